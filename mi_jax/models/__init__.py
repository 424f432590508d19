"""Models: the DiT backbone (and, as they land, the VAE and the audio path)."""

from mi_jax.models.dit import DiT, example_inputs, image_condition_input
from mi_jax.models.dit_config import DiTConfig

__all__ = ["DiT", "DiTConfig", "example_inputs", "image_condition_input"]
