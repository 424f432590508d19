"""Native CPU kernels for what XLA:CPU runs slowly: direct 3-D convolutions with few channels.

`conv3d(x, kernel, strides, pads)` is a VALID 3-D convolution `[B, T, H, W, Ci] x [kt, kh, kw, Ci,
Co]` (float32, channels-last) of x replicate-padded by `pads` (read through clamped indices, never
written out), whose forward pass, input gradient and kernel gradient run in `cpu_conv.cc` through
the XLA FFI: 8 output pixels x 8 output channels kept in registers, work split over (batch, output
frame) on XLA's own thread pool. `benchmarks/cpu_vs_torch.py` measures it against PyTorch's oneDNN;
`tests/test_vae.py` checks it against `jnp.pad(mode="edge")` and XLA's convolution.

The library is compiled on first use with the system C++ compiler (`$CXX`, else `g++`; `-O3
-march=native`) against the FFI headers jaxlib ships, and cached under `$MI_JAX_CACHE` (default
`~/.cache/mi_jax`) by a hash of the source, the flags, jaxlib's version, what the compiler resolves
`-march=native` to here, and this CPU's model and feature flags: one compile per kind of CPU, a
few seconds (under a temporary name, then renamed, so concurrent first uses are safe).
`available()` is False, and callers use XLA's own convolutions, when there is no compiler, the
build fails (the reason is logged once), `MI_JAX_CPU_KERNELS=0` is set, or within `disabled()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from mi_jax.nn.layers import edge_pad_transpose

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_conv.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
_TARGETS = {"mi_jax_conv3d_fwd": "MiJaxConv3dFwd", "mi_jax_conv3d_dk": "MiJaxConv3dKernelGrad"}
BLOCK = 8  # output channels per register block in cpu_conv.cc; other counts are padded up to it


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


@functools.cache
def native_target(cxx: str) -> str:
    """What `-march=native` means to `cxx` on this machine: the CPU and instruction-set options the
    compiler resolves it to (gcc's cc1 line, clang's -target-cpu / -target-feature list).

    The build cache is keyed on it, so a cache shared between machines (a cluster's NFS home) never
    hands one CPU a library built for another's instructions. Raises RuntimeError when the
    compiler does not say (then nothing is built: XLA's convolutions are used)."""
    done = subprocess.run([cxx, "-march=native", "-E", "-v", "-x", "c++", "-", "-o", os.devnull], input="",
                          capture_output=True, text=True)
    for line in done.stderr.splitlines():
        if "cc1" in line and "-march=" in line:  # gcc: the driver's resolved options
            return " ".join(t for t in line.split() if t.startswith(("-m", "--param=", "l1-", "l2-")))
        if "-target-cpu" in line:  # clang: -target-cpu NAME -target-feature +avx2 ...
            toks = [t.strip('"') for t in line.split()]
            keep = [b for a, b in zip(toks, toks[1:]) if a in ("-target-cpu", "-target-feature")]
            return " ".join(keep)
    raise RuntimeError(f"{cxx} -march=native -E -v did not say which CPU it targets:\n{done.stderr[-1000:]}")


def cache_key(source: bytes, cxx: str) -> str:
    """The compiled library's name in the cache: a hash of the source, the flags, the compiler,
    jaxlib's version (its FFI headers), the resolved native target and this CPU's model and flags."""
    import jaxlib

    parts = [source, " ".join(_FLAGS).encode(), cxx.encode(), jaxlib.__version__.encode(),
             native_target(cxx).encode(), _cpu_signature().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build() -> str:
    """Path of the compiled library, compiling it if this machine has none yet."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = cache_key(source, cxx)
    cache = os.path.join(os.environ.get("MI_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mi_jax"),
                         "cpu_kernels")
    path = os.path.join(cache, f"cpu_conv-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # compiled under a temporary name, then renamed
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


_enabled = True


@contextlib.contextmanager
def disabled():
    """Within: `available()` is False, so what is traced uses XLA's convolutions (for comparisons,
    and for XLA's cost analysis, which does not count what custom calls compute)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def available() -> bool:
    """Whether the native kernels are built and registered with XLA (built once per machine,
    registered once per process), and not `disabled()`."""
    return _enabled and _load()


@functools.cache
def _load() -> bool:
    if os.environ.get("MI_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA's convolutions
        log.warning("mi_jax native CPU convolutions unavailable, using XLA's (slower on CPU): %s", e)
        return False
    return True


def edge_widths(pads) -> tuple[tuple[int, int], ...]:
    """`(pt, ph, pw)` -> `edge_pad` widths of a `[B, T, H, W, C]` array: frames in front only."""
    pt, ph, pw = pads
    return (0, 0), (pt, 0), (ph, ph), (pw, pw), (0, 0)


def _padded(x_shape, pads) -> tuple[int, int, int]:
    """(T, H, W) of the input once replicate-padded."""
    return tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[1:4], edge_widths(pads)[1:4]))


def _pad_channels(a: jax.Array) -> jax.Array:
    """`a` with its last axis zero-padded to a multiple of BLOCK (the kernels' output channels)."""
    return jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, -a.shape[-1] % BLOCK),)) if a.shape[-1] % BLOCK else a


