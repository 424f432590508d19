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

import json
import os
import shutil
import time

import numpy as np
import soundfile as sf
from PIL import Image

from mi_jax import atomic
from mi_jax.config_utils import load_config
from mi_jax.data import faces, synthetic
from mi_jax.data.prepare import prepare
from mi_jax.data.video_io import write_video
from mi_jax.eval.metrics import best_offset_correlation
from mi_jax.eval.report import plot_lip_sync
from mi_jax.pipeline import Pipeline
from mi_jax.train.run import train
from mi_jax.train.speech_encoder import train_speech_encoder
from mi_jax.train.vae import train_vae

DEMO = "demo"
HELDOUT_SEED = 1_000_123
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def demo_inputs(folder: str, seconds: float = 60.0) -> tuple[str, str, str]:
    """Writes the bundled portrait, voice and face mask (a held-out synthetic identity) if
    missing; returns their paths. The mask is the portrait's face box grown by `prepare`'s
    default face margin: the region the model's audio acted on in training (the face detector
    misses these 64x64 faces, and without a mask audio would act on the whole frame)."""
    portrait, voice, mask = (os.path.join(folder, n) for n in ("portrait.png", "voice.wav", "mask.png"))
    if not all(map(os.path.exists, (portrait, voice, mask))) or sf.info(voice).duration < seconds - 1e-3:
        os.makedirs(folder, exist_ok=True)
        clip = synthetic.render_clip(HELDOUT_SEED, 0.2, size=(64, 64))
        Image.fromarray(clip.frames[0]).save(portrait)
        margin = float(load_config(CONFIG).prepare.face_margin)  # the demo model's, as prepare grew it
        Image.fromarray(faces.box_mask_images(clip.face_boxes[:, 0], 64, 64, margin=margin)[0]).save(mask)
        rng = np.random.default_rng(HELDOUT_SEED)
        turns = synthetic.speaking_turns(rng, seconds, 1)[0]
        sf.write(voice, synthetic.speech_audio(rng, int(seconds * 16000), 150.0, turns), 16000, subtype="PCM_16")
    return portrait, voice, mask


def run_demo(model: str = os.path.join(DEMO, "model"), out: str = "out", seconds: float = 60.0,
             prompt: str = "a person talking", inputs: str | None = None) -> dict:
    """Generates `seconds` of the demo; `inputs`: where the portrait and voice are (written there
    if missing; default: beside the model, i.e. demo/)."""
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model}: no demo model; build it with `mi-jax demo-model` (see the README)")
    portrait, voice, mask = demo_inputs(inputs or os.path.dirname(model.rstrip("/")) or DEMO, seconds)
    os.makedirs(out, exist_ok=True)
    pipe = Pipeline.from_checkpoint(model)
    t0 = time.time()
    chunks = pipe.stream(portrait, voice, prompt, seconds=seconds, masks=[mask])
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
    truth = synthetic.render_clip(HELDOUT_SEED, 0.2, size=video.shape[1:3])
    box = truth.mouth_boxes[0, 0]
    mouth = synthetic.measure_mouth_open(video, np.broadcast_to(box, (len(video), 4)))
    env = synthetic.mouth_envelope(pipe.last_audio, len(video), float(pipe.config.prepare.fps))
    corr, offset = best_offset_correlation(env, mouth, 5)
    plot = plot_lip_sync(env, mouth, float(pipe.config.prepare.fps), os.path.join(out, "lip_sync.png"),
                         title="demo (the voice against the mouth measured from generated pixels)")
    return {"video": path, "plot": plot, "frames": len(video), "seconds": len(video) / pipe.config.prepare.fps,
            "wall_seconds": round(wall, 1), "lip_sync_correlation": round(float(corr), 3), "offset": int(offset)}


