"""Leaf helpers used across the package (file writing, state-dict key rules); they import nothing of it."""
