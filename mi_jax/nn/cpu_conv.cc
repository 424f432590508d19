// Direct 3-D convolution kernels for XLA:CPU through the XLA FFI (jax.ffi), float32, channels-last.
//
// Why: XLA:CPU lowers convolutions with few channels (the demo VAE's 3-16) to Eigen's generic
// spatial convolution, which runs them at ~10 GFLOP/s a core, about half of what oneDNN gives
// PyTorch on the same layers (benchmarks/cpu_vs_torch.py). These kernels keep a block of output
// pixels x 8 output channels in registers and stream the input rows once per tap.
//
//   conv3d_fwd: y[b, t, h, w, o]  = sum_{a,i,j,c} xp[b, t*st+a, h*sh+i, w*sw+j, c] k[a, i, j, c, o]
//   conv3d_dk:  dk[a, i, j, c, o] = sum_{b,t,h,w} xp[b, t*st+a, h*sh+i, w*sw+j, c] g[b, t, h, w, o]
// where xp is x replicate-padded by (pt, 0) frames, (ph, ph) rows and (pw, pw) columns (the causal
// VAE's padding; 0 for none), read through clamped indices instead of being written out. (The
// input gradient is conv3d_fwd of the zero-padded, dilated output gradient with the flipped kernel,
// folded back over the padding, composed in mi_jax/nn/cpu_kernels.py.) The output channel count must
// be a multiple of 8 (the caller pads). Work is split over (batch, output frame) on XLA's intra-op thread pool;
// the calling thread takes part, so no thread ever waits on work that has not started.
//
// Built on first use by mi_jax/nn/cpu_kernels.py (g++ -O3 -march=native, cached per machine).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCo = 8;  // output channels per register block
constexpr int64_t kWb = 8;  // output pixels per register block (forward)

struct Shape {
  int64_t b, ti, hi, wi, ci;  // input (unpadded)
  int64_t kt, kh, kw, co;     // kernel
  int64_t st, sh, sw;         // strides
  int64_t pt, ph, pw;         // replicate padding: pt frames in front, ph / pw on both sides
  int64_t to, ho, wo;         // output

  // Row (b, tp, hp) of the padded input: the clamped row of x.
  const float* Row(const float* x, int64_t bb, int64_t tp, int64_t hp) const {
    const int64_t t = std::clamp<int64_t>(tp - pt, 0, ti - 1), h = std::clamp<int64_t>(hp - ph, 0, hi - 1);
    return x + ((bb * ti + t) * hi + h) * wi * ci;
  }
  // Offset in a row of padded column wp: the clamped column's.
  int64_t Col(int64_t wp) const { return std::clamp<int64_t>(wp - pw, 0, wi - 1) * ci; }
};

// Runs fn(i) for i in [0, n) on the caller and on pool threads. Items are claimed from a shared
// counter, so the caller only waits for items another thread is already running.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < n) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  // Helpers hold `state` (shared) but call `fn` only for items claimed before `done` reaches n,
  // and the caller returns only after that, so `fn` (a reference) outlives every call of it.
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

typedef float v8 __attribute__((vector_size(32)));  // 8 output channels (GCC / Clang vector extension)

inline v8 Load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// NP output pixels y[b, t, h, w:w+NP, co0:co0+8] of the forward convolution, all of whose input
// columns are inside the row (no clamping). SW is the width stride and CI the input channels,
// template arguments so the pixel offsets are constants and the channel loop unrolls (0: any, read
// from s).
template <int64_t SW, int64_t CI, int64_t NP>
inline void ForwardPixels(const float* x, const float* k, float* yr, const Shape& s, int64_t b, int64_t t,
                          int64_t h, int64_t w, int64_t co0) {
  const int64_t ci = CI ? CI : s.ci, co = s.co, sw = SW ? SW : s.sw;
  v8 acc[NP] = {};
  for (int64_t a = 0; a < s.kt; ++a) {
    for (int64_t i = 0; i < s.kh; ++i) {
      const float* xr = s.Row(x, b, t * s.st + a, h * s.sh + i) + (w * sw - s.pw) * ci;
      const float* kr = k + ((a * s.kh + i) * s.kw) * ci * co + co0;
      for (int64_t j = 0; j < s.kw; ++j) {
        const float* xp = xr + j * ci;
        const float* kp = kr + j * ci * co;
        for (int64_t c = 0; c < ci; ++c) {
          const v8 kv = Load8(kp + c * co);
          for (int64_t p = 0; p < NP; ++p) acc[p] += xp[p * sw * ci + c] * kv;
        }
      }
    }
  }
  for (int64_t p = 0; p < NP; ++p) Store8(yr + (w + p) * co, acc[p]);
}

