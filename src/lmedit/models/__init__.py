"""Model loading, the architecture table and token positions."""
