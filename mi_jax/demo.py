"""`make demo` / `mi-jax demo`: the bundled demo model talks for a minute, on a CPU.

    mi-jax demo [--model demo/model] [--seconds 60] [--out out]

Reads the bundled portrait and voice (`demo/portrait.png`, `demo/voice.wav`: a held-out identity
and voice of the synthetic world), generates through the sliding-window sampler, writes
`out/demo.mp4` (the voice muxed in) and `out/lip_sync.png` (the voice's envelope against the
mouth opening measured from the generated pixels), and prints the lip-sync correlation.

`mi-jax demo-model` rebuilds `demo/` from nothing with the project's own commands (synthetic
clips -> VAE -> prepare -> stage 1 -> stage 2 -> DMD2 to 4 steps), seeded, so the bundled checkpoint is
reproducible; see `build_demo_model`.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

DEMO = "demo"
HELDOUT_SEED = 1_000_123


def demo_inputs(folder: str, seconds: float = 60.0) -> tuple[str, str]:
    """Writes the bundled portrait and voice (a held-out synthetic identity) if missing."""
    import soundfile as sf
    from PIL import Image

    from mi_jax.data import synthetic

    portrait, voice = os.path.join(folder, "portrait.png"), os.path.join(folder, "voice.wav")
    if not (os.path.exists(portrait) and os.path.exists(voice)) or sf.info(voice).duration < seconds - 1e-3:
        os.makedirs(folder, exist_ok=True)
        clip = synthetic.render_clip(HELDOUT_SEED, 0.2, size=(64, 64))
        Image.fromarray(clip.frames[0]).save(portrait)
        rng = np.random.default_rng(HELDOUT_SEED)
        turns = synthetic.speaking_turns(rng, seconds, 1)[0]
        sf.write(voice, synthetic.speech_audio(rng, int(seconds * 16000), 150.0, turns), 16000, subtype="PCM_16")
    return portrait, voice


def run_demo(model: str = os.path.join(DEMO, "model"), out: str = "out", seconds: float = 60.0,
             prompt: str = "a person talking", inputs: str | None = None) -> dict:
    """Generates `seconds` of the demo; `inputs`: where the portrait and voice are (written there
    if missing; default: beside the model, i.e. demo/)."""
    from mi_jax.data.synthetic import measure_mouth_open, mouth_envelope
    from mi_jax.data.video_io import write_video
    from mi_jax.eval.metrics import best_offset_correlation
    from mi_jax.eval.report import plot_lip_sync
    from mi_jax.pipeline import Pipeline

    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model}: no demo model; build it with `mi-jax demo-model` (see the README)")
    portrait, voice = demo_inputs(inputs or os.path.dirname(model.rstrip("/")) or DEMO, seconds)
    os.makedirs(out, exist_ok=True)
    pipe = Pipeline.from_checkpoint(model)
    t0 = time.time()
    chunks = pipe.stream(portrait, voice, prompt, seconds=seconds)
    frames = [next(chunks)]  # inputs are read and checked here

    def keep():
        yield from frames[0]
        for chunk in chunks:
            frames.append(chunk)
            yield from chunk

    path = os.path.join(out, "demo.mp4")
    write_video(path, keep(), float(pipe.config.prepare.fps), audio=pipe.last_audio,
                sample_rate=int(pipe.config.prepare.sample_rate))
    video = np.concatenate(frames)
    wall = time.time() - t0
    # mouth box: the portrait's lower face (the synthetic world's mouth sits at a fixed place
    # relative to the face; measure in the portrait's ground-truth box)
    from mi_jax.data import synthetic

    truth = synthetic.render_clip(HELDOUT_SEED, 0.2, size=video.shape[1:3])
    box = truth.mouth_boxes[0, 0]
    mouth = measure_mouth_open(video, np.broadcast_to(box, (len(video), 4)))
    env = mouth_envelope(pipe.last_audio, len(video), float(pipe.config.prepare.fps))
    corr, offset = best_offset_correlation(env, mouth, 5)
    plot = plot_lip_sync(env, mouth, float(pipe.config.prepare.fps), os.path.join(out, "lip_sync.png"),
                         title="demo (the voice against the mouth measured from generated pixels)")
    return {"video": path, "plot": plot, "frames": len(video), "seconds": len(video) / pipe.config.prepare.fps,
            "wall_seconds": round(wall, 1), "lip_sync_correlation": round(float(corr), 3), "offset": int(offset)}


def build_demo_model(out: str = os.path.join(DEMO, "model"), work: str = "runs/demo", *, clips: int = 48,
                     vae_steps: int = 4000, vae_batch: int = 8, vae_refine_steps: int = 0,
                     stage1_steps: int = 3000, stage2_steps: int = 6000, distill_steps: int = 400, seed: int = 0,
                     log=print) -> str:
    """The demo model from nothing, seeded: synthetic clips -> a trained tiny VAE (uniform L1;
    optionally then face / mouth-weighted, `refine_vae`) -> prepare -> stage 1 -> stage 2 -> DMD2 (4 steps,
    LoRA); copies the final run (weights + config) to `out`.

    Stage order: `text_first` (configs/magicinfinite.py). With no pretrained backbone, stage 1
    of the default order would train audio modules over a random frozen DiT; here stage 1
    teaches the backbone video (text + reference) and stage 2 adds audio jointly.
    A VAE already in `demo/vae` is kept (it is the slow part on a CPU: 0.5 step/s here, 27 on one
    H200; the bundled one was trained on an H200 with exactly this call).
    """
    from mi_jax.cli import main as cli
    from mi_jax.config_utils import load_config
    from mi_jax.train.vae import refine_vae, train_vae

    os.makedirs(work, exist_ok=True)
    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "magicinfinite.py")
    vae_dir = os.path.join(os.path.dirname(out.rstrip("/")) or DEMO, "vae")
    data, store = os.path.join(work, "clips"), os.path.join(work, "store")
    common = [f"--config.prepare.vae={vae_dir}", f"--config.seed={seed}", f"--config.data.store={store}",
              "--config.mesh=fsdp=1"]
    cli(["synth", "--out", data, "--clips", str(clips), "--seconds", "4", "--seed-start", str(seed)])
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        log(train_vae(load_config(spec + ":tiny,stage1"), vae_dir, steps=vae_steps, batch=vae_batch, seed=seed,
                      log=log))
        if vae_refine_steps:  # off by default: 400 CPU steps did not bring the mouth back (see refine_vae)
            log(refine_vae(vae_dir, steps=vae_refine_steps, lr=1e-3, seed=seed + 1, log=log))
    cli(["prepare", "--clips", data, "--out", store, "--config", spec + ":tiny,stage1", *common[:2]])
    s1, s2, s3 = (os.path.join(work, s) for s in ("stage1", "stage2", "distill"))
    cli(["train", "--config", spec + ":tiny,stage1,text_first", "--workdir", s1,
         f"--config.train.steps={stage1_steps}", *common])
    cli(["train", "--config", spec + ":tiny,stage2,text_first", "--workdir", s2,
         f"--config.train.steps={stage2_steps}", f"--config.init.checkpoint={s1}", *common])
    cli(["distill", "--config", spec + ":tiny,distill", "--workdir", s3,
         f"--config.train.steps={distill_steps}", f"--config.init.checkpoint={s2}", *common])
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(s3, out, ignore=shutil.ignore_patterns("tensorboard"))
    return out