// NP output pixels from w whose input columns may fall in the padding (clamped per pixel and tap).
template <int64_t NP>
inline void ForwardPixelsClamped(const float* x, const float* k, float* yr, const Shape& s, int64_t b, int64_t t,
                                 int64_t h, int64_t w, int64_t co0) {
  const int64_t ci = s.ci, co = s.co;
  v8 acc[NP] = {};
  for (int64_t a = 0; a < s.kt; ++a) {
    for (int64_t i = 0; i < s.kh; ++i) {
      const float* xr = s.Row(x, b, t * s.st + a, h * s.sh + i);
      const float* kr = k + ((a * s.kh + i) * s.kw) * ci * co + co0;
      for (int64_t j = 0; j < s.kw; ++j) {
        const float* xp[NP];
        for (int64_t p = 0; p < NP; ++p) xp[p] = xr + s.Col((w + p) * s.sw + j);
        const float* kp = kr + j * ci * co;
        for (int64_t c = 0; c < ci; ++c) {
          const v8 kv = Load8(kp + c * co);
          for (int64_t p = 0; p < NP; ++p) acc[p] += xp[p][c] * kv;
        }
      }
    }
  }
  for (int64_t p = 0; p < NP; ++p) Store8(yr + (w + p) * co, acc[p]);
}

// One output row y[b, t, h, :, co0:co0+8], kWb pixels at a time: the first and last blocks read
// through clamped columns (the padding), the others with constant offsets. The last block ends at
// the row's end and may overlap the one before (those pixels are written twice, equal).
template <int64_t SW, int64_t CI>
inline void ForwardRow(const float* x, const float* k, float* y, const Shape& s, int64_t b, int64_t t, int64_t h,
                       int64_t co0) {
  float* yr = y + (((b * s.to + t) * s.ho + h) * s.wo) * s.co + co0;
  if (s.wo < kWb) {
    for (int64_t w = 0; w < s.wo; ++w) ForwardPixelsClamped<1>(x, k, yr, s, b, t, h, w, co0);
    return;
  }
  const int64_t sw = SW ? SW : s.sw;
  const auto inside = [&](int64_t last) { return last * sw + s.kw - 1 - s.pw <= s.wi - 1; };
  int64_t w = 0;
  if (s.pw > 0 || !inside(kWb - 1)) {
    ForwardPixelsClamped<kWb>(x, k, yr, s, b, t, h, 0, co0);
    w = kWb;
  }
  for (; w + kWb <= s.wo && inside(w + kWb - 1); w += kWb) ForwardPixels<SW, CI, kWb>(x, k, yr, s, b, t, h, w, co0);
  if (w < s.wo) ForwardPixelsClamped<kWb>(x, k, yr, s, b, t, h, s.wo - kWb, co0);
}

