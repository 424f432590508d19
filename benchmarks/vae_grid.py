"""Which latent grid for the demo: 64x64 frames through a 4x-spatial VAE, or 128x128 frames through
the 8x VAE? Both give the DiT 16x16 latents (64 tokens per latent frame at patch 2). Issue 29.

    python benchmarks/vae_grid.py [--seconds 240] [--batch 16] [--identities 400] [--heldout 32]
                                  [--slice 20] [--json out.json]

Both candidates are the project's own `CausalVAE` with the demo VAE's architecture
(configs/magicinfinite.py:demo `prepare.vae_random`: widths 8/8/16/16, 8 latent channels, one
resnet per block), differing only in `spatial_compression_ratio` (4 or 8). Each is trained from
scratch on single frames (the image stage of an image-then-video curriculum) of the synthetic
world's training identities (seeds below `synthetic.HELDOUT_SEED_START`, 10 % of them two-speaker
frames as in `train.vae.ClipPool`), rendered at the candidate's frame size, for the same budget
of its own wall-clock seconds. The loss is the project's region-weighted L1 (1 + face 2 + mouth
10 + eye band 10, `train.vae.region_weights`) plus the same weighted L1 on the image's forward
differences (`--grad-weight`) and a small KL term; AdamW at a constant rate after 100 warm-up
steps, gradients clipped to norm 1.

The two are trained in alternating slices of `--slice` seconds, each counting only its own step
time, so that both see the same load on a shared machine. At each quarter of the budget (clock
paused) the held-out identities (seeds from `HELDOUT_SEED_START`, never trained on; frames 0 and
5 of each) are encoded (posterior mean) and decoded, and scored against the renderer's frames:

* eye_detail: `eval.metrics.eye_detail` (edge energy of the eye band), reconstruction / renderer;
* face_detail: the same edge energy over the whole face box, reconstruction / renderer;
* l1: mean |reconstruction - renderer| in [-1, 1] units, all pixels; eye_l1: the same in the
  eye band (edge energy alone also rewards noise: an untrained decoder's scores above 1).

Prints one JSON line per candidate: steps done, seconds per step, compile time, the held-out
figures at the end of the budget and the curve at each quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

CANDIDATES = {"64px_vae4x": (64, 4), "128px_vae8x": (128, 8)}  # name -> (frame size, spatial factor)
WEIGHTS = (2.0, 10.0, 10.0)  # face, mouth, eyes: vae_train's defaults
FRAMES = (0, 3, 6, 9)  # the training frames kept of each 10-frame identity clip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="training budget per candidate (its own step time)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--identities", type=int, default=400, help="training identities")
    ap.add_argument("--heldout", type=int, default=32, help="held-out identities")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-weight", type=float, default=1.0, help="weight of the L1 on image differences")
    ap.add_argument("--beta", type=float, default=1e-6, help="KL weight")
    ap.add_argument("--slice", type=float, default=20.0, help="seconds per turn when alternating the candidates")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of " + ",".join(CANDIDATES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the lines here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}")
    results = run(names, args)
    lines = [json.dumps(r) for r in results]
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def vae_config(spatial: int):
    """The demo VAE's architecture with `spatial` pixels per latent cell side."""
    from mi_jax.config_utils import load_config
    from mi_jax.models.vae import VAEConfig

    demo = load_config(os.path.join(ROOT, "configs", "magicinfinite.py:demo,stage1"))
    return VAEConfig(**dict(demo.prepare.vae_random.to_dict(), spatial_compression_ratio=spatial))


def render_pool(seeds, size: int, frames=FRAMES, two_speaker_every: int = 0):
    """uint8 frames [N, H, W, 3], region weights [N, H, W], eye boxes [N, 4] and face boxes [N, 4]
    (the first speaker's) of `frames` of each seed's 0.4 s clip."""
    from mi_jax.data import synthetic
    from mi_jax.train.vae import region_weights

    video, weight, eyes, face = [], [], [], []
    prompts = synthetic.TRAINING_PROMPTS
    for j, s in enumerate(seeds):
        speakers = 2 if two_speaker_every and j % two_speaker_every == two_speaker_every - 1 else 1
        clip = synthetic.render_clip(int(s), 0.4, size=(size, size), prompt=prompts[j % len(prompts)], speakers=speakers)
        idx = list(frames)
        video.append(clip.frames[idx])
        weight.append(region_weights(clip, WEIGHTS)[idx])
        eyes.append(clip.eye_boxes[0, idx])
        face.append(clip.face_boxes[0, idx])
    return (np.concatenate(video), np.concatenate(weight).astype(np.float32), np.concatenate(eyes),
            np.concatenate(face))


