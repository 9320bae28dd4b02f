"""pomona: train, tune, evaluate and serve EfficientNet classifiers for apple varieties."""

__version__ = "0.1.0"
