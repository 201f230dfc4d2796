/* Weight-only int8 / int4 linear for x86 CPUs at batch 1..16: y[M,N] = x[M,K] . W^T (+ bias), fp32 x, fp32
 * accumulate, the weight decoded in registers (never an fp32 weight in memory).
 *
 * int8, one scale per output channel: codes int8 [N, K] (K % 16 == 0), scale fp32 [N], optional affine fix-up
 *   fix[n] = scale[n] * zero[n]:  y[m,n] = scale[n] * sum_k q[n,k] x[m,k] - fix[n] * sum_k x[m,k] + bias[n].
 * int4, one scale (and zero point) per group of g along K (g % 32 == 0, K % g == 0): codes c = q - quant_min in
 *   [0, 15], packed per 32-element block as 16 bytes, byte i = element i (low nibble) | element 16 + i (high
 *   nibble) -- 16 bytes give two 16-lane index vectors with one shift and no shuffles. For each group a 16-entry
 *   table (c - z) * s is built once (z = zero[n, j] - quant_min as uint8 [N, K/g], or one constant when
 *   symmetric) and the codes index it (vpermps; AVX2: two vpermps + a blend), so a decoded weight is exactly
 *   the reference's fp32 value (q - z) * s.
 *
 * Loop order: blocks of R output channels (R rows of W streamed side by side, each x vector loaded once per
 * block); rows of x in register tiles of MT <= 4 over the block, so the block's weights come from DRAM once
 * per call and from L1/L2 for the other tiles. Threads split N in blocks (pthreads started per call, like
 * nf4_kernel.c). Built at install time into qcompile._nf4 (setup.py), called through ctypes (kernels.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <pthread.h>

#define WO_MAX_ROWS 16
#define WO_MAX_THREADS 64
#define RMAX 4

typedef struct wo_job {
    int kind, isa;           /* kind 0 int8, 1 int4; isa 2 AVX-512, 1 AVX2+FMA, 0 scalar */
    const float *x, *scale, *fix, *bias, *xsum;
    const void *w;
    const uint8_t *zero;     /* int4: [N, K/g] or NULL (then zconst) */
    float zconst;
    const float *base;       /* int4: the 16 code values before (v - z) * s: 0..15, or e.g. the NF4 table */
    const uint16_t *xb;      /* int4 BF16 body: x as bf16 pairs, and its sums per group [M, K/g] */
    const float *xg;
    float *y;
    int64_t M, N, K, g;
} wo_job;

/* out: [R][WO_MAX_ROWS] partial results for rows n..n+R-1 and the MT rows of x starting at x */
typedef void (*blk_fn)(const wo_job *, int64_t n, const float *x, float *out);

int qc_wo_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

int qc_wo_max_rows(void) { return WO_MAX_ROWS; }

/* int4 rows: blocks of 128 elements in 64 bytes (16 little-endian dwords), nibble i (bits 4i..4i+3) of
 * dword d = element 16 i + d of the block; the last block of a row is zero-padded when K % 128 != 0 */
static inline int64_t i4_row_bytes(int64_t K) { return (K + 127) / 128 * 64; }

static inline float zero_of(const wo_job *j, int64_t n, int64_t grp) {
    return j->zero ? (float)j->zero[n * (j->K / j->g) + grp] : j->zconst;
}

/* ---- scalar: one channel, all rows of x ----------------------------------------------------------- */
static void i8_scalar(const wo_job *j, int64_t n, const float *x, float *out) {
    const int8_t *w = (const int8_t *)j->w + n * j->K;
    for (int64_t m = 0; m < j->M; m++) {
        float s = 0.f;
        for (int64_t k = 0; k < j->K; k++) s += (float)w[k] * x[m * j->K + k];
        out[m] = s;
    }
}

