"""The host-memory setting (mi_jax/hostmem.py): glibc's hugetlb tunable, set by re-executing."""

import os
import subprocess
import sys

import pytest

from mi_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MI_JAX_HUGETLB")}
    return dict(env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)


def test_tunables_keep_the_users_and_do_not_override_an_explicit_value():
    assert hostmem.tunables(None) == "glibc.malloc.hugetlb=1"
    assert hostmem.tunables("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostmem.tunables("glibc.malloc.hugetlb=0:x.y=1") == "glibc.malloc.hugetlb=0:x.y=1"
    assert not hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux")
    assert not hostmem.wanted({"MI_JAX_HUGETLB": "0"}, "linux")
    assert not hostmem.wanted({"MI_JAX_HUGETLB": "reexec"}, "linux")  # no loop
    assert not hostmem.wanted({}, "darwin")
    assert hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux")


_SHOW = ("import os, sys; from mi_jax.hostmem import reexec_with_tunable; reexec_with_tunable(); "
         "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('MI_JAX_HUGETLB'), sys.argv[1:])")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables exist on Linux only")
def test_the_command_starts_again_once_with_the_tunable_and_its_arguments():
    out = subprocess.run([sys.executable, "-c", _SHOW, "a b", "--c"], env=_env(GLIBC_TUNABLES="x.y=1"),
                         capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "x.y=1:glibc.malloc.hugetlb=1 reexec ['a b', '--c']"
    out = subprocess.run([sys.executable, "-c", _SHOW], env=_env(MI_JAX_HUGETLB="0"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None 0 []"  # opted out: untouched


_FAULTS = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.cumsum(jnp.stack([x * i for i in range(48)]), 0)), 0))
x = jnp.ones((1024, 1024))
f(x).block_until_ready(); f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables exist on Linux only")
def test_xla_temporaries_stop_faulting_in_page_by_page():
    """An XLA:CPU call with ~200 MB of temporaries: without the tunable each call maps them anew
    and faults in every 4 KiB page; with it, 2 MiB pages (where the kernel's THP mode allows)."""
    def faults(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=_env(**env), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().split("\n")[-1])

    plain, tuned = faults(MI_JAX_HUGETLB="0"), faults(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert plain > 3 * 40_000  # 3 calls x ~50,000 pages of 4 KiB: mapped anew each call
    if _thp_mode() in ("madvise", "always"):
        assert tuned < plain / 10, (plain, tuned)
    else:  # THP off in this kernel: the tunable cannot help, and must not hurt
        assert tuned <= plain * 1.1, (plain, tuned)
