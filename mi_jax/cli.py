"""`mi-jax`: the command line.

    mi-jax synth    --out DIR [--clips N] [--seconds S] [--seed-start K] [--size HxW] [--voice espeak|mixed]
    mi-jax prepare  --clips DIR --out DIR --config configs/FILE.py:VARIANT [--config.FIELD=VALUE ...]
    mi-jax train    --config configs/FILE.py:VARIANT --workdir DIR [--config.FIELD=VALUE ...]
    mi-jax distill  --config configs/magicinfinite.py:tiny,distill --workdir DIR --config.init.checkpoint=RUN
    mi-jax generate --checkpoint RUN --portrait IMG --audio WAV [--audio WAV --mask IMG ...]
                    | --say TEXT [--voice en-us+f3]          (typed words spoken by espeak-ng: .[speech])
                    --prompt TEXT | --prompt 0:TEXT --prompt SECONDS:TEXT ... --out OUT.mp4
                    [--timeline FILE] [--no-rest] [--colour-anchor] [--seconds S] [--steps N]
                    [--cfg-text X] [--cfg-audio Y] [--seed K] [--size WxH]
    mi-jax import-weights --transformer DIR [--vae DIR] [--wav2vec DIR] --out CKPT [--config FILE:VARIANT]
    mi-jax export   --checkpoint CKPT --out DIR [--dtype bf16|fp32] [--merge-lora] [--ema]
    mi-jax train-vae --out DIR [--config FILE:VARIANT] [--config.vae_train.steps=N]   (the demo VAE)
    mi-jax train-speech-encoder --out DIR [--config FILE:VARIANT] [--config.speech_encoder_train.steps=N]
    mi-jax eval     --checkpoint RUN --out DIR [--clips N] [--seconds S] [--voice synthetic|espeak|both]
    mi-jax plan     --config FILE:VARIANT --mesh fsdp=8 [--budget 80] [--gpu h100]   (AOT memory / FLOPs)
    mi-jax demo     [--model demo/model] [--seconds 60] [--out out]
    mi-jax demo-model [--out demo/model]                            (rebuilds the bundled demo model)
    mi-jax app      [--checkpoint demo/model] [--port 7860] [--host 127.0.0.1]   (a local web page; needs .[app])
    mi-jax serve    [--checkpoint demo/model] [--port 7861] [--max-streams 2]   (live streams over HTTP; .[app])

Config overrides use the config's own field paths (`--config.train.steps=100`).
"""

from __future__ import annotations

# Each command imports what it runs inside its function: the commands pull different heavy
# stacks (JAX + the models, torch for export, gradio for app) and `plan` must set the host
# device count before JAX starts, so `mi-jax --help` and every command load only their own.
import argparse
import json
import sys


def cmd_synth(args) -> int:
    from mi_jax.data import synthetic

    h, w = (int(v) for v in args.size.lower().split("x"))
    synthetic.write_clips(args.out, args.clips, args.seconds, seed_start=args.seed_start, size=(h, w),
                          speakers=args.speakers, voice=args.voice)
    print(f"wrote {args.clips} clips to {args.out}")
    return 0


def cmd_prepare(args, overrides) -> int:
    from mi_jax.config_utils import load_config
    from mi_jax.data.prepare import prepare

    config = load_config(args.config, overrides)
    report = prepare(config, args.clips, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "prepared"}, indent=1))
    return 0


def cmd_distill(args, overrides) -> int:
    return cmd_train(args, overrides, distill=True)


def cmd_train(args, overrides, distill: bool = False) -> int:
    from mi_jax.parallel.distributed import maybe_initialize

    maybe_initialize()  # before anything touches a JAX backend
    from mi_jax.config_utils import load_config
    from mi_jax.train.run import train

    metrics = train(load_config(args.config, overrides), args.workdir, distill=distill)
    print(json.dumps(metrics))
    return 0


