// Exact attention with a relative position term on the CPU: one parallel region per pass.
//
// relattn's chunked backend issues a few ATen ops per query block, each an OpenMP parallel
// region; on cores that other processes also use, every region waits for a descheduled thread.
// Here each pass is ONE at::parallel_for over the threads, which take (batch, query head,
// query block) tasks from a shared counter (heaviest first), so a thread that loses its core
// only takes fewer tasks. Inside a task:
//
//   * float32 matrix products are the kernel's own register-tiled loops (AVX-512, or AVX2 +
//     FMA; "own tile products" below) when the head dim is a multiple of 16; otherwise, and for
//     float64, they call the BLAS that libtorch_cpu exports (MKL's sgemm_/dgemm_, which runs
//     on one thread inside a parallel region), or at::addmm_ on views of the tile when the
//     symbol is absent (weak reference); nested ATen ops also run inline on one thread. This
//     needs the file compiled with -fopenmp under torch's OpenMP pool: without it the
//     at::parallel_for below runs on the calling thread only, and every nested exp/MKL call
//     opens a parallel region of its own (measured: no speed-up with 2 threads);
//   * float32 exponentials are a vectorized polynomial fused with the row's shift and sum;
//     float64 ones one at::exp_ per tile (ATen's vectorized kernel, inline);
//   * the position term is a contiguous slice of F_h[u] = PE_h(Δ) with u = c - r + Nq - 1 and
//     Δ = q_offset + r - c, -inf where causality, the window or the table's range hide Δ: row r
//     of a tile of keys [k0, k0 + L) reads F_h[k0 - r + Nq - 1 ...] (a Toeplitz tile).
//
// Forward: online softmax over key tiles of up to block_n keys inside the block's visible span.
// Backward: P = exp(s - lse) recomputed per tile; dq rows owned by the task; dk, dv summed into
// per-thread buffers and the table gradient into per-thread G_h[u] += dS[r, j] (a contiguous
// add per row), all reduced once after the region.
//
// Shapes: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D) contiguous, float32, float64, bfloat16 or
// float16; table (Hq, T) or slopes (Hq,) in the compute dtype (float32 for 16-bit inputs), or
// empty tensors. bfloat16 with AVX-512-BF16 and D a multiple of 32 multiplies in bf16 ("bfloat16
// tiles" below); other 16-bit inputs are widened to float32 once per call. Either way the
// statistics, the position term and every sum are float32, and out, dq, dk, dv are rounded to
// the input dtype once.

#include <torch/extension.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

// How float32 tiles are multiplied: relattn's own register-tiled loops (below; kTilesAvx2 keeps
// to their AVX2 version on an AVX-512 CPU), the exported BLAS, or nested at::addmm_. Tests and
// benchmarks switch; the own loops fall back to BLAS where they cannot run (no AVX2 + FMA, a
// head dim that is not a multiple of 16, float64).
enum class Products { kTiles, kTilesAvx2, kBlas, kAten };
Products g_products = Products::kTiles;

// Whether bfloat16 forwards may multiply in bf16 where the CPU can (tests and benchmarks
// compare them with the widened path).
bool g_bf16_tiles = true;

bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

template <typename T>
at::ScalarType scalar_type_of();
template <>
at::ScalarType scalar_type_of<float>() { return at::kFloat; }
template <>
at::ScalarType scalar_type_of<double>() { return at::kDouble; }

// A row-major matrix view (rows x cols, row stride ld) of external memory, as a tensor.
template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(scalar_type_of<T>()));
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, op(A) (m x kk), op(B) (kk x n).
template <typename T>
void gemm(bool ta, bool tb, int m, int n, int kk, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (g_products != Products::kAten && blas_available()) {
    // Column-major BLAS on row-major data: C^T = op(B)^T op(A)^T.
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&cb, &ca, &n, &m, &kk, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
    } else {
      dgemm_(&cb, &ca, &n, &m, &kk, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
    }
    return;
  }
  at::Tensor A = ta ? view(a, kk, m, lda).t() : view(a, m, kk, lda);
  at::Tensor B = tb ? view(b, n, kk, ldb).t() : view(b, kk, n, ldb);
  at::Tensor C = view(c, m, n, ldc);
  if (kk == 0) {
    C.mul_(beta);
    return;
  }
  C.addmm_(A, B, beta, alpha);
}

// ---------------------------------------------------------------------------- own tile products
//
// C (M x N, row stride ldc) <- alpha·A B (+ C), A's element (i, k) at a[i·ars + k·aks] (so A or
// Aᵀ of a row-major tile), B's row k contiguous at b + k·ldb, N a multiple of the vector width.
// A micro-kernel keeps an MR x (NCV vectors) block of C in registers over the whole k loop:
// each step loads NCV vectors of B's row k and broadcasts MR elements of A's column k. BLAS
// packs both operands of every call into its own layout first; at the attention's tile shapes
// (128 x 256 x 64) that packing cost more than a sixth of its time (perf, AMD Zen 4), while
// here every operand is read where it lies: q, k, v, dO rows as they are, the scores and
// their gradient as the passes wrote them, and kᵀ, vᵀ transposed once per call. Each C
// element is one sequential sum over k (like a naive dot product).
// Tile width granularity of the own products (columns are computed a vector at a time).
constexpr int64_t kTileCols = 16;
// Query rows per kv head from which k and v are transposed for the own q kᵀ and dO vᵀ.
constexpr int64_t kTransposeRows = 512;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(W * 4), aligned(4)));  // unaligned loads
};

constexpr int64_t kPrefetchRows = 8;

template <int W, int MR, int NCV>
__attribute__((always_inline)) inline void micro(int64_t K, const float* a, int64_t ars,
                                                 int64_t aks, const float* b, int64_t ldb,
                                                 float* c, int64_t ldc, float alpha, bool acc) {
  typedef typename VecOf<W>::type vf;
  if (acc) {  // C's block (dk, dv rows in a large buffer) arrives while the k loop runs
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NCV * W; v += 16) __builtin_prefetch(c + i * ldc + v, 1);
    }
  }
  vf sum[MR][NCV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NCV; ++v) sum[i][v] = vf{};
  }
  for (int64_t k = 0; k < K; ++k) {
    // B's rows ahead of the loop (their lines come from L2 or L3: strided rows defeat the
    // hardware prefetchers when a block uses only part of each row)
    for (int v = 0; v < NCV * W; v += 16) __builtin_prefetch(b + (k + kPrefetchRows) * ldb + v);
    vf bv[NCV];
    for (int v = 0; v < NCV; ++v) bv[v] = *reinterpret_cast<const vf*>(b + k * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      // x - 0 is x for every float (-0 and NaN included), so this is one broadcast load
      // (vbroadcastss from memory); "x + 0" is not x for -0 and keeps an add
      const vf ai = a[i * ars + k * aks] - vf{};
      for (int v = 0; v < NCV; ++v) sum[i][v] += ai * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NCV; ++v) {
      vf* cp = reinterpret_cast<vf*>(c + i * ldc + v * W);
      *cp = acc ? *cp + alpha * sum[i][v] : alpha * sum[i][v];
    }
  }
}

// Rows i .. M - 1 (fewer than MR) of one column block.
template <int W, int MR, int NCV>
__attribute__((always_inline)) inline void micro_rest(int64_t rows, int64_t K, const float* a,
                                                      int64_t ars, int64_t aks, const float* b,
                                                      int64_t ldb, float* c, int64_t ldc,
                                                      float alpha, bool acc) {
  if constexpr (MR > 1) {
    if (rows == MR - 1) return micro<W, MR - 1, NCV>(K, a, ars, aks, b, ldb, c, ldc, alpha, acc);
    micro_rest<W, MR - 1, NCV>(rows, K, a, ars, aks, b, ldb, c, ldc, alpha, acc);
  }
}

template <int W, int MR, int NCV>
__attribute__((always_inline)) inline void tiles_body(int64_t M, int64_t N, int64_t K,
                                                      float alpha, const float* a, int64_t ars,
                                                      int64_t aks, const float* b, int64_t ldb,
                                                      bool acc, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + NCV * W <= N; j += NCV * W) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      micro<W, MR, NCV>(K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, alpha, acc);
    }
    micro_rest<W, MR, NCV>(M - i, K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc,
                           alpha, acc);
  }
  for (; j < N; j += W) {  // the last columns, one vector wide
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      micro<W, MR, 1>(K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, alpha, acc);
    }
    micro_rest<W, MR, 1>(M - i, K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc,
                         alpha, acc);
  }
}

// 32 vector registers: a 6 x 64 block of C in 24. 16 registers: 6 x 16 in 12.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) void tiles_v4(
    int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t ars, int64_t aks,
    const float* b, int64_t ldb, bool acc, float* c, int64_t ldc) {
  tiles_body<16, 6, 4>(M, N, K, alpha, a, ars, aks, b, ldb, acc, c, ldc);
}

__attribute__((target("avx2,fma"))) void tiles_v3(int64_t M, int64_t N, int64_t K, float alpha,
                                                  const float* a, int64_t ars, int64_t aks,
                                                  const float* b, int64_t ldb, bool acc,
                                                  float* c, int64_t ldc) {
  tiles_body<8, 6, 2>(M, N, K, alpha, a, ars, aks, b, ldb, acc, c, ldc);
}

// 4: AVX-512, 3: AVX2 + FMA, 0: neither (BLAS). RELATTN_ISA_AVX2 stops at 3.
int tiles_isa() {
  static const int isa = [] {
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifndef RELATTN_ISA_AVX2
    if (v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return 4;
    }
#endif
    return v3 ? 3 : 0;
  }();
  return isa;
}

// Whether float32 tiles of head dim d get the own products, and whether in their AVX-512
// version (the one place that decides; products() and products_for() ask here).
bool own_products(int64_t d) {
  return tiles_isa() > 0 && d % kTileCols == 0 &&
         (g_products == Products::kTiles || g_products == Products::kTilesAvx2);
}
bool own_avx512() { return tiles_isa() == 4 && g_products == Products::kTiles; }

void tiles_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t ars,
                int64_t aks, const float* b, int64_t ldb, bool acc, float* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (own_avx512()) {
    tiles_v4(M, N, K, alpha, a, ars, aks, b, ldb, acc, c, ldc);
  } else {
    tiles_v3(M, N, K, alpha, a, ars, aks, b, ldb, acc, c, ldc);
  }
}

// ---------------------------------------------------------------------------- bfloat16 tiles
//
// On CPUs with AVX-512-BF16 (AMD Zen 4, Intel Cooper Lake and Sapphire Rapids on) the forward
// pass multiplies bfloat16 operands with vdpbf16ps: each float32 lane adds the two products of
// a pair of bf16 values (exact products, float32 sums). Operands are laid out in pairs along
// the summed index, as 32-bit words: C (M x N) += alpha · Σ_p A[i, p] ⊙ B[p, j], A's word
// (i, p) at a[i·ars + p·aks], B's row p of words at b + p·ldb, N a multiple of 16. For q kᵀ, A is
// q itself (pairs of features) and B is k transposed as words (kp: (D/2, keys) per kv head);
// for P v, A is the probability tile rounded to bf16 (pairs of keys) and B is v with pairs of
// keys interleaved (vp: (keys/2, D) words per kv head). Only P is rounded beyond the inputs,
// as in every 16-bit flash attention.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define RELATTN_HAVE_BF16_TILES 1
#define RELATTN_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")))

template <int MR, int NCV>
RELATTN_BF16_TARGET __attribute__((always_inline)) inline void micro_bf16(
    int64_t KP, const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb,
    float* c, int64_t ldc, float alpha, bool acc) {
  __m512 sum[MR][NCV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NCV; ++v) sum[i][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < KP; ++p) {
    for (int v = 0; v < NCV; ++v) __builtin_prefetch(b + (p + kPrefetchRows) * ldb + v * 16);
    __m512i bv[NCV];
    for (int v = 0; v < NCV; ++v) bv[v] = _mm512_loadu_si512(b + p * ldb + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(static_cast<int>(a[i * ars + p * aks]));
      for (int v = 0; v < NCV; ++v) {
        sum[i][v] = _mm512_dpbf16_ps(sum[i][v], (__m512bh)ai, (__m512bh)bv[v]);
      }
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NCV; ++v) {
      float* cp = c + i * ldc + v * 16;
      const __m512 r = _mm512_mul_ps(al, sum[i][v]);
      _mm512_storeu_ps(cp, acc ? _mm512_add_ps(_mm512_loadu_ps(cp), r) : r);
    }
  }
}

template <int MR, int NCV>
RELATTN_BF16_TARGET __attribute__((always_inline)) inline void micro_bf16_rest(
    int64_t rows, int64_t KP, const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b,
    int64_t ldb, float* c, int64_t ldc, float alpha, bool acc) {
  if constexpr (MR > 1) {
    if (rows == MR - 1) {
      return micro_bf16<MR - 1, NCV>(KP, a, ars, aks, b, ldb, c, ldc, alpha, acc);
    }
    micro_bf16_rest<MR - 1, NCV>(rows, KP, a, ars, aks, b, ldb, c, ldc, alpha, acc);
  }
}

