"""sweeper: hyperparameter sweeps and experiment tracking for PyTorch image classifiers."""

__version__ = "0.1.0"
