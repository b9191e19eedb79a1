/* XᵀY of bf16 or float32 activations on CPUs with AVX512-BF16 (AMD's Zen 4 and later; Intel's keep MKL, which
 * is tuned for them): the Hessian's lower triangle (solver.accumulate_hessian) and GPTAQ's ΔX X̃ᵀ
 * (gptaq.accumulate_cross) where MKL runs slowly.
 *
 * bf16: a product of two bf16 numbers is exact in float32 (8-bit significands), so VDPBF16PS, which adds two
 * such products to a float32 lane (round to nearest even; inputs and results below float32's normal range
 * flushed to zero, far below any activation's square), gives XᵀY with float32 summation as the float32 route
 * does, only in another order, at twice the float32 rate. MKL's cblas_gemm_bf16bf16f32 uses that instruction
 * on Intel CPUs but not on AMD ones, where it runs no faster than float32 (bench/hessian_amd-epyc-*.json).
 * float32: VFMADD231PS, one rounding per product and sum as in MKL's SSYRK, which reaches about half of the
 * FMA rate on AMD CPUs (123-131 GFLOP/s on 2 Zen 4 cores at K = 576-1536).
 *
 * Layout: both operands are rows of 32-bit words. float32: the activations themselves, one token per row.
 * bf16: VDPBF16PS pairs neighbouring elements along the sum, so the operands come packed by token pairs:
 * P[p][k] = (X[2p][k], X[2p+1][k]) as one word (gptq_pack_pairs; an odd last token is paired with zero).
 * C[i][j] = beta * C[i][j] + alpha * sum_p A[p][i] . B[p][j] for i in [i0, i1), j in [j0, j1): each tile keeps
 * 6 rows by 64 columns of C in registers over a chunk of rows (a B word per column of a vector, an A word
 * broadcast per row), then adds it to C. beta 0 ignores C's old values (as BLAS does).
 *
 * Plain C, no Python or torch headers: gptq_cli/kernels/cpu_xtx.py calls it through ctypes, which releases
 * the GIL. gptq_xty_job runs as the body of a parallel region of torch's own OpenMP runtime (GOMP_parallel,
 * found in the process by cpu_xtx.py, passes the thread functions in the job): its threads are the ones
 * torch's operators just used, still spinning for work, where a thread pool of our own waited for a core they
 * held (27% of the Hessian's time in a quantize run). The rows of C are split into parts, each element
 * computed by one thread in one order, so the result does not depend on the number of threads.
 */
#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#define BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
#define TILE_ROWS 6
#define TILE_VECTORS 4

int gptq_xty_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

/* P [ceil(m / 2), K] 32-bit words from X [m, K] bf16 (row stride K), rows [p0, p1) of P. */
static void gptq_pack_pairs(const uint16_t *X, uint32_t *P, int64_t m, int64_t K, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
        const uint16_t *even = X + 2 * p * K;
        const uint16_t *odd = 2 * p + 1 < m ? even + K : 0;
        uint32_t *out = P + p * K;
        for (int64_t k = 0; k < K; ++k)
            out[k] = (uint32_t)even[k] | ((uint32_t)(odd ? odd[k] : 0) << 16);
    }
}

/* acc + the products of a's and b's lanes: float32 (one token) or bf16 pairs (two tokens). `fp32` is a
 * constant wherever this is inlined, so each instance of the loops below holds one instruction or the other. */
static inline __attribute__((always_inline)) BF16_TARGET __m512 step(__m512 acc, __m512i a, __m512i b,
                                                                     const int fp32) {
    return fp32 ? _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
                : _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

static inline __attribute__((always_inline)) BF16_TARGET void tile(const uint32_t *A, const uint32_t *B,
                                                                   int64_t ld, int64_t pairs, int64_t i,
                                                                   int64_t j, const int rows, const int vectors,
                                                                   const __mmask16 *mask, float *C, int64_t ldc,
                                                                   float alpha, float beta, const int fp32) {
    __m512 acc[TILE_ROWS][TILE_VECTORS];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vectors; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t *a = A + p * ld + i;
        const uint32_t *b = B + p * ld + j;
        __m512i bv[TILE_VECTORS];
        for (int v = 0; v < vectors; ++v) bv[v] = _mm512_maskz_loadu_epi32(mask[v], b + 16 * v);
        for (int r = 0; r < rows; ++r) {
            const __m512i av = _mm512_set1_epi32((int)a[r]);
            for (int v = 0; v < vectors; ++v) acc[r][v] = step(acc[r][v], av, bv[v], fp32);
        }
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vectors; ++v) {
            float *c = C + (i + r) * ldc + j + 16 * v;
            __m512 out = _mm512_mul_ps(acc[r][v], va);
            if (beta != 0.0f) out = _mm512_add_ps(out, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask[v], c), vb));
            _mm512_mask_storeu_ps(c, mask[v], out);
        }
}

