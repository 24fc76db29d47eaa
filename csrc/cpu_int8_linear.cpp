// Weight-only low-precision linear for CPU decoding: y = (x @ W^T) * scale + bias, fp32 activations and output.
//
//   torch.ops.nanogpt_cpu.wlinear(x (M, K) fp32, w (N, K) int8 or bf16, scale (N,) / (N, groups) fp32 or None,
//                                 bias (N,) fp32 or None)
//
// Built and loaded by gpt/cpu_int8.py (torch.utils.cpp_extension, -mavx2 -mfma). Why a hand-written kernel:
// PyTorch's `_weight_int8pack_mm` has its fast path only for AVX-512; on this AVX2 CPU it ran slower than
// what reading the int8 bytes costs. Here each weight row is read once per group of activation rows,
// widened in registers (int8 -> int32 -> fp32, or bf16 -> fp32 by a 16-bit shift) and multiplied by fused
// multiply-adds against fp32 activations, so only the weights lose precision.
//
// Batch invariance: every output (m, n) is the same sequence of operations whatever M is (8 lanes along K,
// the same lane order and the same horizontal sum), so a row's result does not depend on the rows beside it
// (a seeded reply is the same alone or batched). Threads split the output columns, never K.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 load8(const at::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline float scalar(int8_t v) { return static_cast<float>(v); }
inline float scalar(at::BFloat16 v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[m][n] for MB activation rows x R weight rows starting at (x, w): R * MB accumulators in registers.
// `groups` scales per weight row (scale[r * groups + g] for columns [g * K / groups, (g + 1) * K / groups)):
// with one group the scale multiplies the finished dot product; with more, each group's partial sums
// (`part`) are scaled into the accumulators when the group ends.
template <typename W, int R, int MB>
inline void tile(const float* x, int64_t ldx, const W* w, int64_t K, const float* scale, int64_t groups,
                 const float* bias, float* y, int64_t ldy, const W* next) {
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  // The next tile's weight rows are contiguous after these: fetch one cache line of them per step, so
  // that DRAM streams while this tile computes (the hardware prefetcher alone left int8 rows ~3x slower
  // from DRAM than from cache).
  const char* pf = reinterpret_cast<const char*>(next);
  const int64_t pf_step = std::max<int64_t>(64, R * 8 * int64_t(sizeof(W)));
  if (groups == 1 || scale == nullptr) {
    for (int64_t k = 0; k < K8; k += 8, pf += pf_step) {
      if (next) _mm_prefetch(pf, _MM_HINT_T0);
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = load8(w + r * K + k);
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
      }
    }
  } else {  // K8 == K (the caller checks that groups divide K into multiples of 8)
    const int64_t G = K / groups;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 part[MB][R];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r) part[m][r] = _mm256_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 8, pf += pf_step) {
        if (next) _mm_prefetch(pf, _MM_HINT_T0);
        __m256 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = load8(w + r * K + k);
          for (int m = 0; m < MB; ++m) part[m][r] = _mm256_fmadd_ps(wv, xv[m], part[m][r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 sv = _mm256_broadcast_ss(scale + r * groups + g);
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(part[m][r], sv, acc[m][r]);
      }
    }
  }
  const bool row_scale = scale != nullptr && groups == 1;
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = K8; k < K; ++k) s += scalar(w[r * K + k]) * x[m * ldx + k];
      if (row_scale) s *= scale[r];
      if (bias) s += bias[r];
      y[m * ldy + r] = s;
    }
  }
}

