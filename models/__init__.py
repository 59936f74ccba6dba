"""Model cards, pre/post-processing and the scripts that build and quantise the models."""
