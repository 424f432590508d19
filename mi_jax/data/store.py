"""The training-sample store: fixed-length clip windows in ArrayRecord shards plus a manifest.

A sample is one window of a clip, cut at prepare time (T latent frames, F = 1 + 4(T - 1) video
frames of audio):

    latents       [T, h, w, C]     float32  VAE mean x scaling factor (what the DiT sees)
    ref_latent    [1, h, w, C]     float32  the reference portrait frame's latent
    audio_states  [F, n_layers, A] float16  Wav2Vec2 features per video frame
                  (or [S, F, n_layers, A]: one track per speaker)
    text_embeds   [L, D]           float16
    text_mask     [L]              int32
    pooled        [P]              float32
    face_mask     [T, h, w]        uint8    union over speakers, latent resolution
    mouth_mask    [T, h, w]        uint8
    speaker_masks [S, T, h, w]     uint8
    clip_id str, window int (index within the clip), fps float, truth: a json-able dict

Extra array fields are allowed; every window of a store has the same fields, shapes and dtypes.

Layout of a store directory:

    manifest.json                  fields, shards, record counts, finished clips
    shard-00000.array_record ...   one record per window (group_size 1: random access)

Record format: a msgpack map of `dtype, shape, raw bytes` per array plus the metadata. Decoding
is `np.frombuffer` per field (~13 us for a tiny-config window against ~1.3 ms for `np.load` of an
`np.savez` zip, which parses a zip directory and an .npy header per array); msgpack ships with
flax already. `truth` is kept as a JSON string so it reads back exactly as JSON would give it.

Crash safety: a shard is written under a temporary name, renamed when complete, and only then
listed in the manifest (itself replaced atomically). Shards hold whole clips and a clip is
buffered until its last window arrives, so a clip is either fully in the store or not at all and
`prepare` can skip `done_clips(dir)` on a re-run; a re-run's shards are appended to the store.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import msgpack
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from mi_jax import atomic
from mi_jax.models.vae import TEMPORAL_FACTOR

MANIFEST = "manifest.json"
FORMAT = "mi_jax.sample_store"
VERSION = 1
METADATA = ("clip_id", "window", "fps", "truth")
READER_KEYS = ("index",)  # added by StoreReader; dropped on write so samples can be copied between stores

# name -> (dtype, allowed dimension layouts). Dimension names are bound across fields so that
# e.g. `h` means the same size everywhere; "1" is a literal size and `F` must be 1 + 4(T - 1).
FIELDS: dict[str, tuple[np.dtype, tuple[tuple[str, ...], ...]]] = {
    "latents": (np.dtype(np.float32), (("T", "h", "w", "C"),)),
    "ref_latent": (np.dtype(np.float32), (("1", "h", "w", "C"),)),
    "audio_states": (np.dtype(np.float16), (("F", "n_layers", "A"), ("S", "F", "n_layers", "A"))),
    "text_embeds": (np.dtype(np.float16), (("L", "D"),)),
    "text_mask": (np.dtype(np.int32), (("L",),)),
    "pooled": (np.dtype(np.float32), (("P",),)),
    "face_mask": (np.dtype(np.uint8), (("T", "h", "w"),)),
    "mouth_mask": (np.dtype(np.uint8), (("T", "h", "w"),)),
    "speaker_masks": (np.dtype(np.uint8), (("S", "T", "h", "w"),)),
}
COMPRESSIONS = ("uncompressed", "snappy", "zstd", "brotli")


class StoreError(ValueError):
    """A sample store is missing, malformed, locked, or asked to do something it cannot."""


class SchemaError(StoreError):
    """A sample does not fit the store's fields, shapes or dtypes."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    shape: tuple[int, ...]
    dtype: np.dtype

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.name}

    @classmethod
    def from_json(cls, d: Mapping) -> FieldSpec:
        return cls(tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]))


# ----------------------------------------------------------------------------- records


