"""Placeholder while the module is written (issue #6)."""
TASKS = {}
SOURCES = {}
