"""DMD2 against the base loss on the 2-D toy of tests/test_dmd2_toy.py, for several K.

For each K: DMD2 (the test's recipe: LoRA over the one frozen base, backward simulation, TTUR,
curriculum, real score with attenuated CFG) and a same-budget student trained on the base
loss alone, sampled with K Euler steps. Prints MMD^2 against the teacher's 64-step samples,
mode coverage (modes holding >= 4% of the samples, and the fraction of samples within 5 std
of a mode), the conditional samples' class accuracy, and the wall time of the DMD2 steps.
The measures are defined in the test's docstring.

Usage: python benchmarks/dmd2_toy.py [--ks 1,2,4] [--steps 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as the tests run
jax.config.update("jax_threefry_partitionable", True)

import test_dmd2_toy as toy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4", help="generator step counts to compare")
    ap.add_argument("--steps", type=int, default=toy.DMD_STEPS, help="DMD2 steps (and base-loss steps) per K")
    args = ap.parse_args()
    teacher = toy.train_teacher()
    samples = toy.teacher_sampler(teacher)
    print(f"teacher ({toy.TEACHER_STEPS} steps), 64 Euler steps: coverage {toy.coverage(samples)}")
    head = ("K", "MMD2 dmd2", "MMD2 base", "cov dmd2", "cov base", "class acc", "dmd2 s")
    print("{:>2} {:>10} {:>10} {:>14} {:>14} {:>9} {:>7}".format(*head))
    for k in (int(x) for x in args.ks.split(",")):
        cfg = dataclasses.replace(toy.DMD_CFG, num_steps=k)
        out = toy.distil(teacher, cfg, args.steps)
        r = toy.evaluate(teacher, samples, out["state"], cfg, args.steps)
        cov = lambda c: f"{c[0]:.3f}/{c[1]:.3f}"  # noqa: E731
        print(f"{k:>2} {r['mmd_dmd']:>10.4f} {r['mmd_base']:>10.4f} {cov(r['cov_dmd']):>14} {cov(r['cov_base']):>14} "
              f"{r['own_mode']:>9.3f} {out['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