// C (M x N, N a multiple of 16) <- alpha·A B (+ C) over KP pairs: a 6 x 64 block of C in 24
// of the 32 registers, the last columns a vector at a time.
RELATTN_BF16_TARGET void tiles_bf16(int64_t M, int64_t N, int64_t KP, float alpha,
                                    const uint32_t* a, int64_t ars, int64_t aks,
                                    const uint32_t* b, int64_t ldb, bool acc, float* c,
                                    int64_t ldc) {
  constexpr int MR = 6, NCV = 4;
  if (M <= 0 || N <= 0) return;
  int64_t j = 0;
  for (; j + NCV * 16 <= N; j += NCV * 16) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      micro_bf16<MR, NCV>(KP, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, alpha,
                          acc);
    }
    micro_bf16_rest<MR, NCV>(M - i, KP, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j,
                             ldc, alpha, acc);
  }
  for (; j < N; j += 16) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      micro_bf16<MR, 1>(KP, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, alpha,
                        acc);
    }
    micro_bf16_rest<MR, 1>(M - i, KP, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc,
                           alpha, acc);
  }
}

// n floats -> n bfloat16 (round to nearest even, as vcvtneps2bf16 and c10::BFloat16 do).
RELATTN_BF16_TARGET void round_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)h);
  }
  for (; j < n; ++j) out[j] = c10::BFloat16(x[j]).x;
}


// A generation step's two products in bf16 (D a multiple of 32, bf16 bits): out[i] = x·y_i for
// N rows y_i = y + i·ldy, each a vdpbf16ps sum reduced at the end.
template <int N>
RELATTN_BF16_TARGET __attribute__((always_inline)) inline void dot_keys_bf16(
    const uint16_t* x, const uint16_t* y, int64_t ldy, int64_t D, float* out) {
  __m512 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + d);
    for (int i = 0; i < N; ++i) {
      acc[i] = _mm512_dpbf16_ps(acc[i], xv, (__m512bh)_mm512_loadu_si512(y + i * ldy + d));
    }
  }
  for (int i = 0; i < N; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// out[c] = x·y_c for rows y_c = y + c·ldy, c < rows: four keys at a time.
RELATTN_BF16_TARGET void dot_rows_bf16(const uint16_t* x, const uint16_t* y, int64_t ldy,
                                       int64_t rows, int64_t D, float* out) {
  int64_t c = 0;
  for (; c + 4 <= rows; c += 4) dot_keys_bf16<4>(x, y + c * ldy, ldy, D, out + c);
  for (; c < rows; ++c) dot_keys_bf16<1>(x, y + c * ldy, ldy, D, out + c);
}

// o (D floats) += Σ_c w[c]·x_c for rows x_c = x + c·ldx: pairs of rows interleaved per 128-bit
// lane (vpunpck{l,h}wd) against the pair of weights rounded to bf16, so an accumulator's lanes
// hold features 8L + t (low words) and 8L + 4 + t (high) of its 32; a last odd row in float32.
RELATTN_BF16_TARGET void axpy_rows_bf16(float* o, const uint16_t* x, int64_t ldx, const float* w,
                                        int64_t rows, int64_t D) {
  const int64_t pairs = rows / 2;
  for (int64_t d0 = 0; d0 < D; d0 += 128) {  // up to four blocks of 32 features in registers
    const int nb = static_cast<int>(std::min<int64_t>(4, (D - d0) / 32));
    __m512 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* a = x + 2 * p * ldx + d0;
      const uint16_t* b = a + ldx;
      const uint32_t word = uint32_t(c10::BFloat16(w[2 * p]).x) |
                            uint32_t(c10::BFloat16(w[2 * p + 1]).x) << 16;
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      for (int i = 0; i < nb; ++i) {
        const __m512i av = _mm512_loadu_si512(a + 32 * i), bv = _mm512_loadu_si512(b + 32 * i);
        lo[i] = _mm512_dpbf16_ps(lo[i], (__m512bh)_mm512_unpacklo_epi16(av, bv), wv);
        hi[i] = _mm512_dpbf16_ps(hi[i], (__m512bh)_mm512_unpackhi_epi16(av, bv), wv);
      }
    }
    for (int i = 0; i < nb; ++i) {
      alignas(64) float l[16], h[16];
      _mm512_store_ps(l, lo[i]);
      _mm512_store_ps(h, hi[i]);
      float* oi = o + d0 + 32 * i;
      for (int L = 0; L < 4; ++L) {
        for (int t = 0; t < 4; ++t) {
          oi[8 * L + t] += l[4 * L + t];
          oi[8 * L + 4 + t] += h[4 * L + t];
        }
      }
    }
  }
  if (rows % 2) {
    const uint16_t* xr = x + (rows - 1) * ldx;
    const float wl = w[rows - 1];
    for (int64_t d = 0; d < D; ++d) {
      o[d] += wl * static_cast<float>(c10::BFloat16(xr[d], c10::BFloat16::from_bits()));
    }
  }
}

bool bf16_tiles_isa() {
  static const bool ok = [] {
#ifdef RELATTN_ISA_AVX2
    return false;
#else
    __builtin_cpu_init();
    return tiles_isa() == 4 && __builtin_cpu_supports("avx512bf16");
#endif
  }();
  return ok;
}
#else
bool bf16_tiles_isa() { return false; }
#endif

// Whether a bfloat16 forward of head dim d multiplies in bf16 (the one place that decides):
// AVX-512-BF16 with the own AVX-512 products, pairs of features in 16-word blocks.
bool bf16_products(int64_t d) {
  return g_bf16_tiles && bf16_tiles_isa() && own_avx512() && d % 32 == 0;
}
#else
int tiles_isa() { return 0; }
bool bf16_products(int64_t) { return false; }
bool own_products(int64_t) { return false; }  // Mul::tiles stays false
bool own_avx512() { return false; }
void tiles_gemm(int64_t, int64_t, int64_t, float, const float*, int64_t, int64_t, const float*,
                int64_t, bool, float*, int64_t) {
  TORCH_CHECK(false, "relattn cpu kernel: own tile products need x86-64 with GCC or clang");
}
#endif

#ifndef RELATTN_HAVE_BF16_TILES
// Never called: bf16_products() is false without them (x86-64, GCC >= 10 or clang >= 9).
[[noreturn]] void no_bf16_tiles() {
  TORCH_CHECK(false, "relattn cpu kernel: bf16 tiles need AVX-512-BF16 on x86-64 (GCC >= 10 or "
              "clang >= 9)");
}
void tiles_bf16(int64_t, int64_t, int64_t, float, const uint32_t*, int64_t, int64_t,
                const uint32_t*, int64_t, bool, float*, int64_t) { no_bf16_tiles(); }
void round_bf16(const float*, int64_t, uint16_t*) { no_bf16_tiles(); }
void dot_rows_bf16(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*) {
  no_bf16_tiles();
}
void axpy_rows_bf16(float*, const uint16_t*, int64_t, const float*, int64_t, int64_t) {
  no_bf16_tiles();
}
#endif


template <typename T>
void exp_inplace(T* p, int64_t n) {
  at::from_blob(p, {n}, at::TensorOptions().dtype(scalar_type_of<T>())).exp_();
}

// Row kernels. Reductions keep independent lanes (one running sum or max would be a chain of
// dependent operations). The build is -O3 for any x86-64, so on GCC each kernel is also cloned
// for the x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) levels and picked at load time by the
// CPU (target_clones). A plain "avx2" clone would have no FMA (a separate CPU feature), so its
// exponential ran at half the AVX-512 clone's speed; GCC before 12 has no level names and
// gets "avx512f"/"avx2" clones. RELATTN_ISA_AVX2 (RELATTN_CPU_KERNEL_ISA=avx2) leaves the
// AVX-512 clone out, so an AVX-512 machine can measure what an AVX2-class one runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define RELATTN_ISA_V4 "arch=x86-64-v4"
#define RELATTN_ISA_V3 "arch=x86-64-v3"
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RELATTN_ISA_V4 "avx512f"
#define RELATTN_ISA_V3 "avx2"
#endif
#if defined(RELATTN_ISA_V3) && defined(RELATTN_ISA_AVX2)
#define RELATTN_CLONES __attribute__((target_clones(RELATTN_ISA_V3, "default")))
#elif defined(RELATTN_ISA_V3)
#define RELATTN_CLONES __attribute__((target_clones(RELATTN_ISA_V4, RELATTN_ISA_V3, "default")))
#else
#define RELATTN_CLONES
#endif

constexpr int kLanes = 16;

// A row whose max came out -inf is all -inf, or holds NaN (comparisons skip NaN): its NaN,
// else -inf.
template <typename T>
T nan_or(const T* x, int64_t n, T out) {
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] != x[j]) return x[j];
  }
  return out;
}

#define RELATTN_ROW_KERNELS(T)                                                           \
  RELATTN_CLONES T row_max(const T* x, int64_t n) {                                       \
    const T inf = std::numeric_limits<T>::infinity();                                     \
    T acc[kLanes];                                                                        \
    for (int l = 0; l < kLanes; ++l) acc[l] = -inf;                                       \
    int64_t j = 0;                                                                        \
    for (; j + kLanes <= n; j += kLanes) {                                                \
      for (int l = 0; l < kLanes; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];    \
    }                                                                                     \
    T out = -inf;                                                                         \
    for (int l = 0; l < kLanes; ++l) out = acc[l] > out ? acc[l] : out;                   \
    for (; j < n; ++j) out = x[j] > out ? x[j] : out;                                     \
    return out == -inf ? nan_or(x, n, out) : out;                                         \
  }                                                                                       \
  RELATTN_CLONES T row_sum(const T* x, int64_t n) {                                       \
    T acc[kLanes] = {};                                                                   \
    int64_t j = 0;                                                                        \
    for (; j + kLanes <= n; j += kLanes) {                                                \
      for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];                                \
    }                                                                                     \
    T out = 0;                                                                            \
    for (int l = 0; l < kLanes; ++l) out += acc[l];                                       \
    for (; j < n; ++j) out += x[j];                                                       \
    return out;                                                                           \
  }                                                                                       \
  RELATTN_CLONES T dot(const T* x, const T* y, int64_t n) {                               \
    T acc[kLanes] = {};                                                                   \
    int64_t j = 0;                                                                        \
    for (; j + kLanes <= n; j += kLanes) {                                                \
      for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l] * y[j + l];                     \
    }                                                                                     \
    T out = 0;                                                                            \
    for (int l = 0; l < kLanes; ++l) out += acc[l];                                       \
    for (; j < n; ++j) out += x[j] * y[j];                                                \
    return out;                                                                           \
  }                                                                                       \
  /* x <- (x - a) - b */                                                                  \
  RELATTN_CLONES void row_sub(T* x, int64_t n, T a, T b) {                                \
    if (b == T(0)) {                                                                      \
      for (int64_t j = 0; j < n; ++j) x[j] -= a;                                          \
    } else {                                                                              \
      for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - a) - b;                              \
    }                                                                                     \
  }                                                                                       \
  RELATTN_CLONES void row_scale(T* x, int64_t n, T a) {                                   \
    for (int64_t j = 0; j < n; ++j) x[j] *= a;                                            \
  }                                                                                       \
  /* out[r] = x · y_r for the rows y_r = y + r·ldy, four rows at a time (x loaded once) */ \
  RELATTN_CLONES void dot_rows(const T* x, const T* y, int64_t ldy, int64_t rows,          \
                               int64_t n, T* out) {                                       \
    int64_t r = 0;                                                                        \
    for (; r + 4 <= rows; r += 4) {                                                       \
      const T* y0 = y + r * ldy;                                                          \
      const T* y1 = y0 + ldy;                                                             \
      const T* y2 = y1 + ldy;                                                             \
      const T* y3 = y2 + ldy;                                                             \
      T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};               \
      int64_t j = 0;                                                                      \
      for (; j + kLanes <= n; j += kLanes) {                                              \
        for (int l = 0; l < kLanes; ++l) {                                                \
          const T xv = x[j + l];                                                          \
          a0[l] += xv * y0[j + l];                                                        \
          a1[l] += xv * y1[j + l];                                                        \
          a2[l] += xv * y2[j + l];                                                        \
          a3[l] += xv * y3[j + l];                                                        \
        }                                                                                 \
      }                                                                                   \
      T o0 = 0, o1 = 0, o2 = 0, o3 = 0;                                                   \
      for (int l = 0; l < kLanes; ++l) {                                                  \
        o0 += a0[l];                                                                      \
        o1 += a1[l];                                                                      \
        o2 += a2[l];                                                                      \
        o3 += a3[l];                                                                      \
      }                                                                                   \
      for (; j < n; ++j) {                                                                \
        o0 += x[j] * y0[j];                                                               \
        o1 += x[j] * y1[j];                                                               \
        o2 += x[j] * y2[j];                                                               \
        o3 += x[j] * y3[j];                                                               \
      }                                                                                   \
      out[r] = o0;                                                                        \
      out[r + 1] = o1;                                                                    \
      out[r + 2] = o2;                                                                    \
      out[r + 3] = o3;                                                                    \
    }                                                                                     \
    for (; r < rows; ++r) out[r] = dot(x, y + r * ldy, n);                                \
  }                                                                                       \
  /* y <- y + Σ_r a[r] · x_r for the rows x_r = x + r·ldx */                              \
  RELATTN_CLONES void axpy_rows(T* __restrict y, const T* __restrict x, int64_t ldx,      \
                                const T* __restrict a, int64_t rows, int64_t n) {         \
    for (int64_t r = 0; r < rows; ++r) {                                                  \
      const T ar = a[r];                                                                  \
      const T* xr = x + r * ldx;                                                          \
      for (int64_t j = 0; j < n; ++j) y[j] += ar * xr[j];                                 \
    }                                                                                     \
  }                                                                                       \
  /* ds <- p * (ds - di), and g <- g + ds where g is not null (the table gradient) */     \
  RELATTN_CLONES void softmax_grad(T* __restrict ds, const T* __restrict p, int64_t n, T di,\
                                   T* __restrict g) {                                     \
    if (g) {                                                                              \
      for (int64_t j = 0; j < n; ++j) {                                                   \
        const T d = p[j] * (ds[j] - di);                                                  \
        ds[j] = d;                                                                        \
        g[j] += d;                                                                        \
      }                                                                                   \
    } else {                                                                              \
      for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - di);                        \
    }                                                                                     \
  }

