"""Development tools (not deployed)."""
