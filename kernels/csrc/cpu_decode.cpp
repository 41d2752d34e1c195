// Fused bf16 decode step of DeepSeek-V3 on x86 CPUs: every layer of a decode-only batch
// (one new token per sequence) in one C++ call.
//
// The Python model (engine/model) is the specification and stays the path for prefill,
// mixed steps, fp32 and FP4 experts. At decode its cost on a small CPU is not the math but
// the few hundred tiny ops per step: each pays Python and dispatcher overhead and most
// allocate. Here GEMMs still go to oneDNN through the same prepacked weights
// (mkldnn::_linear_pointwise, as kernels/cpu_gemm.py), and everything between them (RMSNorm,
// rope, the cache write, MLA's weight absorption, paged attention, routing, SwiGLU, residual
// adds) is plain loops over the step's rows, with no intermediate tensors.
//
// Rounding follows the Python path: bf16 wherever it keeps a bf16 tensor (normed rows before
// the weight, rope outputs, silu, products, residual sums), fp32 inside attention and
// routing. Attention is fp32 throughout, as the reference backend (torch_backend.py).
//
// Legend: T = tokens (= sequences), D = hidden, H = heads, Dn = nope dim, R = rope dim,
// Dv = v dim, C = kv_lora_rank, W = C + R (cache row), E = routed experts, K = experts per
// token, I = expert intermediate, B = block size.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;

inline float f32(bf16 v) { return static_cast<float>(v); }
inline bf16 round_bf16(float v) { return bf16(v); }

// y = x W^T through oneDNN with a weight prepacked by torch.ops.mkldnn._reorder_linear_weight.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// y = x W^T for a few rows of x (T <= 4), straight from the bf16 weight [N, K] (K % 32 == 0):
// AVX512-BF16 dot products, every weight row read once for all T rows, 4 rows at a time.
// At decode this is 2-3x faster than oneDNN's small-M path (its per-call cost dominates);
// oneDNN keeps larger batches and the vocabulary projection.
#if defined(__AVX512BF16__)
template <int T>
void small_linear_rows(const bf16* x, int64_t ldx, const bf16* w, int64_t K, bf16* y, int64_t ldy, int64_t r0,
                       int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    __m512 acc[4][T];
    for (int i = 0; i < 4; ++i)
      for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh xv[T];
      for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * ldx + k);
      for (int i = 0; i < 4; ++i) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (r + i) * K + k);
        for (int t = 0; t < T; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv, xv[t]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int t = 0; t < T; ++t) y[t * ldy + r + i] = bf16(_mm512_reduce_add_ps(acc[i][t]));
  }
  for (; r < r1; ++r) {
    __m512 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_loadu_si512(x + t * ldx + k));
    }
    for (int t = 0; t < T; ++t) y[t * ldy + r] = bf16(_mm512_reduce_add_ps(acc[t]));
  }
}
#endif

constexpr int64_t SMALL_LINEAR_MAX_ROWS = 4;

bool small_linear_applies(const at::Tensor& x, const at::Tensor& w) {
#if defined(__AVX512BF16__)
  return w.defined() && x.size(0) <= SMALL_LINEAR_MAX_ROWS && w.size(1) % 32 == 0 && x.stride(1) == 1;
#else
  (void)x, (void)w;
  return false;
#endif
}

// x [T, K] bf16 (T <= 4, unit stride along K); w [N, K] bf16 contiguous -> [T, N] bf16
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(small_linear_applies(x, w), "small_linear: needs AVX512-BF16, at most ",
              SMALL_LINEAR_MAX_ROWS, " rows and K % 32 == 0");
  const int64_t T = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor y = at::empty({T, N}, x.options());
