/* Batched uint8 x uint8 -> uint8 matmul for static int8 attention (Q.K^T, P.V) on AVX-512 VNNI CPUs.
 *
 * out[b] = requant((A[b] - za) @ (B[b] - zb)),  A [M, K], B [K, N] quint8 codes, any strides.
 *
 * torch._int_mm is 2-D only: one call per batch slice (48 per attention matmul of a 6-head, batch-8 encoder)
 * spends more time in dispatch than in arithmetic at these sizes (128 x 64 x 128).  Here every slice is
 * packed once into the VNNI layout -- A rows as 4-byte groups of k (uint8, the operand vpdpbusd takes
 * unsigned), B as [k/4][n][4] int8 (codes - 128) -- and multiplied with register tiles of 4 rows x 64
 * columns (16 zmm accumulators).  The zero points are removed exactly with row sums of A and column sums
 * of B, and the int32 result is requantized to the output's uint8 grid in the same pass:
 *
 *   sum_k (a - za)(b - zb) = sum_k a (b - 128) + (128 - zb) rowA[m] - za colB[n],  colB = sum_k (b - zb)
 *   out = clamp(nearbyint(total * mult) + zo, 0, 255),  mult = scale_a * scale_b / scale_out
 *
 * qc_u8_bmm_f32 writes total * mult as fp32 instead (mult = scale_a * scale_b): Q.K^T, whose consumers (the
 * score scale, the mask, softmax) are float, keeps its scores unrounded.
 *
 * Built at install time with the NF4 kernel (setup.py); qcompile/kernels.py calls it through ctypes and
 * falls back to torch._int_mm per slice where it is missing or the CPU lacks AVX-512 VNNI.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define BMM_MAX_THREADS 64

int qc_bmm_isa(void) {  /* 1 when this CPU runs the VNNI kernel */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

typedef struct {
    const uint8_t *a, *b;
    const int64_t *a_off, *b_off;  /* per-batch element offsets */
    int64_t sam, sak, sbk, sbn;   /* element strides */
    void *out;                     /* [B, M, N] contiguous, uint8 or (out_f32) float */
    int64_t b0, b1, M, K, N;
    int32_t za, zb, zo;
    float mult;
    int out_f32;
    int status;
} bmm_job_t;

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void slice(const bmm_job_t *j, const uint8_t *a, const uint8_t *b, void *out, uint8_t *ap, int8_t *bp,
                  int32_t *row_a, int32_t *col_b, int64_t M4, int64_t K4, int64_t N64) {
    const int64_t M = j->M, K = j->K, N = j->N;
    /* pack A: [M4][K4] uint8, zero padded; row sums over the real k */
    memset(ap, 0, (size_t)(M4 * K4));
    for (int64_t m = 0; m < M; m++) {
        int32_t s = 0;
        uint8_t *dst = ap + m * K4;
        if (j->sak == 1) {  /* a contiguous row: one copy, a vectorized sum */
            memcpy(dst, a + m * j->sam, (size_t)K);
            for (int64_t k = 0; k < K; k++) s += dst[k];
        } else {
            for (int64_t k = 0; k < K; k++) s += dst[k] = a[m * j->sam + k * j->sak];
        }
        row_a[m] = s;
    }
    /* pack B: [K4/4][N64][4] int8 (code - 128), zero padded; column sums of (code - zb) */
    memset(bp, 0, (size_t)(K4 * N64));
    for (int64_t n = 0; n < N; n++) col_b[n] = 0;
    if (j->sbk == 1) {  /* B^T stored row-major (K.T of attention): 4 consecutive k of a column are one word */
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *src = b + n * j->sbn;
            int32_t s = 0;
            for (int64_t k = 0; k < K; k++) s += src[k];
            col_b[n] = s - (int32_t)K * j->zb;
            for (int64_t k4 = 0; k4 < K / 4; k4++) {
                uint32_t w;
                memcpy(&w, src + 4 * k4, 4);
                w ^= 0x80808080u;
                memcpy(bp + (k4 * N64 + n) * 4, &w, 4);
            }
            for (int64_t k = K / 4 * 4; k < K; k++) bp[((k / 4) * N64 + n) * 4 + (k % 4)] = (int8_t)(src[k] ^ 0x80);
        }
    } else {
        for (int64_t k = 0; k < K; k++) {
            int8_t *dst = bp + (k / 4) * N64 * 4 + (k % 4);
            const uint8_t *src = b + k * j->sbk;
            if (j->sbn == 1) {  /* row-major B (V of attention): contiguous reads */
                for (int64_t n = 0; n < N; n++) {
                    dst[n * 4] = (int8_t)(src[n] ^ 0x80);
                    col_b[n] += src[n];
                }
            } else {
                for (int64_t n = 0; n < N; n++) {
                    dst[n * 4] = (int8_t)(src[n * j->sbn] ^ 0x80);
                    col_b[n] += src[n * j->sbn];
                }
            }
        }
        for (int64_t n = 0; n < N; n++) col_b[n] -= (int32_t)K * j->zb;
    }
    const __m512 mult = _mm512_set1_ps(j->mult);
    const __m512i zo = _mm512_set1_epi32(j->zo), lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(255);
    const int32_t za = j->za, zb_shift = 128 - j->zb;
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
        for (int64_t n0 = 0; n0 < N64; n0 += 64) {
            __m512i acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
            for (int64_t k4 = 0; k4 < K4 / 4; k4++) {
                const int8_t *bq = bp + (k4 * N64 + n0) * 4;
                __m512i bv[4];
                for (int c = 0; c < 4; c++) bv[c] = _mm512_loadu_si512((const void *)(bq + 64 * c));
                for (int r = 0; r < 4; r++) {
                    int32_t a4;
                    memcpy(&a4, ap + (m0 + r) * K4 + 4 * k4, 4);
                    const __m512i av = _mm512_set1_epi32(a4);
                    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], av, bv[c]);
                }
            }
            for (int r = 0; r < 4 && m0 + r < M; r++) {
                const __m512i ra = _mm512_set1_epi32(zb_shift * row_a[m0 + r]);
                for (int c = 0; c < 4; c++) {
                    const int64_t n = n0 + 16 * c;
                    if (n >= N) break;
                    const int64_t valid = N - n < 16 ? N - n : 16;
                    const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
                    const __m512i cb = _mm512_maskz_loadu_epi32(mask, col_b + n);
                    __m512i t = _mm512_sub_epi32(_mm512_add_epi32(acc[r][c], ra), _mm512_mullo_epi32(_mm512_set1_epi32(za), cb));
                    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(t), mult);
                    if (j->out_f32) {
                        _mm512_mask_storeu_ps((float *)out + (m0 + r) * N + n, mask, y);
                        continue;
                    }
                    __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zo);
                    q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
                    _mm512_mask_cvtepi32_storeu_epi8((uint8_t *)out + (m0 + r) * N + n, mask, q);
                }
            }
        }
    }
}