static void i4_scalar(const wo_job *j, int64_t n, const float *x, float *out) {
    const int64_t K = j->K, G = K / j->g;
    const uint8_t *p = (const uint8_t *)j->w + n * i4_row_bytes(K);
    for (int64_t m = 0; m < j->M; m++) out[m] = 0.f;
    for (int64_t e = 0; e < K; e += 16) {  /* one nibble slot: elements e .. e + 15 */
        const int64_t grp = e / j->g;
        const float s = j->scale[n * G + grp], z = zero_of(j, n, grp);
        const uint8_t *blk = p + (e / 128) * 64;
        const int sh = (int)(4 * ((e % 128) / 16));
        for (int d = 0; d < 16; d++) {
            uint32_t word;
            memcpy(&word, blk + 4 * d, 4);
            const float w = ((float)((word >> sh) & 15) - z) * s;
            for (int64_t m = 0; m < j->M; m++) out[m] += w * x[m * K + e + d];
        }
    }
}

/* ---- AVX-512 ---------------------------------------------------------------------------------------- */
#define I8_512(R, MT)                                                                                      \
__attribute__((target("avx512f,avx512bw")))                                                                \
static void i8_512_##R##_##MT(const wo_job *j, int64_t n, const float *x, float *out) {                    \
    const int64_t K = j->K;                                                                                \
    const int8_t *w = (const int8_t *)j->w + n * K;                                                        \
    __m512 s[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) s[r][m] = _mm512_setzero_ps();               \
    for (int64_t k = 0; k < K; k += 16) {                                                                  \
        __m512 wv[R];                                                                                      \
        for (int r = 0; r < R; r++)                                                                        \
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * K + k)))); \
        for (int m = 0; m < MT; m++) {                                                                     \
            const __m512 xv = _mm512_loadu_ps(x + m * K + k);                                              \
            for (int r = 0; r < R; r++) s[r][m] = _mm512_fmadd_ps(wv[r], xv, s[r][m]);                     \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = _mm512_reduce_add_ps(s[r][m]); \
}

/* int4: a new group's tables are built when `left` (nibble slots left in the group) reaches 0 */
#define I4_NEXT_GROUP(BUILD)                                                                               \
    if (left == 0) {                                                                                       \
        for (int r = 0; r < RR; r++) {                                                                      \
            const float zz = zero_of(j, n + r, grp), ss = j->scale[(n + r) * G + grp];                     \
            BUILD;                                                                                         \
        }                                                                                                  \
        grp++;                                                                                             \
        left = per;                                                                                        \
    }                                                                                                      \
    left--;

#define I4_512_BUILD I4_NEXT_GROUP(t[r] = _mm512_mul_ps(j->zero ? _mm512_sub_ps(iota, _mm512_set1_ps(zz)) : iotaz,       \
                                           _mm512_set1_ps(ss)))

/* slot i of a block: 16 codes of each of the R rows decoded, times MT rows of x (CHECK: group may change) */
#define I4_512_SLOT(i, CHECK)                                                                              \
    {                                                                                                      \
        if (CHECK) { I4_512_BUILD }                                                                        \
        __m512 w[RR];                                                                                       \
        for (int r = 0; r < RR; r++) /* vpermps reads the index's low 4 bits: no mask */                   \
            w[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * (i)), t[r]);                          \
        for (int m = 0; m < MM; m++) {                                                                     \
            const __m512 xv = _mm512_loadu_ps(x + m * K + e + 16 * (i));                                   \
            for (int r = 0; r < RR; r++) s[r][m] = _mm512_fmadd_ps(w[r], xv, s[r][m]);                      \
        }                                                                                                  \
    }

