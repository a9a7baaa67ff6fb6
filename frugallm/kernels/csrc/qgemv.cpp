// Batch-1 GEMVs over int8 / int4 weight codes with int8 activations (docs/design/quantization.md,
// "Native int8-activation GEMV"). The activation row is quantized the way llama.cpp quantizes it
// for its q8_0 / q4_0 dot products (per block of 32 inputs: dx = amax / 127, qx = round(x / dx)),
// then every weight block is an int8 x int8 (or uint4 x int8) dot product in int32, scaled once:
//
//   int8, a scale per row   y[n] = s[n] * sum_g dx[g] * sum_j qx[32g+j] q[n, 32g+j]
//   int8, a scale per block y[n] = sum_g dx[g] s[n, g] * sum_j qx[32g+j] q[n, 32g+j]       (GGUF q8_0)
//   int4 (q4_0)             y[n] = sum_g dx[g] d[n, g] * (sum_j qx[32g+j] c[n, 32g+j] - 8 sum_j qx[32g+j])
//
// Three implementations of the same sums, picked by the caller (`isa`, chosen once from the host's
// flags): 0 plain C++, 1 AVX2 (vpmaddubsw + vpmaddwd, 32 weights per pair), 2 AVX-512 VNNI on 256-bit
// vectors (vpdpbusd). The integer sums are exact in all three; only the fp32 accumulation of the
// per-block terms differs in order. frugallm/kernels/native.py holds the pure-torch twin.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
enum Format { kQ8Row, kQ8Block, kQ4 };

struct Rows {  // the weight rows of one (matrix, activation row) pair, and that activation row quantized
  const uint8_t* codes;  // row n starts at codes + n * row_bytes
  int64_t row_bytes;
  const float* s32;      // int8: per row (s32[n]) or per block (s32[n * G + g])
  const uint16_t* s16;   // int4: fp16 per block
  const int8_t* qx;      // the activation row, int8 (K)
  const float* dx;       // its block scales (G)
  const int32_t* sx;     // its block sums (G), for int4's -8 offset
  int64_t G;
  const int8_t* qx2;     // int4: the row in pairs of blocks (see pair_activations), else nullptr
};

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// ---- isa 0: plain C++ -----------------------------------------------------------------------------
template <Format F>
float row_ref(const Rows& r, int64_t n) {
  float acc = 0.f;
  for (int64_t g = 0; g < r.G; ++g) {
    const int8_t* x = r.qx + g * kBlock;
    int32_t s = 0;
    if constexpr (F == kQ4) {
      const uint8_t* b = r.codes + n * r.row_bytes + g * (kBlock / 2);
      for (int64_t j = 0; j < kBlock / 2; ++j) s += int32_t(b[j] & 15) * x[j] + int32_t(b[j] >> 4) * x[j + 16];
      acc += r.dx[g] * half_to_float(r.s16[n * r.G + g]) * float(s - 8 * r.sx[g]);
    } else {
      const int8_t* w = reinterpret_cast<const int8_t*>(r.codes + n * r.row_bytes) + g * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) s += int32_t(w[j]) * x[j];
      acc += r.dx[g] * (F == kQ8Block ? r.s32[n * r.G + g] : 1.f) * float(s);
    }
  }
  return F == kQ8Row ? acc * r.s32[n] : acc;
}

template <Format F>
void rows_ref(const Rows& r, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) y[n] = row_ref<F>(r, n);
}

// ---- isa 1 and 2: 256-bit vectors, one row at a time (see FRUGALLM_ROWS) -------------------------------
#define FRUGALLM_TARGET_AVX2 "avx2,fma,f16c"
#define FRUGALLM_TARGET_VNNI "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"

__attribute__((target(FRUGALLM_TARGET_AVX2))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// u (unsigned bytes) . s (signed bytes), summed in fours into 8 int32 lanes
__attribute__((target(FRUGALLM_TARGET_AVX2))) inline __m256i dot_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // pairs <= 2*128*127: no saturation
}
__attribute__((target(FRUGALLM_TARGET_VNNI))) inline __m256i dot_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