def build_demo_model(out: str = os.path.join(DEMO, "model"), work: str = "runs/demo", *, clips: int = 128,
                     two_speaker_clips: int = 32,
                     vae_steps: int | None = None, stage1_steps: int = 3000, stage2_steps: int = 8000,
                     distill_steps: int = 400, seed: int = 0, log=print) -> str:
    """The demo model from nothing, seeded: synthetic clips -> the demo VAE (`train_vae`, in the
    regime generation runs it) -> the speech encoder (`train_speech_encoder`: the small Wav2Vec2
    taught visemes, in place of a pretrained one) -> prepare -> stage 1 -> stage 2 -> DMD2 (4
    steps, LoRA); writes the VAE to `<out>/../vae`, the speech encoder to `<out>/../wav2vec2` and
    the final run (weights + config) to `out`, with `build.json`
    (seed, steps, wall time per part) beside the model.

    Resumable: everything goes to `work` first and every part picks up where it stopped (the VAE
    trainer and the training loop from their checkpoints, prepare skips prepared clips, finished
    parts are skipped), so a build killed midway and started again ends with the same model.

    The config is configs/demo.py; stage order `text_first` (configs/magicinfinite.py). With no
    pretrained backbone, stage 1 of the default order would train audio modules over a random
    frozen DiT; here stage 1 teaches the backbone video (text + reference) and stage 2 adds audio
    jointly.
    """
    os.makedirs(work, exist_ok=True)
    spec = CONFIG
    vae_out, w2v_out = (os.path.join(os.path.dirname(out.rstrip("/")) or DEMO, p) for p in ("vae", "wav2vec2"))
    vae_dir, w2v_dir, data, store = (os.path.join(work, p) for p in ("vae", "wav2vec2", "clips", "store"))
    # prepare encodes with the VAE and speech encoder being built; the runs name the folders they
    # ship in (generation loads them from there; training itself runs neither)
    common = [f"prepare.vae={vae_out}", f"prepare.wav2vec2={w2v_out}", f"seed={seed}", f"data.store={store}",
              "mesh=fsdp=1"]
    log_path = os.path.join(work, "build.json")
    record = {"seed": seed, "clips": clips, "two_speaker_clips": two_speaker_clips, "parts": {}}
    if os.path.exists(log_path):
        with open(log_path) as f:
            record = json.load(f)

    def part(name: str, fn):
        t0 = time.time()
        fn()
        record["parts"][name] = round(record["parts"].get(name, 0.0) + time.time() - t0, 1)
        _write_json(log_path, record)

    def finished(run: str, steps: int) -> bool:
        return os.path.isdir(os.path.join(work, run, "checkpoints", str(steps)))

    if "synth" not in record["parts"]:  # recorded once every clip is written
        def synth():  # both voices (synthetic, espeak-ng speech); a share of two speakers taking turns
            synthetic.write_clips(data, clips, 4.0, seed_start=seed, voice="mixed")
            synthetic.write_clips(data, two_speaker_clips, 4.0, seed_start=seed + clips, voice="mixed", speakers=2)
        part("synth", synth)
    vae_cfg = load_config(spec + ":stage1")
    vae_steps = int(vae_cfg.vae_train.steps if vae_steps is None else vae_steps)
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        part("vae", lambda: log(train_vae(vae_cfg, vae_dir, work_dir=os.path.join(work, "vae.train"), log=log,
                                          steps=vae_steps, seed=seed)))
        # a stopped build times only the resumed run's share; the trainer counts its steps' time
        # over every run
        with open(os.path.join(vae_dir, "training.json")) as f:
            record["parts"]["vae"] = max(record["parts"]["vae"], float(json.load(f)["wall_seconds"]))
        _write_json(log_path, record)
    if not os.path.exists(os.path.join(w2v_dir, "config.json")):  # a Wav2Vec2 that tells visemes apart
        part("speech_encoder", lambda: log(train_speech_encoder(vae_cfg, w2v_dir, log=log, seed=seed)))
    part("prepare", lambda: prepare(load_config(spec + ":stage1", [f"prepare.vae={vae_dir}", f"prepare.wav2vec2={w2v_dir}",
                                                                   f"seed={seed}"]), data, store))
    stages = [("stage1", "stage1,text_first", stage1_steps, None),
              ("stage2", "stage2,text_first", stage2_steps, "stage1"),
              ("distill", "distill", distill_steps, "stage2")]
    for name, variant, steps, init in stages:
        if not finished(name, steps):
            extra = [f"init.checkpoint={os.path.join(work, init)}"] if init else []
            config = load_config(f"{spec}:{variant}", [f"train.steps={steps}", *extra, *common])
            part(name, lambda: train(config, os.path.join(work, name), distill=name == "distill"))
    record.update(steps={"vae_image": int(vae_cfg.vae_train.image_steps), "vae": vae_steps,
                         "speech_encoder": int(vae_cfg.speech_encoder_train.steps), "stage1": stage1_steps,
                         "stage2": stage2_steps, "distill": distill_steps},
                  wall_seconds=round(sum(record["parts"].values()), 1))
    _write_json(log_path, record)
    for src, dst, ignore in ((vae_dir, vae_out, None), (w2v_dir, w2v_out, None),
                             (os.path.join(work, "distill"), out, ("tensorboard",))):
        with atomic.folder(dst) as tmp:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*ignore) if ignore else None, dirs_exist_ok=True)
            if dst == out:  # the final checkpoint only (the run keeps the last few)
                shutil.copy(log_path, os.path.join(tmp, "build.json"))
                for step in os.listdir(os.path.join(tmp, "checkpoints")):
                    if step != str(distill_steps):
                        shutil.rmtree(os.path.join(tmp, "checkpoints", step))
    return out


def _write_json(path: str, data: dict) -> None:
    atomic.write_file(path, json.dumps(data, indent=1).encode())
