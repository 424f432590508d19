"""DMD2 quality on the tiny video config: distillation lowers the distribution-matching loss, and
the distilled 4-step sampler lands closer to the teacher's 50-step CFG output than the
undistilled 4-step sampler does.

Teacher: a stage-2 run (300 steps, lr 1e-3) on the tiny synthetic store, started from the tiny
stage-1 run (conftest `tiny_run`): the stage 1 -> stage 2 -> distill recipe of `mi-jax`.

Distillation: the `tiny,distill` job (`make_distill_job`: LoRA over the one frozen teacher, LoRA
on activations, backward simulation, TTUR 5 as DMD2's SDXL recipe, Yin et al. 2024, arXiv
2405.14867) for STEPS steps, with the full config's CFG scales (text 5, audio 4) and
`real_guidance` 5, so that the real score's text scale is MagicInfinite's 2-3x attenuation of
the teacher's (arXiv 2503.05978: 3 for t >= 0.75, 2.33 below); batch 8, lr 1e-3, no curriculum
(MagicInfinite's base-loss warm-up only slows a run this short). Control: the same compiled step
on the same batches with the same keys, the generator reset to the teacher after every step (its
critic still learns). DMD2's loss is normalised per sample and its critic starts as the teacher,
so within one short run it rises while the critic learns the generator; the control holds
everything but the generator's updates fixed.

Measures, on 8 windows of the store x 4 seeds, over the window's latents after the reference
(`make_window_fn`, the pipeline's window step; every sampler sees the same initial noise):
  teacher     50 Euler steps with multi-condition CFG (text 5, audio 4): 150 DiT passes
  distilled   the generator, 4 x0 steps, one pass each (CFG baked in): 4 passes
  undistilled the same 4-step sampler with the teacher's weights (the generator at step 0)
- paired distance: mean squared latent difference to the teacher's output for the same input
  and seed; mean distance: the same between the outputs' means over the seeds (the first moment
  of each input's output distribution, where the CFG the teacher adds shows).
- DM loss: the step's `dm_loss` (DMD2's distribution-matching loss) on generator updates, mean
  over the second half of the run, distilled against the control.
Bounds: DM loss <= 0.95x the control's; paired distance <= 0.97x and mean distance <= 0.9x the
undistilled sampler's. Measured here (2 CPU cores, ~110 s beside the fixtures), config seed 0 /
seed 1 (with data.shuffle_seed 1): DM loss 0.313 vs 0.384 (0.82x) / 0.383 vs 0.432 (0.89x);
paired distance 0.0220 vs 0.0241 (0.91x) / 0.0224 vs 0.0241 (0.93x); mean distance 0.0076 vs
0.0097 (0.78x) / 0.0081 vs 0.0099 (0.83x). For scale: the teacher's CFG moves its mean output
by about 0.006 (against CFG off), and the teacher with 4 Euler steps and CFG (12 passes) is
about 0.003 paired from its 50 steps: the tiny data's flows are nearly straight, so DMD2's gain
here is the CFG it bakes into one pass, not fewer steps.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from mi_jax.config_utils import load_config
from mi_jax.parallel.mesh import make_mesh

TEACHER_STEPS, STEPS, SEEDS, WINDOWS = 300, 200, 4, 8
DISTILL = ["distill.ttur=5", "distill.curriculum_steps=0", "distill.teacher_cfg_text=5.0",
           "distill.teacher_cfg_audio=4.0", "distill.real_guidance=5.0", "data.global_batch=8",
           "train.learning_rate=1e-3", "train.warmup_steps=5"]
MEASURED = ""


@pytest.fixture(scope="module")
def teacher_run(tiny_store, tiny_run, tmp_path_factory):
    from mi_jax.train.data import TrainData
    from mi_jax.train.loop import run
    from mi_jax.train.pretrain import make_job

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage2"),
                      [f"data.store={tiny_store!r}", "mesh='fsdp=1'", f"train.steps={TEACHER_STEPS}",
                       "train.checkpoint_every=100000", "train.learning_rate=1e-3", f"init.checkpoint={tiny_run!r}"])
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    workdir = str(tmp_path_factory.mktemp("teacher_s2"))
    run(make_job(cfg, TrainData(cfg, mesh), mesh), workdir, log=lambda *_: None)
    return workdir


def _inputs(store: str):
    """Conditions of WINDOWS store windows, shaped as the pipeline's window step takes them."""
    from mi_jax.data.store import StoreReader

    reader = StoreReader(store, writable=False)
    picked = [reader[i] for i in np.linspace(0, len(reader) - 1, WINDOWS).astype(int)]
    b = {k: np.stack([s[k] for s in picked]) for k in picked[0]}
    cond = dict(text_embeds=jnp.asarray(b["text_embeds"], jnp.float32),
                text_mask=jnp.asarray(b["text_mask"], jnp.int32), pooled=jnp.asarray(b["pooled"], jnp.float32),
                ref_latent=jnp.asarray(b["ref_latent"], jnp.float32),
                speaker_masks=jnp.asarray(b["speaker_masks"], jnp.float32))
    audio = jnp.asarray(b["audio_states"], jnp.float32)
    return cond, audio if audio.ndim == 5 else audio[:, None]


