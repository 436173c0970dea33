"""What client and server share: encoding, paths, the schema, `x-tesseract-lx`."""
