"""One name map per model, used in both directions (import from and export to PyTorch).

A flax parameter path such as `("transformer_blocks", "attn", "to_out_0", "kernel")` maps to
PyTorch key(s) by three mechanical steps, so a map is only a few lines per model:

1. module renames: regex substitutions on the dotted module path (`to_out_0` -> `to_out.0`),
2. stacked (scanned) collections: a flax module `transformer_blocks` whose leaves carry a
   leading layer axis becomes `transformer_blocks.{i}` for every i,
3. leaf names: `kernel`/`scale`/`embedding` -> `weight`, `bias` -> `bias`.

Tensor transforms follow from the leaf: a `kernel` is PyTorch's `[out, in, *k]` weight stored
as flax's `[*k, in, out]` (a Linear is the k = () case). Models with extra needs (weight norm,
fused qkv) store the tensor in PyTorch layout under a non-`kernel` leaf name and rename it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import traverse_util

from mi_jax.convert.safetensors_io import CheckpointError

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_to_flax_kernel(w: np.ndarray) -> np.ndarray:
    """`[out, in, *k]` -> `[*k, in, out]`."""
    return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def flax_to_torch_kernel(w: np.ndarray) -> np.ndarray:
    """`[*k, in, out]` -> `[out, in, *k]`."""
    n = w.ndim - 2
    return np.transpose(w, (n + 1, n) + tuple(range(n)))


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Maps flax parameter paths to PyTorch state-dict keys.

    renames: (pattern, replacement) regexes applied in order to the dotted key (modules and the
      already-mapped leaf name).
    stacked: flax module names whose leaves have a leading layer axis (from `nn.scan`); the
      PyTorch side has one `name.{i}` entry per layer.
    """

    renames: tuple[tuple[str, str], ...] = ()
    stacked: tuple[str, ...] = ()
    # (flax stack name, torch list name, index offset): a flax stack that continues a PyTorch
    # module list, e.g. the last N single-stream blocks split off to carry audio adapters
    aliases: tuple[tuple[str, str, int], ...] = ()

    def torch_key(self, path: tuple[str, ...], layer: int | None = None) -> str:
        *modules, leaf = path
        head = modules[0]
        for name, target, offset in self.aliases:
            m = re.fullmatch(rf"{name}_(\d+)", head)
            if head == name and layer is not None:
                head, layer = target, layer + offset
            elif m:
                head = f"{target}.{int(m.group(1)) + offset}"
        modules = [head, *modules[1:]]
        if layer is not None:
            modules = [f"{modules[0]}.{layer}", *modules[1:]]
        dotted = ".".join([*modules, _LEAF.get(leaf, leaf)])
        for pattern, repl in self.renames:
            dotted = re.sub(pattern, repl, dotted)
        return dotted

    def is_stacked(self, path: tuple[str, ...]) -> bool:
        return path[0] in self.stacked

    def torch_keys(self, path: tuple[str, ...], shape: tuple[int, ...]) -> list[str]:
        if self.is_stacked(path):
            return [self.torch_key(path, i) for i in range(shape[0])]
        return [self.torch_key(path)]


def to_flax(leaf: str, w: np.ndarray) -> np.ndarray:
    return torch_to_flax_kernel(w) if leaf == "kernel" else w


def to_torch(leaf: str, w: np.ndarray) -> np.ndarray:
    return flax_to_torch_kernel(w) if leaf == "kernel" else w


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf != "kernel":
        return tuple(flax_shape)
    n = len(flax_shape) - 2
    return (flax_shape[n + 1], flax_shape[n]) + tuple(flax_shape[:n])


class WeightMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model; lists every offending key."""

    def __init__(self, source: str, missing, unexpected, misshaped):
        self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), misshaped
        lines = [f"{source}: the checkpoint does not match the model config."]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for key, (want, got) in sorted(misshaped.items()):
            lines.append(f"  mis-shaped: {key}: model expects {want}, checkpoint has {got}")
        lines.append("  Check that config.json belongs to these weights (same model type and sizes).")
        super().__init__("\n".join(lines))


def import_params(
    abstract: Mapping,
    tensors: Mapping[str, np.ndarray],
    name_map: NameMap,
    *,
    source: str,
    shardings: Mapping | None = None,
    dtype=None,
    ignore_unexpected: Callable[[str], bool] | None = None,
    skip: Callable[[tuple[str, ...]], bool] | None = None,
) -> dict:
    """Builds the flax params tree `abstract` (a tree of ShapeDtypeStruct) from PyTorch tensors.

    Every check runs before any data is read. Each array is assembled with
    `jax.make_array_from_callback`, so a process only reads (from the memory map) the slices
    its own devices hold: the full model never lands on one device or one host.

    dtype: cast every parameter to this dtype (default: the dtype of `abstract`'s leaf).
    ignore_unexpected: predicate for checkpoint keys the model deliberately does not use.
    skip: predicate for flax paths that the checkpoint does not hold (new modules); they are
      left out of the result for the caller to initialise.
    """
    flat = {p: v for p, v in traverse_util.flatten_dict(abstract).items() if not (skip and skip(p))}
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    wanted: set[str] = set()
    missing, misshaped = [], {}
    for path, leaf in flat.items():
        keys = name_map.torch_keys(path, leaf.shape)
        stacked = name_map.is_stacked(path)
        per_layer = leaf.shape[1:] if stacked else leaf.shape
        for key in keys:
            wanted.add(key)
            if key not in tensors:
                missing.append(key)
                continue
            want = torch_shape(path[-1], per_layer)
            got = tuple(tensors[key].shape)
            if want != got:
                misshaped[key] = (want, got)
    unexpected = [k for k in tensors if k not in wanted and not (ignore_unexpected and ignore_unexpected(k))]
    if missing or unexpected or misshaped:
        raise WeightMismatchError(source, missing, unexpected, misshaped)

    out = {}
    for path, leaf in flat.items():
        target = np.dtype(dtype or leaf.dtype)
        keys = name_map.torch_keys(path, leaf.shape)

        def one(key, leaf=path[-1]):
            return to_flax(leaf, tensors[key])

        if name_map.is_stacked(path):

            def cb(index, keys=keys, one=one, target=target):
                layers = range(len(keys))[index[0]]
                return np.stack([np.asarray(one(keys[i])[index[1:]], dtype=target) for i in layers])

        else:

            def cb(index, key=keys[0], one=one, target=target):
                return np.asarray(one(key)[index], dtype=target)

        sharding = flat_shardings.get(path) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out[path] = jax.make_array_from_callback(tuple(leaf.shape), sharding, cb)
    return traverse_util.unflatten_dict(out)


def export_params(params: Mapping, name_map: NameMap) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(torch_key, array)` one tensor at a time (PyTorch layout), never a full copy."""
    for path, value in traverse_util.flatten_dict(params).items():
        keys = name_map.torch_keys(path, value.shape)
        if name_map.is_stacked(path):
            for i, key in enumerate(keys):
                yield key, to_torch(path[-1], np.asarray(value[i]))
        else:
            yield keys[0], to_torch(path[-1], np.asarray(value))
