"""The demo's speech encoder: the small Wav2Vec2 taught what the mouth does, written as a
transformers `Wav2Vec2Model` folder.

MagicInfinite reads speech through a pretrained Wav2Vec2, whose features tell phonemes apart.
No such weights can be downloaded here, and a randomly initialised small Wav2Vec2 keeps the
loudness but not the vowel: on held-out voices a linear probe of its features finds the mouth's
opening but hardly its width per viseme (`benchmarks/speech_features.py`; docs/speech.md).
`train_speech_encoder` stands in for the pretraining: the same architecture, trained on the
synthetic world's training voices to predict, per video frame, the viseme, the mouth's opening
and its width from the features `prepare` computes (the same windows, normalisation and
interpolation to frame times, `Encoders.audio_frame_chunks`). The head is dropped; the folder
loads wherever a pretrained Wav2Vec2 would (`prepare.wav2vec2=FOLDER`, transformers itself).

    mi-jax demo-model   # builds demo/wav2vec2 with this before `prepare`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import linen as nn

from mi_jax import atomic
from mi_jax.convert.export import write_model
from mi_jax.convert.wav2vec2 import wav2vec2_name_map
from mi_jax.data import speech, synthetic
from mi_jax.data.audio_io import mean_std
from mi_jax.data.prepare import audio_window, frame_positions
from mi_jax.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, example_inputs

_TARGETS = len(speech.VISEMES) + 2  # viseme logits, opening, width


class _Head(nn.Module):
    """Per frame: viseme logits, mouth opening and width from the chosen layers' features."""

    @nn.compact
    def __call__(self, feats):  # [B, T, L, C]
        return nn.Dense(_TARGETS, name="out")(feats.reshape(*feats.shape[:2], -1))


def _examples(seeds, seconds: float, fps: float, sample_rate: int, window: int, margin: int):
    """Windows [N, window] (normalised track, zero context as prepare pads a track's edges) and
    per-frame targets: viseme [N, T] int (-1: none, the synthetic voice), opening [N, T], width [N, T]."""
    segments, visemes, opening, width = [], [], [], []
    for j, s in enumerate(seeds):
        clip = synthetic.render_clip(int(s), seconds, fps=fps, size=(32, 32), sample_rate=sample_rate,
                                     voice="espeak" if j % 2 == 0 else "synthetic")
        audio = clip.audio.astype(np.float32)
        seg = np.zeros(window, np.float32)
        n = min(len(audio), window - margin)
        mean, std = mean_std(audio)  # the whole track's statistics, as prepare normalises
        seg[margin : margin + n] = (audio[:n] - mean) / math.sqrt(std * std + 1e-7)
        segments.append(seg)
        t = len(clip.frames)
        if clip.visemes is not None:
            visemes.append(clip.visemes[0].astype(np.int64))
            width.append(clip.mouth_width[0])
        else:
            visemes.append(np.full(t, -1, np.int64))
            width.append(np.ones(t, np.float32))
        opening.append(clip.mouth_open[0])
    return (np.stack(segments), np.stack(visemes), np.stack(opening).astype(np.float32),
            np.stack(width).astype(np.float32))


