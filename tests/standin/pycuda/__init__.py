"""API stand-in for pycuda (not a GPU; see tests/standin/README.md)."""

VERSION_TEXT = "2024.1"
