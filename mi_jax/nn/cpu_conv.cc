// Direct 3-D convolution kernels for XLA:CPU through the XLA FFI (jax.ffi), float32, channels-last.
//
// Why: XLA:CPU lowers convolutions with few channels (the demo VAE's 3-16) to Eigen's generic
// spatial convolution, which runs them at ~10 GFLOP/s a core, about half of what oneDNN gives
// PyTorch on the same layers (benchmarks/cpu_vs_torch.py). These kernels keep a block of output
// pixels x 8 output channels in registers and stream the input rows once per tap.
//
//   conv3d_fwd: y[b, t, h, w, o]     = sum_{a,i,j,c} x[b, t*st+a, h*sh+i, w*sw+j, c] k[a, i, j, c, o]
//   conv3d_dk:  dk[a, i, j, c, o]    = sum_{b,t,h,w} x[b, t*st+a, h*sh+i, w*sw+j, c] g[b, t, h, w, o]
// (VALID padding; the input gradient is conv3d_fwd of the padded, dilated output gradient with the
// flipped kernel, composed in mi_jax/nn/cpu_kernels.py.) The output channel count must be a multiple
// of 8 (the caller pads). Work is split over (batch, output frame) on XLA's intra-op thread pool;
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
  int64_t b, ti, hi, wi, ci;  // input
  int64_t kt, kh, kw, co;     // kernel
  int64_t st, sh, sw;         // strides
  int64_t to, ho, wo;         // output
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