RELATTN_ROW_KERNELS(float)
RELATTN_ROW_KERNELS(double)

// ------------------------------------------------------------------ terms that depend on tokens
//
// The query-conditioned banded bias and the forget gate (Params' band_r, band_w, gate_q,
// gate_k), added to the scores row by row inside the tiles. Row p (position q_offset + r) of a
// tile of keys k0 .. k0 + L - 1 sees Δ = p - k0 - j at key j: the band's keys 0 <= Δ < W are
// one contiguous run of j, and with P's columns reversed (x = W - 1 - Δ) they read one
// contiguous run of each of P's R rows, so the band is R multiply-adds of that run into the
// row (no N x N tensor, no gather; key blocks outside the band cost one comparison a row).
// The gate is fq - fk[j] up to the row's Δ = 0 and fk[j] - fq after it.

// row[j] += Σ_c rv[c]·p[c·ldp + j] for j < n: four vectors of the row stay in registers over
// the R rows of P (four independent chains of multiply-adds).
template <typename T>
__attribute__((always_inline)) inline void band_add_body(T* __restrict row,
                                                         const T* __restrict rv,
                                                         const T* __restrict p, int64_t ldp,
                                                         int64_t R, int64_t n) {
  typedef T vt __attribute__((vector_size(64), aligned(sizeof(T))));
  constexpr int64_t kV = 64 / sizeof(T);
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    vt* o = reinterpret_cast<vt*>(row + j);
    vt a0 = o[0], a1 = o[1], a2 = o[2], a3 = o[3];
    for (int64_t c = 0; c < R; ++c) {
      const T rc = rv[c];
      const vt* pc = reinterpret_cast<const vt*>(p + c * ldp + j);
      a0 += rc * pc[0];
      a1 += rc * pc[1];
      a2 += rc * pc[2];
      a3 += rc * pc[3];
    }
    o[0] = a0;
    o[1] = a1;
    o[2] = a2;
    o[3] = a3;
  }
  for (; j + kV <= n; j += kV) {
    vt* o = reinterpret_cast<vt*>(row + j);
    vt a0 = o[0];
    for (int64_t c = 0; c < R; ++c) a0 += rv[c] * *reinterpret_cast<const vt*>(p + c * ldp + j);
    o[0] = a0;
  }
  for (; j < n; ++j) {
    T a = row[j];
    for (int64_t c = 0; c < R; ++c) a += rv[c] * p[c * ldp + j];
    row[j] = a;
  }
}

// The band's gradients from one row's dS (ds, n keys): dr[c] += Σ_j ds[j]·p[c·ldp + j] and
// g[c·ldp + j] += rv[c]·ds[j] (g: the thread's gradient of the reversed P, same layout as p).
template <typename T>
__attribute__((always_inline)) inline void band_grad_body(const T* __restrict ds,
                                                          const T* __restrict rv,
                                                          const T* __restrict p,
                                                          T* __restrict g, int64_t ldp,
                                                          int64_t R, int64_t n,
                                                          T* __restrict dr) {
  typedef T vt __attribute__((vector_size(64), aligned(sizeof(T))));
  constexpr int64_t kV = 64 / sizeof(T);
  for (int64_t c = 0; c < R; ++c) {
    const T rc = rv[c];
    const T* pc = p + c * ldp;
    T* gc = g + c * ldp;
    vt a0 = {}, a1 = {};
    int64_t j = 0;
    for (; j + 2 * kV <= n; j += 2 * kV) {
      const vt d0 = *reinterpret_cast<const vt*>(ds + j);
      const vt d1 = *reinterpret_cast<const vt*>(ds + j + kV);
      a0 += d0 * *reinterpret_cast<const vt*>(pc + j);
      a1 += d1 * *reinterpret_cast<const vt*>(pc + j + kV);
      vt* gv = reinterpret_cast<vt*>(gc + j);
      gv[0] += rc * d0;
      gv[1] += rc * d1;
    }
    for (; j + kV <= n; j += kV) {
      const vt d0 = *reinterpret_cast<const vt*>(ds + j);
      a0 += d0 * *reinterpret_cast<const vt*>(pc + j);
      *reinterpret_cast<vt*>(gc + j) += rc * d0;
    }
    a0 += a1;
    T sum = 0;
    for (int64_t l = 0; l < kV; ++l) sum += a0[l];
    for (; j < n; ++j) {
      sum += ds[j] * pc[j];
      gc[j] += rc * ds[j];
    }
    dr[c] += sum;
  }
}

#define RELATTN_TOKEN_KERNELS(T)                                                          \
  RELATTN_CLONES void band_add(T* row, const T* rv, const T* p, int64_t ldp, int64_t R,   \
                               int64_t n) {                                               \
    band_add_body<T>(row, rv, p, ldp, R, n);                                              \
  }                                                                                       \
  RELATTN_CLONES void band_grad(const T* ds, const T* rv, const T* p, T* g, int64_t ldp,  \
                                int64_t R, int64_t n, T* dr) {                            \
    band_grad_body<T>(ds, rv, p, g, ldp, R, n, dr);                                       \
  }                                                                                       \
  /* row[j] += fq - fk[j] for j < jd (Δ >= 0), fk[j] - fq for jd <= j < n */              \
  RELATTN_CLONES void gate_add(T* __restrict row, T fq, const T* __restrict fk,           \
                               int64_t jd, int64_t n) {                                   \
    for (int64_t j = 0; j < jd; ++j) row[j] += fq - fk[j];                                \
    for (int64_t j = jd; j < n; ++j) row[j] += fk[j] - fq;                                \
  }                                                                                       \
  /* g[j] -= ds[j] for j < jd, += ds[j] for jd <= j < n; returns the row's signed sum */  \
  RELATTN_CLONES T gate_grad(const T* __restrict ds, T* __restrict g, int64_t jd,         \
                             int64_t n) {                                                 \
    for (int64_t j = 0; j < jd; ++j) g[j] -= ds[j];                                       \
    for (int64_t j = jd; j < n; ++j) g[j] += ds[j];                                       \
    return row_sum(ds, jd) - row_sum(ds + jd, n - jd);                                    \
  }

RELATTN_TOKEN_KERNELS(float)
RELATTN_TOKEN_KERNELS(double)

// exp for float32 in a form the compiler vectorizes (Cephes' expf: 2^n times a degree-6
// polynomial on [-ln2/2, ln2/2], about 1 ulp). t is clamped to [-88, 88]: at -88, n = -127
// makes the factor 2^n's bits 0, so exp(t) is exactly 0 from there down (-inf included);
// NaN passes the clamps (the comparisons are false) and the polynomial, so it stays NaN.
// No float-to-int conversion: 2^n's bits come from the bits of t/ln2 + 1.5·2²³, whose low
// mantissa bits hold 0x400000 + n.
__attribute__((always_inline)) inline float exp_poly(float t) {
  t = t < -88.0f ? -88.0f : t;
  t = t > 88.0f ? 88.0f : t;
  const float k = t * 1.44269504088896341f + 12582912.0f;
  const float n = k - 12582912.0f;  // round(t / ln 2)
  float r = t - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = (__builtin_bit_cast(uint32_t, k) - (0x4B400000u - 127u)) << 23;
  return p * __builtin_bit_cast(float, scale);
}

// x <- exp((x - a) - b), returning the row's sum (kB false: b is 0 and not subtracted).
template <bool kB>
__attribute__((always_inline)) inline float exp_row(float* x, int64_t n, float a, float b) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_poly(kB ? (x[j + l] - a) - b : x[j + l] - a);
      x[j + l] = e;
      acc[l] += e;
    }
  }
  float out = 0;
  for (int l = 0; l < kLanes; ++l) out += acc[l];
  for (; j < n; ++j) {
    const float e = exp_poly(kB ? (x[j] - a) - b : x[j] - a);
    x[j] = e;
    out += e;
  }
  return out;
}

RELATTN_CLONES float exp_shift(float* x, int64_t n, float a) {
  return exp_row<false>(x, n, a, 0.0f);
}

RELATTN_CLONES float exp_shift2(float* x, int64_t n, float a, float b) {
  return exp_row<true>(x, n, a, b);
}

// S (m x L, row stride ld) row r <- exp((S - a[r]) - b[r]) (b may be null: 0), 0 for rows with
// a[r] = -inf; the rows' sums into sums (if not null). Float32: one fused pass per row;
// float64: ATen's exp.
inline void exp_rows(float* S, int64_t m, int64_t L, int64_t ld, const float* a, const float* b,
                     float* sums) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = S + r * ld;
    float sum = 0;
    if (a[r] == -std::numeric_limits<float>::infinity()) {
      std::fill(row, row + L, 0.0f);
    } else {
      sum = b ? exp_shift2(row, L, a[r], b[r]) : exp_shift(row, L, a[r]);
    }
    if (sums) sums[r] = sum;
  }
}

inline void exp_rows(double* S, int64_t m, int64_t L, int64_t ld, const double* a,
                     const double* b, double* sums) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < m; ++r) {
    double* row = S + r * ld;
    if (a[r] == -inf) {
      std::fill(row, row + L, -inf);
    } else {
      row_sub(row, L, a[r], b ? b[r] : 0.0);
    }
    if (ld != L) exp_inplace(row, L);
  }
  if (ld == L) exp_inplace(S, m * L);
  if (sums) {
    for (int64_t r = 0; r < m; ++r) sums[r] = row_sum(S + r * ld, L);
  }
}

// Keys [c0, c1) that the Δ rules leave visible to some query at positions p0 .. p1
// (relattn.masks.key_span).
void key_span(int64_t p0, int64_t p1, int64_t nk, bool causal, int64_t window, int64_t& c0,
              int64_t& c1) {
  c0 = window > 0 ? std::max<int64_t>(0, p0 - window + 1) : 0;
  if (causal) {
    c1 = p1 + 1;
  } else if (window > 0) {
    c1 = p1 + window;
  } else {
    c1 = nk;
  }
  c1 = std::min(std::max<int64_t>(c1, 0), nk);
}

struct Shape {
  int64_t B, Hq, Hkv, Nq, Nk, D, G, U, n_blocks, block_m, block_n;
  int64_t q_offset, window;
  bool causal;
  const int64_t* doc_lo = nullptr;  // (B, Nq): first key of row r's document, or null
  const int64_t* doc_hi = nullptr;  // (B, Nq): one past its last key
  const bool* kpm = nullptr;        // (B, Nk): true for real keys, or null
};

Shape make_shape(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                 bool causal, int64_t q_offset, int64_t window, const at::Tensor& doc_lo,
                 const at::Tensor& doc_hi, const at::Tensor& kpm) {
  Shape s{};
  if (doc_lo.numel() > 0) {
    TORCH_CHECK(doc_lo.scalar_type() == at::kLong && doc_hi.scalar_type() == at::kLong &&
                    doc_lo.is_contiguous() && doc_hi.is_contiguous() &&
                    doc_lo.numel() == q.size(0) * q.size(2) && doc_hi.numel() == doc_lo.numel(),
                "doc_lo, doc_hi must be contiguous int64 (B, Nq)");
    s.doc_lo = doc_lo.data_ptr<int64_t>();
    s.doc_hi = doc_hi.data_ptr<int64_t>();
  }
  if (kpm.numel() > 0) {
    TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.is_contiguous() &&
                    kpm.numel() == k.size(0) * k.size(2),
                "key_padding_mask must be contiguous bool (B, Nk)");
    s.kpm = kpm.data_ptr<bool>();
  }
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Nq = q.size(2);
  s.D = q.size(3);
  s.Hkv = k.size(1);
  s.Nk = k.size(2);
  s.G = s.Hq / s.Hkv;
  s.U = std::max<int64_t>(1, s.Nq + s.Nk - 1);
  s.block_m = std::max<int64_t>(1, block_m);
  s.block_n = std::max<int64_t>(1, block_n);
  s.n_blocks = (s.Nq + s.block_m - 1) / s.block_m;
  s.causal = causal;
  s.q_offset = q_offset;
  s.window = window;
  return s;
}

