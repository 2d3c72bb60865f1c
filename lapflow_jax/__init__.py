"""LapFlow-JAX: Laplacian multi-scale flow matching in JAX/Flax."""

__version__ = "0.1.0"
