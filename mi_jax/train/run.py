"""`mi-jax train` / `mi-jax distill` as a function: a config and a work folder -> the loop run
to `config.train.steps` (resuming from the folder), the last step's metrics."""

from __future__ import annotations

from mi_jax.parallel.mesh import make_mesh
from mi_jax.train.data import TrainData
from mi_jax.train.distill import make_distill_job
from mi_jax.train.loop import run
from mi_jax.train.pretrain import make_job


def train(config, workdir: str, *, distill: bool = False) -> dict:
    """Trains `config` in `workdir`: stage 1 / 2 training, or DMD2 distillation.

    `mi-jax train` / `mi-jax distill`. Resumes from the newest checkpoint in `workdir`; stops
    at `config.train.steps` or on SIGTERM (checkpointing first).

    Args:
      config: a run config (configs/magicinfinite.py); `config.mesh` gives the devices,
        `config.data.store` the prepared data, `config.init` the start.
      workdir: the run folder: checkpoints, the saved config, TensorBoard logs.
      distill: DMD2 distillation of the stage-2 teacher at `config.init.checkpoint` (default
        False: `make_job`'s training).

    Returns:
      The last step's metrics as host floats.

    Raises:
      ValueError: no data store, a batch the mesh cannot split, a conflicting or mismatched
        `init`, or distillation without a teacher.
      TrainingDiverged: `train.nan_patience` non-finite steps in a row.
    """
    mesh = make_mesh(config.mesh)
    data = TrainData(config, mesh)
    job = (make_distill_job if distill else make_job)(config, data, mesh)
    return run(job, workdir)
