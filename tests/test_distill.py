"""DMD2 on the tiny video DiT: the distillation job runs in the one loop over a shared base
(LoRA), and the distilled run samples through the same pipeline in K = 4 one-pass steps."""

import os

import jax
import numpy as np

from conftest import CONFIGS
from mi_jax.config_utils import load_config
from mi_jax.parallel.mesh import make_mesh
from mi_jax.train.distill import make_distill_job
from mi_jax.train.loop import run
from mi_jax.train.metrics import read_metrics


def test_distill_runs_and_samples_in_four_steps(tiny_store, tiny_run, tmp_path):
    from mi_jax.data import synthetic
    from mi_jax.pipeline import Pipeline
    from mi_jax.train.data import TrainData

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,distill"),
                      [f"data.store={tiny_store!r}", "mesh='fsdp=1'", "train.steps=6", "train.log_every=1",
                       "train.checkpoint_every=1000", "distill.ttur=2", "distill.curriculum_steps=2",
                       f"init.checkpoint={tiny_run!r}"])
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    job = make_distill_job(cfg, TrainData(cfg, mesh), mesh)
    out = run(job, str(tmp_path), log=lambda *_: None)
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    assert out["final_step"] == 6 and "dm_loss" in rows[-1] and "critic_loss" in rows[-1]

    pipe = Pipeline.from_checkpoint(str(tmp_path))
    assert pipe.config.sample.kind == "x0" and pipe.config.sample.steps == 4
    clip = synthetic.render_clip(1_000_007, 1.0, size=(64, 64))
    video = pipe.generate(clip.frames[0], clip.audio, "a person talking")
    assert video.frames.shape == (25, 64, 64, 3)
