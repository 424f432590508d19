"""`plan` on the tiny config (AOT compile over forced host devices), the FLOP counter, the launch
scripts (XLA flag names parse, the multi-node launcher runs 2 processes) and the GPU benchmark's
CPU dry run."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mi_jax.config_utils import load_config
from mi_jax import plan
from mi_jax.parallel.mesh import make_mesh, with_rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "magicinfinite.py") + ":tiny,stage2"
MESH = "fsdp=2"


def _config(remat="dots_no_batch"):
    config = load_config(CONFIG)
    config.model.remat_policy = remat
    return config


@pytest.fixture(scope="module")
def report():
    return plan.plan(_config(), MESH, budget_gb=80, gpu="h100")


def test_plan_reports_what_the_compiled_step_says(report):
    train, gen = report["steps"]["train"], report["steps"]["generate"]
    for entry in (train, gen):
        assert entry["fits"] and entry["memory_gb"]["total"] > 0 and entry["flops_per_step"] > 0
        assert entry["est_seconds"] > 0 and entry["compile_seconds"] >= 0
    assert not report["warnings"]
    assert train["attention"] == "blockwise"  # the config's "auto" stands in as O(L) attention on CPU
    assert gen["shape"]["batch"] == 3 and train["shape"]["tokens"] == 3 * 4 * 4 + 12

    # the same step compiled independently, the way loop.compile_step lowers it (same CPU options)
    from mi_jax.train.pretrain import make_job

    config = _config()
    config.model.attention = "blockwise"
    with config.model.ignore_type():
        config.model.scan_unroll = 1  # the plan compiles "auto" as accelerators run it
    mesh = make_mesh(MESH, jax.devices()[:2])
    job = make_job(config, plan.AbstractData(plan.abstract_batch(config)), mesh)
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(place, job.abstract_state, job.state_shardings)
    batch = jax.tree.map(place, job.data.element_spec, job.batch_shardings)
    with with_rules(mesh):
        compiled = jax.jit(job.step_fn, out_shardings=(job.state_shardings, None), donate_argnums=0) \
            .lower(state, batch).compile(compiler_options=plan.compiler_options())
    m = compiled.memory_analysis()
    got = train["memory_gb"]
    assert got["arguments"] * plan.GB == m.argument_size_in_bytes
    assert got["temporaries"] * plan.GB == m.temp_size_in_bytes
    assert got["aliased"] * plan.GB == m.alias_size_in_bytes  # the donated state
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    assert math.isclose(got["total"] * plan.GB, total)

    text = plan.format_report(report)
    assert "train" in text and "generate" in text and "WARNING" not in text


def test_over_budget_warns_and_suggests_remat(report):
    budget = report["steps"]["train"]["memory_gb"]["total"] * 0.999
    over = plan.plan(_config(), MESH, budget_gb=budget, gpu="h100", steps=("train",), max_trials=1)
    entry = over["steps"]["train"]
    assert not entry["fits"]
    assert any("over the" in w for w in over["warnings"])
    # the next policy in REMAT_ORDER (offload_dots is skipped on CPU) is full: it saves memory
    assert entry["alternatives"][0]["remat_policy"] == "full"
    assert entry["alternatives"][0]["total_gb"] < entry["memory_gb"]["total"]
    assert entry["suggestion"] == "remat_policy=full"
    assert "fits with remat_policy=full" in plan.format_report(over)


def test_count_flops_counts_loops_and_shard_map():
    def layers(x, w):  # 4 scanned matmuls: XLA's cost_analysis would count one
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    x, w = jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((4, 32, 32), jnp.float32)
    assert plan.count_flops(layers, x, w)["flops"] == 4 * 2 * 16 * 32 * 32
    mesh = make_mesh("data=4,fsdp=2")
    sharded = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(jax.P("data"), jax.P()), out_specs=jax.P("data"))
    a, b = jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((32, 8), jnp.float32)
    assert plan.count_flops(sharded, a, b)["flops"] == 2 * 16 * 32 * 8 * 2  # replicated over fsdp=2
    with pytest.raises(ValueError, match="unknown gpu"):
        plan.plan(_config(), MESH, gpu="tpu")
    with pytest.raises(RuntimeError, match="xla_force_host_platform_device_count=64"):
        plan.plan(_config(), "fsdp=64")


# ------------------------------------------------------------------ launch/


def test_xla_flag_presets_parse():
    """An unknown flag name aborts XLA at start-up; the preset must survive it (any backend
    parses the GPU flags)."""
    script = (f"source {ROOT}/launch/xla_flags.sh h100 && echo \"$XLA_FLAGS\" && "
              f"{sys.executable} -c 'import jax; jax.numpy.zeros(1).block_until_ready()'")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out.stdout
    assert "--xla_gpu_all_gather_combine_threshold_bytes=134217728" in out.stdout  # 1 GiB / 8 GPUs
    bad = subprocess.run(["bash", "-c", f"source {ROOT}/launch/xla_flags.sh b200"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset" in bad.stderr


def _multinode(tmp_path, code: str):
    import portpicker

    env = dict(os.environ, MI_JAX_COORDINATOR=f"127.0.0.1:{portpicker.pick_unused_port()}", MI_JAX_NUM_NODES="1",
               MI_JAX_NODE_RANK="0", MI_JAX_GPUS_PER_NODE="2", MI_JAX_CPU_DEVICES="1", MI_JAX_LOG_DIR=str(tmp_path),
               MI_JAX_XLA_PRESET="none", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([f"{ROOT}/launch/multinode.sh", sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_multinode_launcher_runs_one_process_per_gpu(tmp_path):
    code = ("from mi_jax.parallel.distributed import maybe_initialize; maybe_initialize()\n"
            "import jax, jax.numpy as jnp\n"
            "from jax.experimental import multihost_utils\n"
            "ids = multihost_utils.process_allgather(jnp.array([jax.process_index()]))\n"
            "print('ok', jax.process_count(), ids.ravel().tolist())\n")
    out = _multinode(tmp_path, code)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(2):
        assert "ok 2 [0, 1]" in (tmp_path / f"process_{i}.log").read_text()
    failing = _multinode(tmp_path, "import os, sys; sys.exit(3 if os.environ['MI_JAX_PROCESS_ID'] == '1' else 0)")
    assert failing.returncode == 3


# ------------------------------------------------------------------ benchmarks/gpu_window.py


@pytest.mark.slow  # compiles and runs both benchmark workloads end to end
def test_gpu_benchmark_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_window", os.path.join(ROOT, "benchmarks", "gpu_window.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--dry-run", "--iters", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "window: B=3" in printed and "train: B=1" in printed and "plan:" in printed
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["workload"] for r in rows] == ["window", "train"]
    assert all(r["seconds"] > 0 and r["plan_memory_gb"] > 0 and r["model_tflops"] > 0 for r in rows)


# ------------------------------------------------------------------ the DMD2 step


def test_plan_distill_step(tmp_path, capsys):
    """`mi-jax plan` on a distill config plans the DMD2 step (registered as "distill") beside the
    train step by default, and its generate window runs one branch (CFG baked in); the DMD2
    step is compiled like the others and its row printed."""
    import json

    distill = os.path.join(ROOT, "configs", "magicinfinite.py") + ":tiny,distill"
    assert plan.default_steps(load_config(distill)) == ("train", "distill", "generate")
    assert plan.default_steps(_config()) == ("train", "generate")
    assert plan.sampling_branches(load_config(distill)) == 1 and plan.sampling_branches(_config()) == 3
    out = tmp_path / "plan.json"
    assert plan.main(["--config", distill, "--mesh", MESH, "--steps", "distill", "--no-suggest",
                      "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("distill "))
    assert "B=4 64x64" in row and "fsdp=2" in row and row.endswith("yes")
    entry = json.loads(out.read_text())["steps"]["distill"]
    memory = entry["memory_gb"]
    assert memory["total"] > memory["arguments"] > 0 and memory["aliased"] > 0  # the donated state
    assert entry["flops_per_step"] > 0 and entry["shape"]["grad_accum"] == 1
    with pytest.raises(ValueError, match="no `distill` section"):
        plan.plan(_config(), MESH, steps=("distill",))


def test_plan_takes_config_overrides_and_refuses_other_arguments(capsys):
    """`mi-jax plan`, the CLI and the benchmarks read arguments through config_utils.parse_args:
    `--config.FIELD=VALUE` become overrides, anything else unknown is a usage error."""
    import argparse

    from mi_jax.config_utils import parse_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    args, overrides = parse_args(ap, ["--config", CONFIG, "--config.model.num_layers=3", "--config.mesh=fsdp=1"])
    assert args.config == CONFIG and overrides == ["model.num_layers=3", "mesh=fsdp=1"]
    with pytest.raises(SystemExit):
        plan.main(["--config", CONFIG, "--frobnicate", "--config.model.num_layers=3"])
    assert "unrecognised arguments: --frobnicate" in capsys.readouterr().err


# ------------------------------------------------------------------ live streaming on GPUs


def _work(dit_tflop: float, *, vae_tflop: float = 0.0, audio_tflop: float = 0.0) -> "plan.WindowWork":
    """A window's work with round numbers (no bytes: compute-bound), for exact checks."""
    part = lambda tflop: dict(flops=tflop * 1e12, matmul_bytes=0.0, batched_dot_bytes=0.0)  # noqa: E731
    return plan.WindowWork(dit=part(dit_tflop), dit_param_bytes=0.0, vae_chunk=part(vae_tflop), audio=part(audio_tflop),
                           audio_seconds=1.0, latents_first=5, latents_per_chunk=3, frames_per_chunk=12, heads=24)


