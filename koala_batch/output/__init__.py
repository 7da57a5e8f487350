"""The output: its layout, formats, commit protocol, lease, card and verification."""