// The kernel gradient's contribution of output frame (b, t), channels co0:co0+8, to tap (a, i, j)
// and input channels c0:c0+NC, added to pr = &part[a, i, j, 0, co0]: NC x 8 sums in registers while
// the frame's pixels stream by. cols[w]: the (clamped) column offset each output pixel reads.
template <int64_t NC>
inline void KernelGradTap(const float* x, const float* g, float* pr, const Shape& s, const int64_t* cols, int64_t b,
                          int64_t t, int64_t a, int64_t i, int64_t c0, int64_t co0) {
  const int64_t co = s.co;
  v8 acc[NC] = {};
  for (int64_t h = 0; h < s.ho; ++h) {
    const float* xr = s.Row(x, b, t * s.st + a, h * s.sh + i) + c0;
    const float* gr = g + (((b * s.to + t) * s.ho + h) * s.wo) * co + co0;
    for (int64_t w = 0; w < s.wo; ++w) {
      const v8 gv = Load8(gr + w * co);
      const float* xp = xr + cols[w];
      for (int64_t c = 0; c < NC; ++c) acc[c] += xp[c] * gv;
    }
  }
  for (int64_t c = 0; c < NC; ++c) Store8(pr + (c0 + c) * co, Load8(pr + (c0 + c) * co) + acc[c]);
}

inline void KernelGradFrame(const float* x, const float* g, float* part, const Shape& s, int64_t b, int64_t t,
                            int64_t co0) {
  const int64_t ci = s.ci, co = s.co;
  std::vector<int64_t> cols(s.wo);
  for (int64_t j = 0; j < s.kw; ++j) {
    for (int64_t w = 0; w < s.wo; ++w) cols[w] = s.Col(w * s.sw + j);
    for (int64_t a = 0; a < s.kt; ++a) {
      for (int64_t i = 0; i < s.kh; ++i) {
        float* pr = part + (((a * s.kh + i) * s.kw + j) * ci) * co + co0;
        const int64_t* cw = cols.data();
        int64_t c0 = 0;
        for (; c0 + 8 <= ci; c0 += 8) KernelGradTap<8>(x, g, pr, s, cw, b, t, a, i, c0, co0);
        switch (ci - c0) {  // the last 1-7 channels (the RGB input: 3) in one pass as well
          case 7: KernelGradTap<7>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 6: KernelGradTap<6>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 5: KernelGradTap<5>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 4: KernelGradTap<4>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 3: KernelGradTap<3>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 2: KernelGradTap<2>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          case 1: KernelGradTap<1>(x, g, pr, s, cw, b, t, a, i, c0, co0); break;
          default: break;
        }
      }
    }
  }
}

ffi::Error CheckShapes(const Shape& s) {
  if (s.co % kCo) return ffi::Error::InvalidArgument("cpu_conv3d: output channels must be a multiple of 8");
  if (s.to < 1 || s.ho < 1 || s.wo < 1) return ffi::Error::InvalidArgument("cpu_conv3d: empty output");
  if (s.pt < 0 || s.ph < 0 || s.pw < 0) return ffi::Error::InvalidArgument("cpu_conv3d: negative padding");
  return ffi::Error::Success();
}

Shape MakeShape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd, int64_t st, int64_t sh, int64_t sw,
                int64_t pt, int64_t ph, int64_t pw) {
  Shape s{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], kd[4], st, sh, sw, pt, ph, pw, 0, 0, 0};
  s.to = (s.ti + pt - s.kt) / st + 1;
  s.ho = (s.hi + 2 * ph - s.kh) / sh + 1;
  s.wo = (s.wi + 2 * pw - s.kw) / sw + 1;
  return s;
}