#if defined(__AVX512BF16__)
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b, int64_t e) {
    const int64_t r0 = 4 * b, r1 = std::min(N, 4 * e);
    switch (T) {
      case 1: small_linear_rows<1>(xp, ldx, wp, K, yp, N, r0, r1); break;
      case 2: small_linear_rows<2>(xp, ldx, wp, K, yp, N, r0, r1); break;
      case 3: small_linear_rows<3>(xp, ldx, wp, K, yp, N, r0, r1); break;
      default: small_linear_rows<4>(xp, ldx, wp, K, yp, N, r0, r1); break;
    }
  });
#endif
  return y;
}

// A linear weight in both forms: oneDNN's prepacked copy, and the plain [N, K] bf16 matrix
// (the model's own parameter, shared) for small_linear; plain may be undefined.
struct Weight {
  at::Tensor packed, plain;
};

at::Tensor linear(const at::Tensor& x, const Weight& w) {
  return small_linear_applies(x, w.plain) ? small_linear(x, w.plain) : packed_linear(x, w.packed);
}

// sum_i a[i] * b[i] in fp32 for fp32 a and fp32 or bf16 b; 16 independent lanes so the
// compiler vectorizes it.
template <typename B>
inline float dot(const float* a, const B* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * static_cast<float>(b[i + k]);
  float s = 0;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const bf16* p) {  // a bf16 is the high half of the float with the same bits
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// scores[h * len + p] = q[h] . rows[p]: nh fp32 query rows against len bf16 cache rows, all W
// wide. With AVX-512, blocks of 8 heads x 2 rows share their loads (16 accumulators in
// registers) and each cache value is widened once per block.
inline void score_rows(const float* q, const bf16* const* rows, float* scores, int64_t nh, int64_t len, int64_t W) {
  int64_t h0 = 0;
#if defined(__AVX512F__)
  if (W % 16 == 0) {
    for (; h0 + 8 <= nh; h0 += 8) {
      int64_t p = 0;
      for (; p + 2 <= len; p += 2) {
        __m512 a0[8], a1[8];
        for (int k = 0; k < 8; ++k) a0[k] = a1[k] = _mm512_setzero_ps();
        for (int64_t j = 0; j < W; j += 16) {
          const __m512 r0 = load_bf16x16(rows[p] + j), r1 = load_bf16x16(rows[p + 1] + j);
          for (int k = 0; k < 8; ++k) {
            const __m512 qv = _mm512_loadu_ps(q + (h0 + k) * W + j);
            a0[k] = _mm512_fmadd_ps(qv, r0, a0[k]);
            a1[k] = _mm512_fmadd_ps(qv, r1, a1[k]);
          }
        }
        for (int k = 0; k < 8; ++k) {
          scores[(h0 + k) * len + p] = _mm512_reduce_add_ps(a0[k]);
          scores[(h0 + k) * len + p + 1] = _mm512_reduce_add_ps(a1[k]);
        }
      }
      for (; p < len; ++p)
        for (int k = 0; k < 8; ++k) scores[(h0 + k) * len + p] = dot(q + (h0 + k) * W, rows[p], W);
    }
  }
#endif
  for (; h0 < nh; ++h0)
    for (int64_t p = 0; p < len; ++p) scores[h0 * len + p] = dot(q + h0 * W, rows[p], W);
}

// acc[h * C + j] = sum_p probs[h * len + p] * rows[p][j] for the first C columns of the rows.
// With AVX-512, 8 heads x 32 columns of accumulators stay in registers across all rows.
inline void mix_rows(const float* probs, const bf16* const* rows, float* acc, int64_t nh, int64_t len, int64_t C) {
  int64_t h0 = 0;
#if defined(__AVX512F__)
  if (C % 32 == 0) {
    for (; h0 + 8 <= nh; h0 += 8)
      for (int64_t j = 0; j < C; j += 32) {
        __m512 a0[8], a1[8];
        for (int k = 0; k < 8; ++k) a0[k] = a1[k] = _mm512_setzero_ps();
        for (int64_t p = 0; p < len; ++p) {
          const __m512 r0 = load_bf16x16(rows[p] + j), r1 = load_bf16x16(rows[p] + j + 16);
          for (int k = 0; k < 8; ++k) {
            const __m512 w = _mm512_set1_ps(probs[(h0 + k) * len + p]);
            a0[k] = _mm512_fmadd_ps(w, r0, a0[k]);
            a1[k] = _mm512_fmadd_ps(w, r1, a1[k]);
          }
        }
        for (int k = 0; k < 8; ++k) {
          _mm512_storeu_ps(acc + (h0 + k) * C + j, a0[k]);
          _mm512_storeu_ps(acc + (h0 + k) * C + j + 16, a1[k]);
        }
      }
  }
#endif
  for (; h0 < nh; ++h0) {
    float* a = acc + h0 * C;
    std::fill(a, a + C, 0.0f);
    for (int64_t p = 0; p < len; ++p) {
      const float w = probs[h0 * len + p];
      for (int64_t j = 0; j < C; ++j) a[j] += w * f32(rows[p][j]);
    }
  }
}

inline void bf16_to_f32(const bf16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_bf16x16(src + i));
#endif
  for (; i < n; ++i) dst[i] = f32(src[i]);
}

