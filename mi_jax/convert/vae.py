"""HunyuanVideo VAE <-> diffusers `AutoencoderKLHunyuanVideo` (safetensors)."""

from __future__ import annotations

import os

from flax import linen as nn

from mi_jax.convert.name_map import NameMap, import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_json
from mi_jax.models.vae import VAEConfig, abstract_vae_params
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings

DIFFUSERS_CLASS = "AutoencoderKLHunyuanVideo"
WEIGHTS_NAME = "diffusion_pytorch_model"

# Flax modules are named like the torch ones with `_i` for list entries (`up_blocks_0`), so one
# rename gives every key, e.g. decoder/up_blocks_0/upsamplers_0/conv/conv/kernel ->
# decoder.up_blocks.0.upsamplers.0.conv.conv.weight.
VAE_NAME_MAP = NameMap(
    renames=((r"\b(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)\b", r"\1.\2"),),
)


def load_diffusers_vae(path: str, dtype=None, mesh=None, rules=DEFAULT_RULES):
    """Reads a diffusers `AutoencoderKLHunyuanVideo` folder into `(VAEConfig, params)`.

    Tensors are memory-mapped and copied straight to device.

    Args:
      path: the folder (config.json + safetensors), or a pipeline folder holding `vae/`.
      dtype: parameter dtype (default None: float32, whatever the checkpoint stores).
      mesh: place every parameter with the sharding its logical names give under `rules` (the
        VAE's names are all replicated by default); None (default): the default device.
      rules: the logical-axis rules (default `DEFAULT_RULES`).

    Returns:
      `(VAEConfig, params)`.

    Raises:
      CheckpointError: config.json describes another model.
      WeightMismatchError: every missing / unexpected / mis-shaped key, before reading data.
    """
    path, config = _vae_folder(path)
    abstract = abstract_vae_params(config)
    shardings = logical_shardings(abstract, mesh, rules) if mesh is not None else None
    params = import_params(
        nn.unbox(abstract), SafetensorsFolder(path, WEIGHTS_NAME), VAE_NAME_MAP,
        source=path, shardings=shardings, dtype=dtype,
    )
    return config, params


def read_vae_config(path: str) -> VAEConfig:
    """The `VAEConfig` of a diffusers `AutoencoderKLHunyuanVideo` folder (or of a pipeline
    folder's `vae/`), from its config.json alone: the latent grid (`spatial_factor`,
    `temporal_factor`) without reading any weights."""
    return _vae_folder(path)[1]


def _vae_folder(path: str) -> tuple[str, VAEConfig]:
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")
    cfg_json = read_json(os.path.join(path, "config.json"))
    found = cfg_json.get("_class_name", DIFFUSERS_CLASS)
    if found != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{path}: config.json describes a {found!r}, not a {DIFFUSERS_CLASS}. Point at the vae "
            "folder of a HunyuanVideo diffusers checkpoint (e.g. <model>/vae)."
        )
    return path, VAEConfig.from_diffusers(cfg_json)
