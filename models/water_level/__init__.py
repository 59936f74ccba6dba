"""The water-level forecaster: feature definition, data split, training and evaluation."""
