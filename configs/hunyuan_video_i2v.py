"""HunyuanVideo-I2V backbone shapes (the MagicInfinite base) and a tiny variant for tests.

    python -c "from configs.hunyuan_video_i2v import get_config; print(get_config('tiny'))"

Variants (`get_config(arg)`):
  ""/"i2v"  HunyuanVideo-I2V, token_replace conditioning, 16 channels, guidance embedding
            (diffusers' conversion script `HYVideo-T/2-I2V-16ch`; Tencent-Hunyuan/HunyuanVideo-I2V
            `--i2v-condition-type token_replace`, its default for stable identity).
  "i2v_33ch" the first HunyuanVideo-I2V release: latent_concat, in_channels 2*16+1 = 33, no guidance
            embedding (`HYVideo-T/2-I2V-33ch`; diffusers `hunyuanvideo-community/HunyuanVideo-I2V`).
  "t2v"     HunyuanVideo T2V cfg-distilled (`HYVideo-T/2-cfgdistill`, diffusers' class defaults).
  "tiny"    token_replace with tiny sizes: CPU tests and smoke runs.
Suffix ",bf16" on any variant sets bf16 compute and params (e.g. "i2v,bf16").

Where the numbers come from: every architecture number equals the defaults of diffusers 0.42
`HunyuanVideoTransformer3DModel.__init__` (24 heads x 128 = 3072 hidden, 20 dual + 40 single
blocks, 2 refiner blocks, mlp_ratio 4, patch 1x2x2, rms qk-norm, text_embed_dim 4096 from
LLaVA-LLaMA-3-8B, pooled 768 from CLIP-L, rope_theta 256, rope_axes_dim (16, 56, 56)) and the
`TRANSFORMER_CONFIGS` table of diffusers' scripts/convert_hunyuan_video_to_diffusers.py for the
I2V variants (in_channels, guidance_embeds, image_condition_type).
"""

import ml_collections

_BASE = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    image_condition_type="token_replace",
)

_VARIANTS = {
    "i2v": {},
    "i2v_33ch": dict(in_channels=33, guidance_embeds=False, image_condition_type="latent_concat"),
    "t2v": dict(image_condition_type=None),
    "tiny": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The DiT backbone config of one variant.

    Args:
      arg: `VARIANT[,bf16]` (default "": `i2v`); VARIANT is one of `i2v`, `i2v_33ch`, `t2v`,
        `tiny`; `bf16` sets bf16 compute and parameters.

    Returns:
      An `ml_collections.ConfigDict` with `variant`, `model` (DiTConfig fields), `mesh`, `seed`.

    Raises:
      ValueError: an unknown variant or flag.
    """
    parts = [p.strip() for p in (arg or "i2v").split(",")]
    variant, flags = parts[0] or "i2v", set(parts[1:])
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_VARIANTS)}")
    unknown = flags - {"bf16"}
    if unknown:
        raise ValueError(f"unknown flag(s) {sorted(unknown)}; the only flag is 'bf16'")

    config = ml_collections.ConfigDict()
    config.variant = variant
    model = dict(_BASE, **_VARIANTS[variant])
    model.update(
        dtype="bfloat16" if "bf16" in flags else "float32",
        param_dtype="bfloat16" if "bf16" in flags else "float32",
        attention="auto",  # cuDNN flash attention on GPU in bf16, `dense` on CPU, XLA elsewhere
        scan_layers=True,
        scan_unroll="auto",  # every block unrolled on CPU (faster there), one per iteration elsewhere
        remat_policy="none" if variant == "tiny" else "dots_no_batch",
    )
    config.model = ml_collections.ConfigDict(model)
    # Mesh axis sizes (data, fsdp, context, tensor); -1 fills with the remaining devices.
    config.mesh = "fsdp=-1"
    config.seed = 0
    return config