// F[h, u] = PE_h(Δ = q_offset - (u - (Nq - 1))), -inf where Δ is hidden: (Hq, U).
template <typename T>
std::vector<T> extended(const Shape& s, const at::Tensor& table, const at::Tensor& slopes,
                        int64_t lo) {
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> f(static_cast<size_t>(s.Hq * s.U));
  const bool has_table = table.numel() > 0, has_slopes = slopes.numel() > 0;
  const int64_t T_cols = has_table ? table.size(1) : 0;
  const T* tp = has_table ? table.data_ptr<T>() : nullptr;
  const T* sp = has_slopes ? slopes.data_ptr<T>() : nullptr;
  for (int64_t h = 0; h < s.Hq; ++h) {
    for (int64_t u = 0; u < s.U; ++u) {
      const int64_t delta = s.q_offset - (u - (s.Nq - 1));
      bool vis = true;
      if (s.causal && delta < 0) vis = false;
      if (s.window > 0 && (delta >= s.window || (!s.causal && delta <= -s.window))) vis = false;
      T val = 0;
      if (has_table) {
        const int64_t t = delta - lo;
        if (t < 0 || t >= T_cols) {
          vis = false;
        } else {
          val = tp[h * T_cols + t];
        }
      } else if (has_slopes) {
        val = -sp[h] * static_cast<T>(delta < 0 ? -delta : delta);
      }
      f[h * s.U + u] = vis ? val : -inf;
    }
  }
  return f;
}

// A buffer of at least n elements private to the calling thread, kept for the thread's life
// (a fresh allocation per call would map and fault its pages in again, and unmapping them
// interrupts every core the process runs on).
template <typename T>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// The terms that depend on the tokens, for one call (null pointers: absent): r (B, Hq, Nq, R)
// and P with its columns reversed, pr (Hw, R, ldp) (column x < W holds Δ = W - 1 - x; ldp is
// W rounded up to 32 columns, plus 16: P's rows are an odd number of cache lines apart, so
// the R rows a tile reads do not share the L1's sets as rows 4 KiB apart would); fq (B, Hq,
// Nq), fk (B, Hq, Nk). The backward's gradients: dr like r, dfq like fq (rows owned by a task),
// and per slot dpr like pr and dfk like fk (reduced once after the pass).
template <typename T>
struct Token {
  const T* r = nullptr;
  const T* pr = nullptr;
  int64_t R = 0, W = 0, Hw = 0, ldp = 0;
  const T* fq = nullptr;
  const T* fk = nullptr;
  T* dr = nullptr;
  T* dpr = nullptr;  // (n_slots, Hw, R, W)
  T* dfq = nullptr;
  T* dfk = nullptr;  // (n_slots, B, Hq, Nk)
};

// One task's view of Token: query head bh = b·Hq + h's rows from row r0 on, its head's P, and
// (backward) the slot's gradient buffers. any: some term is present.
template <typename T>
struct TokenRows {
  bool any = false;
  const T* r = nullptr;  // (m, R): the block's rows of r
  const T* pr = nullptr;  // (R, ldp)
  int64_t R = 0, W = 0, ldp = 0;
  const T* fq = nullptr;  // (m,)
  const T* fk = nullptr;  // (Nk,)
  T* dr = nullptr;
  T* dpr = nullptr;
  T* dfq = nullptr;
  T* dfk = nullptr;
};

template <typename T>
TokenRows<T> token_rows(const Shape& s, const Token<T>& t, int64_t bh, int64_t r0, int64_t slot) {
  TokenRows<T> v;
  const int64_t h = bh % s.Hq;
  if (t.r) {
    const int64_t hw = t.Hw == 1 ? 0 : h;
    v.R = t.R;
    v.W = t.W;
    v.ldp = t.ldp;
    v.r = t.r + (bh * s.Nq + r0) * t.R;
    v.pr = t.pr + hw * t.R * t.ldp;
    if (t.dr) {
      v.dr = t.dr + (bh * s.Nq + r0) * t.R;
      v.dpr = t.dpr + (slot * t.Hw + hw) * t.R * t.ldp;
    }
  }
  if (t.fq) {
    v.fq = t.fq + bh * s.Nq + r0;
    v.fk = t.fk + bh * s.Nk;
    if (t.dfq) {
      v.dfq = t.dfq + bh * s.Nq + r0;
      v.dfk = t.dfk + (slot * s.B * s.Hq + bh) * s.Nk;
    }
  }
  v.any = t.r || t.fq;
  return v;
}

// Row r (of the block at r0) of a tile at k0: the keys j < jd have Δ >= 0 (jd in [0, L]), and
// the band's keys are [ja, jb) (empty where the tile lies outside 0 <= Δ < W), reading P's
// reversed columns from x0 on.
struct BandSpan {
  int64_t jd, ja, jb, x0;
};

inline BandSpan band_span(const Shape& s, int64_t W, int64_t r0, int64_t r, int64_t k0,
                          int64_t L) {
  const int64_t last = s.q_offset + r0 + r - k0;  // the key with Δ = 0
  BandSpan b;
  b.jd = std::clamp<int64_t>(last + 1, 0, L);
  b.ja = std::max<int64_t>(0, last - W + 1);
  b.jb = std::min<int64_t>(L, last + 1);
  b.x0 = W - 1 - last + b.ja;
  return b;
}

// row (row r of the block at r0; keys [k0, k0 + L)) += its token terms.
template <typename T>
inline void add_token_row(const Shape& s, const TokenRows<T>& t, int64_t r0, int64_t r,
                          int64_t k0, int64_t L, T* row) {
  const BandSpan sp = band_span(s, t.W, r0, r, k0, L);
  if (t.r && sp.ja < sp.jb) {
    band_add(row + sp.ja, t.r + r * t.R, t.pr + sp.x0, t.ldp, t.R, sp.jb - sp.ja);
  }
  if (t.fq) gate_add(row, t.fq[r], t.fk + k0, sp.jd, L);
}

// The token terms' gradients from dS (m x L, row stride ld) of the same tile.
template <typename T>
void token_grad(const Shape& s, const TokenRows<T>& t, int64_t r0, int64_t m, int64_t k0,
                int64_t L, int64_t ld, const T* dS) {
  for (int64_t r = 0; r < m; ++r) {
    const T* ds = dS + r * ld;
    const BandSpan sp = band_span(s, t.W, r0, r, k0, L);
    if (t.r && sp.ja < sp.jb) {
      band_grad(ds + sp.ja, t.r + r * t.R, t.pr + sp.x0, t.dpr + sp.x0, t.ldp, t.R,
                sp.jb - sp.ja, t.dr + r * t.R);
    }
    if (t.fq) t.dfq[r] += gate_grad(ds, t.dfk + k0, sp.jd, L);
  }
}

// The scores' additive term of keys [k0, k0 + L) for rows r0 .. r0 + m - 1 into S (m x L, row
// stride ld): the position term (a slice of F_h per row), -inf for keys in other documents or
// padding, and the token terms (tk) where present.
template <typename T>
void load_tile(const Shape& s, const T* fh, const TokenRows<T>& tk, int64_t b, int64_t r0,
               int64_t m, int64_t k0, int64_t L, int64_t ld, T* S) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < m; ++r) {
    T* row = S + r * ld;
    std::copy_n(fh + (k0 - r0 - r + s.Nq - 1), L, row);
    if (s.doc_lo) {
      const int64_t lo = std::clamp<int64_t>(s.doc_lo[b * s.Nq + r0 + r] - k0, 0, L);
      const int64_t hi = std::clamp<int64_t>(s.doc_hi[b * s.Nq + r0 + r] - k0, lo, L);
      std::fill(row, row + lo, -inf);
      std::fill(row + hi, row + L, -inf);
    }
    if (s.kpm) {
      const bool* kp = s.kpm + b * s.Nk + k0;
      for (int64_t j = 0; j < L; ++j) row[j] = kp[j] ? row[j] : -inf;
    }
    if (tk.any) add_token_row(s, tk, r0, r, k0, L, row);
  }
}

// The passes' tile products: relattn's own (tiles_gemm) for float32 where they run, with k and
// v transposed once per call for the products with kᵀ and vᵀ; else gemm (BLAS or at::addmm_).
template <typename T>
struct Mul {
  bool tiles = false;
  int64_t D = 0;
  int64_t ldt = 0;         // row stride of the transposed buffers: >= Nk + kTileCols - 1
  const T* kt = nullptr;   // (B·Hkv, D, ldt): k transposed per kv head, 0 past Nk
  const T* vt = nullptr;   // v likewise (the backward's)

  // Row stride of a scratch tile of L keys: whole vectors for the own products.
  int64_t ld(int64_t L) const { return tiles ? round_up(L, kTileCols) : L; }

  // C (m x n, ldc) <- alpha·a xᵀ (+ C): a (m x D); x = keys k0 .. k0 + n - 1 of one kv head of
  // k or v (xh: the head's rows; xth: the head in kt or vt, null when not transposed: BLAS).
  // The own products fill C up to ld(n) columns (the extra ones read the zero padding).
  void abt(int64_t m, int64_t n, T alpha, const T* a, const T* xh, const T* xth, int64_t k0,
           bool acc, T* c, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (tiles && xth) {
        tiles_gemm(m, round_up(n, kTileCols), D, alpha, a, D, 1, xth + k0, ldt, acc, c, ldc);
        return;
      }
    }
    gemm<T>(false, true, m, n, D, alpha, a, D, xh + k0 * D, D, acc ? T(1) : T(0), c, ldc);
  }

  // The bf16 passes' operands (bf16_products; T float), bfloat16 bits: q, k, v, dO rows as
  // given (pairs of features are words); kw, vw: k, v transposed as words (B·Hkv, D/2, ldt);
  // kpr, vpr: k, v with pairs of keys interleaved (B·Hkv, pair_rows, D) words, a zero key after
  // an odd Nk. The backward needs all; the forward q, kw, v, vpr.
  bool bf16 = false;
  const uint16_t *q16 = nullptr, *k16 = nullptr, *v16 = nullptr, *do16 = nullptr;
  const uint16_t* out16 = nullptr;  // the backward's out (its row term)
  const uint32_t *kw = nullptr, *vw = nullptr, *kpr = nullptr, *vpr = nullptr;
  int64_t pair_rows = 0;  // (Nk + 1) / 2
  int64_t nk = 0;

  // C (m x ld(n)) <- alpha·a xᵀ (+ C): a (m x D) bf16 rows, x keys k0 .. k0 + n - 1 of kv head
  // kvh through its transposed words xw (kw or vw; the extra columns read their zero padding,
  // as abt's do).
  void abt_bf16(int64_t m, int64_t n, float alpha, const uint16_t* a, const uint32_t* xw,
                int64_t kvh, int64_t k0, bool acc, float* c, int64_t ldc) const {
    tiles_bf16(m, round_up(n, kTileCols), D / 2, alpha, reinterpret_cast<const uint32_t*>(a),
               D / 2, 1, xw + kvh * (D / 2) * ldt + k0, ldt, acc, c, ldc);
  }

  // o (m x D) += alpha·W x: W (m x L float, row stride ld) weights keys k0 .. k0 + L - 1 of kv
  // head kvh, x given as rows x16 and as key pairs xp (vpr or kpr). Whole pairs (even, odd
  // key) multiply in bf16 through scratch words pb (m x (L/2 + 1)); a single key at either
  // end in float32, so no key outside the tile is read.
  void ab_bf16(int64_t m, int64_t L, float alpha, const float* W, int64_t ld,
               const uint16_t* x16, const uint32_t* xp, int64_t kvh, int64_t k0, float* o,
               uint32_t* pb) const {
    const int64_t end = k0 + L, e0 = k0 + (k0 & 1), e1 = end & ~int64_t(1);
    const uint16_t* xh = x16 + kvh * nk * D;
    auto single = [&](int64_t key) {
      const uint16_t* xr = xh + key * D;
      for (int64_t r = 0; r < m; ++r) {
        const float w = alpha * W[r * ld + (key - k0)];
        float* orow = o + r * D;
        for (int64_t d = 0; d < D; ++d) {
          orow[d] += w * static_cast<float>(c10::BFloat16(xr[d], c10::BFloat16::from_bits()));
        }
      }
    };
    if (k0 & 1) single(k0);
    if (e1 > e0) {
      const int64_t words = (e1 - e0) / 2;
      for (int64_t r = 0; r < m; ++r) {
        round_bf16(W + r * ld + (e0 - k0), e1 - e0, reinterpret_cast<uint16_t*>(pb + r * words));
      }
      tiles_bf16(m, D, words, alpha, pb, words, 1, xp + (kvh * pair_rows + e0 / 2) * D, D, true,
                 o, D);
    }
    if ((end & 1) && end - 1 >= e0) single(end - 1);
  }

  // C (L x D) += alpha·Wᵀ y: W (m x L float, row stride ld), y (m x D) given as row pairs yp
  // ((m + 1) / 2 x D words, a zero row after an odd m); Wᵀ's pairs of rows through scratch
  // words pt ((m + 1) / 2 x L) and halves h (2 x L).
  void atb_bf16(int64_t L, int64_t m, float alpha, const float* W, int64_t ld,
                const uint32_t* yp, float* c, uint32_t* pt, uint16_t* h) const {
    const int64_t mp = (m + 1) / 2;
    for (int64_t i = 0; i < mp; ++i) {
      round_bf16(W + 2 * i * ld, L, h);
      uint32_t* row = pt + i * L;
      if (2 * i + 1 < m) {
        round_bf16(W + (2 * i + 1) * ld, L, h + L);
        for (int64_t j = 0; j < L; ++j) row[j] = uint32_t(h[j]) | uint32_t(h[L + j]) << 16;
      } else {
        for (int64_t j = 0; j < L; ++j) row[j] = h[j];
      }
    }
    tiles_bf16(L, D, mp, alpha, pt, 1, L, yp, D, true, c, D);
  }

  // C (m x D) <- alpha·a b + C: a (m x kk, row stride lda), b (kk x D).
  void ab(int64_t m, int64_t kk, T alpha, const T* a, int64_t lda, const T* b, T* c) const {
    if constexpr (std::is_same_v<T, float>) {
      if (tiles) return tiles_gemm(m, D, kk, alpha, a, lda, 1, b, D, true, c, D);
    }
    gemm<T>(false, false, m, D, kk, alpha, a, lda, b, D, T(1), c, D);
  }

  // C (kk x D) <- alpha·aᵀ b + C: a (m x kk, row stride lda), b (m x D).
  void atb(int64_t kk, int64_t m, T alpha, const T* a, int64_t lda, const T* b, T* c) const {
    if constexpr (std::is_same_v<T, float>) {
      if (tiles) return tiles_gemm(kk, D, m, alpha, a, 1, lda, b, D, true, c, D);
    }
    gemm<T>(true, false, kk, D, m, alpha, a, lda, b, D, T(1), c, D);
  }
};

