"""The `lorahub` command line: thin Typer commands over the library API."""
