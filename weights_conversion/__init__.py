"""PyTorch -> amsam_jax weight conversion (needs the `convert` extra: torch)."""
