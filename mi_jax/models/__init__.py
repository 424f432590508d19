"""Models: the DiT backbone (with the audio path), the causal 3D VAE, the Wav2Vec2 encoder."""

from mi_jax.models.dit import DiT, example_inputs, image_condition_input
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import HUNYUAN_VIDEO_VAE, CausalVAE, Tiling, VAEConfig, VAEStream
from mi_jax.models.wav2vec2 import WAV2VEC2_BASE, Wav2Vec2, Wav2Vec2Config, Wav2Vec2Output

__all__ = [
    "CausalVAE",
    "DiT",
    "DiTConfig",
    "HUNYUAN_VIDEO_VAE",
    "Tiling",
    "VAEConfig",
    "VAEStream",
    "WAV2VEC2_BASE",
    "Wav2Vec2",
    "Wav2Vec2Config",
    "Wav2Vec2Output",
    "example_inputs",
    "image_condition_input",
]
