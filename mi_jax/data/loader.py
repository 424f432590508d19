"""The training input pipeline: a grain `MapDataset` over a sample store, sharded by process,
and the step that places per-process batches on the mesh as global `jax.Array`s.

Index plan per epoch e (all processes must use the same seed):

    permutation_e = shuffle(range(N), seed + e)          grain's index shuffle, per epoch
    keep the first (N // P) * P                          equal shares, so every process takes
    process p takes permutation_e[p::P]                  the same number of steps
    batches of B = global_batch_size / P, within the epoch (drop_remainder drops the tail)

so the processes' samples are disjoint within an epoch and together cover all but N mod P
windows (different ones each epoch). Records are read and batched by `read_threads` threads per
process, or inside `num_workers` worker processes (`mp_prefetch`), each taking every
num_workers-th batch; the output order does not depend on either.

Scripts that start workers need `if __name__ == "__main__":` and, outside `absl.app`,
`absl.flags.FLAGS.mark_as_parsed()` (the Loader does the latter).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from flax import linen as nn
from jax.sharding import NamedSharding

from mi_jax.data.store import StoreReader
from mi_jax.parallel.mesh import DEFAULT_RULES

STATE_FORMAT = "mi_jax.loader_state"


class LoaderError(ValueError):
    """The loader cannot be built as configured, or a saved state does not fit it."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    global_batch_size: int
    seed: int = 0  # the same on every process; in [0, 2**32)
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever
    drop_remainder: bool = True
    num_workers: int = 0  # worker processes; 0 reads in this process
    read_threads: int = 2  # threads reading batches ahead (per process, or per worker)
    prefetch_batches: int = 4  # batches buffered ahead by those threads


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Windows -> a batch: arrays stacked to `[B, ...]`; `index`, `window` [B] int32, `fps` [B]
    float32, `clip_id` [B] str; `truth` stays a list of B dicts."""
    first = samples[0]
    batch: dict[str, Any] = {
        k: np.stack([s[k] for s in samples]) for k, v in first.items() if isinstance(v, np.ndarray)
    }
    batch["index"] = np.array([s["index"] for s in samples], np.int32)
    batch["window"] = np.array([s["window"] for s in samples], np.int32)
    batch["fps"] = np.array([s["fps"] for s in samples], np.float32)
    batch["clip_id"] = np.array([s["clip_id"] for s in samples], dtype=str)
    batch["truth"] = [s["truth"] for s in samples]
    return batch


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise LoaderError(f"shard_index={index} must be in [0, shard_count={count})")
    return index, count


def make_dataset(
    reader: StoreReader, config: LoaderConfig, shard_index: int, shard_count: int
) -> tuple[grain.MapDataset, int]:
    """The batched, repeated `MapDataset` of one shard and its batches per epoch."""
    if config.global_batch_size % shard_count:
        raise LoaderError(
            f"global_batch_size={config.global_batch_size} is not divisible by {shard_count} processes; "
            "make it a multiple of jax.process_count()"
        )
    batch = config.global_batch_size // shard_count
    per_shard = len(reader) // shard_count
    steps = per_shard // batch if config.drop_remainder else math.ceil(per_shard / batch)
    if steps == 0:
        raise LoaderError(
            f"the store at {reader.directory!r} has {len(reader)} windows: {per_shard} per process, fewer than "
            f"the per-process batch {batch}; write more windows or lower global_batch_size"
        )
    if config.num_epochs is not None and config.num_epochs < 1:
        raise LoaderError(f"num_epochs={config.num_epochs}; use a positive count or None (forever)")
    ds = grain.MapDataset.source(reader)
    if config.shuffle:
        # grain shuffles epoch e with seed + e: hash the seed so that runs with seeds s and s + 1
        # do not see the same orders one epoch apart.
        ds = ds.shuffle(seed=int(np.random.SeedSequence(config.seed).generate_state(1)[0]))
    ds = ds[: per_shard * shard_count][shard_index::shard_count]
    ds = ds.batch(batch, drop_remainder=config.drop_remainder, batch_fn=collate)
    return ds.repeat(config.num_epochs), steps


class Loader:
    """Per-process batches (see `collate`) from a store; an iterator with checkpointable state.

        loader = Loader(store_dir, LoaderConfig(global_batch_size=32, num_epochs=None))
        for batch in loader:
            arrays = to_global(batch, mesh)
        state = loader.get_state()   # json-able: save it beside the orbax checkpoint
        loader.set_state(state)      # continue with exactly the batches that followed

    shard_index / shard_count default to jax.process_index() / jax.process_count(); pass the
    data-parallel group instead when processes share batch shards (e.g. tensor parallelism
    across hosts).
    """

    def __init__(
        self,
        store: str | StoreReader,
        config: LoaderConfig,
        *,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        self.reader = store if isinstance(store, StoreReader) else StoreReader(store, writable=False)
        self.config = config
        self.shard_index, self.shard_count = _shard(shard_index, shard_count)
        self.batch_size = config.global_batch_size // self.shard_count  # per process
        dataset, self.steps_per_epoch = make_dataset(self.reader, config, self.shard_index, self.shard_count)
        read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches)
        self.dataset = dataset.to_iter_dataset(read)
        if config.num_workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
                flags.FLAGS.mark_as_parsed()
            self.dataset = self.dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
        self._iterator = iter(self.dataset)
        self.step = 0  # batches returned so far

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        self.step += 1
        return batch

    def _identity(self) -> dict[str, Any]:
        return {
            "num_records": len(self.reader),
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            **dataclasses.asdict(self.config),
        }

    def get_state(self) -> dict[str, Any]:
        """A json-serialisable state: `set_state` on a Loader built alike resumes after it."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "loader": self._identity(),
            "iterator": _to_json(self._iterator.get_state()),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise LoaderError(f"not a loader state (format={state.get('format')!r}, want {STATE_FORMAT!r})")
        mine = self._identity()
        theirs = dict(state["loader"])
        read_only = ("read_threads", "prefetch_batches")  # do not change which batches come next
        diff = sorted(k for k in mine if k not in read_only and mine[k] != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine[k]!r}" for k in diff)
            raise LoaderError(f"the saved loader state is for another pipeline ({detail}); build the Loader alike")
        self._iterator.set_state(_from_json(state["iterator"]))
        self.step = int(state["step"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_json(obj):
    """grain states may hold int-keyed dicts, which json would turn into str keys."""
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v) for k, v in obj.items()}
        return {"__items__": [[k, _to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(obj):
    if isinstance(obj, Mapping):
        if set(obj) == {"__items__"}:
            return {k: _from_json(v) for k, v in obj["__items__"]}
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- placement


def batch_sharding(mesh: jax.sharding.Mesh, rules=None, logical_axis: str = "activation_batch") -> NamedSharding:
    """The sharding of a batch's leading axis: `logical_axis` through the rules table (None:
    DEFAULT_RULES, P(("data", "fsdp"))). Training, distillation and `mi-jax plan` place batches
    with it."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((logical_axis,), rules or DEFAULT_RULES))


def to_global(
    batch: Mapping[str, Any], mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, *, num_shards: int | None = None
) -> dict[str, jax.Array]:
    """Per-process batch -> global `jax.Array`s sharded along the batch axis.

    Numeric arrays `[B, ...]` become `[B * num_shards, ...]` (num_shards: the Loader's
    shard_count, default jax.process_count()); strings (`clip_id`) and `truth` stay on the host
    and are left out.
    """
    num_shards = jax.process_count() if num_shards is None else num_shards
    sharding = batch_sharding(mesh, rules)
    axes = sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    out = {}
    for name, value in batch.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            continue
        global_shape = (value.shape[0] * num_shards, *value.shape[1:])
        if global_shape[0] % ways:
            raise LoaderError(
                f"global batch {global_shape[0]} cannot be split over the {ways} devices of mesh axes {axes}; "
                "make global_batch_size a multiple of their product"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