def test_distillation_matches_the_cfg_teacher_better(tiny_store, teacher_run):
    global MEASURED
    from mi_jax.diffusion.guidance import GuidanceSchedule
    from mi_jax.diffusion.sampler import SamplerConfig, initial_carry, make_window_fn
    from mi_jax.models.dit_config import DiTConfig
    from mi_jax.train import dmd2
    from mi_jax.train.data import TrainData
    from mi_jax.train.distill import dmd2_config, make_distill_job

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,distill"),
                      [f"data.store={tiny_store!r}", "mesh='fsdp=1'", f"train.steps={STEPS}",
                       f"init.checkpoint={teacher_run!r}", *DISTILL])
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    job = make_distill_job(cfg, TrainData(cfg, mesh), mesh)
    step = jax.jit(job.step_fn)
    trained = control = job.init_state()
    gen0 = control.gen
    dm, dm_control = [], []
    for _ in range(STEPS):
        batch = next(job.data)
        trained, m = step(trained, batch)
        control, m_control = step(control, batch)
        control = control.replace(gen=gen0)  # the generator never moves; its critic does
        if int(m["gen_updated"]):
            dm.append(float(m["dm_loss"]))
            dm_control.append(float(m_control["dm_loss"]))
    assert int(trained.nan_count) == 0 and np.all(np.isfinite(dm))

    # ---- samplers on the same inputs and noise
    mcfg, d = DiTConfig.coerce(cfg.model), cfg.distill
    w, o = cfg.sample.window, cfg.sample.overlap
    teacher_sampler = SamplerConfig(window=w, overlap=o, steps=50, shift=1.0, kind="euler",
                                    guidance=GuidanceSchedule(text=d.teacher_cfg_text, audio=d.teacher_cfg_audio))
    four = SamplerConfig(window=w, overlap=o, steps=d.num_steps, shift=d.time_shift, kind="x0",
                         guidance=GuidanceSchedule(text=1.0, audio=1.0), embedded_guidance=d.student_guidance)
    cond, audio = _inputs(tiny_store)

    compiled = {}

    def outputs(params, scfg):
        fn = compiled.setdefault(scfg, jax.jit(make_window_fn(mcfg, scfg)))
        out = []
        for seed in range(SEEDS):
            _, (motion, new) = fn(params, cond, initial_carry(seed, WINDOWS, cond["ref_latent"].shape[2:], scfg), audio)
            out.append(np.concatenate([motion, new], 1))
        return np.stack(out)  # [seeds, windows, W - 1, h, w, C]

    teacher = outputs(trained.base, teacher_sampler)
    distilled = outputs(dmd2.merged(trained.base, trained.gen.params, dmd2_config(cfg)), four)
    undistilled = outputs(trained.base, four)

    def paired(x):
        return float(np.mean((x - teacher) ** 2))

    def mean(x):
        return float(np.mean((x.mean(0) - teacher.mean(0)) ** 2))

    half = len(dm) // 2
    dm_late, dm_late_control = float(np.mean(dm[half:])), float(np.mean(dm_control[half:]))
    MEASURED = (f"DM loss (2nd half) {dm_late:.4f} vs control {dm_late_control:.4f}; paired distance "
                f"{paired(distilled):.5f} vs undistilled {paired(undistilled):.5f}; mean distance "
                f"{mean(distilled):.5f} vs {mean(undistilled):.5f}")
    print("\n" + MEASURED)
    assert dm_late <= 0.95 * dm_late_control, MEASURED
    assert paired(distilled) <= 0.97 * paired(undistilled), MEASURED
    assert mean(distilled) <= 0.9 * mean(undistilled), MEASURED
