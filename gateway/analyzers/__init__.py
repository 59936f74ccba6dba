"""Analyzers: turn readings into events with reasons (water level and generic series)."""
