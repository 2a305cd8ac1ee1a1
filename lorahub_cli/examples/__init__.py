"""The small example library shipped in registry/examples/ for `lorahub walkthrough` and the tests."""
