"""mambakit: Mamba (selective state space models) in PyTorch, exact and fast on CPU."""

from . import ops

__version__ = "0.1.0"
__all__ = ["ops"]