def _call(target: str, shape, a: jax.Array, b: jax.Array, strides, pads) -> jax.Array:
    attrs = dict(zip(("st", "sh", "sw", "pt", "ph", "pw"), (int(v) for v in (*strides, *pads))))  # int64
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, **attrs)


def _forward(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
    co, kernel = kernel.shape[-1], _pad_channels(kernel)
    dims = ((n - k) // s + 1 for n, k, s in zip(_padded(x.shape, pads), kernel.shape[:3], strides))
    return _call("mi_jax_conv3d_fwd", (x.shape[0], *dims, kernel.shape[-1]), x, kernel, strides, pads)[..., :co]


def _kernel_grad(x: jax.Array, g: jax.Array, k_shape, strides, pads) -> jax.Array:
    co, g = g.shape[-1], _pad_channels(g)
    return _call("mi_jax_conv3d_dk", (*k_shape[:4], g.shape[-1]), x, g, strides, pads)[..., :co]


def _input_grad(g: jax.Array, kernel: jax.Array, x_shape, strides, pads) -> jax.Array:
    """dx: the forward convolution of g (dilated by the strides, zero-padded by kernel - 1 on each
    side, up to the padded input's size) with the kernel flipped in space and time, in and out
    swapped, gives the gradient of the padded input; the padding's transpose folds it back."""
    widths = [(0, 0, 0)]
    for n_in, n_out, k, s in zip(_padded(x_shape, pads), g.shape[1:4], kernel.shape[:3], strides):
        covered = (n_out - 1) * s + k  # input positions the convolution reads
        widths.append((k - 1, k - 1 + n_in - covered, s - 1))
    widths.append((0, 0, 0))
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype), widths)
    dxp = _forward(gp, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), (1, 1, 1), (0, 0, 0))
    return edge_pad_transpose(dxp, edge_widths(pads)) if any(pads) else dxp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
           pads: tuple[int, int, int] = (0, 0, 0)) -> jax.Array:
    """VALID 3-D convolution, channels-last, float32, of x replicate-padded by `pads = (pt, ph, pw)`
    (pt frames in front, ph rows and pw columns on each side), on the native kernels (call
    `available()` first; the caller keeps XLA's convolution for other dtypes and devices)."""
    return _forward(x, kernel, strides, pads)


def _conv3d_fwd(x, kernel, strides, pads):
    return _forward(x, kernel, strides, pads), (x, kernel)


def _conv3d_bwd(strides, pads, res, g):
    x, kernel = res
    return (_input_grad(g, kernel, x.shape, strides, pads),
            _kernel_grad(x, g, kernel.shape, strides, pads))


conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)
