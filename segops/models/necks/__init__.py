"""Necks between backbone and decode head."""