static void *bmm_run(void *arg) {
    bmm_job_t *j = (bmm_job_t *)arg;
    const int64_t M4 = round_up(j->M, 4), K4 = round_up(j->K, 4), N64 = round_up(j->N, 64);
    uint8_t *ap = malloc((size_t)(M4 * K4));
    int8_t *bp = aligned_alloc(64, (size_t)round_up(K4 * N64, 64));
    int32_t *row_a = malloc(sizeof(int32_t) * (size_t)M4), *col_b = malloc(sizeof(int32_t) * (size_t)N64);
    if (!ap || !bp || !row_a || !col_b) {
        j->status = -2;
    } else {
        for (int64_t i = j->b0; i < j->b1; i++)
            slice(j, j->a + j->a_off[i], j->b + j->b_off[i],
                  j->out_f32 ? (void *)((float *)j->out + i * j->M * j->N) : (void *)((uint8_t *)j->out + i * j->M * j->N),
                  ap, bp, row_a, col_b, M4, K4, N64);
    }
    free(ap); free(bp); free(row_a); free(col_b);
    return NULL;
}

static int bmm(const uint8_t *a, const int64_t *a_off, int64_t sam, int64_t sak, const uint8_t *b,
               const int64_t *b_off, int64_t sbk, int64_t sbn, void *out, int out_f32, int64_t B, int64_t M,
               int64_t K, int64_t N, int32_t za, int32_t zb, float mult, int32_t zo, int nthreads) {
    if (!qc_bmm_isa() || B < 1 || M < 1 || K < 1 || N < 1 || K > (1 << 20)) return -1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > BMM_MAX_THREADS) nthreads = BMM_MAX_THREADS;
    if (nthreads > B) nthreads = (int)B;
    bmm_job_t jobs[BMM_MAX_THREADS];
    for (int t = 0; t < nthreads; t++)
        jobs[t] = (bmm_job_t){a, b, a_off, b_off, sam, sak, sbk, sbn, out, B * t / nthreads, B * (t + 1) / nthreads,
                              M, K, N, za, zb, zo, mult, out_f32, 0};
    /* torch's own OpenMP team (built with -fopenmp against the libgomp torch loaded, as csrc/wo_gemv.c): no
     * second set of threads fighting torch's spinning workers for the cores, which the pthreads spawned
     * here per call used to do. Without OpenMP: the slices run one after the other on this thread. */
#pragma omp parallel for schedule(static, 1) num_threads(nthreads)
    for (int t = 0; t < nthreads; t++) bmm_run(&jobs[t]);
    int status = 0;
    for (int t = 0; t < nthreads; t++)
        if (jobs[t].status) status = jobs[t].status;
    return status;
}

/* Returns 0 on success, -1 when the CPU lacks the ISA or arguments are bad, -2 when memory ran out. */
int qc_u8_bmm(const uint8_t *a, const int64_t *a_off, int64_t sam, int64_t sak, const uint8_t *b,
              const int64_t *b_off, int64_t sbk, int64_t sbn, uint8_t *out, int64_t B, int64_t M, int64_t K,
              int64_t N, int32_t za, int32_t zb, float mult, int32_t zo, int nthreads) {
    return bmm(a, a_off, sam, sak, b, b_off, sbk, sbn, out, 0, B, M, K, N, za, zb, mult, zo, nthreads);
}

/* As qc_u8_bmm with an fp32 result: out[b] = ((A[b] - za) @ (B[b] - zb)) * mult, mult = scale_a * scale_b. */
int qc_u8_bmm_f32(const uint8_t *a, const int64_t *a_off, int64_t sam, int64_t sak, const uint8_t *b,
                  const int64_t *b_off, int64_t sbk, int64_t sbn, float *out, int64_t B, int64_t M, int64_t K,
                  int64_t N, int32_t za, int32_t zb, float mult, int nthreads) {
    return bmm(a, a_off, sam, sak, b, b_off, sbk, sbn, out, 1, B, M, K, N, za, zb, mult, 0, nthreads);
}
