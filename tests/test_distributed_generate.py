"""Generation on a mesh: the window step with its parameters sharded over 4 devices (FSDP, the
CFG branches split over the devices) gives the latents of one device within 1e-5; `mi-jax
generate` under launch/local.py with 2 processes writes, from process 0 only, the very frames
one process writes on the same 2-device mesh.

One device per process in the launcher test: every cross-device sum then has two terms, which
add the same in any order, so two processes (gloo) and one (in-process collectives) agree
bit for bit and the mp4s can be compared frame for frame. With more devices the order of a
partial-sum all-reduce differs between the two (~5e-7 on the latents), and H.264 turns a
flipped rounding into visible differences.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CONFIGS, write_talk_inputs
from mi_jax.data.video_io import read_video

ROOT = os.path.dirname(CONFIGS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("dist_gen_inputs"), 1_000_007, 1.2)


def test_sharded_window_step_matches_one_device(tiny_run, inputs):
    from mi_jax.parallel.mesh import make_mesh
    from mi_jax.pipeline import Pipeline

    one = Pipeline.from_checkpoint(tiny_run, mesh="fsdp=1")
    four = Pipeline(one.config, one.params, one.enc, mesh=make_mesh("fsdp=4", jax.devices()[:4]))
    sharded = [x.sharding.spec for x in jax.tree.leaves(four.params) if any(x.sharding.spec)]
    assert sharded, "no parameter is sharded over the 4-device mesh"
    args = (str(inputs / "portrait.png"), str(inputs / "voice.wav"), "a person talking")
    a = np.concatenate(list(one.latents(*args, seed=1, steps=2)), axis=1)
    b = np.concatenate(list(four.latents(*args, seed=1, steps=2)), axis=1)
    assert a.shape == b.shape and a.shape[1] >= 1 + (30 - 1) // 4
    np.testing.assert_allclose(b, a, atol=1e-5)


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"), **extra)
    env.pop("XLA_FLAGS", None)
    return env


def test_two_processes_write_what_one_process_writes(tiny_run, inputs, tmp_path):
    def generate(out, *extra):
        return [sys.executable, "-m", "mi_jax.cli", "generate", "--checkpoint", tiny_run,
                "--portrait", str(inputs / "portrait.png"), "--audio", str(inputs / "voice.wav"),
                "--prompt", "a person talking", "--out", str(out), "--steps", "2", "--seed", "1", *extra]

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run(generate(tmp_path / "one" / "talk.mp4", "--mesh", "fsdp=2"), env=_env(MI_JAX_CPU_DEVICES="2"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # default mesh of a multi-process job: all its devices (here fsdp=2, one per process)
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--cpu-devices", "1", "--"]
    two = subprocess.run(launcher + generate(tmp_path / "two" / "talk.mp4"), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:]  # both processes exit 0
    lines = two.stdout.splitlines()
    assert any(line.startswith("[p0] wrote") for line in lines), two.stdout[-3000:]
    assert not any(line.startswith("[p1] wrote") for line in lines)
    assert os.listdir(tmp_path / "two") == ["talk.mp4"]  # one file, no temporary left behind
    a, b = read_video(tmp_path / "one" / "talk.mp4"), read_video(tmp_path / "two" / "talk.mp4")
    assert len(a.frames) == len(b.frames) == 30
    np.testing.assert_array_equal(b.frames, a.frames)