#if defined(__AVX512F__)
// out[c0 + 0..16*NB) = sum_i a[i] * w[i * ld + c0 + ...]: NB vectors of columns, P interleaved
// partial sums over i so that at least 8 independent FMA chains hide the FMA latency.
template <int NB, int P>
inline void vec_mat_block(const float* a, int64_t m, const float* w, int64_t ld, int64_t c0, float* out) {
  __m512 acc[P][NB];
  for (int p = 0; p < P; ++p)
    for (int z = 0; z < NB; ++z) acc[p][z] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + P <= m; i += P)
    for (int p = 0; p < P; ++p) {
      const __m512 ai = _mm512_set1_ps(a[i + p]);
      const float* wr = w + (i + p) * ld + c0;
      for (int z = 0; z < NB; ++z) acc[p][z] = _mm512_fmadd_ps(ai, _mm512_loadu_ps(wr + 16 * z), acc[p][z]);
    }
  for (; i < m; ++i) {
    const __m512 ai = _mm512_set1_ps(a[i]);
    for (int z = 0; z < NB; ++z) acc[0][z] = _mm512_fmadd_ps(ai, _mm512_loadu_ps(w + i * ld + c0 + 16 * z), acc[0][z]);
  }
  for (int z = 0; z < NB; ++z) {
    __m512 total = acc[0][z];
    for (int p = 1; p < P; ++p) total = _mm512_add_ps(total, acc[p][z]);
    _mm512_storeu_ps(out + c0 + 16 * z, total);
  }
}
#endif

// out[0..n) = a[0..m) W for a row-major fp32 W [m, n] (MLA's absorbed matrices, per head)
inline void vec_mat(const float* a, int64_t m, const float* w, int64_t n, float* out) {
  int64_t c0 = 0;
#if defined(__AVX512F__)
  for (; c0 + 128 <= n; c0 += 128) vec_mat_block<8, 1>(a, m, w, n, c0, out);
  switch ((n - c0) / 16) {
    case 1: vec_mat_block<1, 8>(a, m, w, n, c0, out); break;
    case 2: vec_mat_block<2, 4>(a, m, w, n, c0, out); break;
    case 3: vec_mat_block<3, 3>(a, m, w, n, c0, out); break;
    case 4: vec_mat_block<4, 2>(a, m, w, n, c0, out); break;
    case 5: vec_mat_block<5, 2>(a, m, w, n, c0, out); break;
    case 6: vec_mat_block<6, 1>(a, m, w, n, c0, out); break;
    case 7: vec_mat_block<7, 1>(a, m, w, n, c0, out); break;
    default: break;
  }
  c0 += (n - c0) / 16 * 16;
#endif
  for (int64_t c = c0; c < n; ++c) {
    float total = 0;
    for (int64_t i = 0; i < m; ++i) total += a[i] * w[i * n + c];
    out[c] = total;
  }
}

