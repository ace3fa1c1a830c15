"""Pipelines: split one model across several devices to train or serve it."""
