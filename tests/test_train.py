"""Stage-1 training on the synthetic world: the loss falls; resume after SIGKILL is
bit-identical; SIGTERM leaves a checkpoint; a NaN batch is skipped and counted; two processes
give the losses of one."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from mi_jax.config_utils import load_config
from mi_jax.parallel.mesh import make_mesh
from mi_jax.train.loop import run
from mi_jax.train.metrics import read_metrics
from mi_jax.train.pretrain import make_job

ROOT = os.path.dirname(CONFIGS)
CONFIG = os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1")


def _config(store, *overrides):
    return load_config(CONFIG, [f"data.store={store!r}", "mesh='fsdp=1'", *overrides])


def _one_device_mesh():
    return make_mesh("fsdp=1", devices=jax.devices()[:1])


def test_stage1_loss_falls(tiny_store, tmp_path):
    from mi_jax.train.data import TrainData

    cfg = _config(tiny_store, "train.steps=150", "train.log_every=10", "train.checkpoint_every=1000")
    mesh = _one_device_mesh()
    run(make_job(cfg, TrainData(cfg, mesh), mesh), str(tmp_path), log=lambda *_: None)
    losses = [m["loss"] for m in read_metrics(str(tmp_path))]
    first, last = np.mean(losses[:2]), np.mean(losses[-3:])
    print(f"stage-1 loss: first 20 steps {first:.3f} -> last 30 steps {last:.3f}")
    assert last < 0.8 * first, losses


class NaNAt:
    """Wraps the data: the batch of step `at` carries a NaN."""

    def __init__(self, data, at):
        self.data, self.at, self.i = data, at, 0
        self.element_spec = data.element_spec

    def __next__(self):
        batch = next(self.data)
        self.i += 1
        if self.i == self.at:
            batch = dict(batch, latents=batch["latents"] * np.nan)
        return batch

    def get_state(self):
        return self.data.get_state()

    def set_state(self, s):
        self.data.set_state(s)


def test_nan_batch_is_skipped_and_counted(tiny_store, tmp_path):
    from mi_jax.train.data import TrainData

    cfg = _config(tiny_store, "train.steps=8", "train.log_every=1", "train.checkpoint_every=1000")
    mesh = _one_device_mesh()
    job = make_job(cfg, NaNAt(TrainData(cfg, mesh), at=4), mesh)
    out = run(job, str(tmp_path), log=lambda *_: None)
    rows = read_metrics(str(tmp_path))
    assert [int(r["skipped"]) for r in rows] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert out["final_step"] == 8 and out["nan_count"] == 1 and np.isfinite(out["loss"])


def test_repeated_nans_stop_with_a_clear_message(tiny_store, tmp_path):
    from mi_jax.train.data import TrainData
    from mi_jax.train.loop import TrainingDiverged

    class AllNaN(NaNAt):
        def __next__(self):
            return dict(next(self.data), latents=next(self.data)["latents"] * np.nan)

    cfg = _config(tiny_store, "train.steps=50", "train.nan_patience=3", "train.checkpoint_every=1000")
    mesh = _one_device_mesh()
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        run(make_job(cfg, AllNaN(TrainData(cfg, mesh), 0), mesh), str(tmp_path), log=lambda *_: None)


def test_lora_stage_runs_on_activations_with_factors_split_like_their_kernels(tiny_store):
    """`init.lora_rank > 0`: the step's DiT runs the factors on activations (`step_params` under
    `activation_lora`), which equals running the merged kernels, and the factors (hence their
    optimiser state) are split over the mesh like their kernels, not replicated."""
    from flax import traverse_util

    from mi_jax.train.data import TrainData
    from mi_jax.nn.lora import merge_run
    from mi_jax.train.pretrain import make_loss_fn

    cfg = load_config(CONFIG, [f"data.store={tiny_store!r}", "mesh='fsdp=2'", "init.lora_rank=2"])
    mesh = make_mesh("fsdp=2", devices=jax.devices()[:2])
    data = TrainData(cfg, mesh)
    job = make_job(cfg, data, mesh)
    factors = traverse_util.flatten_dict(job.state_shardings.params["lora"])
    kernels = traverse_util.flatten_dict(job.state_shardings.params["base"])
    split = {path for path, sh in factors.items() if any(sh.spec)}
    assert split and split == {path for path in factors if any(kernels[path[:-1]].spec)}

    params = job.init_state().params
    lora = jax.tree.map(lambda x: x + 0.2, params["lora"])  # b starts at 0: make the adapter act clearly
    batch, rng, loss_fn = next(iter(data)), jax.random.key(0), jax.jit(make_loss_fn(cfg))
    on_activations = float(loss_fn({"base": params["base"], "lora": lora}, batch, rng)[0])
    merged = float(loss_fn(merge_run({"base": params["base"], "lora": lora}), batch, rng)[0])
    base = float(loss_fn(params["base"], batch, rng)[0])
    assert abs(on_activations - merged) <= 1e-5 * abs(merged) and abs(merged - base) > 1e-3 * abs(base)


# ---------------------------------------------------------------- real processes


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MI_JAX_CPU_DEVICES=str(devices),
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
    env.pop("XLA_FLAGS", None)
    return env


def _train_cmd(store, workdir, *overrides):
    return [sys.executable, "-m", "mi_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.data.store={store}", *[f"--config.{o}" for o in overrides]]


def _final_params(workdir):
    from mi_jax.convert.checkpoint import latest_checkpoint

    import orbax.checkpoint as ocp

    root, step = latest_checkpoint(str(workdir))
    with ocp.CheckpointManager(root) as m:
        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return step, state


@pytest.mark.slow  # four training processes
def test_sigkill_resume_is_bit_identical_and_sigterm_saves(tiny_store, tmp_path):
    common = ("train.steps=20", "train.checkpoint_every=5", "train.log_every=1", "mesh='fsdp=1'")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_store, ref_dir, *common), env=_env(), check=True, capture_output=True, timeout=300)

    # SIGKILL at step 13 exactly (the loop's fault-injection hook; polling from here would race
    # a run this fast), after the step-10 checkpoint and before the step-15 one
    killed = subprocess.run(_train_cmd(tiny_store, run_dir, *common), env=dict(_env(), MI_JAX_FAULT_KILL_AT_STEP="13"),
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert read_metrics(str(run_dir))[-1]["step"] == 13
    subprocess.run(_train_cmd(tiny_store, run_dir, *common), env=_env(), check=True, capture_output=True, timeout=300)

    step_a, a = _final_params(ref_dir)
    step_b, b = _final_params(run_dir)
    assert step_a == step_b == 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # same program, same data: resume is exact

    # SIGTERM: the run saves where it is and exits cleanly
    term_dir = tmp_path / "terminated"
    proc = subprocess.Popen(_train_cmd(tiny_store, term_dir, "train.steps=100000", "train.checkpoint_every=100000",
                                       "train.log_every=1", "mesh='fsdp=1'"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not read_metrics(str(term_dir)) or read_metrics(str(term_dir))[-1]["step"] < 3:
        time.sleep(0.05)
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    step, _ = _final_params(term_dir)
    assert step >= 3


@pytest.mark.slow  # three processes (one alone, two with gloo)
def test_two_processes_match_one(tiny_store, tmp_path):
    common = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=1000", "mesh='fsdp=4'")
    one = tmp_path / "one"
    subprocess.run(_train_cmd(tiny_store, one, *common), env=_env(4), check=True, capture_output=True, timeout=300)
    two = tmp_path / "two"
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2", "--cpu-devices", "2", "--"]
    res = subprocess.run(launcher + _train_cmd(tiny_store, two, *common), env=_env(2), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    l1 = [r["loss"] for r in read_metrics(str(one))]
    l2 = [r["loss"] for r in read_metrics(str(two))]
    assert len(l1) == len(l2) == 6
    np.testing.assert_allclose(l2, l1, atol=1e-5)
