"""progfl: progressive block-wise federated learning for memory-limited devices."""

__version__ = "0.1.0"
