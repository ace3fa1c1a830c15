"""NeuraNet: one fabric of the computers you own, for files and neural networks."""

__version__ = "0.1.0"
