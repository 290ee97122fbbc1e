"""Fedscan coordinator."""