def _live_config(steps: int = 4, window: int = 33, overlap: int = 3):
    config = load_config(os.path.join(ROOT, "configs", "magicinfinite.py") + ":tiny,distill")
    config.sample.update(steps=steps, window=window, overlap=overlap)
    return config


def test_plan_reports_live_latency(report):
    """The plan's generate step brings the live-streaming estimate, on the generate mesh's GPUs,
    counted from the tiny model's DiT, VAE decoder and Wav2Vec2; the text shows it."""
    lat = report["latency"]
    assert lat["gpus"] == 2 and lat["window"]["cfg_branches"] == 3 and lat["window"]["steps"] == 20
    assert lat["window"]["new_frames"] == 4 * (3 - 1 - 1)
    assert all(lat["tflop"][k] > 0 for k in ("dit_step", "vae", "audio"))
    sec = lat["seconds"]
    assert math.isclose(sec["dit"], 20 * sec["dit_step"])
    assert math.isclose(sec["per_window"], sec["audio"] + sec["dit"] + sec["vae"])
    assert math.isclose(lat["realtime_factor"], lat["window"]["new_seconds"] / sec["per_window"])
    text = plan.format_report(report)
    assert "Live streaming on 2 x H100 SXM" in text and "real-time factor" in text and "assumes: 40% MFU" in text


