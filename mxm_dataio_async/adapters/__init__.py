"""Adapters: the protocols, and the built-in implementations."""
