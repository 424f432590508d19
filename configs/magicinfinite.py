"""MagicInfinite training: stage 1 (audio / lip sync) and stage 2 (text + audio + reference).

    mi-jax train --config configs/magicinfinite.py:tiny,stage1 --workdir runs/tiny_s1
    mi-jax train --config configs/magicinfinite.py:tiny,stage2 --workdir runs/tiny_s2 \
        --config.init.checkpoint=runs/tiny_s1
    mi-jax train --config configs/magicinfinite.py:stage1 --workdir gs://.../s1 \
        --config.init.diffusers=HunyuanVideo-I2V/transformer --config.data.store=/data/store

`get_config("VARIANT,STAGE[,text_first]")`: VARIANT is `tiny` (CPU tests), `demo` (the bundled
demo model: configs/demo.py, built on tiny) or `full` (the 13B HunyuanVideo-I2V backbone,
configs/hunyuan_video_i2v.py); STAGE is `stage1`, `stage2` or `distill`. The paper (Yi et al.
2025, section 6) does not fix the stage order, so the stages are data: by default stage 1 trains
the audio modules for lip sync with a mouth-weighted loss, stage 2 trains everything jointly with
per-condition dropout for CFG. `text_first` swaps the emphasis (stage 1: text + reference on the
backbone, no audio; stage 2: audio joins).
"""

import os

import ml_collections

from mi_jax.config_utils import load_config
from mi_jax.data import synthetic
from mi_jax.data.text_encoder import prompt_words

_HERE = os.path.dirname(os.path.abspath(__file__))

AUDIO_MODULES = (r"^audio_projector/", r"audio_attn/")


def _model(variant: str) -> ml_collections.ConfigDict:
    if variant == "tiny":
        model = load_config(os.path.join(_HERE, "hunyuan_video_i2v.py:tiny")).model
        model.update(audio_blocks=1, audio_feature_layers=4, audio_feature_dim=32, audio_window=1,
                     audio_hidden=32, audio_tokens=4, audio_token_dim=32)
        return model
    model = load_config(os.path.join(_HERE, "hunyuan_video_i2v.py:i2v")).model
    # `mi-jax plan`: the stage-2 step at 544x544 x 33 frames, B=8 on fsdp=8, needs full remat
    # to fit 80 GB per device
    model.remat_policy = "full"
    # wav2vec2-base: 12 transformer layers of 768; audio in the last 10 of 40 single blocks
    model.update(audio_blocks=10, audio_feature_layers=12, audio_feature_dim=768, audio_window=2,
                 audio_hidden=512, audio_tokens=32, audio_token_dim=768)
    return model