// n bf16 rows of D (x) -> (n + 1) / 2 rows of D words (out), word (r, d) holding rows 2r (low
// half) and 2r + 1 (high; 0 after an odd n) of column d.
void pair_rows(const uint16_t* x, int64_t n, int64_t D, uint32_t* out) {
  for (int64_t r = 0; r < (n + 1) / 2; ++r) {
    const uint16_t* even = x + 2 * r * D;
    uint32_t* o = out + r * D;
    if (2 * r + 1 < n) {
      for (int64_t d = 0; d < D; ++d) o[d] = uint32_t(even[d]) | uint32_t(even[D + d]) << 16;
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = even[d];
    }
  }
}

// S (m x L, row stride ld) <- scale·q kᵀ + the additive term of load_tile, for rows
// r0 .. r0 + m - 1 (row0 .. in q's rows of all heads) and keys [k0, k0 + L) of kv head kvh:
// from q16 and kw in bf16 (mul.bf16; qb, kh null), else from qb, kh (kth). rmax[r] <- row r's
// max (its NaN if it holds one), unless rmax is null.
template <typename T>
void score_tile(const Shape& s, const Mul<T>& mul, const T* qb, const T* kh, const T* kth,
                T scale, const T* fh, const TokenRows<T>& tk, int64_t b, int64_t r0, int64_t row0, int64_t kvh,
                int64_t m, int64_t k0, int64_t L, int64_t ld, T* S, T* rmax) {
  load_tile(s, fh, tk, b, r0, m, k0, L, ld, S);
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (mul.bf16) {
      mul.abt_bf16(m, L, scale, mul.q16 + row0 * s.D, mul.kw, kvh, k0, true, S, ld);
      done = true;
    }
  }
  if (!done) mul.abt(m, L, scale, qb, kh, kth, k0, true, S, ld);
  if (rmax) {
    for (int64_t r = 0; r < m; ++r) rmax[r] = row_max(S + r * ld, L);
  }
}

// Runs task(slot, t) for t in [0, n_tasks) on the pool's threads, in ONE parallel region;
// slot in [0, n_slots) is private to the thread running it.
template <typename F>
void run_tasks(int64_t n_slots, int64_t n_tasks, const F& task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_slots, 1, [&](int64_t begin, int64_t end) {
    // No Python dispatch (TorchDispatchMode, profiler hooks in Python) for the nested ops.
    c10::impl::ExcludeDispatchKeyGuard no_python(
        c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
    at::NoGradGuard no_grad;
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) task(slot, t);
    }
  });
}

// Keys [c0, c1) that any row r0 .. r0 + m - 1 of batch b may see: the Δ rules' span, narrowed
// to the documents of the block's rows (contiguous runs, so the rows see their union).
inline void block_key_span(const Shape& s, int64_t b, int64_t r0, int64_t m, int64_t& c0,
                           int64_t& c1) {
  key_span(s.q_offset + r0, s.q_offset + r0 + m - 1, s.Nk, s.causal, s.window, c0, c1);
  if (s.doc_lo) {
    c0 = std::max(c0, s.doc_lo[b * s.Nq + r0]);
    c1 = std::min(c1, s.doc_hi[b * s.Nq + r0 + m - 1]);
  }
}

// Task t -> (bh, query block), the last (heaviest under causality) blocks first.
inline void task_of(const Shape& s, int64_t t, int64_t& bh, int64_t& blk) {
  const int64_t bhs = s.B * s.Hq;
  blk = s.n_blocks - 1 - t / bhs;
  bh = t % bhs;
}

template <typename T>
void forward_impl(const Shape& s, const Mul<T>& mul, const T* q, const T* k, const T* v,
                  const T* f, const Token<T>& tok, T scale, T* out, T* lse, int64_t n_slots) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t D = s.D;
  run_tasks(n_slots, s.B * s.Hq * s.n_blocks, [&](int64_t slot, int64_t t) {
    int64_t bh, blk;
    task_of(s, t, bh, blk);
    const int64_t b = bh / s.Hq, h = bh % s.Hq, kvh = b * s.Hkv + h / s.G;
    const int64_t r0 = blk * s.block_m, m = std::min(s.block_m, s.Nq - r0);
    T* o = out + (bh * s.Nq + r0) * D;
    T* ls = lse + bh * s.Nq + r0;
    std::fill(o, o + m * D, T(0));
    std::fill(ls, ls + m, -inf);
    int64_t c0, c1;
    block_key_span(s, b, r0, m, c0, c1);
    if (c1 <= c0) return;
    const int64_t bn = std::min(s.block_n, c1 - c0);
    const int64_t tile = s.block_m * round_up(s.block_n, kTileCols);
    T* S = scratch<T>(tile + 4 * s.block_m);
    T* mx = S + tile;
    T* l = mx + s.block_m;
    T* alpha = l + s.block_m;
    T* sums = alpha + s.block_m;
    std::fill(mx, mx + m, -inf);
    std::fill(l, l + m, T(0));
    // (null in the bf16 forward, which reads mul's operands)
    const T* qb = q ? q + (bh * s.Nq + r0) * D : nullptr;
    const T* kb = k ? k + kvh * s.Nk * D : nullptr;
    const T* vb = v ? v + kvh * s.Nk * D : nullptr;
    const T* ktb = mul.kt ? mul.kt + kvh * D * mul.ldt : nullptr;
    const T* fh = f + h * s.U;
    const TokenRows<T> tk = token_rows(s, tok, bh, r0, slot);
    uint32_t* pb = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      if (mul.bf16) pb = scratch<uint32_t>(s.block_m * (s.block_n / 2 + 1));
    }
    for (int64_t k0 = c0; k0 < c1; k0 += bn) {
      const int64_t L = std::min(bn, c1 - k0), ld = mul.ld(L);
      score_tile(s, mul, qb, kb, ktb, scale, fh, tk, b, r0, bh * s.Nq + r0, kvh, m, k0, L, ld, S,
                 sums);  // sums: maxima
      for (int64_t r = 0; r < m; ++r) {
        const T rmax = sums[r];
        const T mnew = rmax != rmax ? rmax : std::max(mx[r], rmax);  // NaN stays NaN
        if (mnew == -inf) {
          alpha[r] = T(1);  // nothing visible yet: the row stays 0
          continue;
        }
        alpha[r] = std::exp(mx[r] - mnew);
        mx[r] = mnew;
      }
      exp_rows(S, m, L, ld, mx, nullptr, sums);
      for (int64_t r = 0; r < m; ++r) {
        l[r] = l[r] * alpha[r] + sums[r];
        if (alpha[r] != T(1)) {
          T* orow = o + r * D;
          row_scale(orow, D, alpha[r]);
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (mul.bf16) {
          mul.ab_bf16(m, L, 1.0f, S, ld, mul.v16, mul.vpr, kvh, k0, o, pb);
          continue;
        }
      }
      mul.ab(m, L, T(1), S, ld, vb + k0 * D, o);
    }
    for (int64_t r = 0; r < m; ++r) {
      T* orow = o + r * D;
      if (mx[r] == -inf) {  // saw no key (NaN scores stay NaN, as documented)
        std::fill(orow, orow + D, T(0));
        ls[r] = -inf;
        continue;
      }
      const T inv = T(1) / l[r];
      row_scale(orow, D, inv);
      ls[r] = mx[r] + std::log(l[r]);
    }
  });
}

template <typename T>
void backward_impl(const Shape& s, const Mul<T>& mul, const T* q, const T* k, const T* v,
                   const T* f, const Token<T>& tok, T scale, const T* out, const T* lse,
                   const T* dout, T* dq, T* dk_t, T* dv_t, T* g_t, int64_t n_slots) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t D = s.D;
  const int64_t kv_size = s.B * s.Hkv * s.Nk * D;
  run_tasks(n_slots, s.B * s.Hq * s.n_blocks, [&](int64_t slot, int64_t t) {
    int64_t bh, blk;
    task_of(s, t, bh, blk);
    const int64_t b = bh / s.Hq, h = bh % s.Hq, kvh = b * s.Hkv + h / s.G;
    const int64_t r0 = blk * s.block_m, m = std::min(s.block_m, s.Nq - r0);
    int64_t c0, c1;
    block_key_span(s, b, r0, m, c0, c1);
    if (c1 <= c0) return;
    const int64_t bn = std::min(s.block_n, c1 - c0);
    const int64_t tile = s.block_m * round_up(s.block_n, kTileCols);
    T* P = scratch<T>(2 * tile + 3 * s.block_m);
    T* dS = P + tile;
    T* Di = dS + tile;
    T* mx = Di + s.block_m;  // P = exp((s - mx) - lg)
    T* lg = mx + s.block_m;
    const int64_t row0 = bh * s.Nq + r0;
    // (null in the bf16 backward, which reads mul's operands)
    const T* qb = q ? q + row0 * D : nullptr;
    const T* ob = out ? out + row0 * D : nullptr;
    const T* dob = dout ? dout + row0 * D : nullptr;
    const T* kb = k ? k + kvh * s.Nk * D : nullptr;
    const T* vb = v ? v + kvh * s.Nk * D : nullptr;
    const T* lb = lse + row0;
    T* dqb = dq + row0 * D;
    const T* ktb = mul.kt ? mul.kt + kvh * D * mul.ldt : nullptr;
    const T* vtb = mul.vt ? mul.vt + kvh * D * mul.ldt : nullptr;
    T* dkb = dk_t + slot * kv_size + kvh * s.Nk * D;
    T* dvb = dv_t + slot * kv_size + kvh * s.Nk * D;
    const T* fh = f + h * s.U;
    T* gh = g_t ? g_t + (slot * s.Hq + h) * s.U : nullptr;
    const TokenRows<T> tk = token_rows(s, tok, bh, r0, slot);
    bool b16 = false;
    if constexpr (std::is_same_v<T, float>) b16 = mul.bf16;
    // The bf16 products' scratch words: the block's q and dO rows in pairs (mp x D each), a
    // weight tile's pairs along keys (m x (bn/2 + 1)) or along rows (mp x bn), two rows' halves.
    const int64_t mp = (m + 1) / 2;
    uint32_t *qpair = nullptr, *dopair = nullptr, *pb = nullptr;
    uint16_t* halves = nullptr;
    if (b16) {
      const int64_t tw = std::max(s.block_m * (s.block_n / 2 + 1), mp * s.block_n);
      qpair = scratch<uint32_t>(2 * mp * D + tw);
      dopair = qpair + mp * D;
      pb = dopair + mp * D;
      halves = scratch<uint16_t>(2 * s.block_n);
      pair_rows(mul.q16 + row0 * D, m, D, qpair);
      pair_rows(mul.do16 + row0 * D, m, D, dopair);
    }
    // P (m x ld) <- the scores of keys k0 .. k0 + L - 1 (rmax: their row maxima, or null)
    auto scores = [&](T* S, int64_t k0, int64_t L, int64_t ld, T* rmax) {
      score_tile(s, mul, qb, kb, ktb, scale, fh, tk, b, r0, row0, kvh, m, k0, L, ld, S, rmax);
    };
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      if (b16) {
        const uint16_t* dr = mul.do16 + (row0 + r) * D;
        const uint16_t* orow = mul.out16 + (row0 + r) * D;
        T sum = 0;
        for (int64_t d = 0; d < D; ++d) {
          sum += static_cast<T>(c10::BFloat16(dr[d], c10::BFloat16::from_bits())) *
                 static_cast<T>(c10::BFloat16(orow[d], c10::BFloat16::from_bits()));
        }
        Di[r] = sum;
      } else {
        Di[r] = dot(dob + r * D, ob + r * D, D);
      }
      any = any || lb[r] != -inf;
    }
    if (!any) return;
    // lse arrives rounded to float32: exp(s - lse) is off by the factor exp(|lse|·2⁻²⁴) in a
    // row, which matters for |lse| in the thousands (scores near ±1e4). Rows like that get
    // their max and log-sum recomputed here, in one more pass over the keys.
    bool exact_stats = false;
    for (int64_t r = 0; r < m; ++r) {
      mx[r] = lb[r];
      lg[r] = 0;
      exact_stats = exact_stats || (std::is_same_v<T, float> && lb[r] != -inf &&
                                    std::abs(lb[r]) > T(64));
    }
    if (exact_stats) {
      T* l = dS;  // the dP tile is free until the main loop
      for (int64_t r = 0; r < m; ++r) {
        mx[r] = -inf;
        l[r] = 0;
      }
      for (int64_t k0 = c0; k0 < c1; k0 += bn) {
        const int64_t L = std::min(bn, c1 - k0), ld = mul.ld(L);
        T* sums = l + s.block_m;
        scores(P, k0, L, ld, sums);  // sums: maxima
        for (int64_t r = 0; r < m; ++r) {
          const T rmax = sums[r];
          const T mnew = rmax != rmax ? rmax : std::max(mx[r], rmax);
          if (mnew == -inf) continue;
          l[r] *= std::exp(mx[r] - mnew);
          mx[r] = mnew;
        }
        exp_rows(P, m, L, ld, mx, nullptr, sums);
        for (int64_t r = 0; r < m; ++r) l[r] += sums[r];
      }
      for (int64_t r = 0; r < m; ++r) {
        if (lb[r] == -inf || mx[r] == -inf) {
          mx[r] = -inf;
          lg[r] = 0;
        } else {
          lg[r] = std::log(l[r]);
        }
      }
    }
    for (int64_t k0 = c0; k0 < c1; k0 += bn) {
      const int64_t L = std::min(bn, c1 - k0), ld = mul.ld(L);
      scores(P, k0, L, ld, nullptr);
      exp_rows(P, m, L, ld, mx, lg, nullptr);
      if constexpr (std::is_same_v<T, float>) {
        if (b16) {
          mul.abt_bf16(m, L, 1.0f, mul.do16 + row0 * D, mul.vw, kvh, k0, false, dS, ld);  // dP
          mul.atb_bf16(L, m, 1.0f, P, ld, dopair, dvb + k0 * D, pb, halves);  // dV += Pᵀ dO
        }
      }
      if (!b16) {
        mul.abt(m, L, T(1), dob, vb, vtb, k0, false, dS, ld);  // dP
        mul.atb(L, m, T(1), P, ld, dob, dvb + k0 * D);          // dV += Pᵀ dO
      }
      for (int64_t r = 0; r < m; ++r) {
        T* ds = dS + r * ld;
        const T* p = P + r * ld;
        const T di = Di[r];
        softmax_grad(ds, p, L, di, gh ? gh + (k0 - r0 - r + s.Nq - 1) : nullptr);
      }
      if (tk.any) token_grad(s, tk, r0, m, k0, L, ld, dS);
      if constexpr (std::is_same_v<T, float>) {
        if (b16) {
          mul.atb_bf16(L, m, scale, dS, ld, qpair, dkb + k0 * D, pb, halves);  // dK += dSᵀ q
          mul.ab_bf16(m, L, scale, dS, ld, mul.k16, mul.kpr, kvh, k0, dqb, pb);  // dQ += dS k
          continue;
        }
      }
      mul.atb(L, m, scale, dS, ld, qb, dkb + k0 * D);  // dK += dSᵀ q
      mul.ab(m, L, scale, dS, ld, kb + k0 * D, dqb);   // dQ += dS k
    }
  });
}

