"""mi_jax: MagicInfinite in JAX/Flax."""

__version__ = "0.1.0"
