"""Bodies built from a public source (filled in by its builder module)."""
