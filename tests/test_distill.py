"""DMD2 on the tiny video DiT: the distillation job runs in the one loop over a shared base
(LoRA), and the distilled run samples through the same pipeline in K = 4 one-pass steps."""

import os

import jax
import numpy as np
import pytest

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


def test_every_dmd2_setting_comes_from_the_config():
    """Every DMD2Config field a user sets is in config.distill and reaches the step's config
    (the GAN head and the LoRA targets are not settings of the DiT job); a misspelt one fails."""
    import dataclasses

    from mi_jax.train.distill import dmd2_config
    from mi_jax.train.dmd2 import DMD2Config

    path = os.path.join(CONFIGS, "magicinfinite.py:tiny,distill")
    cfg = load_config(path)
    fields = {f.name for f in dataclasses.fields(DMD2Config)} - {"seed", "gan_g_weight", "gan_d_weight", "lora_targets"}
    assert fields <= set(cfg.distill.keys())
    assert dmd2_config(cfg).lora_activations is True
    got = dmd2_config(load_config(path, ["distill.cfg_attenuation_high=2.5", "distill.dm_t_shift=5.0", "seed=3"]))
    assert (got.cfg_attenuation_high, got.dm_t_shift, got.seed) == (2.5, 5.0, 3)
    cfg.distill.cfg_atenuation_low = 2.0
    with pytest.raises(ValueError, match="cfg_atenuation_low"):
        dmd2_config(cfg)


def test_activation_lora_equals_merged_kernels():
    """LoRA on activations (`lora_params` under `activation_lora()`, what the DMD2 step runs:
    x W + (x a)(s b)) equals the merged model (W + s a b) in output and in the gradients of the
    factors, through the tiny DiT's scanned and rematerialised blocks; outside the context the
    factors are ignored (the merged tree is what sampling and export use)."""
    import jax.numpy as jnp
    from flax import linen as nn

    from mi_jax.convert.hunyuan import abstract_dit_params
    from mi_jax.models.dit import DiT, example_inputs
    from mi_jax.models.dit_config import DiTConfig
    from mi_jax.nn.lora import activation_lora, lora_apply, lora_init, lora_params

    mcfg = DiTConfig.coerce(load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,distill")).model)
    mcfg = mcfg.replace(remat_policy="full", num_layers=1, num_single_layers=1, num_refiner_layers=1)
    model, inputs = DiT(mcfg), example_inputs(mcfg)
    # random weights on the parameter shapes: compiling the DiT's init would take ~10 s more
    shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_dit_params(mcfg)))
    keys = jax.random.split(jax.random.key(0), len(shapes[0]))
    params = jax.tree_util.tree_unflatten(shapes[1], [
        (1.0 if str(getattr(p[-1], "key", "")) == "scale" else 0.0) + 0.2 * jax.random.normal(k, a.shape, a.dtype)
        for (p, a), k in zip(shapes[0], keys)])
    lora = lora_init(params, jax.random.key(1), 4)
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), lora)  # b != 0

    def loss(factors, activations):
        if activations:
            with activation_lora():
                out = model.apply({"params": lora_params(params, factors, 0.5)}, **inputs)
        else:
            out = model.apply({"params": lora_apply(params, factors, 0.5)}, **inputs)
        return jnp.sum(jnp.sin(out)), out

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_act, out_act), (g_merged, out_merged) = grad(lora, True), grad(lora, False)
    _, base = grad(jax.tree.map(jnp.zeros_like, lora), False)  # merged with zero factors: the base
    assert float(jnp.abs(out_merged - base).max()) > 0.1 * float(jnp.abs(base).max())  # the factors act
    np.testing.assert_allclose(out_act, out_merged, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_act), jax.tree.leaves(g_merged), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(jnp.abs(b).max())))
    ignored = jax.jit(lambda p: model.apply({"params": p}, **inputs))(lora_params(params, lora, 0.5))
    np.testing.assert_allclose(ignored, base, rtol=1e-5, atol=1e-5)


def test_lora_factors_shard_like_their_kernels():
    """The distill job places each LoRA factor of the generator and the critic, and its Adam
    moments, as its kernel on a 2-device FSDP mesh (not replicated on every device); shapes
    only: nothing is compiled or allocated."""
    from mi_jax.plan import AbstractData, abstract_batch

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,distill"))
    mesh = make_mesh("fsdp=2", devices=jax.devices()[:2])
    job = make_distill_job(cfg, AbstractData(abstract_batch(cfg)), mesh, need_teacher=False)

    def keys(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

    kernels = {keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(job.state_shardings.base)[0]}
    checked = split = 0
    for part in (job.state_shardings.gen, job.state_shardings.critic):
        for p, s in jax.tree_util.tree_flatten_with_path(part)[0]:
            k = keys(p)
            if k[-1] not in ("a", "b") or k[-2] != "kernel":
                continue
            owner = max((path for path in kernels if k[:-1][-len(path):] == path), key=len)
            kernel = kernels[owner]
            assert s.spec == kernel.spec, (k, s.spec, kernel.spec)
            checked += 1
            split += any(a is not None for a in s.spec)
    assert checked >= 4 * 3 and split > 0  # params and two Adam moments, generator and critic
    with pytest.raises(ValueError, match="needs the teacher"):
        job.init_state()
