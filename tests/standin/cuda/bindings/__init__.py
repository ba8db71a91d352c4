"""API stand-in for cuda-python's cuda.bindings (not a GPU; see tests/standin/README.md)."""
