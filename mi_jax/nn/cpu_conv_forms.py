"""XLA:CPU forms of the VAE's 3-D convolution, for when the native kernels are unavailable.

XLA:CPU runs a 3-D convolution through a slow generic path. `conv3d` computes the same VALID
convolution as sums of 2-D convolutions, picking the form by channel counts, with a custom
gradient: the input gradient through the transposed 2-D form, the kernel gradient through FFT
cross-correlations on large frames. `mi_jax.models.vae.conv3d` uses it on CPU when
`mi_jax.nn.cpu_kernels` is unavailable; `benchmarks/cpu_vs_torch.py` measures both against torch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_FEW_CHANNELS = 4  # at or below: the RGB layers, which XLA:CPU convolves slowly as they are
_FFT_MIN_SIZE = 32  # the FFT kernel gradient pays from this frame size (stride 1); below, XLA's


def _frames(x: jax.Array, i: int, st: int, t_out: int) -> jax.Array:
    """The input frames temporal tap `i` reads: i, i + st, ..., one per output frame."""
    return jax.lax.slice_in_dim(x, i, i + st * (t_out - 1) + 1, st, axis=1)


def _conv2d(x: jax.Array, kernel: jax.Array, strides) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_frames(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    """The 3-D convolution as a sum over the kt temporal taps of 2-D convolutions of the frames
    (frames folded into the batch): XLA:CPU's fast form forward at 8 or more channels."""
    kt = kernel.shape[0]
    b, t = x.shape[:2]
    t_out = (t - kt) // strides[0] + 1
    y = None
    for i in range(kt):
        frames = _frames(x, i, strides[0], t_out).reshape(b * t_out, *x.shape[2:])
        yi = _conv2d(frames, kernel[i], strides[1:])
        y = yi if y is None else y + yi
    return y.reshape(b, t_out, *y.shape[1:])


def _conv_taps_in_channels(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    """The same convolution as one 2-D convolution over kt x Ci channels (each output frame's kt
    input frames side by side): XLA:CPU's fast form forward when Ci is tiny (the RGB input) and
    for the input gradient at every VAE shape, but slow forward at 8-16 channels."""
    kt, kh, kw, ci, co = kernel.shape
    b, t = x.shape[:2]
    t_out = (t - kt) // strides[0] + 1
    stacked = jnp.concatenate([_frames(x, i, strides[0], t_out) for i in range(kt)], axis=-1)
    y = _conv2d(stacked.reshape(b * t_out, *x.shape[2:4], kt * ci),
                kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * ci, co), strides[1:])
    return y.reshape(b, t_out, *y.shape[1:])


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    """The fastest of the forms on XLA:CPU for these channel counts."""
    ci, co = kernel.shape[3:]
    if ci <= _FEW_CHANNELS:
        return _conv_taps_in_channels(x, kernel, strides)
    if co <= _FEW_CHANNELS:  # the RGB output: convolve to 8 output channels, keep co
        wide = jnp.pad(kernel, ((0, 0),) * 4 + ((0, 2 * _FEW_CHANNELS - co),))
        return _conv_frames(x, wide, strides)[..., :co]
    return _conv_frames(x, kernel, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    """VALID 3-D convolution in the forms XLA:CPU runs fastest, with a custom gradient.

    Args:
      x: input `[B, T, H, W, Ci]`, already padded.
      kernel: `[kt, kh, kw, Ci, Co]`.
      strides: `(st, sh, sw)`, a tuple (hashable: it is a static argument).

    Returns:
      `[B, T', H', W', Co]`, equal to `jax.lax.conv_general_dilated(x, kernel, strides, "VALID")`
      within float round-off (tests/test_vae.py).
    """
    return _forward(x, kernel, strides)


def _conv3d_fwd(x, kernel, strides):
    return _forward(x, kernel, strides), (x, kernel)


def _conv3d_bwd(strides, res, g):
    """Input gradient: XLA's transpose of `_conv_taps_in_channels` (one transposed 2-D
    convolution). Kernel gradient, at stride 1 on frames of at least `_FFT_MIN_SIZE` pixels: for
    each temporal tap, the cross-correlation of the frames with the output gradient over (H, W),
    summed over batch and frames, through FFTs; only its first kh x kw lags are the kernel's
    gradient. There XLA:CPU's own kernel gradient is slower; on smaller or strided frames it is
    faster and is used. The FFT's round-off is that of the direct sum (tests/test_vae.py)."""
    x, kernel = res
    _, pullback = jax.vjp(lambda v: _conv_taps_in_channels(v, kernel, strides), x)
    (dx,) = pullback(g)
    if strides != (1, 1, 1) or min(x.shape[2:4]) < _FFT_MIN_SIZE:
        _, pullback = jax.vjp(lambda k: _conv_frames(x, k, strides), kernel)
        return dx, pullback(g)[0]
    kt, kh, kw, ci, co = kernel.shape
    t_out = g.shape[1]
    hx, wx = x.shape[2:4]
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    # the output gradient zero-padded to the input's frame size
    gd = jax.lax.pad(g.astype(f32), jnp.zeros((), f32),
                     ((0, 0, 0), (0, 0, 0), (0, hx - g.shape[2], 0), (0, wx - g.shape[3], 0), (0, 0, 0)))
    spec_g = jnp.conj(jnp.fft.rfft2(gd, axes=(2, 3)))
    spec_x = jnp.fft.rfft2(x.astype(f32), axes=(2, 3))
    taps = []
    for a in range(kt):
        corr = jnp.fft.irfft2(jnp.einsum("bthwc,bthwo->cohw", _frames(spec_x, a, 1, t_out), spec_g),
                              s=(hx, wx), axes=(2, 3))
        taps.append(corr[:, :, :kh, :kw].transpose(2, 3, 0, 1))
    return dx, jnp.stack(taps).astype(kernel.dtype)


conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)