// softmax of n fp32 scores in place. With AVX-512 the exponentials run 16 at a time: e^x by
// Cody-Waite reduction to r = x - k ln2 and Cephes' degree-6 polynomial for e^r, scaled by
// 2^k (within 2 ulp of expf for the x <= 0 that softmax feeds it).
#if defined(__AVX512F__)
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));  // e^-88 is below the smallest normal float
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#endif

inline void softmax_inplace(float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) best = std::max(best, x[i]);
  float total = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(best);
  __m512 sum = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), m));
    _mm512_mask_storeu_ps(x + i, live, e);
    sum = _mm512_mask_add_ps(sum, live, sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += (x[i] = std::exp(x[i] - best));
  const float inv = 1.0f / total;
  for (i = 0; i < n; ++i) x[i] *= inv;
}

// RMSNorm as engine/model/layers.py: normalized in fp32, rounded to bf16, times the weight in bf16.
inline void rms_norm_row(const bf16* x, const bf16* w, bf16* out, int64_t n, float eps) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += f32(x[i + k]) * f32(x[i + k]);
  float ss = 0;
  for (int k = 0; k < 16; ++k) ss += acc[k];
  for (; i < n; ++i) ss += f32(x[i]) * f32(x[i]);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = round_bf16(f32(w[i]) * f32(round_bf16(f32(x[i]) * r)));
}

// silu(gate) * up with the Python path's roundings: silu to bf16, then the bf16 product.
inline bf16 swiglu(bf16 gate, bf16 up) {
  const float g = f32(gate);
  return round_bf16(f32(round_bf16(g / (1.0f + std::exp(-g)))) * f32(up));
}

// RMSNorm of every row of x [T, n] (unit stride along n, any row stride) as RMSNorm in
// engine/model/layers.py: for the Python path's large batches (prefill), where the composite
// op makes five passes over the rows and this makes one; and every norm of the fused step.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.scalar_type() == at::kBFloat16 && w.numel() == x.size(1),
              "rms_norm: x [T, n] bf16 with unit stride along n, w [n] bf16");
  const int64_t T = x.size(0), n = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({T, n}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_norm_row(xp + t * ld, wp, op + t * n, n, static_cast<float>(eps));
  });
  return out;
}

struct Config {
  int64_t hidden, heads, q_rank, kv_rank, rope, nope, v_dim;
  int64_t experts, top_k, n_group, topk_group, moe_inter;
  bool norm_topk;
  double routed_scale, eps, softmax_scale, rope_factor;
};

struct Layer {
  at::Tensor in_norm, qa_norm, kva_norm, w_uk, w_uv_t, post_norm;
  Weight fused_a, q_b, o_proj;
  // dense layers: the MLP; MoE layers: the shared experts (undefined when there are none)
  Weight gate_up, down;
  bool moe = false;
  at::Tensor router_w, router_bias;
  Weight up_all, down_all;  // all experts side by side (kernels/moe_cpu.py), packed only
  std::vector<Weight> expert_up, expert_down;
};

class Decoder {
 public:
  // dims: hidden, heads, q_rank, kv_rank, rope, nope, v_dim, experts, top_k, n_group, topk_group,
  // moe_inter; scalars: routed_scale, eps, softmax_scale, rope attention factor
  Decoder(std::vector<int64_t> dims, bool norm_topk, std::vector<double> scalars, at::Tensor embed,
          at::Tensor final_norm, at::Tensor inv_freq)
      : embed_(embed.contiguous()), final_norm_(final_norm.contiguous()), inv_freq_(inv_freq.contiguous()) {
    TORCH_CHECK(dims.size() == 12 && scalars.size() == 4, "Decoder: 12 dims and 4 scalars expected");
    cfg_ = Config{dims[0], dims[1], dims[2],  dims[3],  dims[4],    dims[5],    dims[6], dims[7],
                  dims[8], dims[9], dims[10], dims[11], norm_topk, scalars[0], scalars[1], scalars[2], scalars[3]};
    TORCH_CHECK(cfg_.q_rank > 0, "the fused decoder needs q LoRA (q_lora_rank > 0)");
    TORCH_CHECK(cfg_.rope % 2 == 0 && cfg_.v_dim <= 256 && cfg_.experts <= 1024, "unsupported dims");
    TORCH_CHECK(cfg_.experts == 0 || (cfg_.n_group > 0 && cfg_.experts % cfg_.n_group == 0 &&
                                      cfg_.topk_group * (cfg_.experts / cfg_.n_group) >= cfg_.top_k),
                "routing: the chosen groups must hold top_k experts");
  }

