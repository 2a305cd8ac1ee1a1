"""The small example library shipped in registry/examples/ for `lorahub walkthrough` and the tests.

Registry and retrieval only: the adapters' weights are random and their base model is not shipped, so
they cannot be composed (the demo library, lorahub_cli/demo/, can)."""