def _as_field(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if name in FIELDS:
        want = FIELDS[name][0]
        if arr.dtype != want:
            # float32 -> float16 and bool -> uint8 are what callers mean; float -> uint8 is not.
            if not np.can_cast(arr.dtype, want, "same_kind") and arr.dtype != np.bool_:
                raise SchemaError(f"field {name!r} has dtype {arr.dtype}, the store keeps {want}; cast it first")
            arr = arr.astype(want)
    if arr.dtype.kind not in "biuf":
        raise SchemaError(f"field {name!r} has dtype {arr.dtype}; store numeric arrays only (metadata goes in `truth`)")
    return np.ascontiguousarray(arr)


def check_layout(shapes: Mapping[str, Sequence[int]]) -> None:
    """Raises SchemaError unless the known fields are present with consistent dimensions
    (`shapes`: field name -> shape)."""
    missing = [n for n in FIELDS if n not in shapes]
    if missing:
        raise SchemaError(f"sample lacks field(s) {missing}; a sample needs {list(FIELDS)}")
    bound: dict[str, tuple[int, str]] = {}
    for name, (_, layouts) in FIELDS.items():
        shape = tuple(shapes[name])
        dims = next((d for d in layouts if len(d) == len(shape)), None)
        if dims is None:
            want = " or ".join("[" + ", ".join(d) + "]" for d in layouts)
            raise SchemaError(f"field {name!r} must be {want}, got shape {shape}")
        for dim, size in zip(dims, shape):
            if dim.isdigit():
                if size != int(dim):
                    raise SchemaError(f"field {name!r} must have size {dim} in that axis, got shape {shape}")
                continue
            if dim in bound and bound[dim][0] != size:
                raise SchemaError(
                    f"field {name!r} has {dim}={size} (shape {shape}) but {bound[dim][1]!r} has "
                    f"{dim}={bound[dim][0]}; all fields of a window must agree"
                )
            bound.setdefault(dim, (size, name))
    t, f = bound["T"][0], bound["F"][0]
    if f != 1 + TEMPORAL_FACTOR * (t - 1):
        raise SchemaError(
            f"audio_states covers F={f} video frames but T={t} latent frames need F = 1 + {TEMPORAL_FACTOR}(T-1) = "
            f"{1 + TEMPORAL_FACTOR * (t - 1)}"
        )


def encode(sample: Mapping[str, Any]) -> tuple[bytes, dict[str, FieldSpec]]:
    """One window -> (record bytes, its field specs). Arrays: see the module docstring."""
    for key in ("clip_id", "window", "fps"):
        if key not in sample:
            raise SchemaError(f"sample lacks {key!r} (metadata: {METADATA})")
    arrays = {k: _as_field(k, v) for k, v in sample.items() if k not in METADATA + READER_KEYS}
    try:
        truth = json.dumps(sample.get("truth", {}), allow_nan=True)
    except TypeError as e:
        raise SchemaError(f"`truth` must be json-able (lists, not arrays; str keys): {e}") from None
    record = {
        "arrays": {k: [a.dtype.str, list(a.shape), a.tobytes()] for k, a in arrays.items()},
        "clip_id": str(sample["clip_id"]),
        "window": int(sample["window"]),
        "fps": float(sample["fps"]),
        "truth": truth,
    }
    specs = {k: FieldSpec(a.shape, a.dtype) for k, a in arrays.items()}
    return msgpack.packb(record), specs


def decode(raw: bytes, *, writable: bool = True) -> dict[str, Any]:
    """Record bytes -> sample dict. writable=False returns read-only views (no copy): for
    consumers that copy anyway, such as batching."""
    record = msgpack.unpackb(raw)
    out: dict[str, Any] = {}
    for name, (dtype, shape, buf) in record.pop("arrays").items():
        arr = np.frombuffer(buf, np.dtype(dtype)).reshape(shape)
        out[name] = arr.copy() if writable else arr
    out["clip_id"] = record["clip_id"]
    out["window"] = record["window"]
    out["fps"] = record["fps"]
    out["truth"] = json.loads(record["truth"])
    return out


def _check_specs(store: dict[str, FieldSpec], specs: dict[str, FieldSpec], where: str) -> None:
    if set(specs) != set(store):
        raise SchemaError(
            f"{where} has fields {sorted(specs)}, the store has {sorted(store)}; "
            "every window of a store carries the same fields"
        )
    for name, spec in specs.items():
        have = store[name]
        if spec.shape != have.shape:
            raise SchemaError(
                f"{where}: field {name!r} has shape {spec.shape}, the store's is {have.shape}; "
                "cut windows to one length and resolution per store"
            )
        if spec.dtype != have.dtype:
            raise SchemaError(f"{where}: field {name!r} has dtype {spec.dtype}, the store's is {have.dtype}")


# ----------------------------------------------------------------------------- manifest


def _manifest_path(directory) -> str:
    return os.path.join(os.fspath(directory), MANIFEST)


def read_manifest(directory) -> dict:
    path = _manifest_path(directory)
    if not os.path.exists(path):
        raise StoreError(f"no sample store at {os.fspath(directory)!r} (no {MANIFEST}); write one with StoreWriter")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(
            f"{path} is not a {FORMAT} v{VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    return manifest


def done_clips(directory) -> set[str]:
    """Clip ids fully written to the store at `directory` (empty if there is no store yet)."""
    if not os.path.exists(_manifest_path(directory)):
        return set()
    return set(read_manifest(directory)["clips"])


# ----------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes clips' windows into a new or existing store (appending; old shards are untouched).

        with StoreWriter(dir, shard_size=256) as w:
            for clip_id in clips:
                if clip_id not in w.clip_ids:
                    w.write_clip(clip_id, windows_of(clip_id))

    shard_size: records per shard, a target: shards close at the first clip boundary past it.
    compression: ArrayRecord compression, "uncompressed" (default: latents and audio features
    hardly compress and zstd multiplies the read time), "snappy", "zstd:N" or "brotli:N".
    One writer per store at a time (an flock on `dir/.lock`; released if the process dies).
    Leaving a `with` block by an exception drops the open shard; committed shards stay.
    """

    def __init__(self, directory, shard_size: int = 256, compression: str = "uncompressed"):
        if shard_size < 1:
            raise StoreError(f"shard_size must be >= 1, got {shard_size}")
        if compression.split(":")[0] not in COMPRESSIONS:
            raise StoreError(f"compression={compression!r}; choose one of {COMPRESSIONS} (zstd/brotli may add ':level')")
        self.directory = os.fspath(directory)
        self.shard_size = shard_size
        self._options = f"group_size:1,{compression}"  # group_size 1: each record readable alone
        os.makedirs(self.directory, exist_ok=True)
        self._lock = open(os.path.join(self.directory, ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._manifest = self._open_manifest()
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"another StoreWriter holds {self.directory!r}; write a store from one process") from None
        except BaseException:
            self._lock.close()
            raise
        fields = self._manifest["fields"]
        self._specs = None if fields is None else {k: FieldSpec.from_json(v) for k, v in fields.items()}
        self._shard: _OpenShard | None = None
        self._closed = False

    def _open_manifest(self) -> dict:
        for name in os.listdir(self.directory):  # leftovers of a crashed writer (we hold the lock)
            if name.endswith(".tmp"):
                os.remove(os.path.join(self.directory, name))
        if os.path.exists(_manifest_path(self.directory)):
            return read_manifest(self.directory)
        manifest = {"format": FORMAT, "version": VERSION, "fields": None, "num_records": 0, "shards": [], "clips": {}}
        atomic.write_file(_manifest_path(self.directory), json.dumps(manifest).encode())
        return manifest

    @property
    def clip_ids(self) -> set[str]:
        """Clips written so far, committed or in the open shard."""
        pending = self._shard.clips if self._shard else {}
        return set(self._manifest["clips"]) | set(pending)

    @property
    def num_records(self) -> int:
        return self._manifest["num_records"] + (self._shard.count if self._shard else 0)

    def write_clip(self, clip_id: str, samples: Iterable[Mapping[str, Any]]) -> int:
        """Writes all windows of one clip (zero windows records the clip as done). Returns the
        number of windows. Samples lacking `clip_id`/`window` get this id / their position."""
        self._check_open()
        clip_id = str(clip_id)
        if clip_id in self.clip_ids:
            raise StoreError(f"clip {clip_id!r} is already in {self.directory!r}; skip it (see done_clips)")
        records = []  # the whole clip first, so a failure mid-clip leaves nothing behind
        store_specs = self._specs
        for i, sample in enumerate(samples):
            sample = {"clip_id": clip_id, "window": i, **sample}
            if sample["clip_id"] != clip_id:
                raise SchemaError(f"write_clip({clip_id!r}) got a window of clip {sample['clip_id']!r}")
            raw, specs = encode(sample)
            if store_specs is None:  # the store's first window fixes its shapes
                check_layout({k: s.shape for k, s in specs.items()})
                store_specs = specs
            _check_specs(store_specs, specs, f"clip {clip_id!r} window {sample['window']}")
            records.append(raw)
        self._specs = store_specs
        if self._shard is None:
            self._shard = _OpenShard(self.directory, len(self._manifest["shards"]), self._options)
        for raw in records:
            self._shard.writer.write(raw)
        self._shard.count += len(records)
        self._shard.clips[clip_id] = len(records)
        if self._shard.count >= self.shard_size:
            self._commit()
        return len(records)

    def _commit(self) -> None:
        shard, self._shard = self._shard, None
        name = shard.finish()
        m = self._manifest
        if shard.count:
            m["shards"].append({"file": name, "num_records": shard.count})
        m["num_records"] += shard.count
        m["clips"].update(shard.clips)
        if self._specs is not None:
            m["fields"] = {k: s.to_json() for k, s in self._specs.items()}
        self._save_manifest()

    def _save_manifest(self) -> None:
        atomic.write_file(_manifest_path(self.directory), json.dumps(self._manifest, indent=1).encode())

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"StoreWriter({self.directory!r}) is closed")

    def close(self) -> None:
        """Commits the open shard and the manifest, and releases the store."""
        if self._closed:
            return
        if self._shard is not None:
            self._commit()
        self._release()

    def abort(self) -> None:
        """Drops the open shard (its clips are not recorded as done) and releases the store."""
        if self._closed:
            return
        if self._shard is not None:
            self._shard.discard()
            self._shard = None
        self._release()

    def _release(self) -> None:
        self._closed = True
        self._lock.close()  # releases the flock

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _OpenShard:
    """An ArrayRecord file under a temporary name until `finish` renames it."""

    def __init__(self, directory: str, index: int, options: str):
        self.name = f"shard-{index:05d}.array_record"
        self.final = os.path.join(directory, self.name)
        self.tmp = self.final + ".tmp"
        self.writer = array_record_module.ArrayRecordWriter(self.tmp, options)
        self.count = 0
        self.clips: dict[str, int] = {}

    def finish(self) -> str:
        self.writer.close()
        if not self.count:  # only empty clips: nothing to keep, but they are done
            os.remove(self.tmp)
            return self.name
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the manifest may name the shard only once its bytes are durable
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)
        return self.name

    def discard(self) -> None:
        self.writer.close()
        os.remove(self.tmp)


# ----------------------------------------------------------------------------- reader


class StoreReader:
    """Random access to a store's windows; a grain `RandomAccessDataSource` (picklable: worker
    processes reopen the shards lazily).

    `reader[i]` -> the sample dict of the module docstring plus `index` (= i). A snapshot: shards
    committed after construction are not seen. writable=False gives read-only arrays without a
    copy (the loader's choice, since batching copies).
    """

    def __init__(self, directory, *, writable: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.writable = writable
        manifest = read_manifest(self.directory)
        fields = manifest["fields"] or {}
        self.fields: dict[str, FieldSpec] = {k: FieldSpec.from_json(v) for k, v in fields.items()}
        self._clips: dict[str, int] = dict(manifest["clips"])
        self._shards = [(os.path.join(self.directory, s["file"]), s["num_records"]) for s in manifest["shards"]]
        self._len = sum(n for _, n in self._shards)
        missing = [p for p, _ in self._shards if not os.path.exists(p)]
        if missing:
            raise StoreError(f"store {self.directory!r} lists shards that are missing: {missing}")
        # "path[0:n]" tells ArrayRecord the count, so construction opens no file.
        paths = [f"{p}[0:{n}]" for p, n in self._shards]
        self._source = array_record_data_source.ArrayRecordDataSource(paths) if paths else None

    def __len__(self) -> int:
        return self._len

    def _check_index(self, i: SupportsIndex) -> int:
        i = i.__index__()
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for a store of {self._len} windows")
        return i % self._len

    def __getitem__(self, i: SupportsIndex) -> dict[str, Any]:
        i = self._check_index(i)
        sample = decode(self._source[i], writable=self.writable)
        sample["index"] = i
        return sample

    def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
        indices = [self._check_index(i) for i in indices]
        out = [decode(raw, writable=self.writable) for raw in self._source.__getitems__(indices)]
        for i, sample in zip(indices, out):
            sample["index"] = i
        return out

    def clip_ids(self) -> list[str]:
        """Finished clips, in the order they were written."""
        return list(self._clips)

    def num_windows(self, clip_id: str) -> int:
        return self._clips[clip_id]

    def __repr__(self) -> str:
        return f"StoreReader({self.directory!r}, len={self._len})"