  // t: the layer's tensors by name (see engine/model/fused_cpu.py), linear weights as NAME
  // (prepacked) and NAME_w (plain); experts: per-expert packed and plain weights of a MoE layer
  // (empty for a dense one)
  void add_layer(std::map<std::string, at::Tensor> t, std::vector<at::Tensor> expert_up,
                 std::vector<at::Tensor> expert_down, std::vector<at::Tensor> expert_up_w,
                 std::vector<at::Tensor> expert_down_w) {
    Layer l;
    auto get = [&](const std::string& name) {
      auto it = t.find(name);
      return it == t.end() ? at::Tensor() : it->second.contiguous();
    };
    auto weight = [&](const std::string& name) { return Weight{get(name), get(name + "_w")}; };
    l.in_norm = get("in_norm"); l.qa_norm = get("qa_norm"); l.kva_norm = get("kva_norm");
    l.w_uk = get("w_uk"); l.w_uv_t = get("w_uv_t"); l.post_norm = get("post_norm");
    l.fused_a = weight("fused_a"); l.q_b = weight("q_b"); l.o_proj = weight("o_proj");
    l.gate_up = weight("gate_up"); l.down = weight("down");
    l.router_w = get("router_w");
    l.moe = l.router_w.defined();
    if (l.moe) {
      l.router_bias = get("router_bias"); l.up_all = weight("up_all"); l.down_all = weight("down_all");
      const auto experts = static_cast<size_t>(cfg_.experts);
      TORCH_CHECK(expert_up.size() == experts && expert_down.size() == experts && expert_up_w.size() == experts &&
                  expert_down_w.size() == experts, "packed and plain weights for every expert");
      for (size_t e = 0; e < experts; ++e) {
        l.expert_up.push_back(Weight{expert_up[e], expert_up_w[e].contiguous()});
        l.expert_down.push_back(Weight{expert_down[e], expert_down_w[e].contiguous()});
      }
    }
    layers_.push_back(std::move(l));
  }