def get_config(arg: str = "tiny,stage1") -> ml_collections.ConfigDict:
    """The training, data and sampling config of one variant and stage.

    Args:
      arg: comma-separated parts (default `"tiny,stage1"`): an optional leading variant `tiny`,
        `demo` or `full` (default `tiny`), a stage `stage1`, `stage2` or `distill` (default
        `stage1`) and optionally `text_first`.

    Returns:
      An `ml_collections.ConfigDict` with `model`, `mesh`, `data`, `prepare`, `vae_train`,
      `sample`, `init`, `train`, `stage` (and `distill` for the `distill` stage).

    Raises:
      ValueError: an unknown part.
    """
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    variant = parts[0] if parts and parts[0] in ("tiny", "full", "demo") else "tiny"
    if variant == "demo":  # the bundled demo model: configs/demo.py, built on tiny
        return load_config(os.path.join(_HERE, "demo.py:" + ",".join(parts)))
    stage = next((p for p in parts if p.startswith("stage") or p == "distill"), "stage1")
    text_first = "text_first" in parts
    unknown = set(parts) - {"tiny", "full", "stage1", "stage2", "distill", "text_first"}
    if unknown or stage not in ("stage1", "stage2", "distill"):
        raise ValueError(f"unknown config arg part(s) {sorted(unknown) or stage}; use e.g. 'tiny,stage1'")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model(variant)
    c.mesh = "fsdp=-1"  # data, fsdp, context, tensor sizes; -1 fills

    c.data = ml_collections.ConfigDict()
    c.data.store = ""  # a folder written by `mi-jax prepare`
    c.data.global_batch = 32
    c.data.num_workers = 0
    c.data.shuffle_seed = 0

    # `mi-jax prepare`: clips -> windows of `latent_frames` latents (1 + 4(T-1) video frames)
    p = c.prepare = ml_collections.ConfigDict()
    p.fps = 25.0
    p.sample_rate = 16000
    p.height, p.width = 544, 544
    p.latent_frames = 33
    p.speakers = 1  # S: every window carries S audio tracks and masks (absent speakers are empty)
    p.face_margin = 0.15
    p.default_prompt = "a person talking"
    p.text_len = 256
    p.workers = 2
    p.shard_size = 256
    # frozen encoders: a diffusers / transformers folder, or "random:SEED" (tiny, seeded; tests)
    p.vae = ""
    p.vae_random = ml_collections.ConfigDict(dict(latent_channels=4, block_out_channels=(8, 8, 16, 16),
                                                  layers_per_block=1, norm_num_groups=4))
    # the VAE's temporal tiles (diffusers' names and defaults): `prepare` encodes, generation
    # decodes and `train-vae` trains through one `VAEStream` with these (mi_jax/models/vae.py)
    p.vae_tiling = ml_collections.ConfigDict(dict(tile_sample_min_num_frames=16, tile_sample_stride_num_frames=12))
    p.wav2vec2 = ""
    p.wav2vec2_random = ml_collections.ConfigDict(dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))
    p.audio_layers = tuple(range(1, 13))
    p.audio_chunk_seconds = 8.0  # Wav2Vec2 runs on windows of this (+1 s context each side)
    p.text_encoder = ""  # a HunyuanVideo-I2V diffusers folder (or "tiny")
    p.text_vocabulary = ()  # the words the model knows; () = no check (the real encoder knows English)

    # the demo's speech encoder (mi_jax/train/speech_encoder.py): prepare.wav2vec2_random trained on
    # the synthetic world's training voices to tell visemes apart, as a pretrained Wav2Vec2 would
    e = c.speech_encoder_train = ml_collections.ConfigDict()
    # 150 steps: a longer-trained encoder lets the demo DiT draw the vowels' width but costs it lip
    # sync at the demo's stage-2 length (docs/speech.md#the-demos-speech-encoder)
    e.steps = 150
    e.clips = 64  # 4 s clips of the train split, every other one espeak-ng speech
    e.seconds = 4.0
    e.batch = 4
    e.learning_rate = 1e-3
    e.seed = 0

    # `mi-jax train-vae` (mi_jax/train/vae.py): the small VAE of the synthetic world (tiny variant)
    v = c.vae_train = ml_collections.ConfigDict()
    v.init = ""  # a diffusers VAE folder to fine-tune (widened to more latent channels if needed)
    v.temporal_init = False  # start from `train.vae.temporal_init` of it: each latent from its own frames
    v.steps = 1500
    v.batch = 2
    v.learning_rate = 2e-3
    v.schedule = "cosine"  # after 100 warm-up steps: "cosine" decay to 5 % or "constant"
    v.image_steps = 0  # the image stage first: single frames at image_batch (then `steps` on clips)
    v.image_batch = 16
    v.grad_weight = 0.0  # weight of the L1 on the frames' x / y differences
    v.clip_learning_rate = 0.0  # the clip stage's rate after an image stage (0: learning_rate)
    v.image_every = 0  # in the clip stage every k-th batch is images (0: none)
    v.beta = 1e-6  # KL weight
    v.lengths = ()  # clip lengths in frames; () = VAEStream's regime (17, 13, 9, 5, 1 at 4x time)
    v.tile_fraction = 0.7  # share of steps at the first length (the tile)
    v.portrait_fraction = 0.5  # share of clips whose latent 0 encodes the first frame alone
    v.face_weight, v.mouth_weight, v.eye_weight = 2.0, 10.0, 10.0  # L1 weights on top of 1
    v.clips = 384  # the training pool (2 s synthetic clips, train split)
    v.checkpoint_every = 50
    v.seed = 0

    # generation (mi_jax/diffusion/sampler.py): windows of the training length
    g = c.sample = ml_collections.ConfigDict()
    g.window = p.latent_frames  # W latents per window (RoPE positions as in training)
    g.overlap = 3  # O motion latents carried (InfiniteTalk: 3)
    g.steps = 50
    g.shift = 7.0
    g.kind = "euler"
    g.cfg_text = 5.0
    g.cfg_audio = 4.0
    g.cfg_reference = 1.0
    g.cfg_end_fraction = 1.0  # < 1 anneals the scales towards 1 as t -> 0
    g.embedded_guidance = 1.0
    # live streams (mi_jax/live.py): audio read past a window's last frame before it runs, and the
    # audio-to-frame latency past which a frame counts as late (runs saved without these use the same)
    g.stream_lookahead_s = 0.2
    g.stream_max_latency_s = 1.0

    c.init = ml_collections.ConfigDict()
    c.init.diffusers = ""  # a diffusers HunyuanVideo(-I2V) transformer folder to start from
    c.init.checkpoint = ""  # or an mi_jax run folder (its latest checkpoint's params)
    c.init.lora_rank = 0  # > 0: train LoRA factors (and the audio modules) over a frozen base

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20_000
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 500
    c.train.final_lr_fraction = 0.1
    c.train.weight_decay = 0.0
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.99
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1
    c.train.ema_decay = 0.999
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.nan_patience = 10  # stop after this many non-finite steps in a row

    s = c.stage = ml_collections.ConfigDict()
    s.name = stage
    s.timestep_sampling = "logit_normal"
    s.timestep_shift = 7.0
    s.guidance = 1.0  # embedded guidance scale fed to guidance-embedding models while training
    s.loss = ml_collections.ConfigDict(dict(global_weight=1.0, face_weight=0.0, mouth_weight=0.0))
    s.dropout = ml_collections.ConfigDict(dict(text=0.0, audio=0.0, reference=0.0))
    if stage == "stage1" and not text_first:  # lip sync first: only the audio modules learn
        s.use_audio = True
        s.trainable = list(AUDIO_MODULES)
        s.loss.update(face_weight=0.5, mouth_weight=1.0)
        s.dropout.update(audio=0.05)
    elif stage == "stage1":  # text_first: text + reference on the backbone, no audio yet
        s.use_audio = False
        s.trainable = [r"^(?!audio_projector/)(?!.*audio_attn/).*"]
        s.loss.update(face_weight=0.5)
        s.dropout.update(text=0.1, reference=0.05)
    else:  # stage 2 (and the distillation data): text + audio + reference jointly, CFG dropout
        s.use_audio = True
        s.trainable = [r".*"]
        s.loss.update(face_weight=0.5, mouth_weight=1.0 if text_first else 0.5)
        s.dropout.update(text=0.1, audio=0.1, reference=0.05)
    if stage == "distill":
        _distill(c)
    if variant == "tiny":  # the CPU variant (tests, the demo model): the same config at toy sizes
        c.data.global_batch = 4
        p.update(height=64, width=64, latent_frames=3, text_len=12, vae="random:0", wav2vec2="random:0",
                 audio_layers=(1, 2, 3, 4), text_encoder="tiny")
        # the words the model knows: the tiny encoder hashes each word to its own vector, so a
        # word no training prompt had means nothing; generation names such words in a notice
        training_words = (w for prompt in synthetic.TRAINING_PROMPTS for w in prompt_words(prompt))
        p.text_vocabulary = tuple(dict.fromkeys(training_words))
        g.update(window=p.latent_frames, overlap=1, steps=20, shift=1.0, cfg_text=2.0, cfg_audio=2.0)
        c.train.update(steps=300, learning_rate=1e-3, warmup_steps=20, checkpoint_every=100)
        s.timestep_shift = 1.0
        if stage == "distill":
            c.distill.update(time_shift=1.0, curriculum_steps=100, lora_rank=8)
            c.train.learning_rate = 1e-4
    if stage == "distill":
        _distilled_sampler(c)
    return c


