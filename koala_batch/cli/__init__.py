"""The koala-batch command line."""
