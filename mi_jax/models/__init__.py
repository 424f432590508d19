"""Models: the DiT backbone, the Wav2Vec2 audio encoder (and, as they land, the VAE)."""

from mi_jax.models.dit import DiT, example_inputs, image_condition_input
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.wav2vec2 import WAV2VEC2_BASE, Wav2Vec2, Wav2Vec2Config, Wav2Vec2Output

__all__ = [
    "DiT",
    "DiTConfig",
    "WAV2VEC2_BASE",
    "Wav2Vec2",
    "Wav2Vec2Config",
    "Wav2Vec2Output",
    "example_inputs",
    "image_condition_input",
]
