"""Weights in and out: diffusers / transformers folders (safetensors only) <-> mi_jax params."""

from mi_jax.convert.export import export as export_checkpoint
from mi_jax.convert.hunyuan import DIT_NAME_MAP, dit_name_map, load_diffusers_transformer
from mi_jax.convert.import_weights import format_report, import_weights, load_imported
from mi_jax.convert.name_map import NameMap, WeightMismatchError, export_params, import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder
from mi_jax.convert.vae import VAE_NAME_MAP, load_diffusers_vae
from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2

__all__ = [
    "CheckpointError",
    "DIT_NAME_MAP",
    "dit_name_map",
    "NameMap",
    "SafetensorsFolder",
    "VAE_NAME_MAP",
    "WeightMismatchError",
    "export_checkpoint",
    "export_params",
    "format_report",
    "import_params",
    "import_weights",
    "load_imported",
    "load_diffusers_transformer",
    "load_diffusers_vae",
    "load_transformers_wav2vec2",
]