// int4, two blocks g, g + 1 at once: one 32-byte load holds both blocks' codes, byte j of each block its
// code j (low nibble) and j + 16 (high). So `lo` is [codes 0..15 of g | 0..15 of g + 1] and `hi` the codes
// 16..31 of each; the activations were laid out to match once per call (pair_activations). Lanes 0-3 of
// the int32 result belong to block g, 4-7 to g + 1. Two instructions a block fewer than one block at a
// time (the shift, the 128-bit insert and the mask serve two blocks). vpmaddubsw sums two products of
// at most 15 * 127, so the sum of both halves (<= 7620) still fits int16 before vpmaddwd.
__attribute__((target(FRUGALLM_TARGET_AVX2))) inline __m256i pair_avx2(__m256i lo, __m256i xl, __m256i hi, __m256i xh) {
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)),
                           _mm256_set1_epi16(1));
}
__attribute__((target(FRUGALLM_TARGET_VNNI))) inline __m256i pair_vnni(__m256i lo, __m256i xl, __m256i hi, __m256i xh) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
}

// 32 weights of block g of row n against the activation block: their int32 partial sums (8 lanes)
#define FRUGALLM_BLOCK(SUFFIX, TARGET, DOT)                                                                 \
  template <Format F>                                                                                       \
  __attribute__((target(TARGET), always_inline)) inline __m256i block_##SUFFIX(const Rows& r, int64_t n, int64_t g) { \
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.qx + g * kBlock));             \
    if constexpr (F == kQ4) {                                                                               \
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes + n * r.row_bytes + g * 16));   \
      /* codes 0..15 | 16..31 (low nibbles, then high), unsigned: the -8 comes after, through sx */          \
      return DOT(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15)), xv);   \
    } else {                                                                                                \
      __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.codes + n * r.row_bytes + g * 32)); \
      return DOT(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)); /* |w| . sign(w) x = w . x */            \
    }                                                                                                       \
  }

FRUGALLM_BLOCK(avx2, FRUGALLM_TARGET_AVX2, dot_avx2)
FRUGALLM_BLOCK(vnni, FRUGALLM_TARGET_VNNI, dot_vnni)

// One row at a time, so the codes are read as one sequential stream (what the hardware prefetcher follows
// best: four interleaved rows of 768 bytes read from memory at half the speed), two fp32 accumulator
// chains, and a software prefetch FRUGALLM_PREFETCH bytes ahead of the stream (LOG.md has the sweep).
#ifndef FRUGALLM_PREFETCH
#define FRUGALLM_PREFETCH 1024
#endif

// The blocks' scales dx[g] * s[n, g] of one row, 8 at a time (and the int4 offset's sum_g scale * sx[g]),
// into sc; the rows are processed in pieces of at most kPiece blocks so that sc stays on the stack.
constexpr int64_t kPiece = 256;