#define I4_512(R, MT)                                                                                      \
__attribute__((target("avx512f,avx512bw")))                                                                \
static void i4_512_##R##_##MT(const wo_job *j, int64_t n, const float *x, float *out) {                    \
    enum { RR = R, MM = MT };  /* for the slot macros */                                                    \
    const int64_t K = j->K, G = K / j->g, RB = i4_row_bytes(K), per = j->g / 16;                           \
    const uint8_t *p = (const uint8_t *)j->w + n * RB;                                                     \
    const __m512 iota = _mm512_loadu_ps(j->base);                                                         \
    const __m512 iotaz = _mm512_sub_ps(iota, _mm512_set1_ps(j->zconst));  /* symmetric: one mul a group */ \
    __m512 s[R][MT], t[R];                                                                                 \
    int64_t left = 0, grp = 0, e = 0;                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) s[r][m] = _mm512_setzero_ps();               \
    for (; e + 128 <= K; e += 128) {                                                                       \
        __m512i v[R];                                                                                      \
        for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void *)(p + r * RB + e / 2));         \
        if (per % 8 == 0) {  /* groups of whole blocks: tables change at a block's start only */           \
            I4_512_BUILD                                                                                   \
            left -= 7;                                                                                     \
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) I4_512_SLOT(i, 0)                          \
        } else {                                                                                           \
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) I4_512_SLOT(i, 1)                          \
        }                                                                                                  \
    }                                                                                                      \
    if (e < K) {  /* last, partial block: (K - e) / 16 slots */                                            \
        __m512i v[R];                                                                                      \
        for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void *)(p + r * RB + e / 2));         \
        for (int i = 0; i < (K - e) / 16; i++) I4_512_SLOT(i, 1)                                           \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = _mm512_reduce_add_ps(s[r][m]); \
}

/* ---- AVX-512 BF16, bf16 activations (int4, g % 128 == 0) --------------------------------------------
 * For callers that accept bf16 activations (X86Options.weight_only_activations="bf16", as torch's kernels
 * take them): vdpbf16ps does 32 multiply-adds per instruction where the fp32 body spends a shift, a vpermps
 * and an FMA per 16. A code c becomes the bf16 number 128 + c, whose bits are 0x4300 | c (one 16-bit shift
 * and one ternary-logic op per 32 codes); per group y += s * (sum (128 + c) x - (128 + z) sum x), fp32 sums.
 * The 16-bit word 2d of block word d holds elements 16 i + d (nibble i < 4), word 2d + 1 elements
 * 16 i + 64 + d: x is rounded to bf16 and interleaved to match once per call (prep_bf16). */
#define BF_SLOT(i)                                                                                         \
    {                                                                                                      \
        __m512i w[RR];                                                                                     \
        for (int r = 0; r < RR; r++)                                                                       \
            w[r] = (i) == 3 ? _mm512_or_si512(_mm512_srli_epi16(v[r], 12), c43)                            \
                            : _mm512_ternarylogic_epi32(_mm512_srli_epi16(v[r], 4 * (i)), m0f, c43, 0xEA);  \
        for (int m = 0; m < MM; m++) {                                                                     \
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(j->xb + (((m0 + m) * nb + b) * 4 + (i)) * 32)); \
            for (int r = 0; r < RR; r++) part[(i) % NA][r][m] = _mm512_dpbf16_ps(part[(i) % NA][r][m], (__m512bh)w[r], xv); \
        }                                                                                                  \
    }

#define I4_BF16(R, MT)                                                                                     \
__attribute__((target("avx512f,avx512bw,avx512bf16")))                                                     \
static void i4_bf16_##R##_##MT(const wo_job *j, int64_t n, const float *x, float *out) {                   \
    enum { RR = R, MM = MT, NA = (MT) == 1 ? 2 : 1 };                                                      \
    const int64_t K = j->K, G = K / j->g, RB = i4_row_bytes(K), nb = K / 128, per = j->g / 128;            \
    const int64_t m0 = (x - j->x) / K;                                                                     \
    const uint8_t *p = (const uint8_t *)j->w + n * RB;                                                     \
    const __m512i m0f = _mm512_set1_epi32(0x000F000F), c43 = _mm512_set1_epi32(0x43004300);                \
    __m512 acc[R][MT];                                                                                     \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();             \
    for (int64_t grp = 0; grp < G; grp++) {                                                                \
        __m512 part[NA][R][MT];                                                                            \
        for (int a = 0; a < NA; a++) for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++)             \
            part[a][r][m] = _mm512_setzero_ps();                                                           \
        for (int64_t b = grp * per; b < (grp + 1) * per; b++) {                                            \
            __m512i v[R];                                                                                  \
            for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void *)(p + r * RB + b * 64));    \
            BF_SLOT(0) BF_SLOT(1) BF_SLOT(2) BF_SLOT(3)                                                    \
        }                                                                                                  \
        for (int r = 0; r < R; r++) {                                                                      \
            const __m512 sc = _mm512_set1_ps(j->scale[(n + r) * G + grp]);                                 \
            for (int m = 0; m < MT; m++) {                                                                 \
                __m512 u = part[0][r][m];                                                                  \
                for (int a = 1; a < NA; a++) u = _mm512_add_ps(u, part[a][r][m]);                          \
                acc[r][m] = _mm512_fmadd_ps(u, sc, acc[r][m]);                                             \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++)                                                                            \
        for (int m = 0; m < MT; m++) {                                                                     \
            float t = _mm512_reduce_add_ps(acc[r][m]);                                                     \
            for (int64_t grp = 0; grp < G; grp++)                                                          \
                t -= j->scale[(n + r) * G + grp] * (128.f + zero_of(j, n + r, grp)) * j->xg[(m0 + m) * G + grp]; \
            out[r * WO_MAX_ROWS + m] = t;                                                                  \
        }                                                                                                  \
}

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* x [M, K] -> bf16 [M][K/128][4][16][2] (elements 16 i + d and 16 i + 64 + d of a block side by side) and
 * the group sums of those bf16 values [M][K/g]. Returns -1 when out of memory. */
