"""Memory-mapped reading of safetensors folders (diffusers / transformers layout).

Why not `safetensors.safe_open(framework="np")`: numpy has no bfloat16, so it refuses the
bf16 files every large checkpoint ships. The format is a little-endian u64 header size, a JSON
header (dtype, shape, byte offsets per tensor) and raw bytes, so a `np.memmap` view with
`ml_dtypes.bfloat16` gives zero-copy tensors of every dtype. Nothing is read until a tensor
(or a slice of it) is touched, and pickle files are never opened.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read as asked; the message says why and what to do."""


def read_header(path: str) -> tuple[int, dict]:
    """Returns (byte offset of the data section, header dict) of one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes).")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class SafetensorsFolder(Mapping):
    """Read-only mapping `name -> np.ndarray` (memory-mapped) over a folder of safetensors.

    Accepts a folder holding `<weights_name>.safetensors`, or a sharded checkpoint with
    `<weights_name>.safetensors.index.json`, or any folder with exactly one `*.safetensors`.
    """

    def __init__(self, path: str, weights_name: str | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such folder. Pass the folder saved by save_pretrained().")
        self.path = path
        self._files = self._find_files(path, weights_name)
        self._index: dict[str, tuple[str, int, dict]] = {}
        for file in self._files:
            start, header = read_header(file)
            for name, info in header.items():
                self._index[name] = (file, start, info)
        self._maps: dict[str, np.memmap] = {}

    @staticmethod
    def _find_files(path: str, weights_name: str | None) -> list[str]:
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        if weights_name is not None:
            indexes = [n for n in indexes if n.startswith(weights_name)]
        if indexes:
            with open(os.path.join(path, indexes[0])) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [n for n in files if not os.path.exists(os.path.join(path, n))]
            if missing:
                raise CheckpointError(
                    f"{path}: the index {indexes[0]} names shard(s) that are not in the folder: "
                    f"{missing}. Copy the missing shard(s) or re-save the model."
                )
            return [os.path.join(path, n) for n in files]
        files = [n for n in names if n.endswith(".safetensors")]
        if weights_name is not None:
            files = [n for n in files if n.startswith(weights_name)] or files
        if len(files) == 1:
            return [os.path.join(path, files[0])]
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if not files and pickles:
            raise CheckpointError(
                f"{path}: only pickle checkpoints found ({pickles}); mi_jax never unpickles weights. "
                "Re-save them as safetensors: model.save_pretrained(dir, safe_serialization=True)."
            )
        if not files:
            raise CheckpointError(f"{path}: no .safetensors file in the folder.")
        raise CheckpointError(
            f"{path}: several .safetensors files ({files}) and no *.safetensors.index.json to say "
            "which belong together."
        )

    def _map(self, file: str) -> np.memmap:
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return self._maps[file]

    def __getitem__(self, name: str) -> np.ndarray:
        file, start, info = self._index[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        begin, end = info["data_offsets"]
        raw = self._map(file)[start + begin : start + end]
        return raw.view(dtype).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][2]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing. A diffusers/transformers folder has a config.json.")
    with open(path) as f:
        return json.load(f)
