/* GPTQ's column loop on a CPU: solver.quantize_column_block's inner loop for a run of columns, in plain C.
 *
 * The torch loop in gptq_cli/solver.py costs ~40 us of dispatch per column whatever the block's size; this does
 * the same arithmetic, a row at a time (rows are independent: a row's later columns depend only on its own
 * earlier ones), in the same order, with the same float32 roundings: every product and difference rounded on
 * its own (built with -ffp-contract=off, so no fused multiply-add merges them), round half to even
 * (nearbyintf in the default rounding mode, as torch.round), IEEE division. Its results are the torch loop's
 * bit for bit (tests/test_cpu_columns.py). No Python or torch headers: gptq_cli/kernels/cpu_columns.py calls it
 * through ctypes, which releases the GIL, so rows can be split across threads.
 *
 * For columns c in [c0, c1) of W [rows, B] (row-major, row stride B), with s, z the scale and zero of column
 * c's group (scales, zeros [rows, G] row-major, the group of each column in group_of[B]):
 *   q = clamp(round(w_c / s) + z, 0, maxq)      codes[:, c] = q
 *   err = (w_c - s * (q - z)) / diag[c]          errs[:, c] = err
 *   w_j -= err * Hinv[c, j] for j in (c, B)     (Hinv [B, B] row-major)
 * With GPTAQ's correction P [B, B] (row-major; NULL for plain GPTQ), with w_c the value column c was quantized
 * from:
 *   w_j -= err * Hinv[c, j] - w_c * P[c, j]
 */
#include <math.h>
#include <stdint.h>

#pragma STDC FP_CONTRACT OFF

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GPTQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GPTQ_CLONES
#endif

GPTQ_CLONES
void gptq_columns_f32(float *W, const float *Hinv, const float *scales, const float *zeros,
                      const int64_t *group_of, float *codes, float *errs, const float *P, int64_t row_begin,
                      int64_t row_end, int64_t B, int64_t G, int64_t c0, int64_t c1, float maxq) {
    for (int64_t n = row_begin; n < row_end; ++n) {
        float *w = W + n * B;
        float *code_row = codes + n * B;
        float *err_row = errs + n * B;
        const float *scale_row = scales + n * G;
        const float *zero_row = zeros + n * G;
        for (int64_t c = c0; c < c1; ++c) {
            const float s = scale_row[group_of[c]];
            const float z = zero_row[group_of[c]];
            float q = nearbyintf(w[c] / s) + z;
            q = q < 0.0f ? 0.0f : q;
            q = q > maxq ? maxq : q;
            code_row[c] = q;
            const float dequantized = s * (q - z);
            const float err = (w[c] - dequantized) / Hinv[c * B + c];
            err_row[c] = err;
            const float *h = Hinv + c * B;
            if (P == 0) {
                for (int64_t j = c + 1; j < B; ++j) {
                    const float update = err * h[j];
                    w[j] = w[j] - update;
                }
            } else {
                const float *p = P + c * B;
                const float wc = w[c];
                for (int64_t j = c + 1; j < B; ++j) {
                    const float update = err * h[j] - wc * p[j];
                    w[j] = w[j] - update;
                }
            }
        }
    }
}