ffi::Error Conv3dFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> y, int64_t st, int64_t sh, int64_t sw, int64_t pt, int64_t ph,
                     int64_t pw) {
  if (x.dimensions().size() != 5 || k.dimensions().size() != 5 || y->dimensions().size() != 5 ||
      k.dimensions()[3] != x.dimensions()[4])
    return ffi::Error::InvalidArgument("cpu_conv3d_fwd: x [B,T,H,W,Ci], k [kt,kh,kw,Ci,Co]");
  Shape s = MakeShape(x.dimensions(), k.dimensions(), st, sh, sw, pt, ph, pw);
  if (auto e = CheckShapes(s); e.failure()) return e;
  const auto yd = y->dimensions();
  if (yd[0] != s.b || yd[1] != s.to || yd[2] != s.ho || yd[3] != s.wo || yd[4] != s.co)
    return ffi::Error::InvalidArgument("cpu_conv3d_fwd: y's shape is not the convolution's output shape");
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  // the common strides and channel counts as constants (the VAE's: stride 1 or 2, 8 or 16 channels)
  const bool s1 = s.sw == 1, s2 = s.sw == 2, c8 = s.ci == 8, c16 = s.ci == 16;
  const auto row = s1 && c8 ? ForwardRow<1, 8> : s1 && c16 ? ForwardRow<1, 16> : s1 ? ForwardRow<1, 0>
                 : s2 && c8 ? ForwardRow<2, 8> : s2 && c16 ? ForwardRow<2, 16> : s2 ? ForwardRow<2, 0>
                 : ForwardRow<0, 0>;
  ParallelFor(pool, s.b * s.to, [&](int64_t bt) {
    const int64_t b = bt / s.to, t = bt % s.to;
    for (int64_t co0 = 0; co0 < s.co; co0 += kCo)
      for (int64_t h = 0; h < s.ho; ++h) row(xp, kp, yp, s, b, t, h, co0);
  });
  return ffi::Error::Success();
}

ffi::Error Conv3dKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                            ffi::ResultBuffer<ffi::F32> dk, int64_t st, int64_t sh, int64_t sw, int64_t pt,
                            int64_t ph, int64_t pw) {
  if (x.dimensions().size() != 5 || g.dimensions().size() != 5 || dk->dimensions().size() != 5 ||
      dk->dimensions()[3] != x.dimensions()[4])
    return ffi::Error::InvalidArgument("cpu_conv3d_dk: x [B,T,H,W,Ci], g [B,T',H',W',Co], dk [kt,kh,kw,Ci,Co]");
  Shape s = MakeShape(x.dimensions(), dk->dimensions(), st, sh, sw, pt, ph, pw);
  if (auto e = CheckShapes(s); e.failure()) return e;
  const auto gd = g.dimensions();
  if (gd[0] != s.b || gd[1] != s.to || gd[2] != s.ho || gd[3] != s.wo || gd[4] != s.co)
    return ffi::Error::InvalidArgument("cpu_conv3d_dk: g's shape is not the convolution's output shape");
  const int64_t n = s.kt * s.kh * s.kw * s.ci * s.co;
  // One partial sum per worker slot: items are (b, t) frames, grouped into `slots` contiguous runs.
  const int64_t frames = s.b * s.to;
  const int64_t slots = std::min<int64_t>(frames, std::max<int64_t>(1, pool.num_threads()) * 4);
  std::vector<float> parts(slots * n, 0.0f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelFor(pool, slots, [&](int64_t slot) {
    float* part = parts.data() + slot * n;
    for (int64_t bt = slot * frames / slots; bt < (slot + 1) * frames / slots; ++bt)
      for (int64_t co0 = 0; co0 < s.co; co0 += kCo) KernelGradFrame(xp, gp, part, s, bt / s.to, bt % s.to, co0);
  });
  float* out = dk->typed_data();
  std::memcpy(out, parts.data(), n * sizeof(float));
  for (int64_t slot = 1; slot < slots; ++slot)
    for (int64_t e = 0; e < n; ++e) out[e] += parts[slot * n + e];
  return ffi::Error::Success();
}

}  // namespace

// Both calls: (x, kernel or output gradient) -> result, strides and replicate padding as attributes.
#define MI_JAX_CONV3D_BINDING                                                                          \
  ffi::Ffi::Bind()                                                                                     \
      .Ctx<ffi::ThreadPool>()                                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                    \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                    \
      .Attr<int64_t>("st")                                                                             \
      .Attr<int64_t>("sh")                                                                             \
      .Attr<int64_t>("sw")                                                                             \
      .Attr<int64_t>("pt")                                                                             \
      .Attr<int64_t>("ph")                                                                             \
      .Attr<int64_t>("pw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MiJaxConv3dFwd, Conv3dFwd, MI_JAX_CONV3D_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MiJaxConv3dKernelGrad, Conv3dKernelGrad, MI_JAX_CONV3D_BINDING);
