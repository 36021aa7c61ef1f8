"""Shared mechanisms: hooks, deltas, patches, forward helpers. Each lives here once."""
