/* NF4 weight-only linear for x86 CPUs: y[M,N] = x[M,K] . W^T, W decoded from 4-bit NF4 codes in registers.
 *
 * The weight never exists in fp32 memory: each byte holds two codes (element 2i in the low nibble), a code
 * indexes the 16-entry NF4 table (one vpermps on AVX-512, two plus a blend on AVX2), and the per-group
 * absmax multiplies the group's partial dot product once.  For M > 1 each decoded group is reused by every
 * row of x (decoded once per call, not once per row).  Built at install time from this file; loaded with
 * ctypes (qcompile/kernels.py); a pure-torch path runs when it is missing and the report says so.
 *
 * packed uint8 [N, K/2], absmax fp32 [N, K/g], x fp32 [M, K] contiguous, y fp32 [M, N].  K % g == 0,
 * g % 16 == 0.  Threads split N (nthreads from the caller = torch.get_num_threads()).
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <pthread.h>

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

#define MAX_ROWS 16
#define MAX_THREADS 64

/* ---- scalar ------------------------------------------------------------------------------------ */
static void row_scalar(const uint8_t *p, const float *amax, const float *x, int64_t M, int64_t K, int64_t g,
                       float *acc /* [M] */) {
    for (int64_t m = 0; m < M; m++) acc[m] = 0.f;
    for (int64_t j = 0; j < K / g; j++) {
        float part[MAX_ROWS] = {0};
        for (int64_t k = j * g; k < (j + 1) * g; k += 2) {
            uint8_t b = p[k / 2];
            float w0 = NF4[b & 15], w1 = NF4[b >> 4];
            for (int64_t m = 0; m < M; m++) part[m] += w0 * x[m * K + k] + w1 * x[m * K + k + 1];
        }
        for (int64_t m = 0; m < M; m++) acc[m] += amax[j] * part[m];
    }
}

/* Each ISA body below decodes a vector of codes into weights already scaled by the group's absmax and
 * accumulates it against MT rows of x at once (MT fixed at compile time so the accumulators stay in
 * registers); rows are processed in tiles of 4, then singly.  One horizontal sum per row at the end. */

/* ---- AVX2 + FMA: 8 codes (4 bytes) per step ----------------------------------------------------- */
#define AVX2_TILE(MT)                                                                                      \
__attribute__((target("avx2,fma")))                                                                        \
static void tile_avx2_##MT(const uint8_t *p, const float *amax, const float *x, int64_t K, int64_t g,       \
                           float *acc) {                                                                   \
    const __m256 lo = _mm256_loadu_ps(NF4), hi = _mm256_loadu_ps(NF4 + 8);                                 \
    const __m256i shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), m15 = _mm256_set1_epi32(15);         \
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);              \
    __m256 s[MT];                                                                                          \
    for (int m = 0; m < MT; m++) s[m] = _mm256_setzero_ps();                                               \
    for (int64_t j = 0; j < K / g; j++) {                                                                  \
        const __m256 a = _mm256_set1_ps(amax[j]);                                                          \
        for (int64_t k = j * g; k < (j + 1) * g; k += 8) {                                                 \
            int32_t four;                                                                                  \
            memcpy(&four, p + k / 2, 4);                                                                   \
            __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), dup);                                \
            __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), shift), m15);   \
            __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), \
                                        _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));                  \
            w = _mm256_mul_ps(w, a);                                                                       \
            for (int m = 0; m < MT; m++) s[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), s[m]);  \
        }                                                                                                  \
    }                                                                                                      \
    for (int m = 0; m < MT; m++) {                                                                         \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s[m]), _mm256_extractf128_ps(s[m], 1));               \
        h = _mm_hadd_ps(h, h);                                                                             \
        acc[m] = _mm_cvtss_f32(_mm_hadd_ps(h, h));                                                         \
    }                                                                                                      \
}
AVX2_TILE(1)
AVX2_TILE(4)