class Candidate:
    def __init__(self, name: str, args, train_seeds, heldout_seeds):
        from mi_jax.models.vae import CausalVAE

        self.name = name
        self.size, spatial = CANDIDATES[name]
        self.config = vae_config(spatial)
        t0 = time.time()
        self.train = render_pool(train_seeds, self.size, two_speaker_every=10)
        self.held = render_pool(heldout_seeds, self.size, frames=(0, 5))
        self.render_s = time.time() - t0
        self.model = model = CausalVAE(self.config)
        self.batch, self.seed, self.args = args.batch, args.seed, args
        params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, 1, self.size, self.size, 3))))
        self.params = params["params"]
        self.n_params = int(sum(x.size for x in jax.tree.leaves(self.params)))
        sched = optax.join_schedules([optax.linear_schedule(0.0, args.lr, 100), optax.constant_schedule(args.lr)], [100])
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched))
        self.opt = self.tx.init(self.params)
        self.steps, self.clock, self.curve = 0, 0.0, []
        t0 = time.time()
        x, w = self._batch(0)
        self._step = jax.jit(self._make_step()).lower(self.params, self.opt, x, w, jax.random.key(0)).compile()
        self._recon = jax.jit(lambda p, v: model.apply({"params": p}, model.apply({"params": p}, v, method="encode")[0],
                                                       method="decode"))
        self.compile_s = time.time() - t0

    def _make_step(self):
        model, tx, beta, gw = self.model, self.tx, self.args.beta, self.args.grad_weight

        def loss_fn(p, x, w, key):
            mean, logvar = model.apply({"params": p}, x, method="encode")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            y = model.apply({"params": p}, z, method="decode")

            def wl1(a, b, weight):
                return (jnp.abs(a - b) * weight).sum() / (weight.sum() * a.shape[-1])

            dx = lambda a: a[:, :, :, 1:] - a[:, :, :, :-1]  # noqa: E731
            dy = lambda a: a[:, :, 1:] - a[:, :, :-1]  # noqa: E731
            grad = wl1(dx(y), dx(x), w[:, :, :, 1:]) + wl1(dy(y), dy(x), w[:, :, 1:])
            kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
            loss = wl1(y, x, w) + gw * grad + beta * kl
            return loss, {"weighted_l1": wl1(y, x, w), "grad_l1": grad, "l1": jnp.abs(y - x).mean()}

        def step(p, o, x, w, key):
            (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, w, key)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, metrics

        return step

    def _batch(self, i: int):
        video, weight = self.train[:2]
        pick = np.random.default_rng([self.seed, 13, i]).integers(len(video), size=self.batch)
        x = video[pick][:, None].astype(np.float32) / 127.5 - 1.0  # [B, 1, H, W, 3]: single frames
        return jnp.asarray(x), jnp.asarray(weight[pick][:, None, :, :, None])

    def train_for(self, seconds: float, budget: float) -> None:
        """Steps until `seconds` more of its own clock have passed (or the budget is spent),
        evaluating (clock paused) at each quarter of the budget."""
        stop = min(self.clock + seconds, budget)
        while self.clock < stop:
            t0 = time.perf_counter()
            x, w = self._batch(self.steps)
            self.params, self.opt, metrics = self._step(self.params, self.opt, x, w,
                                                        jax.random.fold_in(jax.random.key(self.seed), self.steps))
            jax.block_until_ready(self.params)
            self.clock += time.perf_counter() - t0
            self.steps += 1
            quarter = budget / 4 * (len(self.curve) + 1)
            if self.clock >= quarter or self.clock >= budget:
                point = dict(step=self.steps, seconds=round(self.clock, 1), train_l1=round(float(metrics["l1"]), 4),
                             **self.evaluate())
                self.curve.append(point)
                print(f"{self.name}: {json.dumps(point)}", file=sys.stderr, flush=True)

    def evaluate(self) -> dict:
        from mi_jax.data import synthetic
        from mi_jax.eval.metrics import eye_detail

        video, _, eyes, face = self.held
        out = []
        for s in range(0, len(video), 16):
            x = jnp.asarray(video[s : s + 16][:, None].astype(np.float32) / 127.5 - 1.0)
            out.append(np.asarray(self._recon(self.params, x))[:, 0])
        recon = np.concatenate(out)
        recon_u8 = np.clip((recon + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        ratio = lambda boxes: float(eye_detail(recon_u8, boxes).mean() / eye_detail(video, boxes).mean())  # noqa: E731
        err = np.abs(recon - (video.astype(np.float32) / 127.5 - 1.0))
        # the eye band's own L1: edge energy alone also rewards noise (an untrained decoder scores > 1)
        eye_err = [synthetic.box_pixels(e, box).mean() for e, box in zip(err, eyes)]
        return dict(eye_detail=round(ratio(eyes), 3), face_detail=round(ratio(face), 3), l1=round(float(err.mean()), 4),
                    eye_l1=round(float(np.mean(eye_err)), 4))

    def result(self, budget: float) -> dict:
        final = self.curve[-1] if self.curve else self.evaluate()
        return dict(candidate=self.name, frame=self.size, spatial_factor=self.config.spatial_factor,
                    latent_grid=[self.size // self.config.spatial_factor] * 2, steps=self.steps,
                    budget_s=budget, train_s=round(self.clock, 1), s_per_step=round(self.clock / max(self.steps, 1), 3),
                    eye_detail=final["eye_detail"], face_detail=final["face_detail"], heldout_l1=final["l1"],
                    eye_l1=final["eye_l1"],
                    curve=self.curve, batch=self.batch, lr=self.args.lr, grad_weight=self.args.grad_weight,
                    vae=dict(block_out_channels=list(self.config.block_out_channels),
                             latent_channels=self.config.latent_channels, parameters=self.n_params),
                    train_frames=len(self.train[0]), heldout_frames=len(self.held[0]),
                    render_s=round(self.render_s, 1), compile_s=round(self.compile_s, 1),
                    backend=jax.default_backend(), cpu_threads=os.cpu_count())


def run(names, args) -> list[dict]:
    from mi_jax.data import synthetic

    rng = np.random.default_rng([args.seed, 7])
    train_seeds = rng.choice(synthetic.HELDOUT_SEED_START, args.identities, replace=False)
    heldout_seeds = synthetic.HELDOUT_SEED_START + np.arange(args.heldout)
    cands = [Candidate(n, args, train_seeds, heldout_seeds) for n in names]
    budget = float(args.seconds)
    while any(c.clock < budget for c in cands):
        for c in cands:
            if c.clock < budget:
                c.train_for(args.slice, budget)
    return [c.result(budget) for c in cands]


if __name__ == "__main__":
    sys.exit(main())