// 16-bit inputs (bfloat16, float16) compute in float32; float32 and float64 in themselves.
bool is_16bit(at::ScalarType st) { return st == at::kBFloat16 || st == at::kHalf; }
at::ScalarType compute_type(at::ScalarType st) { return is_16bit(st) ? at::kFloat : st; }

// x in the compute dtype: a widened copy of a 16-bit tensor (one O(size) pass; the passes'
// products are O(N) times more), else x itself.
at::Tensor widened(const at::Tensor& x) {
  return is_16bit(x.scalar_type()) ? x.to(at::kFloat) : x;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "relattn cpu kernel: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  is_16bit(q.scalar_type()),
              "relattn cpu kernel: float32, float64, bfloat16 or float16 only; got ",
              q.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  // The kernel indexes dense arrays: anything else is refused, never read past.
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "relattn cpu kernel: q, k, v must be contiguous; got strides q ", q.strides(),
              ", k ", k.strides(), ", v ", v.strides(), " (relattn.backends.base.conform)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0), "q and k must have the same batch size");
  TORCH_CHECK(q.size(3) == k.size(3), "q and k must have the same head size");
}

// The position term's tensors: table (Hq, T) contiguous, or slopes (Hq,) contiguous, in the
// compute dtype (float32 for 16-bit q); empty for none.
void check_encoding(const at::Tensor& q, const at::Tensor& table, const at::Tensor& slopes) {
  const at::ScalarType ct = compute_type(q.scalar_type());
  if (table.numel() > 0) {
    TORCH_CHECK(table.dim() == 2 && table.size(0) == q.size(1) && table.is_contiguous() &&
                    table.scalar_type() == ct,
                "relattn cpu kernel: table must be contiguous (Hq, T) in the compute dtype ", ct,
                "; got ", table.scalar_type(), " sizes ", table.sizes(), ", strides ",
                table.strides());
  }
  if (slopes.numel() > 0) {
    TORCH_CHECK(slopes.dim() == 1 && slopes.size(0) == q.size(1) && slopes.is_contiguous() &&
                    slopes.scalar_type() == ct,
                "relattn cpu kernel: slopes must be contiguous (Hq,) in the compute dtype ", ct,
                "; got ", slopes.scalar_type(), " sizes ", slopes.sizes(), ", strides ",
                slopes.strides());
  }
}

// x (heads, nk, d) -> out (heads, d, ldt), columns nk .. ldt - 1 zero, d a multiple of 16: in
// 16 x 16 blocks (16 lines read, 16 written), heads in parallel.
template <typename T>
void transpose_heads(const T* x, int64_t heads, int64_t nk, int64_t d, int64_t ldt, T* out) {
  constexpr int64_t kB = 16;
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    T blk[kB][kB];
    for (int64_t h = h0; h < h1; ++h) {
      const T* xh = x + h * nk * d;
      T* oh = out + h * d * ldt;
      const int64_t full = nk / kB * kB;
      for (int64_t j0 = 0; j0 < full; j0 += kB) {
        for (int64_t c0 = 0; c0 < d; c0 += kB) {
          for (int64_t j = 0; j < kB; ++j) {
            for (int64_t c = 0; c < kB; ++c) blk[c][j] = xh[(j0 + j) * d + c0 + c];
          }
          for (int64_t c = 0; c < kB; ++c) std::copy_n(blk[c], kB, oh + (c0 + c) * ldt + j0);
        }
      }
      for (int64_t c = 0; c < d; ++c) {
        for (int64_t j = full; j < nk; ++j) oh[c * ldt + j] = xh[j * d + c];
        std::fill(oh + c * ldt + nk, oh + (c + 1) * ldt, T(0));
      }
    }
  });
}

// The passes' products: the own ones for float32 where they run (kᵀ, and vᵀ for the backward,
// into kt, vt), else gemm.
template <typename T>
Mul<T> products(const Shape& s, const at::Tensor& k, const at::Tensor* v, at::Tensor& kt,
                at::Tensor& vt) {
  Mul<T> mul;
  mul.D = s.D;
  mul.tiles = std::is_same_v<T, float> && own_products(s.D);
  // Transposing k and v reads and writes them once more: worth it when every key meets many
  // query rows (measured, 1 thread, Nk = 16384, D = 64: at 128-256 rows per kv head the
  // transposes cost 8-11 % more than BLAS's packing; at 512 they break even, at 1024 they
  // gain 10 %). Below that, q kᵀ and dO vᵀ go to BLAS; the other products stay own.
  if (!mul.tiles || s.G * s.Nq < kTransposeRows) return mul;
  mul.ldt = round_up(s.Nk, kTileCols) + kTileCols;
  const int64_t heads = s.B * s.Hkv;
  kt = at::empty({heads, s.D, mul.ldt}, k.options());
  transpose_heads(k.data_ptr<T>(), heads, s.Nk, s.D, mul.ldt, kt.data_ptr<T>());
  mul.kt = kt.data_ptr<T>();
  if (v) {
    vt = at::empty({heads, s.D, mul.ldt}, k.options());
    transpose_heads(v->data_ptr<T>(), heads, s.Nk, s.D, mul.ldt, vt.data_ptr<T>());
    mul.vt = vt.data_ptr<T>();
  }
  return mul;
}

// x (heads, nk, D) bf16 rows -> (heads, (nk + 1) / 2, D) words: pairs of keys (pair_rows).
at::Tensor pair_keys(const at::Tensor& x, int64_t heads, int64_t nk, int64_t D) {
  const int64_t rows = (nk + 1) / 2;
  at::Tensor out = at::empty({heads, rows, D}, x.options().dtype(at::kInt));
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint32_t* ow = reinterpret_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) pair_rows(x16 + h * nk * D, nk, D, ow + h * rows * D);
  });
  return out;
}

// x (heads, nk, D) bf16 rows -> (heads, D / 2, ldt) words: x transposed as pairs of features.
at::Tensor words_transposed(const at::Tensor& x, int64_t heads, int64_t nk, int64_t D,
                            int64_t ldt) {
  at::Tensor out = at::empty({heads, D / 2, ldt}, x.options().dtype(at::kInt));
  transpose_heads(reinterpret_cast<const uint32_t*>(x.data_ptr()), heads, nk, D / 2, ldt,
                  reinterpret_cast<uint32_t*>(out.data_ptr()));
  return out;
}

// The bf16 passes' operands (bf16_products(D)) from bfloat16 q, k, v (and dO, out for the
// backward: dout defined), kept alive in keep.
Mul<float> bf16_operands(const Shape& s, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& dout, const at::Tensor& out,
                         std::vector<at::Tensor>& keep) {
  Mul<float> mul;
  mul.D = s.D;
  mul.tiles = true;  // scratch rows of whole vectors (Mul::ld)
  mul.bf16 = true;
  mul.ldt = round_up(s.Nk, kTileCols) + kTileCols;
  mul.nk = s.Nk;
  mul.pair_rows = (s.Nk + 1) / 2;
  const int64_t heads = s.B * s.Hkv;
  auto bits = [](const at::Tensor& x) { return reinterpret_cast<const uint16_t*>(x.data_ptr()); };
  auto words = [&](at::Tensor x) {
    keep.push_back(x);
    return reinterpret_cast<const uint32_t*>(x.data_ptr());
  };
  mul.q16 = bits(q);
  mul.k16 = bits(k);
  mul.v16 = bits(v);
  mul.kw = words(words_transposed(k, heads, s.Nk, s.D, mul.ldt));
  if (dout.defined()) {
    mul.do16 = bits(dout);
    mul.out16 = bits(out);
    mul.vw = words(words_transposed(v, heads, s.Nk, s.D, mul.ldt));
    mul.kpr = words(pair_keys(k, heads, s.Nk, s.D));
  } else {
    mul.vpr = words(pair_keys(v, heads, s.Nk, s.D));
  }
  return mul;
}

// x <- exp(x - a) for a row of scores whose max a is finite, returning the row's sum.
inline float exp_row_sum(float* x, int64_t n, float a) { return exp_shift(x, n, a); }
inline double exp_row_sum(double* x, int64_t n, double a) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - a));
  return sum;
}

// A generation step, one query row per (batch, head) against every key of its kv head:
// s_c = scale·q·k_c + bias[c], out = softmax(s)·v, lse = log Σ exp(s). One task per (batch, kv
// head) and its G query rows (a GQA group): the bias laid under the scores, q·kᵀ added, a
// vectorized exp, then the weights times v. For a group of kStepBlasGroup rows or more the two
// products are BLAS calls (k and v read once for the group); below, own loops (four keys'
// dot products at a time, one pass of multiply-adds over v). Measured at H = 8, D = 64, one
// thread, own loops vs BLAS: G = 1, 71 vs 97 µs at Nk = 1024, 11 vs 14 at 128 (SDPA without
// position term: 113 and 19); G = 2, about even to 1024, 283 vs 366 at 4096; G = 4, 79 vs 67
// at 1024; G = 8, 68 vs 41 at 1024, 281 vs 183 at 4096. k or v rows that overlap (stride
// below D), which BLAS cannot read, always take the own loops.
constexpr int64_t kStepBlasGroup = 4;

// rows x rows of n values of S, row stride ld, as dense float/double rows in out.
template <typename S, typename T>
void widen_rows(const S* x, int64_t rows, int64_t n, int64_t ld, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* xr = x + r * ld;
    T* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(xr[j]);
  }
}