static int prep_bf16(wo_job *j, uint16_t **xb, float **xg) {
    const int64_t M = j->M, K = j->K, G = K / j->g;
    *xb = (uint16_t *)malloc(sizeof(uint16_t) * M * K);
    *xg = (float *)malloc(sizeof(float) * M * G);
    if (!*xb || !*xg) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t grp = 0; grp < G; grp++) {
            double sum = 0;
            for (int64_t k = grp * j->g; k < (grp + 1) * j->g; k++) {
                const int64_t e = k % 128, o = m * K + ((k / 128 * 4 + (e % 64) / 16) * 16 + e % 16) * 2 + e / 64;
                const uint16_t h = bf16_rne(j->x[m * K + k]);
                uint32_t u = (uint32_t)h << 16;
                float f;
                memcpy(&f, &u, 4);
                (*xb)[o] = h;
                sum += f;
            }
            (*xg)[m * G + grp] = (float)sum;
        }
    j->xb = *xb;
    j->xg = *xg;
    return 0;
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------------------- */
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#define I8_256(R, MT)                                                                                      \
__attribute__((target("avx2,fma")))                                                                        \
static void i8_256_##R##_##MT(const wo_job *j, int64_t n, const float *x, float *out) {                    \
    const int64_t K = j->K;                                                                                \
    const int8_t *w = (const int8_t *)j->w + n * K;                                                        \
    __m256 s[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) s[r][m] = _mm256_setzero_ps();               \
    for (int64_t k = 0; k < K; k += 8) {                                                                   \
        __m256 wv[R];                                                                                      \
        for (int r = 0; r < R; r++)                                                                        \
            wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * K + k)))); \
        for (int m = 0; m < MT; m++) {                                                                     \
            const __m256 xv = _mm256_loadu_ps(x + m * K + k);                                              \
            for (int r = 0; r < R; r++) s[r][m] = _mm256_fmadd_ps(wv[r], xv, s[r][m]);                     \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = hsum256(s[r][m]);  \
}

/* 16-entry lookup on AVX2 for nibble slot i of v: its low 3 bits pick within a half (vpermps reads bits
 * 0-2 only), its bit 3, shifted to the sign, picks the half (blendv) */
#define LUT256(v, i, tl, th)                                                                               \
    _mm256_blendv_ps(_mm256_permutevar8x32_ps(tl, _mm256_srli_epi32(v, 4 * (i))),                          \
                     _mm256_permutevar8x32_ps(th, _mm256_srli_epi32(v, 4 * (i))),                          \
                     _mm256_castsi256_ps(_mm256_slli_epi32(v, 28 - 4 * (i))))

