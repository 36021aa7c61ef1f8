"""Editing methods: one small module each, registered with ``lmedit.registry.register_method``."""