#define FRUGALLM_ROWS(SUFFIX, TARGET, DOT, PAIR)                                                                 \
  template <Format F>                                                                                      \
  __attribute__((target(TARGET))) float scales_##SUFFIX(const Rows& r, int64_t n, int64_t g0, int64_t g1, float* sc) { \
    float corr = 0.f;                                                                                      \
    int64_t g = g0;                                                                                        \
    for (; g + 8 <= g1; g += 8) {                                                                          \
      __m256 v = _mm256_loadu_ps(r.dx + g);                                                                \
      if constexpr (F == kQ8Block) v = _mm256_mul_ps(v, _mm256_loadu_ps(r.s32 + n * r.G + g));             \
      if constexpr (F == kQ4) {                                                                            \
        v = _mm256_mul_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.s16 + n * r.G + g)))); \
        corr += hsum8(_mm256_mul_ps(v, _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.sx + g))))); \
      }                                                                                                    \
      _mm256_storeu_ps(sc + g - g0, v);                                                                    \
    }                                                                                                      \
    for (; g < g1; ++g) {                                                                                  \
      float v = r.dx[g];                                                                                   \
      if constexpr (F == kQ8Block) v *= r.s32[n * r.G + g];                                                \
      if constexpr (F == kQ4) v *= _cvtsh_ss(r.s16[n * r.G + g]), corr += v * float(r.sx[g]);              \
      sc[g - g0] = v;                                                                                      \
    }                                                                                                      \
    return corr;                                                                                           \
  }                                                                                                        \
  template <Format F>                                                                                      \
  __attribute__((target(TARGET))) void rows_##SUFFIX(const Rows& r, int64_t n0, int64_t n1, float* y) {   \
    constexpr int64_t bs = F == kQ4 ? 16 : 32;                                                             \
    alignas(32) float sc[kPiece];                                                                          \
    for (int64_t n = n0; n < n1; ++n) {                                                                    \
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                       \
      float corr = 0.f;                                                                                    \
      const char* pf = reinterpret_cast<const char*>(r.codes + n * r.row_bytes) + FRUGALLM_PREFETCH;       \
      for (int64_t g0 = 0; g0 < r.G; g0 += kPiece) {                                                       \
        const int64_t g1 = std::min(r.G, g0 + kPiece);                                                     \
        corr += scales_##SUFFIX<F>(r, n, g0, g1, sc);                                                      \
        int64_t g = g0;                                                                                    \
        if constexpr (F == kQ4) /* two blocks a step, one 32-byte load of codes (see pair_activations) */  \
          for (; g + 2 <= g1; g += 2) {                                                                    \
            _mm_prefetch(pf + g * bs, _MM_HINT_T0);                                                        \
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.codes + n * r.row_bytes + g * 16)); \
            const __m256i* xp = reinterpret_cast<const __m256i*>(r.qx2 + g * kBlock);                      \
            const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(15));                                  \
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));            \
            const __m256 scv = _mm256_set_m128(_mm_broadcast_ss(sc + g + 1 - g0), _mm_broadcast_ss(sc + g - g0)); \
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PAIR(lo, _mm256_loadu_si256(xp), hi,                \
                                                           _mm256_loadu_si256(xp + 1))), scv, acc0);        \
          }                                                                                                \
        /* two blocks a step into two accumulators (a runtime index into an array would spill them) */   \
        for (; g < g1; g += 2) {                                                                           \
          _mm_prefetch(pf + g * bs, _MM_HINT_T0);                                                          \
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_##SUFFIX<F>(r, n, g)), _mm256_broadcast_ss(sc + g - g0), acc0); \
          if (g + 1 < g1)                                                                                  \
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_##SUFFIX<F>(r, n, g + 1)),                      \
                                   _mm256_broadcast_ss(sc + g + 1 - g0), acc1);                            \
        }                                                                                                  \
      }                                                                                                    \
      const float v = hsum8(_mm256_add_ps(acc0, acc1)) - 8.f * corr;                                       \
      y[n] = F == kQ8Row ? v * r.s32[n] : v;                                                               \
    }                                                                                                      \
  }

FRUGALLM_ROWS(avx2, FRUGALLM_TARGET_AVX2, dot_avx2, pair_avx2)
FRUGALLM_ROWS(vnni, FRUGALLM_TARGET_VNNI, dot_vnni, pair_vnni)

using RowsFn = void (*)(const Rows&, int64_t, int64_t, float*);

template <Format F>
RowsFn pick_isa(int64_t isa) {
  switch (isa) {
    case 0: return rows_ref<F>;
    case 1: return rows_avx2<F>;
    case 2: return rows_vnni<F>;
  }
  TORCH_CHECK(false, "qgemv: isa must be 0 (plain C++), 1 (AVX2) or 2 (AVX-512 VNNI), got ", isa);
}

