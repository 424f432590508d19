"""The loop's view of the data: global, sharded batches from a sample store with a
checkpointable position (mi_jax.data.loader does the reading, shuffling and sharding)."""

from __future__ import annotations

import jax
import numpy as np

from mi_jax.data.loader import Loader, LoaderConfig, batch_sharding, to_global
from mi_jax.data.store import FIELDS, StoreReader


class TrainData:
    """Iterator of global batches `{field: jax.Array [global_batch, ...]}` on `mesh`.

    element_spec: the ShapeDtypeStructs of one batch (the step is compiled for them);
    get_state / set_state: the loader position, saved beside every checkpoint."""

    def __init__(self, config, mesh):
        if not config.data.store:
            raise ValueError("config.data.store is empty: point it at a folder made by `mi-jax prepare`")
        reader = StoreReader(config.data.store, writable=False)
        per_process, rem = divmod(config.data.global_batch, jax.process_count())
        if rem:
            raise ValueError(f"data.global_batch={config.data.global_batch} is not divisible by the "
                             f"{jax.process_count()} processes")
        self.loader = Loader(reader, LoaderConfig(global_batch_size=config.data.global_batch, seed=config.data.shuffle_seed,
                                                  num_epochs=None, num_workers=config.data.num_workers))
        self.mesh = mesh
        sample = reader[0]
        # `index` (the window's store index) keys each sample's noise: see pretrain.sample_keys
        self.fields = [k for k in FIELDS if k in sample] + ["index"]
        sample = dict(sample, index=np.asarray(sample["index"], np.int32))
        sharding = batch_sharding(mesh)
        self.element_spec = {
            k: jax.ShapeDtypeStruct((config.data.global_batch, *sample[k].shape), sample[k].dtype, sharding=sharding)
            for k in self.fields
        }
        self.reader = reader

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self.loader)
        return to_global({k: batch[k] for k in self.fields}, self.mesh)

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)