#define I4_256_SLOT(i)                                                                                     \
    {                                                                                                      \
        I4_NEXT_GROUP(tl[r] = _mm256_mul_ps(_mm256_sub_ps(iota, _mm256_set1_ps(zz)), _mm256_set1_ps(ss));  \
                      th[r] = _mm256_mul_ps(_mm256_sub_ps(iota8, _mm256_set1_ps(zz)),                      \
                                            _mm256_set1_ps(ss)))                                           \
        for (int h = 0; h < 2; h++) {  /* dwords 8h .. 8h + 7: elements e + 16 i + 8h .. */                \
            __m256 w[RR];                                                                                   \
            for (int r = 0; r < RR; r++) w[r] = LUT256(v[r][h], i, tl[r], th[r]);                           \
            for (int m = 0; m < MM; m++) {                                                                 \
                const __m256 xv = _mm256_loadu_ps(x + m * K + e + 16 * (i) + 8 * h);                       \
                for (int r = 0; r < RR; r++) s[r][m] = _mm256_fmadd_ps(w[r], xv, s[r][m]);                  \
            }                                                                                              \
        }                                                                                                  \
    }

#define I4_256(R, MT)                                                                                      \
__attribute__((target("avx2,fma")))                                                                        \
static void i4_256_##R##_##MT(const wo_job *j, int64_t n, const float *x, float *out) {                    \
    enum { RR = R, MM = MT };  /* for the slot macros */                                                    \
    const int64_t K = j->K, G = K / j->g, RB = i4_row_bytes(K), per = j->g / 16;                           \
    const uint8_t *p = (const uint8_t *)j->w + n * RB;                                                     \
    const __m256 iota = _mm256_loadu_ps(j->base), iota8 = _mm256_loadu_ps(j->base + 8);                    \
    __m256 s[R][MT], tl[R], th[R];                                                                         \
    int64_t left = 0, grp = 0, e = 0;                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) s[r][m] = _mm256_setzero_ps();               \
    for (; e < K; e += 128) {                                                                              \
        __m256i v[R][2];                                                                                   \
        for (int r = 0; r < R; r++) for (int h = 0; h < 2; h++)                                            \
            v[r][h] = _mm256_loadu_si256((const __m256i *)(p + r * RB + e / 2 + 32 * h));                  \
        if (e + 128 <= K) {                                                                                \
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) I4_256_SLOT(i)                             \
        } else {                                                                                           \
            for (int i = 0; i < (K - e) / 16; i++) I4_256_SLOT(i)                                          \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = hsum256(s[r][m]);  \
}

I8_512(4, 1) I8_512(4, 2) I8_512(4, 4) I8_512(1, 1) I8_512(1, 2) I8_512(1, 4)
I4_512(4, 1) I4_512(4, 2) I4_512(4, 4) I4_512(1, 1) I4_512(1, 2) I4_512(1, 4)
I8_256(4, 1) I8_256(4, 2) I8_256(1, 1) I8_256(1, 2)
I4_256(2, 1) I4_256(2, 2) I4_256(1, 1) I4_256(1, 2)
I4_BF16(4, 1) I4_BF16(4, 2) I4_BF16(1, 1) I4_BF16(1, 2) I4_BF16(1, 4)

/* [kind][isa]: block rows R and the kernels for (R, MT = 1, 2, 4) and (1, MT); NULL: tile not built */
typedef struct { int R; blk_fn big[3], one[3]; } isa_table;
static const isa_table BF16_TABLE = {4, {i4_bf16_4_1, i4_bf16_4_2, NULL}, {i4_bf16_1_1, i4_bf16_1_2, i4_bf16_1_4}};
static const isa_table TABLES[2][3] = {
    {{1, {i8_scalar, NULL, NULL}, {i8_scalar, NULL, NULL}},
     {4, {i8_256_4_1, i8_256_4_2, NULL}, {i8_256_1_1, i8_256_1_2, NULL}},
     {4, {i8_512_4_1, i8_512_4_2, i8_512_4_4}, {i8_512_1_1, i8_512_1_2, i8_512_1_4}}},
    {{1, {i4_scalar, NULL, NULL}, {i4_scalar, NULL, NULL}},
     {2, {i4_256_2_1, i4_256_2_2, NULL}, {i4_256_1_1, i4_256_1_2, NULL}},
     {4, {i4_512_4_1, i4_512_4_2, i4_512_4_4}, {i4_512_1_1, i4_512_1_2, i4_512_1_4}}},
};

