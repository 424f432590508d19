"""Per-device memory of a DMD2 step against a plain fine-tuning step, compiled ahead of time.

Three steps of one config, compiled on abstract shapes over forced host devices exactly as
`mi-jax plan` compiles them (mi_jax/plan.py; nothing is allocated):

    train           the stage-2 fine-tuning step: every weight trained (AdamW moments, EMA)
    dmd2 LoRA       the DMD2 step (mi_jax/train/dmd2.py) with the generator and the critic as
                    LoRA factors over the one frozen teacher (`distill.lora_rank`)
    dmd2 full copy  the same step with the generator and the critic as full trainable copies
                    (DMD2's and CausVid's choice; `distill.lora_rank=0`)
    (--merged)      the LoRA step with the factors merged into full kernels inside the step
                    (`distill.lora_activations=False`) instead of applied on activations

and prints `compiled.memory_analysis()` per device (arguments + outputs - donated +
temporaries) and the ratios to the train step. Goal: DMD2 with LoRA <= 1.4x the train step.

Default: the real (13B) HunyuanVideo-I2V shapes of `configs/magicinfinite.py:full,distill`, one
544x544 clip of 9 latent frames per device (fsdp=8, batch 8): a real training shape at which
weights, optimiser state and gradients (about 33 of the train step's 54 GB) outweigh the
activations. Measured here (CPU compiler; GB per device):

    step               args  temps  total  x train
    train              27.4   26.5   53.9    1.00
    dmd2 LoRA           7.8   50.7   58.5    1.09   LoRA on activations (distill.lora_activations)
    dmd2 full copy     48.0   72.2  120.2    2.23
    dmd2 LoRA merged    7.8   80.7   88.5    1.64   190 GB (3.5x) with the factors replicated

The DMD2 step's temporaries are about twice the train step's: it runs more passes (backward
simulation, the generator under the base and DM losses, the critic, the 3-branch real score),
and two backward passes.
Any config field can be overridden:

    python benchmarks/dmd2_memory.py [--mesh fsdp=8] [--config configs/magicinfinite.py:full,distill] \
        [--config.model.num_layers=4 --config.model.num_single_layers=8 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mi_jax.config_utils import load_config, parse_args  # noqa: E402
from mi_jax import plan  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "magicinfinite.py") + ":full,distill"
DEFAULT_OVERRIDES = ["data.global_batch=8", "prepare.latent_frames=9"]


def measure(config, mesh: str, log=print, merged: bool = False) -> dict:
    """{name: plan entry} for the train step, the DMD2 step with LoRA and with full copies (and,
    with `merged`, with LoRA merged into the kernels inside the step)."""
    lora = plan.plan(config, mesh, steps=("train", "distill"), suggest=False, log=log)["steps"]
    full = copy.deepcopy(config)
    full.distill.lora_rank = 0
    copies = plan.plan(full, mesh, steps=("distill",), suggest=False, log=log)["steps"]
    rows = {"train": lora["train"], "dmd2 LoRA": lora["distill"], "dmd2 full copy": copies["distill"]}
    if merged:
        kernels = copy.deepcopy(config)
        kernels.distill.lora_activations = False
        merged_plan = plan.plan(kernels, mesh, steps=("distill",), suggest=False, log=log)
        rows["dmd2 LoRA merged"] = merged_plan["steps"]["distill"]
    return rows


def report(rows: dict, config) -> str:
    base = rows["train"]["memory_gb"]["total"]
    m, d = config.model, config.distill
    lines = [f"model: {m.num_layers} dual + {m.num_single_layers} single blocks, hidden "
             f"{m.num_attention_heads * m.attention_head_dim}, params {m.param_dtype}, remat {m.remat_policy}; "
             f"LoRA rank {d.lora_rank}; batch {config.data.global_batch}, {config.prepare.height}x"
             f"{config.prepare.width}, {config.prepare.latent_frames} latent frames",
             f"{'step':<17} {'args GB':>8} {'temps GB':>9} {'total GB':>9} {'x train':>8} {'compile s':>9}"]
    for name, e in rows.items():
        g = e["memory_gb"]
        lines.append(f"{name:<17} {g['arguments']:8.3f} {g['temporaries']:9.3f} {g['total']:9.3f} "
                     f"{g['total'] / base:8.3f} {e['compile_seconds']:9.1f}")
    lora, full = (rows[k]["memory_gb"]["total"] / base for k in ("dmd2 LoRA", "dmd2 full copy"))
    lines.append(f"ratio DMD2/train: LoRA {lora:.3f} (goal <= 1.4: {'met' if lora <= 1.4 else 'MISSED'}), "
                 f"full copies {full:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--mesh", default="fsdp=8")
    ap.add_argument("--merged", action="store_true",
                    help="also the DMD2 step with LoRA merged into full kernels (distill.lora_activations=False)")
    args, overrides = parse_args(ap, argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_platforms", "cpu")  # as `mi-jax plan`: forced host devices, nothing allocated
        jax.config.update("jax_num_cpu_devices", plan._named_devices(args.mesh) or 8)
    config = load_config(args.config, (DEFAULT_OVERRIDES if args.config == DEFAULT_CONFIG else []) + overrides)
    t0 = time.time()
    rows = measure(config, args.mesh, log=lambda s: print(s, flush=True), merged=args.merged)
    print(report(rows, config))
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