// S: the dtype of q, k, v, out; T: the compute dtype (float for 16-bit S, else S). For 16-bit
// inputs each task widens its q rows and its kv head's k and v to float once (a pass over the
// head's cache, which it reads anyway), computes in float and rounds out once.
template <typename S, typename T>
void step_impl(const S* q, const S* k, const S* v, const T* bias, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t Nk, int64_t D, const int64_t* sk_in, const int64_t* sv_in,
               int64_t sbias, T scale, S* out, T* lse) {
  constexpr bool kWiden = !std::is_same_v<S, T>;
  const int64_t G = Hq / Hkv;
  // bfloat16 on AVX-512-BF16 (bf16_products): both products read q, k, v as they are, no
  // widened copy of the cache (the weights rounded to bf16 for the product with v).
  bool b16 = false;
  if constexpr (std::is_same_v<S, c10::BFloat16>) b16 = bf16_products(D);
  const T inf = std::numeric_limits<T>::infinity();
  // Row strides the products read: the inputs', or D for the widened copies.
  const int64_t sk[3] = {sk_in[0], sk_in[1], kWiden ? D : sk_in[2]};
  const int64_t sv[3] = {sv_in[0], sv_in[1], kWiden ? D : sv_in[2]};
  const bool products = !b16 && G >= kStepBlasGroup && sk[2] >= D && sv[2] >= D &&
                        Nk <= std::numeric_limits<int>::max() &&
                        sk[2] <= std::numeric_limits<int>::max() &&
                        sv[2] <= std::numeric_limits<int>::max();
  // Groups per task: about 32k multiply-adds each, so a short cache runs on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 2 * G * Nk * D));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> s(G * Nk), qk(products ? 0 : Nk);
    std::vector<T> wide_q(kWiden ? G * D : 0), wide_o(kWiden ? G * D : 0);
    std::vector<T> wide_k(kWiden && !b16 ? Nk * D : 0), wide_v(kWiden && !b16 ? Nk * D : 0);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / Hkv, hk = bk % Hkv, h0 = hk * G, row0 = b * Hq + h0;
      const T* qg;  // the group's G query rows, (G, D) dense
      const T* kb;
      const T* vb;
      T* o;
      if (b16) {
        qg = kb = vb = nullptr;  // read as bf16 bits below
        o = wide_o.data();
      } else if constexpr (kWiden) {
        widen_rows(q + row0 * D, G, D, D, wide_q.data());
        widen_rows(k + b * sk_in[0] + hk * sk_in[1], Nk, D, sk_in[2], wide_k.data());
        widen_rows(v + b * sv_in[0] + hk * sv_in[1], Nk, D, sv_in[2], wide_v.data());
        qg = wide_q.data();
        kb = wide_k.data();
        vb = wide_v.data();
        o = wide_o.data();
      } else {
        qg = q + row0 * D;
        kb = k + b * sk[0] + hk * sk[1];
        vb = v + b * sv[0] + hk * sv[1];
        o = out + row0 * D;
      }
      for (int64_t j = 0; j < G; ++j) {  // the bias, or 0, under each row's scores
        T* sr = s.data() + j * Nk;
        if (bias) {
          std::copy_n(bias + (h0 + j) * sbias, Nk, sr);
        } else {
          std::fill(sr, sr + Nk, T(0));
        }
      }
      if (b16) {
        if constexpr (std::is_same_v<T, float>) {
          const auto* q16 = reinterpret_cast<const uint16_t*>(q + row0 * D);
          const auto* k16 = reinterpret_cast<const uint16_t*>(k + b * sk_in[0] + hk * sk_in[1]);
          for (int64_t j = 0; j < G; ++j) {
            T* sr = s.data() + j * Nk;
            dot_rows_bf16(q16 + j * D, k16, sk_in[2], Nk, D, qk.data());
            for (int64_t c = 0; c < Nk; ++c) sr[c] += qk[c] * scale;
          }
        }
      } else if (products) {
        gemm<T>(false, true, G, Nk, D, scale, qg, D, kb, sk[2], T(1), s.data(), Nk);
      } else {
        for (int64_t j = 0; j < G; ++j) {
          T* sr = s.data() + j * Nk;
          dot_rows(qg + j * D, kb, sk[2], Nk, D, qk.data());
          for (int64_t c = 0; c < Nk; ++c) sr[c] += qk[c] * scale;
        }
      }
      std::vector<T> sums(G);
      for (int64_t j = 0; j < G; ++j) {
        T* sr = s.data() + j * Nk;
        const T mx = row_max(sr, Nk);
        if (mx == -inf) {  // every score -inf: no weight anywhere (out 0, as for a masked row)
          std::fill(sr, sr + Nk, T(0));
          lse[row0 + j] = -inf;
          sums[j] = T(0);  // its weights are 0 above, so its out comes out 0
          continue;
        }
        sums[j] = exp_row_sum(sr, Nk, mx);
        lse[row0 + j] = mx + std::log(sums[j]);
      }
      if (b16) {
        if constexpr (std::is_same_v<T, float>) {
          const auto* v16 = reinterpret_cast<const uint16_t*>(v + b * sv_in[0] + hk * sv_in[1]);
          std::fill(o, o + G * D, T(0));
          for (int64_t j = 0; j < G; ++j) {
            axpy_rows_bf16(o + j * D, v16, sv_in[2], s.data() + j * Nk, Nk, D);
          }
        }
      } else if (products) {
        gemm<T>(false, false, G, D, Nk, T(1), s.data(), Nk, vb, sv[2], T(0), o, D);
      } else {
        std::fill(o, o + G * D, T(0));
        for (int64_t j = 0; j < G; ++j) axpy_rows(o + j * D, vb, sv[2], s.data() + j * Nk, Nk, D);
      }
      for (int64_t j = 0; j < G; ++j) {
        if (sums[j] != T(0)) row_scale(o + j * D, D, T(1) / sums[j]);  // NaN scales: stays NaN
      }
      if constexpr (kWiden) {
        S* dst = out + row0 * D;
        for (int64_t i = 0; i < G * D; ++i) dst[i] = static_cast<S>(o[i]);
      }
    }
  });
}

// One generated token: q (B, Hq, 1, D) contiguous; k, v (B, Hkv, Nk, D) with unit stride along
// D (any other strides: a KV cache's view of its buffer); bias (Hq, W) with unit column stride,
// key c of head h adding bias[h, start + c], or an empty tensor for none; q, k, v float32,
// float64, bfloat16 or float16, one dtype (16-bit computed in float32), the bias in the compute
// dtype. Returns (out (B, Hq, 1, D) in q's dtype, lse (B, Hq, 1) in the compute dtype).
std::vector<at::Tensor> step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& bias, int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1 &&
                  q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0 && k.size(2) > 0,
              "relattn cpu kernel step: q must be (B, Hq, 1, D) and k, v (B, Hkv, Nk, D), Nk >= "
              "1; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  const at::ScalarType st = q.scalar_type();
  TORCH_CHECK(st == k.scalar_type() && st == v.scalar_type() &&
                  (st == at::kFloat || st == at::kDouble || st == at::kBFloat16 ||
                   st == at::kHalf),
              "relattn cpu kernel step: q, k, v must be float32, float64, bfloat16 or float16, "
              "one dtype");
  // The compute dtype: float64 for float64, else float32 (bias and lse are in it).
  const at::ScalarType compute = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t D = q.size(3);
  // (an empty batch reads nothing: any strides, as the decode backend's layout allows)
  TORCH_CHECK(q.is_contiguous() && (D == 1 || q.size(0) == 0 ||
                                    (k.stride(3) == 1 && v.stride(3) == 1)),
              "relattn cpu kernel step: q must be contiguous and k, v of unit stride along D; "
              "got strides q ", q.strides(), ", k ", k.strides(), ", v ", v.strides());
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == q.size(1) &&
                    bias.scalar_type() == compute &&
                    (bias.size(1) <= 1 || bias.stride(1) == 1) && start >= 0 &&
                    start + k.size(2) <= bias.size(1),
                "relattn cpu kernel step: bias must be (Hq, W) in the compute dtype (float64 "
                "for float64 inputs, else float32) with unit column stride and start + Nk <= W; "
                "got ", bias.scalar_type(), " ", bias.sizes(), " strides ", bias.strides(),
                ", start ", start);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), 1}, q.options().dtype(compute));
  const int64_t sk[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t sv[3] = {v.stride(0), v.stride(1), v.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "relattn_cpu_step", [&] {
    using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const compute_t* b = has_bias ? bias.data_ptr<compute_t>() + start : nullptr;
    step_impl<scalar_t, compute_t>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), b, q.size(0),
        q.size(1), k.size(1), k.size(2), D, sk, sv, has_bias ? bias.stride(0) : 0,
        static_cast<compute_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<compute_t>());
  });
  return {out, lse};
}

// One call, as Python's cpu_kernel.py fills it (by name: the one flattening of a call into
// the kernel's arguments). Tensors: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D), table (Hq, T) or
// empty, slopes (Hq,) or empty, doc_lo / doc_hi int64 (B, Nq) or empty, kpm bool (B, Nk) or
// empty; all contiguous (checked). Table column t is offset lo + t. The terms that depend on
// the tokens, in the compute dtype, contiguous, or empty (0,) tensors: band_r (B, Hq, Nq, R)
// with band_w (Hw, R, W), Hw 1 or Hq (the banded bias Σ_c r[c]·w[c, Δ] for 0 <= Δ < W), and
// gate_q (B, Hq, Nq) with gate_k (B, Hq, Nk) (the forget gate fq - fk for Δ >= 0, fk - fq
// below).
struct Params {
  at::Tensor q, k, v, table, slopes, doc_lo, doc_hi, kpm;
  at::Tensor band_r, band_w, gate_q, gate_k;
  int64_t lo = 0;
  double scale = 1.0;
  bool causal = true;
  int64_t q_offset = 0;
  int64_t window = 0;
  int64_t block_m = 128;
  int64_t block_n = 256;
};

// Whether a token term's tensor is given (an empty 1-d tensor stands for none).
bool present(const at::Tensor& t) { return !(t.dim() == 1 && t.numel() == 0); }

// t must be contiguous, in dtype ct, of the sizes want (-1: any); else a clear error naming it.
void check_term(const at::Tensor& t, const char* name, const char* dims,
                const std::vector<int64_t>& want, at::ScalarType ct) {
  bool ok = t.dim() == static_cast<int64_t>(want.size()) && t.is_contiguous() &&
            t.scalar_type() == ct;
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || t.size(i) == want[i];
  TORCH_CHECK(ok, "relattn cpu kernel: ", name, " must be a contiguous ", dims, " = ", c10::IntArrayRef(want),
              " (-1: any) tensor in the compute dtype ", ct, "; got ", t.scalar_type(), " sizes ",
              t.sizes(), ", strides ", t.strides());
}

// The token terms' tensors (Params): each pair both given or both empty, shapes that fit q, k.
void check_token(const Params& p) {
  const at::ScalarType ct = compute_type(p.q.scalar_type());
  const int64_t B = p.q.size(0), Hq = p.q.size(1), Nq = p.q.size(2), Nk = p.k.size(2);
  TORCH_CHECK(present(p.band_r) == present(p.band_w),
              "relattn cpu kernel: band_r and band_w are given together (empty tensors for "
              "neither); got band_r ", p.band_r.sizes(), ", band_w ", p.band_w.sizes());
  if (present(p.band_r)) {
    check_term(p.band_r, "band_r", "(B, Hq, Nq, R)", {B, Hq, Nq, -1}, ct);
    const int64_t R = p.band_r.size(3);
    check_term(p.band_w, "band_w", "(Hw, R, W)", {-1, R, -1}, ct);
    TORCH_CHECK((p.band_w.size(0) == 1 || p.band_w.size(0) == Hq) && p.band_w.size(2) >= 1,
                "relattn cpu kernel: band_w must be (Hw, R, W) with Hw 1 or Hq = ", Hq,
                " and W >= 1; got ", p.band_w.sizes());
  }
  TORCH_CHECK(present(p.gate_q) == present(p.gate_k),
              "relattn cpu kernel: gate_q and gate_k are given together (empty tensors for "
              "neither); got gate_q ", p.gate_q.sizes(), ", gate_k ", p.gate_k.sizes());
  if (present(p.gate_q)) {
    check_term(p.gate_q, "gate_q", "(B, Hq, Nq)", {B, Hq, Nq}, ct);
    check_term(p.gate_k, "gate_k", "(B, Hq, Nk)", {B, Hq, Nk}, ct);
  }
}

// The row stride of the reversed P (Token::ldp) for W columns.
int64_t band_ld(int64_t W) { return round_up(W, 32) + 16; }

// The kernel's Token of p (T: the compute type); pr keeps the reversed band_w alive.
template <typename T>
Token<T> make_token(const Params& p, at::Tensor& pr) {
  Token<T> t;
  if (present(p.band_r)) {
    t.Hw = p.band_w.size(0);
    t.R = p.band_w.size(1);
    t.W = p.band_w.size(2);
    t.ldp = band_ld(t.W);
    pr = at::zeros({t.Hw, t.R, t.ldp}, p.band_w.options());
    pr.narrow(2, 0, t.W).copy_(p.band_w.flip({2}));
    t.r = p.band_r.data_ptr<T>();
    t.pr = pr.data_ptr<T>();
  }
  if (present(p.gate_q)) {
    t.fq = p.gate_q.data_ptr<T>();
    t.fk = p.gate_k.data_ptr<T>();
  }
  return t;
}

