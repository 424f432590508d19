"""diffusers / transformers folders -> one mi_jax checkpoint ready for training and generation.

Layout of an import folder (the layout of a training run, so every run reader takes it):

    <out>/
      mi_jax_import.json        the import report (sources, imported and new modules)
      checkpoints/0/            an orbax CheckpointManager step, items:
        state/                  {"params": DiT params, "vae": VAE params, "wav2vec2": ...}
                                (StandardSave; "vae" / "wav2vec2" only when imported)
        config/                 JSON {"model": DiTConfig, "vae": VAEConfig, "wav2vec2":
                                Wav2Vec2Config, "wav2vec2_source_config": the transformers
                                config.json, "import": the report} (configs as dicts, or null)

Why a run's layout rather than a format of its own: `init.checkpoint=<out>` in a training
config (`load_run_params`) and `export` read it unchanged. Output goes to a temporary sibling
folder that is renamed into place, so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import traverse_util

from mi_jax import atomic
from mi_jax.convert.checkpoint import read_config, restore_state, step_dir
from mi_jax.convert.hunyuan import DIFFUSERS_CLASS as DIT_CLASS
from mi_jax.convert.hunyuan import WEIGHTS_NAME, abstract_dit_params, dit_name_map, is_audio_path
from mi_jax.convert.hunyuan import load_diffusers_transformer
from mi_jax.convert.name_map import import_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_json
from mi_jax.convert.vae import DIFFUSERS_CLASS as VAE_CLASS
from mi_jax.convert.vae import load_diffusers_vae
from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2
from mi_jax.models.dit_config import DIFFUSERS_FIELDS, DiTConfig
from mi_jax.models.vae import VAEConfig, abstract_vae_params
from mi_jax.models.wav2vec2 import Wav2Vec2Config
from mi_jax.models.wav2vec2 import abstract_params as abstract_wav2vec2_params
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings

REPORT_NAME = "mi_jax_import.json"
AUDIO_CLASS = "MagicInfiniteAudio"  # out/audio/config.json of an export (see export.py)
AUDIO_FIELDS = tuple(f.name for f in dataclasses.fields(DiTConfig) if f.name.startswith("audio_"))
PARAM_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


# ------------------------------------------------------------------ reading back


def load_imported(out_dir: str, *, mesh=None, rules=DEFAULT_RULES) -> dict:
    """Reads an `import_weights` folder back.

    Args:
      out_dir: the folder `import_weights` wrote.
      mesh: None (default): parameters land on the first device; a `Mesh`: sharded by their
        logical axis names, as the trainer places them.
      rules: the logical-axis rules for `mesh` (default `DEFAULT_RULES`).

    Returns:
      `{"dit_config": DiTConfig, "dit": params, "vae_config": VAEConfig | None, "vae": params |
      None, "wav2vec2_config": Wav2Vec2Config | None, "wav2vec2": params | None, "report": dict}`.

    Raises:
      CheckpointError: `out_dir` is not a checkpoint, or is a training run rather than an import.
    """
    step = step_dir(out_dir)
    cfg = read_config(step)
    if "import" not in cfg:
        raise CheckpointError(
            f"{out_dir}: a training run, not an import_weights folder; use export() or load_run_params."
        )
    out = {"report": cfg["import"], "dit_config": DiTConfig.coerce(cfg["model"])}
    models = {"dit": (out["dit_config"], lambda c: abstract_dit_params(c))}
    if cfg.get("vae"):
        out["vae_config"] = VAEConfig(**cfg["vae"])
        models["vae"] = (out["vae_config"], abstract_vae_params)
    if cfg.get("wav2vec2"):
        out["wav2vec2_config"] = Wav2Vec2Config(**cfg["wav2vec2"])
        models["wav2vec2"] = (out["wav2vec2_config"], abstract_wav2vec2_params)
    target, shardings = {}, {}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for name, (config, abstract_fn) in models.items():
        boxed = abstract_fn(config)
        key = "params" if name == "dit" else name
        target[key] = nn.unbox(boxed)
        shardings[key] = (logical_shardings(boxed, mesh, rules) if mesh is not None
                          else jax.tree.map(lambda _: device, target[key]))
    state = restore_state(step, target, shardings)
    out["dit"] = state["params"]
    out["vae"] = state.get("vae")
    out["wav2vec2"] = state.get("wav2vec2")
    out.setdefault("vae_config", None)
    out.setdefault("wav2vec2_config", None)
    return out


# ------------------------------------------------------------------ import


def _config_kind(path: str) -> str:
    cfg = read_json(os.path.join(path, "config.json"))
    return cfg.get("_class_name") or cfg.get("model_type") or "unknown model"


def _expect(path: str, want: str, what: str, folder: str) -> None:
    """Fails early, naming both types, when a folder holds another model than `want`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder (the {what} folder).")
    found = _config_kind(path)
    if found != want:
        raise CheckpointError(
            f"{path}: config.json describes a {found!r}, not a {want!r}; pass the {what} folder "
            f"(e.g. <model>/{folder})."
        )


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _modules(paths, depth: int) -> list[str]:
    return sorted({"/".join(p[:depth]) for p in paths})