// kWb output pixels y[b, t, h, w:w+kWb, co0:co0+8] of the forward convolution (SW: the width
// stride and CI the input channels, template arguments so the pixel offsets are constants and the
// channel loop unrolls; 0: any, read from s).
template <int64_t SW, int64_t CI, int64_t NP>
inline void ForwardPixels(const float* x, const float* k, float* yr, const Shape& s, int64_t b, int64_t t,
                          int64_t h, int64_t w, int64_t co0) {
  const int64_t ci = CI ? CI : s.ci, co = s.co, sw = SW ? SW : s.sw;
  const int64_t x_row = s.wi * ci, x_frame = s.hi * x_row, x_batch = s.ti * x_frame;
  v8 acc[NP] = {};
  for (int64_t a = 0; a < s.kt; ++a) {
    for (int64_t i = 0; i < s.kh; ++i) {
      const float* xr = x + b * x_batch + (t * s.st + a) * x_frame + (h * s.sh + i) * x_row + w * sw * ci;
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

// One output row y[b, t, h, :, co0:co0+8].
template <int64_t SW, int64_t CI>
inline void ForwardRow(const float* x, const float* k, float* y, const Shape& s, int64_t b, int64_t t, int64_t h,
                       int64_t co0) {
  float* yr = y + (((b * s.to + t) * s.ho + h) * s.wo) * s.co + co0;
  int64_t w = 0;
  for (; w + kWb <= s.wo; w += kWb) ForwardPixels<SW, CI, kWb>(x, k, yr, s, b, t, h, w, co0);
  for (; w < s.wo; ++w) ForwardPixels<SW, CI, 1>(x, k, yr, s, b, t, h, w, co0);
}

// The kernel gradient's contribution of output frame (b, t), channels co0:co0+8, added to part
// [kt, kh, kw, ci, co]: for each tap, kCi input channels x 8 output channels in registers while
// the frame's pixels stream by.
template <int64_t NC>
inline void KernelGradTap(const float* xr0, const float* gr0, float* pr, const Shape& s, int64_t c0) {
  const int64_t ci = s.ci, co = s.co, x_row = s.wi * ci;
  v8 acc[NC] = {};
  for (int64_t h = 0; h < s.ho; ++h) {
    const float* xr = xr0 + h * s.sh * x_row + c0;
    const float* gr = gr0 + h * s.wo * co;
    for (int64_t w = 0; w < s.wo; ++w) {
      const v8 gv = Load8(gr + w * co);
      const float* xp = xr + w * s.sw * ci;
      for (int64_t c = 0; c < NC; ++c) acc[c] += xp[c] * gv;
    }
  }
  for (int64_t c = 0; c < NC; ++c) Store8(pr + (c0 + c) * co, Load8(pr + (c0 + c) * co) + acc[c]);
}

inline void KernelGradFrame(const float* x, const float* g, float* part, const Shape& s, int64_t b, int64_t t,
                            int64_t co0) {
  const int64_t ci = s.ci, co = s.co;
  const int64_t x_row = s.wi * ci, x_frame = s.hi * x_row, x_batch = s.ti * x_frame;
  const float* gr0 = g + (((b * s.to + t) * s.ho) * s.wo) * co + co0;
  for (int64_t a = 0; a < s.kt; ++a) {
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        const float* xr0 = x + b * x_batch + (t * s.st + a) * x_frame + i * x_row + j * ci;
        float* pr = part + (((a * s.kh + i) * s.kw + j) * ci) * co + co0;
        int64_t c0 = 0;
        for (; c0 + 8 <= ci; c0 += 8) KernelGradTap<8>(xr0, gr0, pr, s, c0);
        switch (ci - c0) {  // the last 1-7 channels (the RGB input: 3) in one pass as well
          case 7: KernelGradTap<7>(xr0, gr0, pr, s, c0); break;
          case 6: KernelGradTap<6>(xr0, gr0, pr, s, c0); break;
          case 5: KernelGradTap<5>(xr0, gr0, pr, s, c0); break;
          case 4: KernelGradTap<4>(xr0, gr0, pr, s, c0); break;
          case 3: KernelGradTap<3>(xr0, gr0, pr, s, c0); break;
          case 2: KernelGradTap<2>(xr0, gr0, pr, s, c0); break;
          case 1: KernelGradTap<1>(xr0, gr0, pr, s, c0); break;
          default: break;
        }
      }
    }
  }
}

ffi::Error CheckShapes(const Shape& s) {
  if (s.co % kCo) return ffi::Error::InvalidArgument("cpu_conv3d: output channels must be a multiple of 8");
  if (s.to < 1 || s.ho < 1 || s.wo < 1) return ffi::Error::InvalidArgument("cpu_conv3d: empty output");
  return ffi::Error::Success();
}

Shape MakeShape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd, int64_t st, int64_t sh, int64_t sw) {
  Shape s{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], kd[4], st, sh, sw, 0, 0, 0};
  s.to = (s.ti - s.kt) / st + 1;
  s.ho = (s.hi - s.kh) / sh + 1;
  s.wo = (s.wi - s.kw) / sw + 1;
  return s;
}

ffi::Error Conv3dFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> y, int64_t st, int64_t sh, int64_t sw) {
  if (x.dimensions().size() != 5 || k.dimensions().size() != 5 || y->dimensions().size() != 5 ||
      k.dimensions()[3] != x.dimensions()[4])
    return ffi::Error::InvalidArgument("cpu_conv3d_fwd: x [B,T,H,W,Ci], k [kt,kh,kw,Ci,Co]");
  Shape s = MakeShape(x.dimensions(), k.dimensions(), st, sh, sw);
  if (auto e = CheckShapes(s); e.failure()) return e;
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
                            ffi::ResultBuffer<ffi::F32> dk, int64_t st, int64_t sh, int64_t sw) {
  if (x.dimensions().size() != 5 || g.dimensions().size() != 5 || dk->dimensions().size() != 5 ||
      dk->dimensions()[3] != x.dimensions()[4])
    return ffi::Error::InvalidArgument("cpu_conv3d_dk: x [B,T,H,W,Ci], g [B,T',H',W',Co], dk [kt,kh,kw,Ci,Co]");
  Shape s = MakeShape(x.dimensions(), dk->dimensions(), st, sh, sw);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MiJaxConv3dFwd, Conv3dFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("st")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MiJaxConv3dKernelGrad, Conv3dKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("st")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));