Shape params_shape(const Params& p) {
  TORCH_CHECK(p.q.defined() && p.k.defined() && p.v.defined() && p.table.defined() &&
                  p.slopes.defined() && p.doc_lo.defined() && p.doc_hi.defined() &&
                  p.kpm.defined() && p.band_r.defined() && p.band_w.defined() &&
                  p.gate_q.defined() && p.gate_k.defined(),
              "relattn cpu kernel: every tensor of Params must be set (an empty one for none)");
  check_inputs(p.q, p.k, p.v);
  check_encoding(p.q, p.table, p.slopes);
  check_token(p);
  return make_shape(p.q, p.k, p.block_m, p.block_n, p.causal, p.q_offset, p.window, p.doc_lo,
                    p.doc_hi, p.kpm);
}

// Returns (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) in the compute dtype). 16-bit
// q, k, v are widened to float32 once; the statistics, the position term, the products'
// accumulation and out are float32 until out is rounded once at the end.
std::vector<at::Tensor> forward(const Params& p) {
  const at::Tensor &table = p.table, &slopes = p.slopes;
  const int64_t lo = p.lo;
  const double scale = p.scale;
  const Shape s = params_shape(p);
  const int64_t n_slots = std::max<int64_t>(1, at::get_num_threads());
  if (p.q.scalar_type() == at::kBFloat16 && bf16_products(s.D)) {
    std::vector<at::Tensor> keep;
    const Mul<float> mul = bf16_operands(s, p.q, p.k, p.v, at::Tensor(), at::Tensor(), keep);
    at::Tensor out = at::empty(p.q.sizes(), p.q.options().dtype(at::kFloat));
    at::Tensor lse = at::empty({s.B, s.Hq, s.Nq}, out.options());
    const auto f = extended<float>(s, table, slopes, lo);
    at::Tensor pr;
    const Token<float> tok = make_token<float>(p, pr);
    forward_impl<float>(s, mul, nullptr, nullptr, nullptr, f.data(), tok,
                        static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>(),
                        n_slots);
    return {out.to(at::kBFloat16), lse};
  }
  const at::Tensor q = widened(p.q), k = widened(p.k), v = widened(p.v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "relattn_cpu_forward", [&] {
    const auto f = extended<scalar_t>(s, table, slopes, lo);
    at::Tensor kt, vt;
    const Mul<scalar_t> mul = products<scalar_t>(s, k, nullptr, kt, vt);
    at::Tensor pr;
    const Token<scalar_t> tok = make_token<scalar_t>(p, pr);
    forward_impl<scalar_t>(s, mul, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                           v.data_ptr<scalar_t>(), f.data(), tok, static_cast<scalar_t>(scale),
                           out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), n_slots);
  });
  if (is_16bit(p.q.scalar_type())) out = out.to(p.q.scalar_type());
  return {out, lse};
}

// Returns (dq, dk, dv, dtable, dr, dw, dgq, dgk): dq, dk, dv in q's dtype, dtable (Hq, T) in
// the compute dtype, or an empty tensor without a table; the token terms' gradients shaped like
// band_r, band_w, gate_q, gate_k in the compute dtype (empty tensors for absent ones). dout, out (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq)
// in the compute dtype; max_slots bounds the per-thread dk/dv/table-gradient buffers (and
// those of band_w's and gate_k's gradients). 16-bit inputs are widened to float32 once; every
// gradient is summed in float32 and dq, dk, dv are rounded once at the end.
std::vector<at::Tensor> backward(const Params& p, const at::Tensor& dout_in,
                                 const at::Tensor& out_in, const at::Tensor& lse,
                                 int64_t max_slots) {
  const at::Tensor &table = p.table, &slopes = p.slopes;
  const int64_t lo = p.lo;
  const double scale = p.scale;
  const Shape s = params_shape(p);
  const at::ScalarType st = p.q.scalar_type();
  TORCH_CHECK(dout_in.scalar_type() == st && out_in.scalar_type() == st &&
                  lse.scalar_type() == compute_type(st),
              "relattn cpu kernel: dout and out must have q's dtype and lse the compute dtype; "
              "got dout ", dout_in.scalar_type(), ", out ", out_in.scalar_type(), ", lse ",
              lse.scalar_type());
  TORCH_CHECK(dout_in.is_contiguous() && out_in.is_contiguous() && lse.is_contiguous(),
              "relattn cpu kernel: dout, out, lse must be contiguous");
  TORCH_CHECK(dout_in.sizes() == p.q.sizes() && out_in.sizes() == p.q.sizes() &&
                  lse.dim() == 3 && lse.size(0) == p.q.size(0) && lse.size(1) == p.q.size(1) &&
                  lse.size(2) == p.q.size(2),
              "relattn cpu kernel: dout and out must have q's shape and lse (B, Hq, Nq); got "
              "dout ", dout_in.sizes(), ", out ", out_in.sizes(), ", lse ", lse.sizes());
  // bf16 products (bf16_products) read the 16-bit tensors themselves; else widened copies.
  const bool b16 = st == at::kBFloat16 && bf16_products(s.D);
  const at::Tensor q = b16 ? p.q : widened(p.q), k = b16 ? p.k : widened(p.k);
  const at::Tensor v = b16 ? p.v : widened(p.v);
  const at::Tensor dout = b16 ? dout_in : widened(dout_in), out = b16 ? out_in : widened(out_in);
  const auto opts = p.q.options().dtype(compute_type(st));
  // One dk/dv/table-gradient buffer per slot; max_slots bounds their memory (fewer threads).
  const int64_t n_slots = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), s.B * s.Hq * s.n_blocks, max_slots}));
  const bool has_table = table.numel() > 0;
  at::Tensor dq = at::zeros(q.sizes(), opts);
  at::Tensor dk_t = at::zeros({n_slots, s.B, s.Hkv, s.Nk, s.D}, opts);
  at::Tensor dv_t = at::zeros({n_slots, s.B, s.Hkv, s.Nk, s.D}, opts);
  at::Tensor g_t = has_table ? at::zeros({n_slots, s.Hq, s.U}, opts) : at::Tensor();
  // The token terms' gradients: dr and dgq rows owned by a task; band_w's (reversed) and
  // gate_k's per slot.
  const bool has_band = present(p.band_r), has_gate = present(p.gate_q);
  at::Tensor dr, dpr_t, dgq, dgk_t;
  if (has_band) {
    dr = at::zeros(p.band_r.sizes(), opts);
    dpr_t = at::zeros({n_slots, p.band_w.size(0), p.band_w.size(1), band_ld(p.band_w.size(2))},
                      opts);
  }
  if (has_gate) {
    dgq = at::zeros(p.gate_q.sizes(), opts);
    dgk_t = at::zeros({n_slots, s.B, s.Hq, s.Nk}, opts);
  }
  // Token<T> with the gradient buffers; pr keeps the reversed band_w alive.
  at::Tensor pr;
  auto token_of = [&](auto zero) {
    using T = decltype(zero);
    Token<T> t = make_token<T>(p, pr);
    if (has_band) {
      t.dr = dr.data_ptr<T>();
      t.dpr = dpr_t.data_ptr<T>();
    }
    if (has_gate) {
      t.dfq = dgq.data_ptr<T>();
      t.dfk = dgk_t.data_ptr<T>();
    }
    return t;
  };
  if (b16) {
    std::vector<at::Tensor> keep;
    const Mul<float> mul = bf16_operands(s, q, k, v, dout, out, keep);
    const auto f = extended<float>(s, table, slopes, lo);
    backward_impl<float>(s, mul, nullptr, nullptr, nullptr, f.data(), token_of(0.0f),
                         static_cast<float>(scale), nullptr, lse.data_ptr<float>(), nullptr,
                         dq.data_ptr<float>(), dk_t.data_ptr<float>(), dv_t.data_ptr<float>(),
                         has_table ? g_t.data_ptr<float>() : nullptr, n_slots);
  } else AT_DISPATCH_FLOATING_TYPES(dq.scalar_type(), "relattn_cpu_backward", [&] {
    const auto f = extended<scalar_t>(s, table, slopes, lo);
    at::Tensor kt, vt;
    const Mul<scalar_t> mul = products<scalar_t>(s, k, &v, kt, vt);
    backward_impl<scalar_t>(s, mul, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), f.data(), token_of(scalar_t(0)),
                            static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                            lse.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(),
                            dk_t.data_ptr<scalar_t>(), dv_t.data_ptr<scalar_t>(),
                            has_table ? g_t.data_ptr<scalar_t>() : nullptr, n_slots);
  });
  at::Tensor dk = n_slots == 1 ? dk_t[0] : dk_t.sum(0);
  at::Tensor dv = n_slots == 1 ? dv_t[0] : dv_t.sum(0);
  at::Tensor dtable = at::empty({0}, opts);
  if (has_table) {
    const int64_t T_cols = table.size(1);
    dtable = at::zeros({s.Hq, T_cols}, opts);
    at::Tensor g = n_slots == 1 ? g_t[0] : g_t.sum(0);
    AT_DISPATCH_FLOATING_TYPES(dtable.scalar_type(), "relattn_cpu_dtable", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* dp = dtable.data_ptr<scalar_t>();
      for (int64_t h = 0; h < s.Hq; ++h) {
        for (int64_t t = 0; t < T_cols; ++t) {
          const int64_t u = s.q_offset - (lo + t) + s.Nq - 1;
          if (u >= 0 && u < s.U) dp[h * T_cols + t] = gp[h * s.U + u];
        }
      }
    });
  }
  if (is_16bit(st)) {
    dq = dq.to(st);
    dk = dk.to(st);
    dv = dv.to(st);
  }
  const at::Tensor none = at::empty({0}, opts);
  at::Tensor dw = none, dgk = none;
  if (has_band) {
    dw = (n_slots == 1 ? dpr_t[0] : dpr_t.sum(0)).narrow(2, 0, p.band_w.size(2)).flip({2});
  }
  if (has_gate) dgk = n_slots == 1 ? dgk_t[0] : dgk_t.sum(0);
  return {dq, dk, dv, dtable, has_band ? dr : none, dw, has_gate ? dgq : none, dgk};
}

// "tiles" (the default), "tiles-avx2", "blas" or "aten".
void set_products(const std::string& name) {
  if (name == "tiles") {
    g_products = Products::kTiles;
  } else if (name == "tiles-avx2") {
    g_products = Products::kTilesAvx2;
  } else if (name == "blas") {
    g_products = Products::kBlas;
  } else if (name == "aten") {
    g_products = Products::kAten;
  } else {
    TORCH_CHECK(false, "products must be 'tiles', 'tiles-avx2', 'blas' or 'aten'; got '", name,
                "'");
  }
}

// Whether bfloat16 forwards of head dim d multiply in bf16 here (AVX-512-BF16), after
// set_bf16_products(on) (default on).
bool bf16_products_for(int64_t d) { return bf16_products(d); }
void set_bf16_products(bool on) { g_bf16_tiles = on; }

// What multiplies float32 tiles of head dim d: "tiles" (and its ISA), "blas" or "aten".
std::string products_for(int64_t d) {
  if (own_products(d)) return own_avx512() ? "tiles (AVX-512)" : "tiles (AVX2)";
  return g_products != Products::kAten && blas_available() ? "blas" : "aten";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Params>(m, "Params", "One call's tensors and scalars (see cpu_kernel.py)")
      .def(py::init<>())
      .def_readwrite("q", &Params::q)
      .def_readwrite("k", &Params::k)
      .def_readwrite("v", &Params::v)
      .def_readwrite("table", &Params::table)
      .def_readwrite("slopes", &Params::slopes)
      .def_readwrite("doc_lo", &Params::doc_lo)
      .def_readwrite("doc_hi", &Params::doc_hi)
      .def_readwrite("kpm", &Params::kpm)
      .def_readwrite("band_r", &Params::band_r)
      .def_readwrite("band_w", &Params::band_w)
      .def_readwrite("gate_q", &Params::gate_q)
      .def_readwrite("gate_k", &Params::gate_k)
      .def_readwrite("lo", &Params::lo)
      .def_readwrite("scale", &Params::scale)
      .def_readwrite("causal", &Params::causal)
      .def_readwrite("q_offset", &Params::q_offset)
      .def_readwrite("window", &Params::window)
      .def_readwrite("block_m", &Params::block_m)
      .def_readwrite("block_n", &Params::block_n);
  // The kernels touch no Python object: other Python threads run meanwhile.
  m.def("forward", &forward, "(out, lse) of exact attention with a relative position term",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "(dq, dk, dv, dtable, dr, dw, dgq, dgk)", py::call_guard<py::gil_scoped_release>());
  m.def("step", &step, "(out, lse) of one generated token (decode backend)",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_products", &set_products,
        "how tiles are multiplied: 'tiles' (own, float32), 'tiles-avx2' (own, at most AVX2), "
        "'blas' (exported BLAS) or 'aten'");
  m.def("products_for", &products_for, "what multiplies float32 tiles of a head dim");
  m.def("bf16_products_for", &bf16_products_for,
        "whether bfloat16 forwards of a head dim multiply in bf16 (AVX-512-BF16) here");
  m.def("set_bf16_products", &set_bf16_products,
        "let bfloat16 forwards multiply in bf16 where the CPU can (default), or widen them");
}
