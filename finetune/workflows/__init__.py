"""Workflows: several library steps strung together for one verb (the CLI calls these; the library never does)."""
