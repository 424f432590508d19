"""HunyuanVideo transformer <-> diffusers `HunyuanVideoTransformer3DModel` (safetensors).

MagicInfinite's audio modules (`audio_projector`, `audio_attn` in the last `audio_blocks`
single-stream blocks) have no diffusers counterpart: loading a HunyuanVideo checkpoint into
an audio config initialises them fresh (the zero-initialised output projection keeps the
backbone's output unchanged) and logs which ones.
"""

from __future__ import annotations

import logging
import os

import jax
from flax import linen as nn
from flax import traverse_util

from mi_jax.convert.name_map import NameMap, import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_json
from mi_jax.models.dit import DiT, example_inputs
from mi_jax.models.dit_config import DiTConfig
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings

log = logging.getLogger(__name__)

DIFFUSERS_CLASS = "HunyuanVideoTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model"
_RENAMES = (
    (r"\b(refiner_blocks|transformer_blocks|single_transformer_blocks)_(\d+)\b", r"\1.\2"),
    (r"\bto_out_0\b", "to_out.0"),
    (r"\bnet_0\b", "net.0.proj"),
    (r"\bnet_2\b", "net.2"),
    (r"^context_embedder\.(timestep_embedder|text_embedder)\b", r"context_embedder.time_text_embed.\1"),
    (r"^x_embedder\.", "x_embedder.proj."),
)


def dit_name_map(config: DiTConfig) -> NameMap:
    """The flax <-> diffusers name map of a DiT with this config (the audio stack continues
    diffusers' `single_transformer_blocks` list)."""
    return NameMap(
        renames=_RENAMES,
        stacked=("transformer_blocks", "single_transformer_blocks", "audio_single_blocks"),
        aliases=(("audio_single_blocks", "single_transformer_blocks", config.num_single_layers - config.audio_blocks),),
    )


DIT_NAME_MAP = dit_name_map(DiTConfig())


def is_audio_path(path: tuple[str, ...]) -> bool:
    """Parameters MagicInfinite adds to HunyuanVideo (not in diffusers checkpoints)."""
    return path[0] == "audio_projector" or "audio_attn" in path


def abstract_dit_params(config: DiTConfig):
    """Parameter shapes (boxed with logical axis names) without allocating anything."""
    model = DiT(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **example_inputs(config)))["params"]


def init_subset(config: DiTConfig, rng, keep, shardings=None) -> dict:
    """The parameters at paths where `keep(path)` holds, as a full `DiT(config).init(rng)`
    would make them, without allocating the others (XLA drops the unused initialisers)."""
    model = DiT(config)

    def run(key):
        params = nn.unbox(model.init(key, **example_inputs(config))["params"])
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})

    out_sh = None
    if shardings is not None:
        flat = traverse_util.flatten_dict(shardings)
        out_sh = traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})
    return jax.jit(run, out_shardings=out_sh)(rng)


def load_diffusers_transformer(path: str, *, mesh=None, rules=DEFAULT_RULES, rng=None, **overrides):
    """Reads a diffusers `HunyuanVideoTransformer3DModel` folder into `(DiTConfig, params)`.

    Tensors are memory-mapped and copied straight into (sharded, when `mesh` is given) device
    arrays; per-layer weights are stacked for the scanned blocks (`scan_layers=True`, the
    default).

    Args:
      path: the folder (config.json + safetensors, a sharded index too).
      mesh: shard the parameters by their logical names under `rules` (default None: the
        default device).
      rules: the logical-axis rules (default `DEFAULT_RULES`).
      rng: the key of MagicInfinite's fresh audio modules (default None: `jax.random.key(0)`).
      **overrides: any DiTConfig field that is not in config.json, such as `dtype="bfloat16"`,
        `param_dtype=...`, `scan_layers=False`, `remat_policy="full"` or `audio_blocks=N`.

    Returns:
      `(DiTConfig, params)`, with the audio modules freshly initialised when `audio_blocks > 0`.

    Raises:
      CheckpointError: config.json describes another model.
      WeightMismatchError: every missing / unexpected / mis-shaped key.
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
        nn.unbox(abstract), tensors, dit_name_map(config), source=path, shardings=shardings,
        dtype=config.param_dtype, skip=is_audio_path,
    )
    if config.audio_blocks:
        fresh = init_subset(config, rng if rng is not None else jax.random.key(0), is_audio_path, shardings)
        names = sorted({"/".join(p[:2]) for p in traverse_util.flatten_dict(fresh)})
        log.info("%s: initialised new MagicInfinite modules: %s", path, ", ".join(names))
        merged = traverse_util.flatten_dict(params)
        merged.update(traverse_util.flatten_dict(fresh))
        params = traverse_util.unflatten_dict(merged)
    return config, params