def _import_audio(audio_dir: str, config: DiTConfig, params: dict, param_dtype) -> dict:
    """Replaces the fresh audio modules with the ones of an exported `out/audio` folder."""
    tensors = SafetensorsFolder(audio_dir, WEIGHTS_NAME)
    audio = import_params(
        nn.unbox(abstract_dit_params(config)), tensors, dit_name_map(config), source=audio_dir,
        dtype=param_dtype, skip=lambda p: not is_audio_path(p),
    )
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(audio))
    return traverse_util.unflatten_dict(flat)


def import_weights(
    transformer_dir: str,
    out_dir: str,
    *,
    vae_dir: str | None = None,
    wav2vec_dir: str | None = None,
    audio_dir: str | None = None,
    config_overrides: Mapping | None = None,
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Imports PyTorch weights (safetensors only) into one mi_jax checkpoint folder.

    `mi-jax import-weights`. Everything is read and checked before anything is written; the
    folder appears whole or not at all.

    Args:
      transformer_dir: a diffusers `HunyuanVideoTransformer3DModel` folder (config.json +
        safetensors, sharded or not).
      out_dir: the checkpoint folder to write.
      vae_dir: an `AutoencoderKLHunyuanVideo` folder (default None: no VAE).
      wav2vec_dir: a transformers `Wav2Vec2Model` (or task model) folder (default None).
      audio_dir: an `out/audio` folder of `export` (trained MagicInfinite audio modules). None
        (default): the audio modules of `config_overrides["audio_blocks"] > 0` are initialised
        fresh from `seed` (zero output projection: the backbone's output is unchanged).
      config_overrides: DiTConfig fields that config.json does not hold (audio_*, dtype,
        scan_layers, ...); architecture fields come from config.json and cannot be overridden.
      dtype: parameter dtype of every model, "fp32" or "bf16" (default None: float32).
      seed: the seed of freshly initialised modules (default 0).
      overwrite: replace an existing `out_dir`, only once the new one is complete (default False).

    Returns:
      The report (also saved as `<out_dir>/mi_jax_import.json`): per model the source, the
      imported modules / tensors / parameter count and the newly initialised modules.

    Raises:
      CheckpointError: a folder of the wrong model, an override of an architecture field, an
        audio folder with unmerged LoRA or other audio sizes; `WeightMismatchError` (a
        `CheckpointError`) for missing, unexpected or mis-shaped tensors.
      ValueError: an unknown `dtype`.
      FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    out_dir = atomic.check_new_folder(out_dir, overwrite)
    overrides = dict(config_overrides or {})
    fixed = sorted(set(overrides) & set(DIFFUSERS_FIELDS))
    if fixed:
        raise CheckpointError(
            f"config_overrides {fixed}: these come from {transformer_dir}/config.json (they fix the "
            "weights' shapes) and cannot be overridden; only audio_* and run fields (dtype, "
            "scan_layers, ...) can."
        )
    param_dtype = PARAM_DTYPES.get(str(dtype).lower()) if dtype is not None else None
    if dtype is not None and param_dtype is None:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(PARAM_DTYPES)}")
    if param_dtype:
        overrides.setdefault("param_dtype", param_dtype)
    if audio_dir is not None:
        _expect(audio_dir, AUDIO_CLASS, "MagicInfinite audio", "audio")
        audio_cfg = read_json(os.path.join(audio_dir, "config.json"))
        if audio_cfg.get("lora"):
            raise CheckpointError(
                f"{audio_dir}: belongs to an export with unmerged LoRA factors; re-export with "
                "merge_lora=True to import it."
            )
        for k in AUDIO_FIELDS:
            if k in overrides and overrides[k] != audio_cfg[k]:
                raise CheckpointError(f"config_overrides {k}={overrides[k]} but {audio_dir} has {k}={audio_cfg[k]}.")
            overrides[k] = audio_cfg[k]

    _expect(transformer_dir, DIT_CLASS, "transformer", "transformer")
    if vae_dir is not None:
        _expect(vae_dir, VAE_CLASS, "VAE", "vae")
    if wav2vec_dir is not None:
        _expect(wav2vec_dir, "wav2vec2", "Wav2Vec2", "wav2vec2")

    # read and check everything before writing anything
    config, dit = load_diffusers_transformer(transformer_dir, rng=jax.random.key(seed), **overrides)
    flat = traverse_util.flatten_dict(dit)
    backbone = [p for p in flat if not is_audio_path(p)]
    audio = [p for p in flat if is_audio_path(p)]
    if audio_dir is not None:
        dit = _import_audio(audio_dir, config, dit, config.param_dtype)
    n_keys = sum(len(dit_name_map(config).torch_keys(p, flat[p].shape)) for p in backbone)
    report = {
        "out_dir": out_dir,
        "dit": {
            "source": os.path.abspath(transformer_dir),
            "imported": {"modules": _modules(backbone, 1), "tensors": n_keys,
                         "parameters": _count([flat[p] for p in backbone])},
            "new": {"modules": [] if audio_dir else _modules(audio, 2),
                    "parameters": 0 if audio_dir else _count([flat[p] for p in audio])},
        },
        "audio": {"source": os.path.abspath(audio_dir), "modules": _modules(audio, 2)} if audio_dir else None,
        "vae": None,
        "wav2vec2": None,
    }
    state = {"params": dit}
    cfg_json = {"model": dataclasses.asdict(config), "vae": None, "wav2vec2": None, "wav2vec2_source_config": None}
    if vae_dir is not None:
        vae_config, state["vae"] = load_diffusers_vae(vae_dir, dtype=param_dtype)
        cfg_json["vae"] = dataclasses.asdict(vae_config)
        report["vae"] = {"source": os.path.abspath(vae_dir), "parameters": _count(state["vae"])}
    if wav2vec_dir is not None:
        w_config, state["wav2vec2"] = load_transformers_wav2vec2(wav2vec_dir, dtype=param_dtype)
        cfg_json["wav2vec2"] = dataclasses.asdict(w_config)
        cfg_json["wav2vec2_source_config"] = read_json(os.path.join(wav2vec_dir, "config.json"))
        report["wav2vec2"] = {"source": os.path.abspath(wav2vec_dir), "parameters": _count(state["wav2vec2"])}
    cfg_json["import"] = report

    with atomic.folder(out_dir) as tmp:
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
        with ocp.CheckpointManager(os.path.join(tmp, "checkpoints"), options=options) as manager:
            manager.save(0, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg_json)))
            manager.wait_until_finished()
        with open(os.path.join(tmp, REPORT_NAME), "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(report: Mapping) -> str:
    """A few human-readable lines of an import report (for the CLI)."""
    dit = report["dit"]
    lines = [
        f"imported {report['out_dir']}",
        f"  transformer from {dit['source']}: {dit['imported']['tensors']} tensors, "
        f"{dit['imported']['parameters']:,} parameters ({', '.join(dit['imported']['modules'])})",
    ]
    if dit["new"]["modules"]:
        lines.append(f"  new, freshly initialised: {dit['new']['parameters']:,} parameters in "
                     + ", ".join(dit["new"]["modules"]))
    if report.get("audio"):
        lines.append(f"  audio modules from {report['audio']['source']}: " + ", ".join(report["audio"]["modules"]))
    for name in ("vae", "wav2vec2"):
        if report.get(name):
            lines.append(f"  {name} from {report[name]['source']}: {report[name]['parameters']:,} parameters")
    return "\n".join(lines)
