"""Waste image classifier: TrashNet's six classes, pre/post-processing and the citizen result."""
