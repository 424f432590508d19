"""Weights in and out: diffusers / transformers folders (safetensors only) <-> mi_jax params."""

from mi_jax.convert.hunyuan import DIT_NAME_MAP, dit_name_map, load_diffusers_transformer
from mi_jax.convert.name_map import NameMap, WeightMismatchError, export_params, import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder
from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2

__all__ = [
    "CheckpointError",
    "DIT_NAME_MAP",
    "dit_name_map",
    "NameMap",
    "SafetensorsFolder",
    "WeightMismatchError",
    "export_params",
    "import_params",
    "load_diffusers_transformer",
    "load_transformers_wav2vec2",
]
