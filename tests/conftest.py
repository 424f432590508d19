"""Test harness: 8 forced CPU devices (for sharding tests), the persistent JAX compilation
cache, and exact fp32 matmuls so parity tests compare like with like."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
jax.config.update("jax_compilation_cache_dir", os.path.join(_ROOT, ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def torch():
    import torch as _torch

    _torch.manual_seed(0)
    _torch.set_num_threads(2)
    return _torch


def write_talk_inputs(folder, seed: int, seconds: float):
    """portrait.png (the clip's first frame) and voice.wav of a 64x64 synthetic clip in `folder`."""
    import soundfile as sf
    from PIL import Image

    from mi_jax.data import synthetic

    clip = synthetic.render_clip(seed, seconds, size=(64, 64))
    Image.fromarray(clip.frames[0]).save(os.path.join(folder, "portrait.png"))
    sf.write(os.path.join(folder, "voice.wav"), clip.audio, 16000)
    return folder


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


CONFIGS = os.path.join(_ROOT, "configs")


def once_per_session(tmp_path_factory, name: str, build):
    """`build(folder)` run once for the whole test session, also under pytest-xdist (`make test`
    runs 2 workers): the first worker to get here builds into a shared folder under a file lock,
    the others wait and reuse it (pytest-xdist's documented recipe). Returns the folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this session
    folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with FileLock(str(root / f"shared_{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return str(folder)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A sample store prepared from 4 synthetic clips (2 s each) with the tiny config."""
    from mi_jax.config_utils import load_config
    from mi_jax.data import synthetic
    from mi_jax.data.prepare import prepare

    def build(folder):
        clips = folder / "clips"
        prompts = synthetic.TRAINING_PROMPTS  # neutral, nodding, shaking head, smiling for seeds 0..3
        for seed in range(4):
            synthetic.render_clip(seed, 2.0, size=(64, 64), prompt=prompts[seed]).save(str(clips / f"clip_{seed}"))
        report = prepare(load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1")), str(clips),
                         str(folder / "store"), progress=False)
        assert not report["skipped"], report

    return os.path.join(once_per_session(tmp_path_factory, "tiny_store", build), "store")


@pytest.fixture(scope="session")
def tiny_run(tiny_store, tmp_path_factory):
    """A tiny stage-1 run (30 steps) on the synthetic store: a checkpoint to generate from."""
    from mi_jax.config_utils import load_config
    from mi_jax.parallel.mesh import make_mesh
    from mi_jax.train.data import TrainData
    from mi_jax.train.loop import run
    from mi_jax.train.pretrain import make_job

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1"),
                      [f"data.store={tiny_store!r}", "mesh='fsdp=1'", "train.steps=30", "train.checkpoint_every=1000",
                       "sample.steps=2"])
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    return once_per_session(tmp_path_factory, "tiny_run",
                            lambda folder: run(make_job(cfg, TrainData(cfg, mesh), mesh), str(folder), log=lambda *_: None))
