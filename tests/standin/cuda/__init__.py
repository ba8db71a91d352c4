"""API stand-in for cuda-python (not a GPU; see tests/standin/README.md)."""

__version__ = "12.6.0"
