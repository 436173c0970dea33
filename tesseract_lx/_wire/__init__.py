"""What client and server share: array encoding, paths, the schema and `x-tesseract-lx`."""
