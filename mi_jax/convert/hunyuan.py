"""HunyuanVideo transformer <-> diffusers `HunyuanVideoTransformer3DModel` (safetensors)."""

from __future__ import annotations

import os

import jax
from flax import linen as nn

from mi_jax.convert.name_map import NameMap, import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_json
from mi_jax.models.dit import DiT, example_inputs
from mi_jax.models.dit_config import DiTConfig
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings

DIFFUSERS_CLASS = "HunyuanVideoTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model"

DIT_NAME_MAP = NameMap(
    renames=(
        (r"\b(refiner_blocks|transformer_blocks|single_transformer_blocks)_(\d+)\b", r"\1.\2"),
        (r"\bto_out_0\b", "to_out.0"),
        (r"\bnet_0\b", "net.0.proj"),
        (r"\bnet_2\b", "net.2"),
        (r"^context_embedder\.(timestep_embedder|text_embedder)\b", r"context_embedder.time_text_embed.\1"),
        (r"^x_embedder\.", "x_embedder.proj."),
    ),
    stacked=("transformer_blocks", "single_transformer_blocks"),
)


def abstract_dit_params(config: DiTConfig):
    """Parameter shapes (boxed with logical axis names) without allocating anything."""
    model = DiT(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **example_inputs(config)))["params"]


def load_diffusers_transformer(path: str, *, mesh=None, rules=DEFAULT_RULES, **overrides):
    """Reads a diffusers `HunyuanVideoTransformer3DModel` folder (config.json + safetensors,
    sharded index too) into `(DiTConfig, params)`.

    Tensors are memory-mapped and copied straight into (sharded, when `mesh` is given) device
    arrays; per-layer weights are stacked for the scanned blocks (`scan_layers=True`, the
    default). overrides: DiTConfig run fields such as `dtype="bfloat16"`, `param_dtype=...`,
    `scan_layers=False`, `remat_policy="full"`. Raises `WeightMismatchError` listing every
    missing / unexpected / mis-shaped key.
    """
    cfg_json = read_json(os.path.join(path, "config.json"))
    found = cfg_json.get("_class_name")
    if found != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{path}: config.json describes a {found!r}, not a {DIFFUSERS_CLASS}. Point at the "
            "transformer folder of a HunyuanVideo(-I2V) diffusers checkpoint (e.g. <model>/transformer)."
        )
    config = DiTConfig.from_diffusers(cfg_json, **overrides)
    tensors = SafetensorsFolder(path, WEIGHTS_NAME)
    abstract = abstract_dit_params(config)
    shardings = logical_shardings(abstract, mesh, rules) if mesh is not None else None
    params = import_params(
        nn.unbox(abstract), tensors, DIT_NAME_MAP, source=path, shardings=shardings, dtype=config.param_dtype
    )
    return config, params