// All M rows against weight rows [n, n + R): row groups of 3 (then 2, 1) share each widened weight vector.
template <typename W, int R, int MB3>
void rows_block(const float* x, int64_t M, int64_t ldx, const W* w, int64_t N, int64_t K, const float* scale,
                int64_t groups, const float* bias, float* y, int64_t ldy, int64_t n) {
  const float* sc = scale ? scale + n * groups : nullptr;
  const float* bs = bias ? bias + n : nullptr;
  const W* wn = w + n * K;
  const W* next = n + 2 * R <= N ? wn + R * K : nullptr;
  int64_t m = 0;
  for (; m + MB3 <= M; m += MB3) tile<W, R, MB3>(x + m * ldx, ldx, wn, K, sc, groups, bs, y + m * ldy + n, ldy, m ? nullptr : next);
  if (M - m == 2) tile<W, R, 2>(x + m * ldx, ldx, wn, K, sc, groups, bs, y + m * ldy + n, ldy, m ? nullptr : next);
  else if (M - m == 1) tile<W, R, 1>(x + m * ldx, ldx, wn, K, sc, groups, bs, y + m * ldy + n, ldy, m ? nullptr : next);
}

template <typename W>
void run(const float* x, int64_t M, int64_t ldx, const W* w, int64_t N, int64_t K, const float* scale,
         int64_t groups, const float* bias, float* y) {
  // M == 1 streams 8 weight rows per pass (8 independent FMA chains hide the FMA latency); more rows
  // reuse each widened weight vector 3 times, with 4 weight rows (12 accumulators in registers). Scale
  // groups need a second set of registers (the group's partial sums): half as many weight rows.
  const bool grouped = groups > 1;
  const int64_t R = M == 1 ? (grouped ? 4 : 8) : (grouped ? 2 : 4);
  const int64_t blocks = N / R;
  // ~64 KB of weights per task: large enough that the fork costs little, small enough for 2+ threads.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (R * K * int64_t(sizeof(W)) + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      switch (R) {
        case 8: rows_block<W, 8, 1>(x, M, ldx, w, N, K, scale, groups, bias, y, N, b * 8); break;
        case 4: if (grouped) rows_block<W, 4, 1>(x, M, ldx, w, N, K, scale, groups, bias, y, N, b * 4);
                else rows_block<W, 4, 3>(x, M, ldx, w, N, K, scale, groups, bias, y, N, b * 4);
                break;
        default: rows_block<W, 2, 3>(x, M, ldx, w, N, K, scale, groups, bias, y, N, b * 2);
      }
    }
  });
  for (int64_t n = blocks * R; n < N; ++n)  // the last N % R rows, one at a time
    rows_block<W, 1, 3>(x, M, ldx, w, N, K, scale, groups, bias, y, N, n);
}

at::Tensor wlinear(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "wlinear: x must be (M, K) float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x_in.size(1), "wlinear: w must be contiguous (N, K)");
  TORCH_CHECK(w.scalar_type() == at::kChar || w.scalar_type() == at::kBFloat16, "wlinear: w must be int8 or bf16");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* sp = nullptr;
  const float* bp = nullptr;
  int64_t groups = 1;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->size(0) == N &&
                    scale->dim() <= 2, "wlinear: scale must be (N,) or (N, groups) contiguous float32");
    groups = scale->dim() == 2 ? scale->size(1) : 1;
    TORCH_CHECK(groups >= 1 && K % groups == 0 && (groups == 1 || (K / groups) % 8 == 0),
                "wlinear: scale groups must split K into equal multiples of 8");
    sp = scale->data_ptr<float>();
  }
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "wlinear: bias must be (N,) contiguous float32");
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (w.scalar_type() == at::kChar)
    run(x.data_ptr<float>(), M, x.stride(0), w.data_ptr<int8_t>(), N, K, sp, groups, bp, y.data_ptr<float>());
  else
    run(x.data_ptr<float>(), M, x.stride(0), w.data_ptr<at::BFloat16>(), N, K, sp, groups, bp, y.data_ptr<float>());
  return y;
}