def _distill(c) -> None:
    """DMD2 to `num_steps` (mi_jax/train/dmd2.py): `mi-jax distill --config ...:tiny,distill
    --config.init.checkpoint=STAGE2_RUN`. The result samples in K steps with no CFG passes
    (`_distilled_sampler`)."""
    d = c.distill = ml_collections.ConfigDict()
    d.num_steps = 4
    d.time_shift = 5.0
    d.ttur = 5  # critic updates per generator update (DMD2)
    d.curriculum_steps = 2000  # base loss -> DM loss (MagicInfinite)
    d.real_guidance = 2.0  # the teacher's CFG weight before MagicInfinite's 2-3x attenuation
    d.student_guidance = 1.0  # embedded guidance fed to the student (guidance-embedding models)
    d.lora_rank = 64
    d.lora_activations = True  # LoRA as x W + (x a) b in the step; False merges W + a b (more memory:
    #                            benchmarks/dmd2_memory.py)
    d.cfg_distill_weight = 0.0  # > 0 adds CFG distillation (Meng et al.) to the generator loss
    # the rest of DMD2Config (mi_jax/train/dmd2.py says where each default comes from); not here:
    # gan_* (the DiT job has no GAN head), lora_targets (DMD2Config's: every attention and MLP
    # kernel), seed (config.seed)
    d.backward_simulation = True  # the generator's input from its own earlier steps (DMD2)
    d.dm_t_min, d.dm_t_max, d.dm_t_shift = 0.02, 0.98, 1.0  # DM loss / critic times
    d.cfg_attenuation_high = 2.0  # MagicInfinite's 2x-3x attenuation of the real score's CFG:
    d.cfg_attenuation_low = 3.0  # high for t >= boundary, low below
    d.cfg_attenuation_boundary = 0.75
    d.base_t_kind, d.base_t_shift = "logit_normal", 7.0  # the curriculum's base (flow) loss times
    d.lora_scale = 1.0  # alpha / rank
    d.cfg_g_min, d.cfg_g_max = 1.0, 8.0  # CFG distillation's guidance range
    d.ema_decay = 0.0  # generator EMA (DMD2 / CausVid: none)
    c.train.learning_rate = 1e-6


def _distilled_sampler(c) -> None:
    """The teacher's CFG is the sampler's of the stage-2 config; the distilled model samples in K
    steps, one pass each (CFG is baked in)."""
    d = c.distill
    d.teacher_cfg_text = c.sample.cfg_text
    d.teacher_cfg_audio = c.sample.cfg_audio
    c.sample.update(kind="x0", steps=d.num_steps, shift=d.time_shift, cfg_text=1.0, cfg_audio=1.0)