  // ids, positions, slots: [T] int64; block_tables [T, M] int32; seq_lens [T] int64 (the new token
  // included); cache [L, N, B, W] bf16, written at `slots`. Returns the final-normed hidden [T, D] bf16.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor cache) {
    const auto& c = cfg_;
    const int64_t T = ids.size(0), D = c.hidden;
    TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == at::kBFloat16, "cache: contiguous bf16");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: int32");
    TORCH_CHECK(positions.size(0) == T && slots.size(0) == T && block_tables.size(0) == T && seq_lens.size(0) == T,
                "decode batch: one token per sequence");
    at::Tensor x = embed_.index_select(0, ids);  // [T, D]
    const at::Tensor cs = rope_table(positions);  // [T, R/2, 2]: (cos, sin) * attention factor
    for (size_t i = 0; i < layers_.size(); ++i) {
      x = attention(layers_[i], x, cs, slots, block_tables, seq_lens, cache.select(0, i));
      x = layers_[i].moe ? moe(layers_[i], x) : mlp(layers_[i], x);
    }
    return rms_norm(x, final_norm_, cfg_.eps);
  }

 private:
  Config cfg_;
  at::Tensor embed_, final_norm_, inv_freq_;
  std::vector<Layer> layers_;

  at::Tensor rope_table(const at::Tensor& positions) {
    const int64_t T = positions.size(0), half = cfg_.rope / 2;
    at::Tensor cs = at::empty({T, half, 2}, at::kFloat);
    const int64_t* pos = positions.data_ptr<int64_t>();
    const float* inv = inv_freq_.data_ptr<float>();
    float* out = cs.data_ptr<float>();
    const float factor = static_cast<float>(cfg_.rope_factor);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(pos[t]) * inv[i];
        out[(t * half + i) * 2] = factor * std::cos(angle);
        out[(t * half + i) * 2 + 1] = factor * std::sin(angle);
      }
    return cs;
  }

  // interleaved pairs (x0, x1) rotated by (cos, sin): the complex product of rope.py, to bf16
  static inline void rope_row(const bf16* in, const float* cs, bf16* out, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = f32(in[2 * i]), b = f32(in[2 * i + 1]), co = cs[2 * i], si = cs[2 * i + 1];
      out[2 * i] = round_bf16(a * co - b * si);
      out[2 * i + 1] = round_bf16(a * si + b * co);
    }
  }

  at::Tensor attention(const Layer& l, const at::Tensor& x, const at::Tensor& cs, const at::Tensor& slots,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor cache) {
    const auto& c = cfg_;
    const int64_t T = x.size(0), D = c.hidden, H = c.heads, C = c.kv_rank, R = c.rope, W = C + R;
    const int64_t Dn = c.nope, Dv = c.v_dim, QK = Dn + R, Q = c.q_rank, half = R / 2;
    const at::Tensor xn = rms_norm(x, l.in_norm, c.eps);
    const at::Tensor a = linear(xn, l.fused_a);  // [T, Q + C + R]
    const at::Tensor qa = rms_norm(a.narrow(1, 0, Q), l.qa_norm, c.eps);
    const at::Tensor q = linear(qa, l.q_b);  // [T, H * (Dn + R)]

    // the new tokens' cache rows: normed latent, roped key
    const int64_t B = cache.size(1);
    bf16* cache_p = cache.data_ptr<bf16>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const float* csp = cs.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const bf16* row = a.data_ptr<bf16>() + t * a.stride(0);
      bf16* dst = cache_p + slot[t] * W;
      rms_norm_row(row + Q, l.kva_norm.data_ptr<bf16>(), dst, C, static_cast<float>(c.eps));
      rope_row(row + Q + C, csp + t * R, dst + C, half);
    }

    // Per (token, group of heads): absorb W_UK, attend over the paged cache in fp32, absorb W_UV.
    // A group reads its context rows straight from the cache and scores all its heads against them.
    at::Tensor o = at::empty({T, H * Dv}, x.options());
    const int64_t M = block_tables.size(1);
    const int32_t* tables = block_tables.data_ptr<int32_t>();
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const float* w_uk = l.w_uk.data_ptr<float>();      // [H, Dn, C]
    const float* w_uv_t = l.w_uv_t.data_ptr<float>();  // [H, C, Dv]
    const bf16* qp = q.data_ptr<bf16>();
    bf16* op = o.data_ptr<bf16>();
    const float scale = static_cast<float>(c.softmax_scale);
    // small batches split the heads so that every thread has work
    const int64_t groups = T >= 2 * at::get_num_threads() ? 1 : std::min<int64_t>(H, at::get_num_threads());
    const int64_t per_group = (H + groups - 1) / groups;
    at::parallel_for(0, T * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(per_group * W), acc(per_group * C), qn(Dn), probs;
      std::vector<const bf16*> rows;
      std::vector<bf16> pe(R);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / groups, h0 = (item % groups) * per_group, h1 = std::min(H, h0 + per_group);
        const int64_t nh = h1 - h0, len = lens[t];
        // queries: q_latent = q_nope W_UK (fp32); q_pe roped and rounded to bf16 as the Python path; scaled
        for (int64_t h = h0; h < h1; ++h) {
          const bf16* qh = qp + t * q.stride(0) + h * QK;
          float* qr = qf.data() + (h - h0) * W;
          bf16_to_f32(qh, qn.data(), Dn);
          vec_mat(qn.data(), Dn, w_uk + h * Dn * C, C, qr);
          rope_row(qh + Dn, csp + t * R, pe.data(), half);
          for (int64_t j = 0; j < R; ++j) qr[C + j] = f32(pe[j]);
          for (int64_t j = 0; j < W; ++j) qr[j] *= scale;
        }
        // the sequence's context rows, found through its block table
        rows.resize(len);
        probs.resize(nh * len);
        const int32_t* table = tables + t * M;
        for (int64_t p = 0; p < len; ++p) rows[p] = cache_p + (static_cast<int64_t>(table[p / B]) * B + p % B) * W;
        score_rows(qf.data(), rows.data(), probs.data(), nh, len, W);
        for (int64_t h = 0; h < nh; ++h) softmax_inplace(probs.data() + h * len, len);
        mix_rows(probs.data(), rows.data(), acc.data(), nh, len, C);
        // o = o_latent W_UV (fp32), rounded to bf16
        for (int64_t h = h0; h < h1; ++h) {
          float out[256];  // Dv <= 256, checked at construction
          vec_mat(acc.data() + (h - h0) * C, C, w_uv_t + h * C * Dv, Dv, out);
          for (int64_t k = 0; k < Dv; ++k) op[t * H * Dv + h * Dv + k] = round_bf16(out[k]);
        }
      }
    });
    const at::Tensor y = linear(o, l.o_proj);  // [T, D]
    return add(x, y);
  }

  static at::Tensor add(const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = at::empty_like(a);
    const int64_t n = a.numel();
    const bf16* ap = a.data_ptr<bf16>();
    const bf16* bp = b.data_ptr<bf16>();
    bf16* o = out.data_ptr<bf16>();
    for (int64_t i = 0; i < n; ++i) o[i] = round_bf16(f32(ap[i]) + f32(bp[i]));
    return out;
  }

  // SwiGLU MLP on normed rows: down(silu(gate) * up), gate_up [2I, D] packed
  static at::Tensor swiglu_mlp(const at::Tensor& xn, const Weight& gate_up, const Weight& down) {
    const at::Tensor h = linear(xn, gate_up);  // [T, 2I]
    const int64_t T = h.size(0), I = h.size(1) / 2;
    at::Tensor act = at::empty({T, I}, h.options());
    const bf16* hp = h.data_ptr<bf16>();
    bf16* ap = act.data_ptr<bf16>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < I; ++i) ap[t * I + i] = swiglu(hp[t * 2 * I + i], hp[t * 2 * I + I + i]);
    return linear(act, down);
  }

  at::Tensor mlp(const Layer& l, const at::Tensor& h) {
    const at::Tensor hn = rms_norm(h, l.post_norm, cfg_.eps);
    return add(h, swiglu_mlp(hn, l.gate_up, l.down));
  }

  // grouped top-k of kernels/moe_ref.py for one token: writes K ids and weights
  void route(const float* logits, const float* bias, int64_t* ids, float* weights) const {
    const auto& c = cfg_;
    const int64_t E = c.experts, G = c.n_group, per = E / G;
    float scores[1024], biased[1024];
    TORCH_CHECK(E <= 1024, "more than 1024 routed experts");
    for (int64_t e = 0; e < E; ++e) {
      scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
      biased[e] = scores[e] + bias[e];
    }
    // groups ranked by the sum of their two best biased scores (one when a group has one expert)
    std::vector<std::pair<float, int64_t>> groups(G);
    for (int64_t g = 0; g < G; ++g) {
      float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        if (biased[e] > b1) { b2 = b1; b1 = biased[e]; } else if (biased[e] > b2) { b2 = biased[e]; }
      }
      groups[g] = {per >= 2 ? b1 + b2 : b1, g};
    }
    std::stable_sort(groups.begin(), groups.end(), [](auto& p, auto& q) { return p.first > q.first; });
    std::vector<char> allowed(E, 0);
    for (int64_t g = 0; g < c.topk_group; ++g)
      for (int64_t e = groups[g].second * per; e < (groups[g].second + 1) * per; ++e) allowed[e] = 1;
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e]) cand.push_back({biased[e], e});
    std::stable_sort(cand.begin(), cand.end(), [](auto& p, auto& q) { return p.first > q.first; });
    float sum = 0;
    for (int64_t k = 0; k < c.top_k; ++k) {
      ids[k] = cand[k].second;
      weights[k] = scores[ids[k]];
      sum += weights[k];
    }
    for (int64_t k = 0; k < c.top_k; ++k) {
      if (c.norm_topk) weights[k] = weights[k] / (sum + 1e-20f);
      weights[k] *= static_cast<float>(c.routed_scale);
    }
  }

  at::Tensor moe(const Layer& l, const at::Tensor& h) {
    const auto& c = cfg_;
    const int64_t T = h.size(0), D = c.hidden, E = c.experts, K = c.top_k, I = c.moe_inter;
    const at::Tensor hn = rms_norm(h, l.post_norm, c.eps);
    // router logits in fp32: hn.float() @ W^T
    std::vector<float> logits(T * E), weights(T * K), hf(D);
    std::vector<int64_t> ids(T * K);
    const bf16* hp = hn.data_ptr<bf16>();
    const float* rw = l.router_w.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t d = 0; d < D; ++d) hf[d] = f32(hp[t * D + d]);
      for (int64_t e = 0; e < E; ++e) logits[t * E + e] = dot(hf.data(), rw + e * D, D);
      route(logits.data() + t * E, l.router_bias.data_ptr<float>(), ids.data() + t * K, weights.data() + t * K);
    }
    at::Tensor routed;
    if (T == 1) {  // only the token's K experts, summed in fp32 (kernels/moe_cpu.py, _one_token)
      std::vector<float> acc(D, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const at::Tensor y = swiglu_mlp(hn, l.expert_up[ids[k]], l.expert_down[ids[k]]);
        const bf16* yp = y.data_ptr<bf16>();
        for (int64_t d = 0; d < D; ++d) acc[d] += weights[k] * f32(yp[d]);
      }
      routed = at::empty_like(h);
      bf16* rp = routed.data_ptr<bf16>();
      for (int64_t d = 0; d < D; ++d) rp[d] = round_bf16(acc[d]);
    } else {  // every expert in two GEMMs, unrouted ones zeroed before the down projection
      const at::Tensor up = linear(hn, l.up_all);  // [T, E * 2I]
      at::Tensor act = at::zeros({T, E * I}, h.options());
      const bf16* upp = up.data_ptr<bf16>();
      bf16* ap = act.data_ptr<bf16>();
      at::parallel_for(0, T * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t t = item / K, e = ids[item];
          const bf16 w = round_bf16(weights[item]);
          const bf16* g = upp + t * E * 2 * I + e * 2 * I;
          bf16* dst = ap + t * E * I + e * I;
          for (int64_t i = 0; i < I; ++i) dst[i] = round_bf16(f32(swiglu(g[i], g[I + i])) * f32(w));
        }
      });
      routed = linear(act, l.down_all);  // [T, D]
    }
    at::Tensor out = l.gate_up.packed.defined() ? add(routed, swiglu_mlp(hn, l.gate_up, l.down)) : routed;
    return add(h, out);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<int64_t>, bool, std::vector<double>, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &Decoder::add_layer)
      // the step runs without the GIL: an event loop on another thread of the process (the
      // in-process AsyncEngine) stays responsive, as it does between the Python path's ops
      .def("forward", &Decoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("small_linear", &small_linear, "x [T <= 4, K] @ w [N, K]^T with AVX512-BF16 (tests compare it with F.linear)");
  m.def("small_linear_available", []() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  });
}