def train_speech_encoder(config, out_dir: str, *, log=print, **overrides) -> dict:
    """Trains `prepare.wav2vec2_random`'s Wav2Vec2 (from its random init, seed 0 as "random")
    on the synthetic world's training voices and writes it as a transformers folder.

    Args:
      config: a run config; `config.speech_encoder_train` holds `steps`, `clips`, `seconds`,
        `batch`, `learning_rate`, `seed`; `prepare.audio_layers`, `audio_chunk_seconds`,
        `sample_rate` and `fps` give the features' regime (that of `prepare`).
      out_dir: the folder to write (config.json, model.safetensors, training.json), whole or not
        at all.
      log: where progress lines go.
      **overrides: `speech_encoder_train` settings that win over the config's.

    Returns:
      The settings, the first and last losses, the held-out viseme accuracy of the head and the
      wall time (also in `out_dir/training.json`).

    Raises:
      ValueError: an unknown override, or fewer clips than a batch.
    """
    t = dict(config.speech_encoder_train.to_dict(), **overrides)
    unknown = set(overrides) - set(config.speech_encoder_train.to_dict())
    if unknown:
        raise ValueError(f"train_speech_encoder: unknown setting(s) {sorted(unknown)}; "
                         f"known: {sorted(config.speech_encoder_train)}")
    steps, batch, clips, seed = int(t["steps"]), int(t["batch"]), int(t["clips"]), int(t["seed"])
    if clips < batch:
        raise ValueError(f"speech_encoder_train.clips={clips} is fewer than a batch of {batch}; raise clips")
    p = config.prepare
    sr, fps = int(p.sample_rate), synthetic.FPS  # the synthetic world's frame rate, as the demo trains at
    _, margin, window = audio_window(float(p.audio_chunk_seconds), fps, sr)  # prepare's first window of a track
    layers = list(p.audio_layers)
    wcfg = Wav2Vec2Config(**p.wav2vec2_random.to_dict())
    model, head = Wav2Vec2(wcfg), _Head()
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **example_inputs(wcfg)))["params"]  # = "random:0"
    t0 = time.time()
    rng = np.random.default_rng([seed, 23])
    train_seeds = rng.choice(synthetic.HELDOUT_SEED_START, clips, replace=False)
    segs, vis, opening, width = _examples(train_seeds, float(t["seconds"]), fps, sr, window, margin)
    frames = vis.shape[1]
    num_features = int(jax.eval_shape(lambda x: model.apply({"params": params}, x).hidden_states[0],
                                      jnp.zeros((1, window))).shape[1])
    i0, i1, w = frame_positions(0, frames, fps, sr, -margin, window, num_features)

    def features(wp, x):  # [B, window] -> [B, T, L, C], as prepare computes them
        h = model.apply({"params": wp}, x).hidden_states
        f = jnp.stack([h[i] for i in layers], -2)
        return f[:, i0] * (1.0 - w[None, :, None, None]) + f[:, i1] * w[None, :, None, None]

    head_params = head.init(jax.random.key(seed + 1), jnp.zeros((1, frames, len(layers), wcfg.hidden_size)))["params"]
    state = {"encoder": params, "head": head_params}

    def loss_fn(s, x, v, o, wd):
        out = head.apply({"params": s["head"]}, features(s["encoder"], x))
        logits, o_hat, w_hat = out[..., :-2], out[..., -2], out[..., -1]
        has = v >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(v, 0))
        ce = (ce * has).sum() / jnp.maximum(has.sum(), 1)
        mse = jnp.mean((o_hat - o) ** 2) + jnp.mean((w_hat - wd) ** 2)
        acc = ((logits.argmax(-1) == v) * has).sum() / jnp.maximum(has.sum(), 1)
        return ce + 10.0 * mse, {"ce": ce, "mse": mse, "accuracy": acc}

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, float(t["learning_rate"]),
                                                                    min(50, steps // 2 + 1), max(steps, 2))))
    opt = tx.init(state)

    @jax.jit
    def step(s, o, x, v, op, wd):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(s, x, v, op, wd)
        u, o = tx.update(g, o, s)
        return optax.apply_updates(s, u), o, dict(m, loss=loss)

    first = last = None
    for i in range(steps):
        idx = np.random.default_rng([seed, 29, i]).choice(len(segs), batch, replace=False)
        state, opt, m = step(state, opt, jnp.asarray(segs[idx]), jnp.asarray(vis[idx]), jnp.asarray(opening[idx]),
                             jnp.asarray(width[idx]))
        if i == 0 or i + 1 == steps or (i + 1) % 50 == 0:
            m = {k: round(float(v), 4) for k, v in m.items()}
            first = first or m
            last = m
            log(f"speech encoder step {i + 1}/{steps}: loss {m['loss']:.4f} viseme ce {m['ce']:.3f} "
                f"accuracy {m['accuracy']:.2f} mse {m['mse']:.4f}")
    held = np.arange(synthetic.HELDOUT_SEED_START, synthetic.HELDOUT_SEED_START + max(2, batch // 2) * 2)
    hs, hv, ho, hw = _examples(held, float(t["seconds"]), fps, sr, window, margin)
    _, hm = jax.jit(loss_fn)(state, jnp.asarray(hs), jnp.asarray(hv), jnp.asarray(ho), jnp.asarray(hw))
    out = {"settings": t, "first": first, "last": last, "heldout_viseme_accuracy": round(float(hm["accuracy"]), 3),
           "heldout_mse": round(float(hm["mse"]), 4), "layers": layers, "wall_seconds": round(time.time() - t0, 1)}
    write_speech_encoder(out_dir, state["encoder"], wcfg, out)
    return out


def transformers_config(config: Wav2Vec2Config) -> dict:
    """A transformers `Wav2Vec2Config` dict for `Wav2Vec2Model` with this architecture."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    return dict(d, model_type="wav2vec2", architectures=["Wav2Vec2Model"], num_feat_extract_layers=len(config.conv_dim))


def write_speech_encoder(out_dir: str, params, config: Wav2Vec2Config, record: dict | None = None) -> None:
    """`params` as a transformers `Wav2Vec2Model` folder (config.json + model.safetensors, plus
    training.json when `record` is given), written whole or not at all (`atomic.folder`)."""
    with atomic.folder(out_dir) as tmp:
        write_model(tmp, params, wav2vec2_name_map(), transformers_config(config), weights_name="model",
                    dtype=np.float32, max_shard_size="1GB")
        # transformers' SpecAugment vector (training only, unused here; drawn as transformers draws
        # it) makes the folder complete: Wav2Vec2Model.from_pretrained reports no missing key
        path = os.path.join(tmp, "model.safetensors")
        tensors = safetensors.numpy.load_file(path)
        tensors["masked_spec_embed"] = np.random.default_rng(0).uniform(size=config.hidden_size).astype(np.float32)
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
        if record is not None:
            with open(os.path.join(tmp, "training.json"), "w") as f:
                json.dump(record, f, default=str)
