"""Precision as converters applied from outside the model; model/ never imports this package."""