/* The full tile, 6 rows by 4 vectors, with its 24 accumulators named: GCC keeps the array version's in
 * registers too but also stores them to the stack on every pair, which halves the rate. */
#define DP_ROW(r)                                                                                             \
    av = _mm512_set1_epi32((int)a[r]);                                                                        \
    c##r##0 = step(c##r##0, av, b0, fp32);                                                                    \
    c##r##1 = step(c##r##1, av, b1, fp32);                                                                    \
    c##r##2 = step(c##r##2, av, b2, fp32);                                                                    \
    c##r##3 = step(c##r##3, av, b3, fp32);
#define STORE_ROW(r)                                                                                          \
    store(C + (i + r) * ldc + j, c##r##0, c##r##1, c##r##2, c##r##3, mask, alpha, beta);

static inline __attribute__((always_inline)) BF16_TARGET void store_vector(float *c, __m512 acc, __mmask16 mask,
                                                                           float alpha, float beta) {
    __m512 out = _mm512_mul_ps(acc, _mm512_set1_ps(alpha));
    if (beta != 0.0f)
        out = _mm512_add_ps(out, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, c), _mm512_set1_ps(beta)));
    _mm512_mask_storeu_ps(c, mask, out);
}

static inline __attribute__((always_inline)) BF16_TARGET void store(float *c, __m512 v0, __m512 v1, __m512 v2,
                                                                    __m512 v3, const __mmask16 *mask,
                                                                    float alpha, float beta) {
    store_vector(c, v0, mask[0], alpha, beta);
    store_vector(c + 16, v1, mask[1], alpha, beta);
    store_vector(c + 32, v2, mask[2], alpha, beta);
    store_vector(c + 48, v3, mask[3], alpha, beta);
}

static inline __attribute__((always_inline)) BF16_TARGET void full_tile(const uint32_t *A, const uint32_t *B,
                                                                        int64_t ld, int64_t pairs, int64_t i,
                                                                        int64_t j, const __mmask16 *mask, float *C,
                                                                        int64_t ldc, float alpha, float beta,
                                                                        const int fp32) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
           c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00,
           c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t *a = A + p * ld + i;
        const uint32_t *b = B + p * ld + j;
        const __m512i b0 = _mm512_maskz_loadu_epi32(mask[0], b);
        const __m512i b1 = _mm512_maskz_loadu_epi32(mask[1], b + 16);
        const __m512i b2 = _mm512_maskz_loadu_epi32(mask[2], b + 32);
        const __m512i b3 = _mm512_maskz_loadu_epi32(mask[3], b + 48);
        __m512i av;
        DP_ROW(0) DP_ROW(1) DP_ROW(2) DP_ROW(3) DP_ROW(4) DP_ROW(5)
    }
    STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)
}

/* The rows [i0, i1) of a tile column: full tiles of TILE_ROWS rows, then the rest one tile of fewer. */
#define ROWS_CASE(R)                                                                                          \
    case R:                                                                                                   \
        tile(A, B, ld, pairs, i, j, R, vectors, mask, C, ldc, alpha, beta, fp32);                            \
        break;

static inline __attribute__((always_inline)) BF16_TARGET void tile_column(
    const uint32_t *A, const uint32_t *B, int64_t ld, int64_t pairs, int64_t i0, int64_t i1, int64_t j,
    const int vectors, const __mmask16 *mask, float *C, int64_t ldc, float alpha, float beta, const int fp32) {
    int64_t i = i0;
    if (vectors == TILE_VECTORS)
        for (; i + TILE_ROWS <= i1; i += TILE_ROWS)
            full_tile(A, B, ld, pairs, i, j, mask, C, ldc, alpha, beta, fp32);
    for (; i < i1; i += TILE_ROWS) {
        switch (i1 - i < TILE_ROWS ? (int)(i1 - i) : TILE_ROWS) {
            ROWS_CASE(1)
            ROWS_CASE(2)
            ROWS_CASE(3)
            ROWS_CASE(4)
            ROWS_CASE(5)
            ROWS_CASE(6)
        }
    }
}

static inline __attribute__((always_inline)) BF16_TARGET void chunk(const uint32_t *A, const uint32_t *B,
                                                                    int64_t ld, int64_t pairs, float *C,
                                                                    int64_t ldc, int64_t i0, int64_t i1,
                                                                    int64_t j0, int64_t j1, float alpha,
                                                                    float beta, int lower, const int fp32) {
    const int64_t width = 16 * TILE_VECTORS;
    for (int64_t j = j0; j < j1; j += width) {
        const int64_t first = lower && j > i0 ? j : i0;
        if (first >= i1) break;
        __mmask16 mask[TILE_VECTORS];
        int vectors = 0;
        for (int v = 0; v < TILE_VECTORS; ++v) {
            int64_t left = j1 - (j + 16 * v);
            if (left <= 0) break;
            mask[v] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            ++vectors;
        }
        switch (vectors) {
            case 1:
                tile_column(A, B, ld, pairs, first, i1, j, 1, mask, C, ldc, alpha, beta, fp32);
                break;
            case 2:
                tile_column(A, B, ld, pairs, first, i1, j, 2, mask, C, ldc, alpha, beta, fp32);
                break;
            case 3:
                tile_column(A, B, ld, pairs, first, i1, j, 3, mask, C, ldc, alpha, beta, fp32);
                break;
            default:
                tile_column(A, B, ld, pairs, first, i1, j, TILE_VECTORS, mask, C, ldc, alpha, beta, fp32);
        }
    }
}