def test_latency_scales_with_steps_and_gpus():
    """Seconds per window follow the model: the DiT part grows with the steps and divides over
    the GPUs; the unsplit VAE and Wav2Vec2 parts do not change; the fewest GPUs for real time is
    the first count whose factor reaches 1."""
    config = _live_config()
    work = _work(1638.0, vae_tflop=2.0, audio_tflop=0.1)
    card, mfu = plan.GPUS["h100"], 0.4
    one = plan.latency(config, gpus=1, work=work)
    assert math.isclose(one["seconds"]["dit_step"], 1638e12 / (card.bf16_flops * mfu))
    assert math.isclose(one["seconds"]["vae"], 2e12 * 29 / 3 / (card.tf32_flops * mfu))  # 29 new latents, 3 per tile
    twice = plan.latency(_live_config(steps=8), gpus=2, work=work)
    assert math.isclose(twice["seconds"]["dit"], one["seconds"]["dit"])  # twice the steps on twice the GPUs
    assert plan.latency(_live_config(steps=8), gpus=1, work=work)["realtime_factor"] < one["realtime_factor"]
    four = plan.latency(config, gpus=4, work=work)
    assert math.isclose(four["seconds"]["dit"], one["seconds"]["dit"] / 4)
    assert four["seconds"]["vae"] == one["seconds"]["vae"] and four["seconds"]["audio"] == one["seconds"]["audio"]
    n = one["min_gpus_realtime"]
    assert n == four["min_gpus_realtime"] and n > 1
    rtf = lambda g: plan.latency(config, gpus=g, work=work)["realtime_factor"]  # noqa: E731
    assert rtf(n) >= 1 > rtf(n - 1)
    assert plan.latency(config, gpus=n, work=work)["latency_s"]["max"] is not None
    assert plan.latency(config, gpus=n - 1, work=work)["latency_s"]["max"] is None  # behind: grows every window
    # pipelined: the decode beside the next window's steps, never slower
    assert plan.latency(config, gpus=n - 1, work=work, pipelined=True)["realtime_factor"] >= rtf(n - 1)
    # 116 new frames (4.64 s) wait for their audio: no GPU count meets the 1 s budget; a window of 3 new
    # latents (one VAE tile, 0.48 s) does from some count on, and not with one GPU fewer
    assert one["min_gpus_within_budget"] is None and "no GPU count keeps every frame" in plan.format_latency(one)
    short = _live_config(window=5, overlap=1)
    m = plan.latency(short, gpus=1, work=work)["min_gpus_within_budget"]
    assert m and plan.latency(short, gpus=m, work=work)["within_budget"]
    assert not plan.latency(short, gpus=m - 1, work=work)["within_budget"]
    # a decoder alone slower than real time: no GPU count helps
    slow = plan.latency(config, gpus=1, work=_work(1.0, vae_tflop=1e4), max_gpus=64)
    assert slow["min_gpus_realtime"] is None and "no GPU count reaches real time" in plan.format_latency(slow)