RowsFn pick(Format f, int64_t isa) {
  return f == kQ4 ? pick_isa<kQ4>(isa) : f == kQ8Block ? pick_isa<kQ8Block>(isa) : pick_isa<kQ8Row>(isa);
}

// x (P, K) fp32 -> qx (P, K) int8, dx (P, G), sums (P, G): llama.cpp's quantize_row_q8_0 rule with the
// scale kept in fp32 (llama.cpp rounds it to fp16) and round-half-to-even (its AVX path's rounding).
void quantize_block_ref(const float* v, int8_t* q, float* d, int32_t* sum) {
  float amax = 0.f;
  for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
  int32_t s = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    const int8_t c = static_cast<int8_t>(std::nearbyint(v[j] * id));
    q[j] = c;
    s += c;
  }
  *d = dd;
  *sum = s;
}

// The same, eight lanes at a time (a scalar nearbyint per input cost ~4 us a 768-wide row: as much as
// the GEMV of a small matrix). The products and the rounding are the scalar ones, so the codes are equal.
__attribute__((target(FRUGALLM_TARGET_AVX2))) void quantize_block_avx2(const float* v, int8_t* q, float* d, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a[4];
  for (int k = 0; k < 4; ++k) a[k] = _mm256_loadu_ps(v + 8 * k);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float dd = _mm_cvtss_f32(h) / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
  const __m256 mul = _mm256_set1_ps(id);
  __m256i i[4];
  for (int k = 0; k < 4; ++k)
    i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(a[k], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  // packs interleave the 128-bit lanes: 0 1 4 5 | 2 3 6 7 (in fours); the permute puts them back in order
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d = dd;
  *sum = _mm_cvtsi128_si32(s);
}

// The int4 pair loop's activation layout: per pair of blocks (g, g + 1), the 64 bytes
// [qx_g[0:16], qx_g+1[0:16], qx_g[16:32], qx_g+1[16:32]] (an odd last block is read from qx itself).
void pair_activations(const int8_t* q, int64_t P, int64_t K, int8_t* out) {
  for (int64_t p = 0; p < P; ++p)
    for (int64_t g = 0; g + 2 <= K / kBlock; g += 2) {
      const int8_t* a = q + p * K + g * kBlock;
      int8_t* o = out + p * K + g * kBlock;
      std::memcpy(o, a, 16), std::memcpy(o + 16, a + 32, 16), std::memcpy(o + 32, a + 16, 16), std::memcpy(o + 48, a + 48, 16);
    }
}

void quantize_rows(const float* x, int64_t P, int64_t K, int8_t* q, float* d, int32_t* sums, int64_t isa) {
  const auto block = isa >= 1 ? quantize_block_avx2 : quantize_block_ref;
  for (int64_t i = 0; i < P * K / kBlock; ++i) block(x + i * kBlock, q + i * kBlock, d + i, sums + i);
}

}  // namespace

