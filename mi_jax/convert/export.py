"""mi_jax checkpoint -> PyTorch folders, streamed tensor by tensor.

    <out>/transformer/   diffusers HunyuanVideoTransformer3DModel (config.json + safetensors,
                         sharded past max_shard_size with diffusion_pytorch_model.safetensors.index.json)
    <out>/vae/           diffusers AutoencoderKLHunyuanVideo (when the checkpoint holds one)
    <out>/wav2vec2/      transformers Wav2Vec2Model (when the checkpoint holds one)
    <out>/audio/         MagicInfinite's audio projector + per-block audio cross-attention
                         (config.json + safetensors), run by mi_jax.convert.torch_audio
    <out>/lora/          pytorch_lora_weights.safetensors: unmerged LoRA factors, PEFT names
                         (`transformer.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r];
                         `audio.<module>...` for the audio modules) + config.json (rank, scale)

Every tensor key comes from the model's one name map (`dit_name_map`, `VAE_NAME_MAP`, ...),
so export is import read backwards. The audio keys continue diffusers' naming
(`single_transformer_blocks.{i}.audio_attn.to_q.weight`, `audio_projector.proj_frame.weight`).

Streaming: the shard plan (keys, shapes, byte offsets) follows from the parameter shapes alone,
so each safetensors header is written first and each tensor appended as `export_params`
yields it: one tensor at a time in host memory, never a shard buffer or a second model copy.
The format is written here rather than with `safetensors.torch.save_file` because that needs
the whole shard as torch tensors in memory (and torch installed); numpy + ml_dtypes cover
bf16. LoRA merging happens per kernel (per layer of a scanned stack) while streaming.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from mi_jax import atomic
from mi_jax.convert.checkpoint import read_config, restore_state, restore_weights, state_metadata, step_dir
from mi_jax.convert.hunyuan import DIFFUSERS_CLASS as DIT_CLASS
from mi_jax.convert.hunyuan import WEIGHTS_NAME, dit_name_map, is_audio_path
from mi_jax.convert.import_weights import AUDIO_CLASS, AUDIO_FIELDS
# torch_shape: the PyTorch shape of a flax leaf, from its shape alone (the plan reads no data)
from mi_jax.convert.name_map import NameMap, torch_shape, export_params
from mi_jax.convert.safetensors_io import CheckpointError
from mi_jax.convert.vae import VAE_NAME_MAP
from mi_jax.convert.wav2vec2 import wav2vec2_name_map
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import VAEConfig
from mi_jax.models.wav2vec2 import Wav2Vec2Config
from mi_jax.nn.lora import is_lora_run

EXPORT_DTYPES = {"fp32": np.float32, "float32": np.float32, "bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16}
_ST_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
LORA_WEIGHTS = "pytorch_lora_weights"  # diffusers' LoRA file name
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or "10GB" / "500MiB" (decimal / binary units, as Hugging Face)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes (an int) or e.g. '10GB', '500MiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.42.1"  # the version the export is tested with; diffusers does not check it


# ------------------------------------------------------------------ streaming safetensors


def tensor_plan(params: Mapping, name_map: NameMap) -> list[tuple[str, tuple[int, ...]]]:
    """`(torch_key, torch_shape)` in the order `export_params(params, name_map)` yields them,
    from shapes only (nothing is read)."""
    plan = []
    for path, value in traverse_util.flatten_dict(params).items():
        shape = tuple(value.shape)
        per_layer = shape[1:] if name_map.is_stacked(path) else shape
        plan += [(k, torch_shape(path[-1], per_layer)) for k in name_map.torch_keys(path, shape)]
    keys = [k for k, _ in plan]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise CheckpointError(f"several parameters map to the same PyTorch key(s) {dup}: the name map is ambiguous")
    return plan


def _split_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices per shard, greedily in order (Hugging Face's rule: start a new shard when the next
    tensor would overflow this one; a tensor bigger than the limit gets a shard of its own)."""
    shards, current, used = [], [], 0
    for i, n in enumerate(sizes):
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def write_safetensors(
    out_dir: str,
    weights_name: str,
    plan: list[tuple[str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    dtype=np.float32,
    max_shard_size: int | str = "10GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes `tensors` (yielded in `plan` order) as `<weights_name>.safetensors`, or as
    `<weights_name>-0000i-of-0000n.safetensors` shards + `<weights_name>.safetensors.index.json`
    past `max_shard_size` (diffusers' / transformers' sharded layout). Holds one tensor at a
    time (cast to `dtype`, made contiguous). Returns the written file names."""
    dtype = np.dtype(dtype)
    itemsize = dtype.itemsize
    sizes = [math.prod(shape) * itemsize for _, shape in plan]
    shards = _split_shards(sizes, parse_size(max_shard_size))
    n = len(shards)
    names = [f"{weights_name}.safetensors"] if n == 1 else [
        f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    stream: Iterator = iter(tensors)
    weight_map = {}
    for name, shard in zip(names, shards):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for i in shard:
            key, shape = plan[i]
            header[key] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, like safetensors' own writer
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for i in shard:
                key, value = next(stream)
                if (key, tuple(value.shape)) != plan[i]:
                    raise RuntimeError(f"export order broke: expected {plan[i]}, got {(key, value.shape)}")
                # the one per-tensor copy: cast + PyTorch layout made contiguous
                data = np.ascontiguousarray(value, dtype=dtype)
                f.write(data.reshape(-1).view(np.uint8))
                del data
    if next(stream, None) is not None:
        raise RuntimeError("export yielded more tensors than planned")
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, f"{weights_name}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def write_model(out_dir: str, params: Mapping, name_map: NameMap, config: Mapping, *, weights_name: str,
                dtype, max_shard_size, metadata=None) -> dict:
    """One folder: `config.json` + the streamed safetensors of `params` under `name_map`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    plan = tensor_plan(params, name_map)
    files = write_safetensors(out_dir, weights_name, plan, export_params(params, name_map), dtype=dtype,
                              max_shard_size=max_shard_size, metadata=metadata)
    return {"path": out_dir, "files": files, "tensors": len(plan)}


# ------------------------------------------------------------------ LoRA


class LoraMerged:
    """A kernel `w` read as `w + scale * a @ b` (`lora_apply`'s maths), computed when read and,
    for a scanned stack `[L, in, out]`, one layer at a time: never a merged copy of the tree."""

    def __init__(self, w, a, b, scale: float):
        self.w, self.a, self.b, self.scale = w, a, b, scale
        self.shape, self.dtype = tuple(w.shape), w.dtype

    def _merge(self, w, a, b) -> np.ndarray:
        delta = jnp.matmul(jnp.asarray(a), jnp.asarray(b), precision=jax.lax.Precision.HIGHEST)
        merged = jnp.asarray(w).astype(jnp.float32) + self.scale * delta.astype(jnp.float32)
        return np.asarray(merged.astype(w.dtype))

    def __getitem__(self, i) -> np.ndarray:
        return self._merge(self.w[i], self.a[i], self.b[i])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._merge(self.w, self.a, self.b)
        return out if dtype is None else out.astype(dtype)


def split_lora(params: Mapping) -> tuple[dict, dict | None]:
    """`{"base", "lora"}` (a LoRA training run) -> (base, {kernel path: (a, b)}); else (params, None)."""
    if not is_lora_run(params):
        return dict(params), None
    base = traverse_util.flatten_dict(params["base"])
    factors = traverse_util.flatten_dict(params["lora"])
    lora = {}
    for path in sorted({p[:-1] for p in factors}):
        if path not in base:
            raise CheckpointError(f"LoRA factors for {'/'.join(path)}, which the model does not have")
        lora[path] = (factors[path + ("a",)], factors[path + ("b",)])
    return params["base"], lora


def merge_lazily(base: Mapping, lora: Mapping, scale: float) -> dict:
    """`base` with every LoRA-adapted kernel replaced by a `LoraMerged` (`W + scale * a @ b`,
    computed only when the tensor is written)."""
    flat = traverse_util.flatten_dict(base)
    for path, (a, b) in lora.items():
        flat[path] = LoraMerged(flat[path], a, b, scale)
    return traverse_util.unflatten_dict(flat)


def _lora_tree(lora: Mapping, keep) -> dict:
    """LoRA factors as kernels of `lora_A` / `lora_B` modules under the adapted module, so the
    model's name map gives PEFT's keys (`...proj_out.lora_A.weight`, transposed like a Linear)."""
    flat = {}
    for path, (a, b) in lora.items():
        if keep(path):
            flat[path[:-1] + ("lora_A", "kernel")] = a
            flat[path[:-1] + ("lora_B", "kernel")] = b
    return traverse_util.unflatten_dict(flat)


def _prefixed(name_map: NameMap, prefix: str) -> NameMap:
    """`name_map` with `prefix` before every key (the last rename, after the anchored ones)."""
    return NameMap(renames=name_map.renames + ((r"^", prefix),), stacked=name_map.stacked, aliases=name_map.aliases)


# ------------------------------------------------------------------ reading checkpoints


def open_checkpoint(checkpoint: str, *, which: str = "params") -> dict:
    """Reads what export needs from an import_weights folder or a training run (newest step),
    as host numpy arrays.

    which: "params" (the raw weights) or "ema" (a run's EMA; frozen leaves, which have no EMA,
    come from the params). Returns {"config": DiTConfig, "params": tree (maybe {"base",
    "lora"}), "vae_config", "vae", "wav2vec2_config", "wav2vec2", "wav2vec2_source_config",
    "step_dir"}.
    """
    step = step_dir(checkpoint)
    cfg = read_config(step)
    if "model" not in cfg:
        raise CheckpointError(f"{step}: its config has no `model` entry; not an mi_jax checkpoint.")
    meta = state_metadata(step)
    if "params" not in meta:
        raise CheckpointError(f"{step}: the saved state has no `params`; not an mi_jax checkpoint.")
    params = restore_weights(step, meta["params"], which=which)
    parts = {name: meta[name] for name in ("vae", "wav2vec2") if meta.get(name) is not None}
    state = restore_state(step, parts) if parts else {}
    return {
        "step_dir": step,
        "config": DiTConfig.coerce(cfg["model"]),
        "params": params,
        "vae_config": VAEConfig(**cfg["vae"]) if cfg.get("vae") and "vae" in state else None,
        "vae": state.get("vae"),
        "wav2vec2_config": Wav2Vec2Config(**cfg["wav2vec2"]) if cfg.get("wav2vec2") and "wav2vec2" in state else None,
        "wav2vec2": state.get("wav2vec2"),
        "wav2vec2_source_config": cfg.get("wav2vec2_source_config"),
    }


# ------------------------------------------------------------------ export


def audio_config(config: DiTConfig, lora: dict | None = None) -> dict:
    """out/audio/config.json: what `torch_audio.MagicInfiniteAudio` needs to rebuild the modules."""
    return {
        "_class_name": AUDIO_CLASS,
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "num_single_layers": config.num_single_layers,
        "first_audio_block": config.num_single_layers - config.audio_blocks,
        "patch_size": config.patch_size,
        "patch_size_t": config.patch_size_t,
        **{k: getattr(config, k) for k in AUDIO_FIELDS},
        "lora": lora,
    }


def export(
    checkpoint: str,
    out_dir: str,
    *,
    dtype: str = "fp32",
    merge_lora: bool = False,
    which: str = "params",
    max_shard_size: int | str = "10GB",
    lora_scale: float = 1.0,
    overwrite: bool = False,
) -> dict:
    """Exports an mi_jax checkpoint to PyTorch folders under `out_dir` (layout: module docstring).

    `mi-jax export`. Tensors are read and written one at a time; nothing is left behind when
    it fails.

    Args:
      checkpoint: an import_weights folder, a training run folder (its newest checkpoint) or a
        `<run>/checkpoints/<step>` folder.
      out_dir: the folder to write (`transformer/`, `audio/`, `lora/`, `vae/`, `wav2vec2/`).
      dtype: "fp32" (default) or "bf16", for every written tensor.
      merge_lora: with LoRA factors (a `{"base", "lora"}` run), write `W + lora_scale * a @ b`
        into the transformer / audio weights; False (default) writes the base weights and the
        factors to `out/lora/`.
      which: "params" (default) or "ema" (a run's EMA weights).
      max_shard_size: bytes or "10GB"-style (default "10GB"); larger models are sharded with an
        index json.
      lora_scale: the LoRA factors' scale, alpha / rank (default 1.0).
      overwrite: replace an existing `out_dir`, only once the new one is complete (default False).

    Returns:
      A report `{"out_dir", "checkpoint", "which", "dtype", "transformer", "audio", "lora",
      "vae", "wav2vec2"}` with the folders, files and tensor counts (None for parts not written).

    Raises:
      ValueError: an unknown `dtype` or `which`.
      CheckpointError: `checkpoint` is not an mi_jax checkpoint, or holds no EMA weights with
        `which="ema"`.
      FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    np_dtype = EXPORT_DTYPES.get(str(dtype).lower())
    if np_dtype is None:
        raise ValueError(f"dtype={dtype!r}; choose 'fp32' or 'bf16'")
    out_dir = atomic.check_new_folder(out_dir, overwrite)
    src = open_checkpoint(checkpoint, which=which)
    config: DiTConfig = src["config"]
    base, lora = split_lora(src["params"])
    dit = merge_lazily(base, lora, lora_scale) if (lora and merge_lora) else base
    name_map = dit_name_map(config)
    flat = traverse_util.flatten_dict(dit)
    backbone = traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_audio_path(p)})
    audio = traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_audio_path(p)})
    kw = dict(dtype=np_dtype, max_shard_size=max_shard_size)
    report = {"out_dir": out_dir, "checkpoint": src["step_dir"], "which": which,
              "dtype": np.dtype(np_dtype).name, "audio": None, "lora": None, "vae": None, "wav2vec2": None}

    with atomic.folder(out_dir) as tmp:
        t_cfg = {"_class_name": DIT_CLASS, "_diffusers_version": _diffusers_version(), **config.to_diffusers()}
        report["transformer"] = write_model(os.path.join(tmp, "transformer"), backbone, name_map, t_cfg,
                                            weights_name=WEIGHTS_NAME, **kw)
        lora_info = None
        if lora and not merge_lora:
            rank = int(next(iter(lora.values()))[0].shape[-1])
            lora_info = {"rank": rank, "scale": lora_scale, "file": f"../lora/{LORA_WEIGHTS}.safetensors"}
            factors = {
                "transformer": (_lora_tree(lora, lambda p: not is_audio_path(p)), _prefixed(name_map, "transformer.")),
                "audio": (_lora_tree(lora, is_audio_path), _prefixed(name_map, "audio.")),
            }
            trees = {k: v for k, v in factors.items() if v[0]}
            # one file, both prefixes: stream the two trees one after the other
            plan = sum((tensor_plan(t, m) for t, m in trees.values()), [])
            stream = (kv for t, m in trees.values() for kv in export_params(t, m))
            path = os.path.join(tmp, "lora")
            os.makedirs(path)
            files = write_safetensors(path, LORA_WEIGHTS, plan, stream, **kw)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({"rank": rank, "scale": lora_scale, "targets": sorted(trees)}, f, indent=2)
            report["lora"] = {"path": path, "files": files, "tensors": len(plan), "rank": rank}
        if audio:
            report["audio"] = write_model(os.path.join(tmp, "audio"), audio, name_map, audio_config(config, lora_info),
                                          weights_name=WEIGHTS_NAME, **kw)
        if src["vae"] is not None:
            v_cfg = {**src["vae_config"].to_diffusers(), "_diffusers_version": _diffusers_version()}
            report["vae"] = write_model(os.path.join(tmp, "vae"), src["vae"], VAE_NAME_MAP, v_cfg,
                                        weights_name=WEIGHTS_NAME, **kw)
        if src["wav2vec2"] is not None:
            w_cfg = dict(src["wav2vec2_source_config"]
                         or {"model_type": "wav2vec2", **dataclasses.asdict(src["wav2vec2_config"])})
            w_cfg["architectures"] = ["Wav2Vec2Model"]  # the heads of task models are not kept
            w_cfg["torch_dtype" if "torch_dtype" in w_cfg else "dtype"] = np.dtype(np_dtype).name
            report["wav2vec2"] = write_model(os.path.join(tmp, "wav2vec2"), src["wav2vec2"], wav2vec2_name_map(),
                                             w_cfg, weights_name="model", **kw)
    for part in ("transformer", "audio", "lora", "vae", "wav2vec2"):
        if report[part]:
            report[part]["path"] = report[part]["path"].replace(tmp, out_dir)
    return report
