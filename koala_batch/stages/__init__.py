"""The stages of the Ray Data graph: read, expand, generate, encode, write."""
