"""Pure tensor numerics for weight quantization (no model, no I/O)."""