// x (P, K) fp32 or bf16; codes (N, Kc) or (E, N, Kc): int8 (Kc = K) or packed int4 uint8 (Kc = K / 2);
// scales: int8 (N) / (E, N) fp32 per row, or (.., N, K/32) fp32 per block; int4 (.., N, K/32) fp16.
// idx: None (every row times the one matrix) or (P) int64, the expert each row multiplies.
// Returns y (P, N) fp32.
at::Tensor qgemv(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                 const std::optional<at::Tensor>& idx, int64_t isa) {
  const bool int4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(int4 || codes.scalar_type() == at::kChar, "qgemv: codes must be int8 or packed int4 (uint8), got ",
              codes.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && codes.dim() >= 2 && codes.dim() <= 3, "qgemv: x must be (P, K), codes (N, Kc) or (E, N, Kc)");
  const at::Tensor x = x_in.scalar_type() == at::kFloat && x_in.is_contiguous() ? x_in : x_in.to(at::kFloat).contiguous();
  const at::Tensor& c = codes;
  const at::Tensor& s = scales;
  TORCH_CHECK(c.is_contiguous() && s.is_contiguous(), "qgemv: codes and scales must be contiguous");
  const int64_t P = x.size(0), K = x.size(1), N = c.size(-2), E = c.dim() == 3 ? c.size(0) : 1;
  const int64_t G = K / kBlock, Kc = int4 ? K / 2 : K;
  TORCH_CHECK(K % kBlock == 0 && c.size(-1) == Kc, "qgemv: K = ", K, " must be a multiple of 32 and match the codes' ",
              c.size(-1), " columns");
  const bool grouped = s.dim() == c.dim();
  TORCH_CHECK(!int4 || (grouped && s.scalar_type() == at::kHalf), "qgemv: int4 scales must be (.., N, K/32) fp16");
  TORCH_CHECK(int4 || s.scalar_type() == at::kFloat, "qgemv: int8 scales must be fp32");
  TORCH_CHECK(s.size(-1) == (grouped ? G : N), "qgemv: scales of shape ", s.sizes(), " do not fit the codes");
  at::Tensor ix;
  if (idx.has_value()) {
    ix = idx->scalar_type() == at::kLong && idx->is_contiguous() ? *idx : idx->to(at::kLong).contiguous();
    TORCH_CHECK(ix.numel() == P, "qgemv: idx must hold one expert per row of x (", P, "), got ", ix.numel());
    for (int64_t p = 0; p < P; ++p) {  // here, not in the parallel loop, where an exception cannot leave
      const int64_t e = ix.data_ptr<int64_t>()[p];
      TORCH_CHECK(e >= 0 && e < E, "qgemv: expert index ", e, " is outside [0, ", E, ")");
    }
  } else {
    TORCH_CHECK(E == 1, "qgemv: stacked codes need idx");
  }
  // the quantized activation rows: a few KB, so plain heap scratch (no tensor allocations)
  std::vector<int8_t> qx(P * K);
  std::vector<float> dx(P * G);
  std::vector<int32_t> sx(P * G);
  quantize_rows(x.data_ptr<float>(), P, K, qx.data(), dx.data(), sx.data(), isa);
  std::vector<int8_t> qx2(int4 ? P * K : 0);
  if (int4) pair_activations(qx.data(), P, K, qx2.data());
  at::Tensor y = at::empty({P, N}, x.options());
  const Format f = int4 ? kQ4 : grouped ? kQ8Block : kQ8Row;
  const RowsFn rows = pick(f, isa);
  const uint8_t* cp = reinterpret_cast<const uint8_t*>(c.data_ptr());
  const int64_t* ip = ix.defined() ? ix.data_ptr<int64_t>() : nullptr;
  const float* s32 = int4 ? nullptr : s.data_ptr<float>();
  const uint16_t* s16 = int4 ? reinterpret_cast<const uint16_t*>(s.data_ptr()) : nullptr;
  const int8_t* qxp = qx.data();
  const float* dxp = dx.data();
  const int32_t* sxp = sx.data();
  float* yp = y.data_ptr<float>();
  // work items: (activation row p, a chunk of 16 weight rows); a thread takes whole chunks
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  at::parallel_for(0, P * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / chunks, n0 = (i % chunks) * kChunk, n1 = std::min(N, n0 + kChunk);
      const int64_t e = ip ? ip[p] : 0;
      const Rows r{cp + e * N * Kc, Kc, s32 ? s32 + e * N * (grouped ? G : 1) : nullptr,
                   s16 ? s16 + e * N * G : nullptr, qxp + p * K, dxp + p * G, sxp + p * G, G,
                   int4 ? qx2.data() + p * K : nullptr};
      rows(r, n0, n1, yp + p * N);
    }
  });
  return y;
}

TORCH_LIBRARY(frugallm, m) {
  m.def("qgemv(Tensor x, Tensor codes, Tensor scales, Tensor? idx, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("qgemv", qgemv);
}
