"""Model sources (directory, hub id, GGUF) and per-family adapters."""