def test_stream_timeline_is_live_loop_arithmetic():
    """With instant compute a frame waits only for its window's audio and the VAE's tiles; compute
    time adds to every frame's latency one for one while the stream keeps up."""
    kw = dict(window=9, overlap=2, fps=25.0, lookahead_s=0.2, latents_first=5, latents_per_chunk=3, frames_per_chunk=12)
    free = plan.stream_timeline(compute_s=0.0, chunk_s=0.0, **kw)
    # window 0 runs when frame 1 + 4 * 8 = 33 and 5 lookahead frames are heard; its 5-latent first tile
    # yields 13 frames
    assert math.isclose(free["first_frame_s"], 38 / 25 - 1 / 25)
    assert free["latency_s"].min() >= 5 / 25 - 1e-12  # never earlier than the lookahead
    busy = plan.stream_timeline(compute_s=0.05, chunk_s=0.01, **kw)
    steady = slice(33, 33 + 120)
    first_tile = free["latency_s"][steady]
    # each frame waits for its window's compute and its own tile's decode, after earlier tiles of that window
    assert ((busy["latency_s"][steady] - first_tile) >= 0.05 + 0.01 - 1e-9).all()
    assert ((busy["latency_s"][steady] - first_tile) <= 0.05 + 0.01 * 3 + 1e-9).all()


def test_latency_on_the_full_model_and_bad_input(capsys):
    """The full 13B distilled config, counted on abstract shapes: one step of a 540p (544x544)
    window is at least 2 FLOPs per parameter per token, and the GPU count the plan names for real
    time is the first that reaches it. 0 GPUs or an unknown GPU fail before anything is traced."""
    full = load_config(os.path.join(ROOT, "configs", "magicinfinite.py") + ":full,distill")
    work = plan.count_window_work(full)
    params = work.dit_param_bytes / 2  # bf16
    tokens = plan._tokens(full, full.sample.window)["video_tokens"]
    assert work.dit["flops"] >= 2 * params * tokens and params > 12e9
    lat = plan.latency(full, gpus=1, work=work)
    n = lat["min_gpus_realtime"]
    assert lat["window"]["new_frames"] == 116 and lat["window"]["cfg_branches"] == 1 and lat["window"]["steps"] == 4
    assert plan.latency(full, gpus=n, work=work)["realtime_factor"] >= 1 > plan.latency(full, gpus=n - 1, work=work)[
        "realtime_factor"]

    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="whole number >= 1"):
            plan.latency(full, gpus=bad, work=work)
    with pytest.raises(ValueError, match="unknown gpu 'tpu'"):
        plan.latency(full, gpu="tpu", work=work)
    with pytest.raises(ValueError, match="mfu"):
        plan.latency(full, mfu=0.0, work=work)
    said = []
    with pytest.raises(ValueError, match="whole number >= 1"):
        plan.plan(_config(), MESH, gpus=0, log=said.append)
    assert not said  # refused before compiling anything
    with pytest.raises(SystemExit):
        plan.main(["--config", CONFIG, "--gpus", "0"])
    assert "a whole number of GPUs >= 1" in capsys.readouterr().err


def test_plan_cli_prints_and_writes_latency(tmp_path, capsys):
    """`mi-jax plan --gpus N` puts the live-streaming estimate in the text and the JSON."""
    import json

    out = tmp_path / "plan.json"
    assert plan.main(["--config", CONFIG, "--mesh", MESH, "--steps", "generate", "--gpus", "3", "--mfu", "0.2",
                      "--pipelined", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Live streaming on 3 x H100 SXM" in printed and "beside window k+1's steps" in printed
    lat = json.loads(out.read_text())["latency"]
    assert lat["gpus"] == 3 and lat["mfu"] == 0.2 and lat["pipelined"] and lat["realtime_factor"] > 0
