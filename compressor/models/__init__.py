"""Model sources (directory, hub id, GGUF) and the model families (`families/`: one adapter module per family)."""