/* C[i][j] (row stride ldc) for i in [i0, i1), j in [j0, j1) from A, B [rows, ld] 32-bit words (see above);
 * lower: only the tile columns' rows from their first column down (all of the lower triangle i >= j, and the
 * upper one's entries within the diagonal's tiles). In chunks of kc rows: a chunk's rows of B for one tile
 * column stay in the L1/L2 cache while every tile reads them, and each chunk's sums are added to C on their own
 * (sums of kc products, then of chunks: a shorter chain of float32 roundings than one running sum). */
static inline __attribute__((always_inline)) BF16_TARGET void xty(const uint32_t *A, const uint32_t *B,
                                                                  int64_t ld, int64_t rows, float *C, int64_t ldc,
                                                                  int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                                                  float alpha, float beta, int64_t kc, int lower,
                                                                  const int fp32) {
    for (int64_t p0 = 0; p0 < rows; p0 += kc) {
        const int64_t n = rows - p0 < kc ? rows - p0 : kc;
        chunk(A + p0 * ld, B + p0 * ld, ld, n, C, ldc, i0, i1, j0, j1, alpha, p0 == 0 ? beta : 1.0f, lower, fp32);
    }
}

/* The two instances: token pairs of bf16, tokens of float32. */
static BF16_TARGET void xty_bf16(const uint32_t *A, const uint32_t *B, int64_t ld, int64_t rows, float *C,
                                 int64_t ldc, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float alpha,
                                 float beta, int64_t kc, int lower) {
    xty(A, B, ld, rows, C, ldc, i0, i1, j0, j1, alpha, beta, kc, lower, 0);
}

static BF16_TARGET void xty_fp32(const uint32_t *A, const uint32_t *B, int64_t ld, int64_t rows, float *C,
                                 int64_t ldc, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float alpha,
                                 float beta, int64_t kc, int lower) {
    xty(A, B, ld, rows, C, ldc, i0, i1, j0, j1, alpha, beta, kc, lower, 1);
}

/* One call's work for a team of threads: bf16 operands are packed first (each thread its share of the token
 * pairs, then it waits for the others); then each thread computes the parts of C's rows (cuts[part] to
 * cuts[part + 1]) numbered thread, thread + threads, ... The thread functions are the OpenMP runtime's
 * (omp_get_thread_num, omp_get_num_threads, GOMP_barrier); without them the calling thread does all of it. */
typedef struct {
    const void *X, *Y; /* [m, K], row stride K: bf16, or float32 (fp32) */
    uint32_t *A, *B;   /* bf16: room for their packed pairs [ceil(m / 2), K]; B == A when Y is X */
    int64_t m, K;
    float *C; /* [K, K], row stride K */
    float alpha, beta;
    int64_t kc; /* rows of words per chunk */
    int64_t lower;
    int64_t fp32;
    int64_t parts;
    const int64_t *cuts;
    int (*thread_num)(void);
    int (*num_threads)(void);
    void (*barrier)(void);
} gptq_xty_job_t;

void gptq_xty_job(void *arg) {
    const gptq_xty_job_t *job = (const gptq_xty_job_t *)arg;
    const int64_t t = job->thread_num ? job->thread_num() : 0, n = job->num_threads ? job->num_threads() : 1;
    const uint32_t *A = (const uint32_t *)job->X, *B = (const uint32_t *)job->Y;
    int64_t rows = job->m;
    if (!job->fp32) {
        rows = (job->m + 1) / 2;
        gptq_pack_pairs(job->X, job->A, job->m, job->K, rows * t / n, rows * (t + 1) / n);
        if (job->B != job->A) gptq_pack_pairs(job->Y, job->B, job->m, job->K, rows * t / n, rows * (t + 1) / n);
        if (n > 1) job->barrier();
        A = job->A, B = job->B;
    }
    for (int64_t part = t; part < job->parts; part += n)
        (job->fp32 ? xty_fp32 : xty_bf16)(A, B, job->K, rows, job->C, job->K, job->cuts[part],
                                           job->cuts[part + 1], 0, job->K, job->alpha, job->beta, job->kc,
                                           (int)job->lower);
}

#else

int gptq_xty_supported(void) { return 0; }

#endif