/* ---- AVX-512: 16 codes (8 bytes) per step, the table in one register ------------------------------ */
#define AVX512_TILE(MT)                                                                                    \
__attribute__((target("avx512f,avx512bw")))                                                                \
static void tile_avx512_##MT(const uint8_t *p, const float *amax, const float *x, int64_t K, int64_t g,     \
                             float *acc) {                                                                 \
    const __m512 table = _mm512_loadu_ps(NF4);                                                             \
    const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);               \
    const __m512i m15 = _mm512_set1_epi32(15);                                                             \
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);                     \
    __m512 s[MT];                                                                                          \
    for (int m = 0; m < MT; m++) s[m] = _mm512_setzero_ps();                                               \
    for (int64_t j = 0; j < K / g; j++) {                                                                  \
        const __m512 a = _mm512_set1_ps(amax[j]);                                                          \
        for (int64_t k = j * g; k < (j + 1) * g; k += 16) {                                                \
            __m128i bytes = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(p + k / 2)), dup);          \
            __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), shift), m15);   \
            __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), a);                                \
            for (int m = 0; m < MT; m++) s[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), s[m]);  \
        }                                                                                                  \
    }                                                                                                      \
    for (int m = 0; m < MT; m++) acc[m] = _mm512_reduce_add_ps(s[m]);                                      \
}
AVX512_TILE(1)
AVX512_TILE(4)

typedef void (*tile_fn)(const uint8_t *, const float *, const float *, int64_t, int64_t, float *);

static void row_tiled(tile_fn t1, tile_fn t4, const uint8_t *p, const float *amax, const float *x, int64_t M,
                      int64_t K, int64_t g, float *acc) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) t4(p, amax, x + m * K, K, g, acc + m);
    for (; m < M; m++) t1(p, amax, x + m * K, K, g, acc + m);
}

static void row_avx2(const uint8_t *p, const float *amax, const float *x, int64_t M, int64_t K, int64_t g,
                     float *acc) {
    row_tiled(tile_avx2_1, tile_avx2_4, p, amax, x, M, K, g, acc);
}

static void row_avx512(const uint8_t *p, const float *amax, const float *x, int64_t M, int64_t K, int64_t g,
                       float *acc) {
    row_tiled(tile_avx512_1, tile_avx512_4, p, amax, x, M, K, g, acc);
}

typedef void (*row_fn)(const uint8_t *, const float *, const float *, int64_t, int64_t, int64_t, float *);

/* 2 = AVX-512, 1 = AVX2+FMA, 0 = scalar */
int qc_nf4_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

typedef struct {
    row_fn fn;
    const float *x, *absmax, *bias;
    const uint8_t *packed;
    float *y;
    int64_t M, N, K, g, n0, n1;
} job_t;

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    for (int64_t n = j->n0; n < j->n1; n++) {
        float acc[MAX_ROWS];
        j->fn(j->packed + n * (j->K / 2), j->absmax + n * (j->K / j->g), j->x, j->M, j->K, j->g, acc);
        for (int64_t m = 0; m < j->M; m++) j->y[m * j->N + n] = acc[m] + (j->bias ? j->bias[n] : 0.f);
    }
    return NULL;
}

/* Returns 0 on success, -1 on bad arguments. isa: the value of qc_nf4_isa() or lower (tests force paths).
 * Threads: plain pthreads started and joined per call (no OpenMP runtime beside torch's, no spinning
 * workers on a shared machine); the calling thread takes the first slice. */
int qc_nf4_linear(const float *x, const uint8_t *packed, const float *absmax, const float *bias, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t g, int isa, int nthreads) {
    if (M < 1 || M > MAX_ROWS || K % g || g % 16 || isa < 0 || isa > qc_nf4_isa()) return -1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (N < 64 * nthreads) nthreads = 1;  /* small layers: a thread costs more than it saves */
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (job_t){isa == 2 ? row_avx512 : isa == 1 ? row_avx2 : row_scalar, x, absmax, bias, packed, y,
                          M, N, K, g, N * t / nthreads, N * (t + 1) / nthreads};
        if (t > 0) started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    }
    run_job(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_job(&jobs[t]);  /* could not start a thread: do its slice here */
    }
    return 0;
}

int qc_nf4_max_rows(void) { return MAX_ROWS; }

/* The benches' clock probe: n iterations of 8 dependent register adds. An add has a latency of one cycle on
 * every x86 core, so the loop takes 8 n cycles and timing it gives the clock the core really runs at (boost
 * included), which /proc/cpuinfo's nominal "cpu MHz" does not. Returns -1 where it cannot run. */
int64_t qc_dependent_adds(int64_t n) {
#if defined(__x86_64__)
    int64_t x = 0;
    for (int64_t i = 0; i < n; i++) {
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                         "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    }
    return x;
#else
    (void)n;
    return -1;
#endif
}

/* An importable module so that the build finds and ships it; the functions are called through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nf4", "NF4 x86 kernel (called via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__nf4(void) { return PyModule_Create(&module); }