/* One block of R channels: every tile of x rows, then the epilogue (int8 scale / affine fix-up, bias). */
static void run_block(const wo_job *j, const blk_fn *fns, int R, int64_t n) {
    float acc[RMAX * WO_MAX_ROWS];
    if (j->isa == 0) {
        fns[0](j, n, j->x, acc);
    } else {
        for (int64_t m = 0; m < j->M;) {
            int t = (j->M - m >= 4 && fns[2]) ? 2 : (j->M - m >= 2 && fns[1]) ? 1 : 0;
            fns[t](j, n, j->x + m * j->K, acc + m);
            m += 1 << t;
        }
    }
    for (int r = 0; r < R; r++) {
        const int64_t c = n + r;
        for (int64_t m = 0; m < j->M; m++) {
            float v = acc[r * WO_MAX_ROWS + m];
            if (j->kind == 0) v = v * j->scale[c] - (j->fix ? j->fix[c] * j->xsum[m] : 0.f);
            j->y[m * j->N + c] = v + (j->bias ? j->bias[c] : 0.f);
        }
    }
}

static void run_range(const wo_job *j, int64_t n0, int64_t n1) {
    const isa_table *tb = j->kind == 2 ? &BF16_TABLE : &TABLES[j->kind][j->isa];
    int64_t n = n0;
    for (; n + tb->R <= n1; n += tb->R) run_block(j, tb->big, tb->R, n);
    for (; n < n1; n++) run_block(j, tb->one, 1, n);
}

/* ---- threads ------------------------------------------------------------------------------------------
 * A pool of sleeping workers (condition variable, no spinning: torch's OpenMP workers keep the cores busy
 * enough). A call cuts N into chunks that the caller and the workers claim under a mutex; the caller waits
 * only for chunks some thread has claimed, never for a worker to wake up: on a loaded machine a worker that
 * is not scheduled in time claims nothing and the caller does the whole call (one-thread time, not one
 * scheduler time slice more -- per-call pthread_create + join waited for that slice). */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER, call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static const wo_job *pool_job;
static int64_t pool_chunk, pool_next, pool_count, pool_finished;
static int pool_workers, pool_atfork;

static int claim(const wo_job **j, int64_t *c) {  /* under pool_mu */
    if (!pool_job || pool_next >= pool_count) return 0;
    *j = pool_job;
    *c = pool_next++;
    return 1;
}

static void finish_chunk(const wo_job *j, int64_t c) {
    const int64_t n0 = c * pool_chunk, n1 = n0 + pool_chunk < j->N ? n0 + pool_chunk : j->N;
    run_range(j, n0, n1);
    pthread_mutex_lock(&pool_mu);
    if (++pool_finished == pool_count) pthread_cond_signal(&pool_done);
    pthread_mutex_unlock(&pool_mu);
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        const wo_job *j;
        int64_t c;
        pthread_mutex_lock(&pool_mu);
        while (!claim(&j, &c)) pthread_cond_wait(&pool_work, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
        finish_chunk(j, c);
    }
    return NULL;
}

static void pool_after_fork(void) {  /* a forked child has no workers and fresh locks */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&pool_work, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_job = NULL;
    pool_workers = 0;
}

static void run_pooled(const wo_job *j, int nthreads) {
    pthread_mutex_lock(&call_mu);  /* one call at a time uses the pool */
    if (!pool_atfork) pool_atfork = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool_workers < nthreads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    const int64_t per = (j->N + 4 * nthreads - 1) / (4 * nthreads);  /* 4 chunks a thread */
    pthread_mutex_lock(&pool_mu);
    pool_chunk = (per + RMAX - 1) / RMAX * RMAX;
    pool_count = (j->N + pool_chunk - 1) / pool_chunk;
    pool_next = pool_finished = 0;
    pool_job = j;
    pthread_cond_broadcast(&pool_work);
    const wo_job *jj;
    int64_t c;
    while (claim(&jj, &c)) {
        pthread_mutex_unlock(&pool_mu);
        finish_chunk(jj, c);
        pthread_mutex_lock(&pool_mu);
    }
    while (pool_finished < pool_count) pthread_cond_wait(&pool_done, &pool_mu);
    pool_job = NULL;
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&call_mu);
}