// x * rsqrt(mean(x^2) + eps) * w over the last dimension, fp32: one op where PyTorch's CPU rms_norm is a
// composite of ~7 (each a dispatch and a pass over the row; 61 of them in a SmolLM2 decode step).
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 1 &&
                  w.is_contiguous() && x_in.size(-1) == w.size(0), "rms_norm: x (..., D) and w (D,) float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t D = w.size(0), rows = D ? x.numel() / D : 0;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * D;
    float* yr = yp + i * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < D8; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (int64_t k = D8; k < D; ++k) ss += xr[k] * xr[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < D8; k += 8)
      _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv), _mm256_loadu_ps(wp + k)));
    for (int64_t k = D8; k < D; ++k) yr[k] = xr[k] * inv * wp[k];
  }
  return y;
}

// One query per row (a decode step) against its cached keys and values: softmax(q k^T / sqrt(hd) + mask) v.
// q (B, H, 1, hd); k, v (B, KVH, S, hd) with unit stride in hd (any other strides: views of the slot cache);
// mask (B, 1, 1, S) additive fp32. Positions whose mask is -inf are skipped, so a row reads only its own
// keys and values (PyTorch's SDPA reads all S, 2-3x the bytes here), and a row's result does not depend
// on S or on the other rows. Each key and value row is read once for the H / KVH query heads sharing it.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask_in) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q_in.size(2) == 1 && q_in.scalar_type() == at::kFloat
                  && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && mask_in.scalar_type() == at::kFloat,
              "decode_attention: fp32 q (B, H, 1, hd), k and v (B, KVH, S, hd), mask (B, 1, 1, S)");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor mask = mask_in.expand({k.size(0), 1, 1, k.size(2)}).contiguous();
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(H % KVH == 0 && k.size(3) == hd && v.sizes() == k.sizes() && k.stride(3) == 1 && v.stride(3) == 1 &&
                  hd % 8 == 0 && hd <= 256, "decode_attention: shapes (hd a multiple of 8, <= 256)");
  const int64_t G = H / KVH;
  at::Tensor out = at::empty({B, H, 1, hd}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * S);
    std::vector<float> acc(G * hd);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, h = t % KVH;
      const float* kb = kp + b * k.stride(0) + h * k.stride(1);
      const float* vb = vp + b * v.stride(0) + h * v.stride(1);
      const float* mb = mp + b * S;
      const float* qb = qp + (b * H + h * G) * hd;
      float mx[32];
      const int64_t g_n = std::min<int64_t>(G, 32);
      TORCH_CHECK(G <= 32, "decode_attention: at most 32 query heads per key head");
      for (int64_t g = 0; g < g_n; ++g) mx[g] = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (std::isinf(mb[s]) && mb[s] < 0) {
          for (int64_t g = 0; g < G; ++g) scores[g * S + s] = -INFINITY;
          continue;
        }
        const float* kr = kb + s * k.stride(2);
        for (int64_t g = 0; g < G; ++g) {
          __m256 a = _mm256_setzero_ps();
          for (int64_t d = 0; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * hd + d), _mm256_loadu_ps(kr + d), a);
          const float sc = hsum(a) * scale + mb[s];
          scores[g * S + s] = sc;
          mx[g] = std::max(mx[g], sc);
        }
      }
      float denom[32];
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t s = 0; s < S; ++s) {
          const float e = std::isinf(scores[g * S + s]) ? 0.f : std::exp(scores[g * S + s] - mx[g]);
          scores[g * S + s] = e;
          sum += e;
        }
        denom[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (std::isinf(mb[s]) && mb[s] < 0) continue;
        const float* vr = vb + s * v.stride(2);
        for (int64_t g = 0; g < G; ++g) {
          const __m256 p = _mm256_set1_ps(scores[g * S + s]);
          float* ag = acc.data() + g * hd;
          for (int64_t d = 0; d < hd; d += 8)
            _mm256_storeu_ps(ag + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(ag + d)));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + h * G + g) * hd;
        const float inv = 1.0f / denom[g];
        for (int64_t d = 0; d < hd; ++d) o[d] = acc[g * hd + d] * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nanogpt_cpu, m) {
  m.def("wlinear(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanogpt_cpu, CPU, m) {
  m.impl("wlinear", &wlinear);
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
}
