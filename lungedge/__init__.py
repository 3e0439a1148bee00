"""lungedge: lung-image classifiers from training to a cheap device."""

__version__ = "0.1.0"