static int run(wo_job base, int nthreads) {
    float xsum[WO_MAX_ROWS];
    if (base.fix) {
        for (int64_t m = 0; m < base.M; m++) {
            double s = 0;
            for (int64_t k = 0; k < base.K; k++) s += base.x[m * base.K + k];
            xsum[m] = (float)s;
        }
        base.xsum = xsum;
    }
    uint16_t *xb = NULL;
    float *xg = NULL;
    if (base.kind == 2 && prep_bf16(&base, &xb, &xg) != 0) {
        free(xb);
        free(xg);
        return -2;
    }
    if (nthreads > WO_MAX_THREADS) nthreads = WO_MAX_THREADS;
    if (nthreads <= 1 || base.N < 64 * nthreads) run_range(&base, 0, base.N);  /* small layers: the caller only */
    else run_pooled(&base, nthreads);
    free(xb);
    free(xg);
    return 0;
}

/* All return 0 on success, -1 on arguments the kernel does not take (the caller falls back), -2 out of memory. */
int qc_wo_int8_linear(const float *x, const int8_t *w, const float *scale, const float *fix, const float *bias,
                      float *y, int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    if (M < 1 || M > WO_MAX_ROWS || N < 1 || K < 16 || K % 16 || isa < 0 || isa > qc_wo_isa()) return -1;
    wo_job j = {.kind = 0, .isa = isa, .x = x, .scale = scale, .fix = fix, .bias = bias, .w = w, .y = y,
                .M = M, .N = N, .K = K};
    return run(j, nthreads);
}

static const float IOTA16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* int4: w = (base[code] - z) * s, base = 0..15 when NULL (uniform int4) or a 16-entry table (NF4, z = 0) */
int qc_wo_int4_linear(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero, float zconst,
                      const float *base, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t g, int isa,
                      int nthreads) {
    if (M < 1 || M > WO_MAX_ROWS || N < 1 || g < 16 || g % 16 || K % g || isa < 0 || isa > qc_wo_isa()) return -1;
    wo_job j = {.kind = 1, .isa = isa, .x = x, .scale = scale, .bias = bias, .w = packed, .zero = zero,
                .zconst = zconst, .base = base ? base : IOTA16, .y = y, .M = M, .N = N, .K = K, .g = g};
    return run(j, nthreads);
}

/* 1 when this CPU runs the bf16-activation int4 body (AVX-512 with BF16) */
int qc_wo_bf16_available(void) {
    __builtin_cpu_init();
    return qc_wo_isa() == 2 && __builtin_cpu_supports("avx512bf16");
}

/* int4, uniform codes (w = (c - z) * s), bf16 activations: g % 128 == 0; -1 where it cannot run */
int qc_wo_int4_linear_bf16(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                           float zconst, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t g,
                           int nthreads) {
    if (M < 1 || M > WO_MAX_ROWS || N < 1 || g < 128 || g % 128 || K % g || !qc_wo_bf16_available()) return -1;
    wo_job j = {.kind = 2, .isa = 2, .x = x, .scale = scale, .bias = bias, .w = packed, .zero = zero,
                .zconst = zconst, .base = IOTA16, .y = y, .M = M, .N = N, .K = K, .g = g};
    return run(j, nthreads);
}

/* NF4's double-quantized scales: out[i] = (float)codes[i] * scale[i / block] + offset[i / block], the
 * reference's two roundings (this function has no FMA target, so no contraction), on the calling thread:
 * three torch elementwise ops did it before, each an OpenMP region that stalls on a loaded machine. */
void qc_wo_dequantize_scales(const uint8_t *codes, const float *scale, const float *offset, float *out, int64_t n,
                             int64_t block) {
    for (int64_t i = 0; i < n; i++) {
        const float prod = (float)codes[i] * scale[i / block];
        out[i] = prod + offset[i / block];
    }
}