def cmd_generate(args) -> int:
    import os

    from tqdm import tqdm

    from mi_jax.data.audio_io import AudioError
    from mi_jax.data.inputs import InputError, prompt_notices
    import jax

    from mi_jax.parallel.distributed import maybe_initialize

    maybe_initialize()  # under launch/local.py, SLURM or multinode.sh; before anything touches JAX
    from mi_jax.pipeline import Pipeline

    if not args.out.lower().endswith(".mp4"):
        raise SystemExit(f"--out {args.out}: write an .mp4 file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise SystemExit(f"--out {args.out}: folder {out_dir} does not exist")
    size = None
    if args.size:
        w, _, h = args.size.lower().partition("x")
        size = (int(h), int(w))
    from mi_jax.pipeline import check_inputs
    from mi_jax.convert.checkpoint import load_run_config

    if (args.say is None) == (not args.audio):
        print("error: give --audio FILE (one per speaker) or --say TEXT, not both" if args.audio else
              "error: give --audio FILE or --say TEXT (the words to speak)", file=sys.stderr)
        return 2
    if args.voice is not None and args.say is None:
        print("error: --voice goes with --say (an audio file has its own voice)", file=sys.stderr)
        return 2
    if args.say is not None:  # spoken here, once, before the model is loaded (espeak-ng: milliseconds)
        from mi_jax.data import speech
        from mi_jax.convert.checkpoint import load_run_config as _run_config
        from mi_jax.pipeline import spoken as _spoken

        try:
            speech.check_voice(args.voice or speech.DEFAULT_VOICE)  # text and voice: before the run is read
            speech.check_text(args.say)
            spoken = _spoken(_run_config(args.checkpoint), args.say, args.voice)
        except (InputError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"said {len(args.say.split())} words in {spoken.seconds:.1f} s ({spoken.voice}, "
              f"{len(spoken.phonemes)} phonemes)", file=sys.stderr)
        args.audio = [spoken.audio]
    audio = args.audio if len(args.audio) > 1 else args.audio[0]
    prompts = args.prompt or [""]
    prompt = prompts[0] if len(prompts) == 1 else prompts
    controls = dict(allow_silence=not args.reject_silence, timeline=args.timeline, prompt=prompt)
    try:  # every input is checked before the model is loaded or anything compiled
        run_config = load_run_config(args.checkpoint)
        *_, checked = check_inputs(run_config, args.portrait, audio, seconds=args.seconds, masks=args.mask or None,
                                   size=size, **controls)
    except (InputError, AudioError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mi_jax.generation.controls import prompt_schedule

    # words the model never saw, and the inputs' notices: said now, not after the first window's compute
    told = checked + [n for _, text in prompt_schedule(prompt)
                      for n in prompt_notices(text, run_config.prepare.get("text_vocabulary", ()))]
    for note in told:
        print(f"note: {note}", file=sys.stderr)
    pipe = Pipeline.from_checkpoint(args.checkpoint, which=args.weights, mesh=args.mesh)
    writer = jax.process_index() == 0
    bar = tqdm(unit="window", dynamic_ncols=True, disable=not writer)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        chunks = pipe.stream(args.portrait, audio, prompt,
                             seconds=args.seconds, masks=args.mask or None, seed=args.seed, steps=args.steps,
                             cfg_text=args.cfg_text, cfg_audio=args.cfg_audio, size=size, progress=progress,
                             allow_silence=not args.reject_silence, timeline=args.timeline, rest=args.rest,
                             colour_anchor=args.colour_anchor)
        first = next(chunks)  # inputs are checked here, before anything is written
    except (InputError, AudioError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in pipe.notices:
        if note not in told:
            print(f"note: {note}", file=sys.stderr)

    mouths: list = []  # one voice (e.g. --say): the mouth opening measured as the frames pass, for its lip sync
    measure = len(args.audio) == 1 and writer and len(first)
    if measure:
        import numpy as np

        from mi_jax.app.inputs import mouth_box
        from mi_jax.data import synthetic

        box, found = mouth_box(first[0])

    def frames():
        for chunk in _chain_chunks(first, chunks):
            if measure:
                mouths.append(synthetic.measure_mouth_open(chunk, np.broadcast_to(box, (len(chunk), 4))))
            yield chunk

    written = pipe.write(args.out, frames())  # process 0 writes (atomically); the others compute their part
    bar.close()
    if written:
        print(f"wrote {written}")
    if written and measure:
        _print_lip_sync(pipe, np.concatenate(mouths), found)
    return 0


def _chain_chunks(first, rest):
    yield first
    yield from rest


def _print_lip_sync(pipe, mouth, found: str) -> None:
    """The video's lip sync: the voice's envelope against the mouth opening measured in its frames."""
    from mi_jax.data import synthetic
    from mi_jax.eval.metrics import best_offset_correlation

    p = pipe.config.prepare
    if len(mouth) < 8:
        return
    envelope = synthetic.mouth_envelope(pipe.last_audio, len(mouth), float(p.fps), int(p.sample_rate))
    r, k = best_offset_correlation(envelope, mouth, min(5, len(mouth) - 3))
    print(f"lip sync: r = {r:.2f} at {k:+d} frames (the voice's loudness against the mouth opening measured at "
          f"{found})")


def cmd_import_weights(args, overrides) -> int:
    from mi_jax.convert import format_report, import_weights

    model_overrides = {}
    if args.config:  # MagicInfinite's audio fields (and run fields) from a training config
        import dataclasses

        from mi_jax.config_utils import load_config
        from mi_jax.models.dit_config import DIFFUSERS_FIELDS, DiTConfig

        model = load_config(args.config, overrides).model.to_dict()
        names = {f.name for f in dataclasses.fields(DiTConfig)} - set(DIFFUSERS_FIELDS)
        model_overrides = {k: v for k, v in model.items() if k in names}
    report = import_weights(args.transformer, args.out, vae_dir=args.vae, wav2vec_dir=args.wav2vec,
                            config_overrides=model_overrides or None, dtype=args.dtype, seed=args.seed,
                            overwrite=args.overwrite)
    print(format_report(report))
    return 0


def cmd_export(args) -> int:
    from mi_jax.convert import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, merge_lora=args.merge_lora,
                               which="ema" if args.ema else "params", max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite)
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_train_vae(args, overrides) -> int:
    from mi_jax.config_utils import load_config
    from mi_jax.train.vae import train_vae

    print(json.dumps(train_vae(load_config(args.config, overrides), args.out)))
    return 0


def cmd_train_speech_encoder(args, overrides) -> int:
    from mi_jax.config_utils import load_config
    from mi_jax.train.speech_encoder import train_speech_encoder

    print(json.dumps(train_speech_encoder(load_config(args.config, overrides), args.out)))
    return 0


def cmd_eval(args) -> int:
    """Generates from held-out synthetic clips and scores the videos against their truth."""
    from mi_jax.eval.controls import heldout_generation
    from mi_jax.eval.metrics import evaluate
    from mi_jax.eval.report import check, write_report
    from mi_jax.pipeline import Pipeline

    if args.voice != "synthetic":  # espeak-ng speech, alone or beside the synthetic voice (mi_jax/eval/voices.py)
        from mi_jax.data import speech
        from mi_jax.eval.voices import check_voices, evaluate_voice, write_voices

        if not speech.available():
            print(f"error: --voice {args.voice} needs espeak-ng: {speech.INSTALL}", file=sys.stderr)
            return 2
        pipe = Pipeline.from_checkpoint(args.checkpoint)
        voices = ("synthetic", "espeak") if args.voice == "both" else ("espeak",)
        by_voice = {v: evaluate_voice(pipe, v, args.clips, args.seconds) for v in voices}
        path = write_voices(by_voice, args.out)
        rows = check_voices(by_voice)
        for r in rows:
            value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
            print(f"{r['voice']:>9}  {r['metric']}: {value}" + ("" if r["passed"] is None else
                                                               ("  pass" if r["passed"] else "  FAIL")))
        print(f"wrote {path}")
        return 0 if all(r["passed"] is not False for r in rows) else 1
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    videos, truths, bounds = [], [], []
    for i in range(args.clips):
        frames, clip, seams = heldout_generation(pipe, i, args.seconds)
        videos.append(frames)
        truths.append(clip)
        bounds.append(seams)
    results = evaluate(videos, truths, boundaries=bounds, frames_per_latent=pipe.vae_stream.config.temporal_factor)
    path = write_report(results, args.out)
    rows = check(results)
    print(f"wrote {path}")
    return 0 if all(r["passed"] is not False for r in rows) else 1


def cmd_demo(args) -> int:
    from mi_jax.demo import run_demo

    print(json.dumps(run_demo(args.model, args.out, args.seconds), indent=1))
    return 0


def cmd_demo_model(args) -> int:
    from mi_jax.demo import build_demo_model

    print(build_demo_model(args.out, args.work, seed=args.seed))
    return 0


def cmd_app(args) -> int:
    from mi_jax.app import InstallError, serve

    try:
        return serve(args.checkpoint, host=args.host, port=args.port)
    except (InstallError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_serve(args) -> int:
    from mi_jax.app import InstallError
    from mi_jax.serve import ServeSettings, serve

    if args.max_streams < 1:
        print(f"error: --max-streams {args.max_streams}: serve at least 1 stream", file=sys.stderr)
        return 2
    try:
        return serve(ServeSettings(args.checkpoint, args.host, args.port, args.max_streams))
    except (InstallError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """The options `app` and `serve` share: the model and where to listen."""
    p.add_argument("--checkpoint", default="demo/model", help="a training or distillation run folder")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: this machine only; 0.0.0.0: every network)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="render synthetic talking-head clips with ground truth")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--seed-start", type=int, default=0, help="seeds >= 1000000 are the held-out split")
    p.add_argument("--size", default="64x64", help="HxW")
    p.add_argument("--speakers", type=int, default=1)
    p.add_argument("--voice", choices=("synthetic", "espeak", "mixed"), default="synthetic",
                   help="the clips' voice: the synthetic one, espeak-ng sentences with a viseme truth "
                        "(pip install -e .[speech]), or mixed (both in turn, every 6 seeds)")

    p = sub.add_parser("prepare", help="clips -> a sample store for training")
    p.add_argument("--clips", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="configs/FILE.py:VARIANT")

    p = sub.add_parser("train", help="stage-1 / stage-2 training (resumes from --workdir)")
    p.add_argument("--config", required=True, help="configs/FILE.py:VARIANT")
    p.add_argument("--workdir", required=True)
    p = sub.add_parser("distill", help="DMD2 step distillation of a stage-2 run (--config.init.checkpoint)")
    p.add_argument("--config", required=True, help="configs/magicinfinite.py:tiny,distill")
    p.add_argument("--workdir", required=True)

    p = sub.add_parser("generate", help="portrait + voice + prompt -> talking video (mp4 with the audio)")
    p.add_argument("--checkpoint", required=True, help="a training or distillation run folder")
    p.add_argument("--portrait", required=True)
    p.add_argument("--audio", action="append", help="one per speaker (or --say)")
    p.add_argument("--say", default=None, help="text to speak instead of --audio (espeak-ng, offline; "
                   "pip install -e .[speech]); the spoken audio is animated and muxed into the mp4")
    p.add_argument("--voice", default=None, help="the espeak-ng voice for --say: LANGUAGE or LANGUAGE+VARIANT "
                   "(default en-us; e.g. en-us+f3, en-gb-x-rp+m4, fr)")
    p.add_argument("--mask", action="append", help="one mask image per speaker (white = that speaker)")
    p.add_argument("--prompt", action="append",
                   help="the prompt; repeat as 'SECONDS:TEXT' for a schedule (e.g. --prompt '0:a person talking' "
                        "--prompt '30:a person talking, nodding')")
    p.add_argument("--timeline", default=None,
                   help="a file of 'START END SPEAKER' lines: who speaks when (default: each track's voice activity)")
    p.add_argument("--rest", action=argparse.BooleanOptionalAction, default=True,
                   help="the mouth of a silent speaker rests as in the portrait (default: on)")
    p.add_argument("--colour-anchor", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the frames' colour on the portrait's (default: off; see the README)")
    p.add_argument("--reject-silence", action="store_true", help="fail on a silent track instead of animating it idle")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=None, help="default: the length of the audio")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg-text", type=float, default=None)
    p.add_argument("--cfg-audio", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="WxH (multiples of the VAE's spatial factor x the patch "
                   "size: 16 for an 8x VAE, 8 for a 4x one)")
    p.add_argument("--weights", choices=("ema", "params"), default="ema")
    p.add_argument("--mesh", default=None,
                   help="e.g. fsdp=2: the window step's mesh (default: one device; every device of a "
                        "multi-process job)")

    p = sub.add_parser("import-weights", help="diffusers / transformers folders -> an mi_jax checkpoint")
    p.add_argument("--transformer", required=True, help="a diffusers HunyuanVideo(-I2V) transformer folder")
    p.add_argument("--vae", default=None)
    p.add_argument("--wav2vec", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="configs/FILE.py:VARIANT whose model adds the audio modules")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--seed", type=int, default=0, help="initialises the new audio modules")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="an mi_jax checkpoint -> diffusers folders + the audio modules for PyTorch")
    p.add_argument("--checkpoint", required=True, help="a run folder or an import-weights folder")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--merge-lora", action="store_true")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--max-shard-size", default="10GB")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train-vae", help="train a small causal VAE on the synthetic world (resumable; settings "
                                         "in the config's vae_train, e.g. --config.vae_train.steps=3000)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/magicinfinite.py:tiny,stage1")

    p = sub.add_parser("train-speech-encoder", help="teach the small Wav2Vec2 the synthetic world's visemes and write "
                                                    "it as a transformers folder for prepare.wav2vec2 (the demo's "
                                                    "stand-in for a pretrained one; needs .[speech])")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/demo.py:stage1")

    p = sub.add_parser("eval", help="generate on held-out synthetic clips and write a quality report")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--voice", choices=("synthetic", "espeak", "both"), default="synthetic",
                   help="the clips' voice: synthetic (default), espeak (held-out espeak-ng speech: lip sync and "
                        "viseme shape; pip install -e .[speech]) or both, side by side (OUT/voices.md)")

    sub.add_parser("plan", help="compile train / generate steps on abstract shapes: per-device memory, FLOPs, "
                                "time estimate (see `mi-jax plan --help`)", add_help=False)

    p = sub.add_parser("demo", help="the bundled demo model talks for a minute (out/demo.mp4, out/lip_sync.png)")
    p.add_argument("--model", default="demo/model")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default="out")

    p = sub.add_parser("demo-model", help="rebuild the bundled demo model from nothing (seeded)")
    p.add_argument("--out", default="demo/model")
    p.add_argument("--work", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("app", help="a local web page: portrait + voice + prompt -> talking video (pip install "
                                   "-e '.[app]')")
    _server_arguments(p, port=7860)

    p = sub.add_parser("serve", help="one model, several live streams over HTTP: audio in as it is spoken, frames "
                                     "out as they are made (pip install -e '.[app]'; API in mi_jax/serve.py)")
    _server_arguments(p, port=7861)
    p.add_argument("--max-streams", type=int, default=2,
                   help="live streams at once (default 2); more are refused with HTTP 503 until one ends")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # sets the host device count itself, before JAX starts
        from mi_jax.plan import main as plan_main

        return plan_main(argv[1:]) or 0
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    plain = {"synth": cmd_synth, "generate": cmd_generate, "export": cmd_export, "eval": cmd_eval, "demo": cmd_demo,
             "demo-model": cmd_demo_model, "app": cmd_app, "serve": cmd_serve}
    if args.command in plain:
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        return plain[args.command](args)
    from mi_jax.config_utils import split_overrides

    overrides = split_overrides(rest, parser)
    configured = {"prepare": cmd_prepare, "train": cmd_train, "distill": cmd_distill, "import-weights": cmd_import_weights,
                  "train-vae": cmd_train_vae, "train-speech-encoder": cmd_train_speech_encoder}
    return configured[args.command](args, overrides)


if __name__ == "__main__":
    sys.exit(main())
