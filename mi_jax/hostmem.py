"""Host-memory setting the project runs XLA:CPU under: glibc's `malloc.hugetlb` tunable.

Why: XLA:CPU allocates each executable's temporaries as one block per call (454 MB for the demo
VAE's train step at 2 x 17 x 64 x 64). Past glibc's largest mmap threshold (32 MiB) every such
block is a fresh `mmap`, so every step faults in and zeroes its temporaries page by page: 111,000
minor faults and 0.17 s of kernel time per VAE step on 2 cores. With `glibc.malloc.hugetlb=1`
(glibc >= 2.35) malloc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on what it maps,
which kernels in THP `madvise` mode (the common default) then back with 2 MiB pages: 640 faults,
the VAE step ~10 % faster (benchmarks/cpu_vs_torch.py prints the setting it ran under).

glibc reads its tunables once, at process start, so the entry points that run long CPU jobs
(`mi-jax`, the benchmarks) start themselves again with the tunable set (`reexec_with_tunable`), as
`make` does for the tests. Nothing else changes: other platforms and other C libraries ignore it.
Opt out with `MI_JAX_HUGETLB=0`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
VALUE = "1"
_GUARD = "MI_JAX_HUGETLB"  # "0": leave malloc as it is; "reexec": set by the re-exec (no loop)


def tunables(current: str | None) -> str:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, every other tunable kept; an explicit
    hugetlb value the user set wins."""
    parts = [p for p in (current or "").split(":") if p]
    if any(p.split("=", 1)[0] == TUNABLE for p in parts):
        return ":".join(parts)
    return ":".join([*parts, f"{TUNABLE}={VALUE}"])


def active(environ=os.environ) -> bool:
    """Whether this process was started with the tunable set (glibc read it at start)."""
    return any(p.split("=", 1)[0] == TUNABLE for p in environ.get("GLIBC_TUNABLES", "").split(":"))


def wanted(environ=os.environ, platform: str = sys.platform) -> bool:
    """Whether `reexec_with_tunable` would start this process again: on Linux, not opted out,
    not already set, not already re-executed."""
    return platform.startswith("linux") and environ.get(_GUARD, "") not in ("0", "reexec") and not active(environ)


def reexec_with_tunable() -> None:
    """Starts this very command again (`sys.orig_argv`) with the tunable set, before anything
    heavy has run; returns without doing anything where `wanted` is false. Call it first thing in
    an entry point: the new process replaces this one (same pid, stdin / stdout / stderr)."""
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables(os.environ.get("GLIBC_TUNABLES")), **{_GUARD: "reexec"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
