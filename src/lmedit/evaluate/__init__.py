"""Evaluation: scores a model (or a model with a patch applied); never imports methods."""
