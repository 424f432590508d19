"""`mi-jax train` / `mi-jax distill` as a function: a config and a work folder -> the loop run
to `config.train.steps` (resuming from the folder), the last step's metrics."""

from __future__ import annotations

from mi_jax.parallel.mesh import make_mesh
from mi_jax.train.data import TrainData
from mi_jax.train.distill import make_distill_job
from mi_jax.train.loop import run
from mi_jax.train.pretrain import make_job


def train(config, workdir: str, *, distill: bool = False) -> dict:
    """Stage 1 / 2 training, or DMD2 distillation (`distill`), of `config` in `workdir`."""
    mesh = make_mesh(config.mesh)
    data = TrainData(config, mesh)
    job = (make_distill_job if distill else make_job)(config, data, mesh)
    return run(job, workdir)
