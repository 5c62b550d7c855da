"""Helpers shared by every stage: checkpoint conversion and loading."""
