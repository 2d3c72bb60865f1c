"""Feature networks, Fréchet distance and SWD for the eval mode (lapflow_jax/evaluate.py)."""
