/* Weight-only int8 / int4 linear for x86 CPUs at batch 1..16: y[M,N] = x[M,K] . W^T (+ bias), the weight
 * decoded in registers (never an fp32 weight in memory). Two bodies: fp32 x and fp32 accumulate (below; the
 * reference's numbers to fp32 rounding), and x as int16 per 128-block with exact int32 sums (the fast one,
 * "int16 activations" further down).
 *
 * int8, one scale per output channel: codes int8 [N, K] (K % 16 == 0), scale fp32 [N], optional affine fix-up
 *   fix[n] = scale[n] * zero[n]:  y[m,n] = scale[n] * sum_k q[n,k] x[m,k] - fix[n] * sum_k x[m,k] + bias[n].
 * int4, one scale (and zero point) per group of g along K (g % 16 == 0, K % g == 0): codes c = q - quant_min in
 *   [0, 15], packed per 128-element block as 16 little-endian dwords, nibble i of dword d = element 16 i + d
 *   (see i4_row_bytes) -- one shift gives a 16-lane index vector, no shuffles. For each group a 16-entry
 *   table (c - z) * s is built once (z = zero[n, j] - quant_min as uint8 [N, K/g], or one constant when
 *   symmetric) and the codes index it (vpermps; AVX2: two vpermps + a blend), so a decoded weight is exactly
 *   the reference's fp32 value (q - z) * s.
 *
 * Loop order (fp32 bodies; the int16 ones take R = 1 on the plain layout, see I16_TABLES, and tiles of 4 int4 /
 * 2 int8 rows on the interleaved ones, I4_TILED / I8_TILED): blocks of R output channels (R rows of
 * W streamed side by side, each x vector loaded once per
 * block); rows of x in register tiles of MT <= 4 over the block, so the block's weights come from DRAM once
 * per call and from L1/L2 for the other tiles. Threads (OpenMP, torch's team) split N in
 * chunks of blocks. Built at install time into qcompile._nf4 (setup.py), called through ctypes (kernels.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>  /* fabsf: a builtin, no libm */
#include <immintrin.h>

#define WO_MAX_ROWS 16
#define WO_MAX_THREADS 64
#define RMAX 4
/* The weight streams are prefetched non-temporally: a batch-1 GEMV reads each weight once per call, and a
 * streamed 16 MiB weight fetched into every cache level evicts what the Python around the call needs next
 * (the interpreter, the graph module, torch's dispatcher). Measured on the Zen 4, 4 x Linear(4096) int8 batch
 * 1: the time outside the C calls fell from 0.45 to 0.17 ms per forward (of ~2.1 ms), and 12 x Linear(1024)
 * (12 MB of weights, cache-resident between calls) ran no slower. */
#ifndef WO_HINT
#define WO_HINT _MM_HINT_NTA
#endif
/* Bytes ahead of the row's stream that the int16 bodies prefetch (-D overrides them for tuning builds). 2 KiB:
 * on 4 x Linear(4096) batch 1, six interleaved runs, int4 +2 % and int8 +4 % over 1 KiB (4 KiB: no better). */
#ifndef WO_I4_AHEAD
#define WO_I4_AHEAD 2048
#endif
#ifndef WO_I8_AHEAD
#define WO_I8_AHEAD 2048
#endif

typedef struct wo_job {
    int kind, isa;           /* kind 0 int8, 1 int4 (fp32 x), 3 int8, 4 int4 (int16 x);
                                isa 3 AVX-512 VNNI (int16 bodies), 2 AVX-512, 1 AVX2+FMA, 0 scalar */
    const float *x, *scale, *fix, *bias, *xsum;
    const void *w;
    const uint8_t *zero;     /* int4: [N, K/g] or NULL (then zconst) */
    float zconst;
    const float *base;       /* int4: the 16 code values before (v - z) * s: 0..15, or e.g. the NF4 table */
    const int16_t *xq;       /* int16 bodies: x per 128-block as int16 (int8: [M, K]; int4: see prep_i16), */
    const float *xs;         /* the blocks' scales [M, K/128] */
    const float *xg;         /* and (int4) the groups' sums of dequantized x [M, K/g] */
    float *y;
    int64_t M, N, K, g;
    int64_t G;               /* int4: groups per row, K / g (set once in run: no division per group) */
    int64_t il;              /* int4, int16 bodies: rows interleaved per 64-byte block (1, or 4: see i4_rows) */
} wo_job;

/* out: [R][WO_MAX_ROWS] partial results for rows n..n+R-1 and the MT rows of x starting at row m0 (an index, not
 * a pointer: the bodies would divide by K per call to recover it) */
typedef void (*blk_fn)(const wo_job *, int64_t n, int64_t m0, float *out);

int qc_wo_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

int qc_wo_max_rows(void) { return WO_MAX_ROWS; }

/* 1 when the AVX-512 int16-activation bodies have vpdpwssd (AVX-512 VNNI) */
int qc_wo_vnni(void) {
    __builtin_cpu_init();
    return qc_wo_isa() == 2 && __builtin_cpu_supports("avx512vnni");
}

/* int4 rows: blocks of 128 elements in 64 bytes (16 little-endian dwords), nibble i (bits 4i..4i+3) of
 * dword d = element 16 i + d of the block; the last block of a row is zero-padded when K % 128 != 0 */
static inline int64_t i4_row_bytes(int64_t K) { return (K + 127) / 128 * 64; }

/* The int16 int4 bodies read the codes with rows interleaved by il (1 or 4) per 64-byte block: row n's block b
 * is at w + (n - n % il) RB + (n % il + b il) 64, so a tile of 4 rows is one sequential stream that shares each
 * activation load over 4 rows (pack_int4_blocks(..., interleave=4)). Measured on the Zen 4, 4 x Linear(4096)
 * int4 g128 batch 1, C calls back to back: 26-28 -> 31-35 GB/s on 2 threads, 16-17 -> 18-22 on one; 4 rows
 * side by side in the plain layout, 4 streams, ran at 18 (R = 1 is what the plain layout gets). */
static inline const uint8_t *i4_rows(const wo_job *j, int64_t n, int64_t RB) {
    return (const uint8_t *)j->w + (n - n % j->il) * RB + (n % j->il) * 64;
}

/* int8 codes for the int16 body, rows interleaved by il (1 or 2) per 128-byte block the same way: row n's block b
 * at w + (n - n % il) K + (n % il + b il) 128 (pack_int8_rows). 2 rows a tile, one stream, each x load shared:
 * 4 x Linear(4096) batch 1, 2 threads, C calls back to back: +4-18 % over one row at a time in five runs. */
static inline const int8_t *i8_rows(const wo_job *j, int64_t n) {
    return (const int8_t *)j->w + (n - n % j->il) * j->K + (n % j->il) * 128;
}

static inline float zero_of(const wo_job *j, int64_t n, int64_t grp) {
    return j->zero ? (float)j->zero[n * j->G + grp] : j->zconst;
}

/* ---- scalar: one channel, all rows of x ----------------------------------------------------------- */
static void i8_scalar(const wo_job *j, int64_t n, int64_t m0, float *out) {
    const float *x = j->x + m0 * j->K;
    const int8_t *w = (const int8_t *)j->w + n * j->K;
    for (int64_t m = 0; m < j->M; m++) {
        float s = 0.f;
        for (int64_t k = 0; k < j->K; k++) s += (float)w[k] * x[m * j->K + k];
        out[m] = s;
    }
}

static void i4_scalar(const wo_job *j, int64_t n, int64_t m0, float *out) {
    const float *x = j->x + m0 * j->K;
    const int64_t K = j->K, G = j->G;
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
static void i8_512_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const float *x = j->x + m0 * j->K;                                                                     \
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
static void i4_512_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const float *x = j->x + m0 * j->K;                                                                     \
    enum { RR = R, MM = MT };  /* for the slot macros */                                                    \
    const int64_t K = j->K, G = j->G, RB = i4_row_bytes(K), per = j->g / 16;                               \
    const uint8_t *p = (const uint8_t *)j->w + n * RB;                                                     \
    const __m512 iota = _mm512_loadu_ps(j->base);                                                         \
    const __m512 iotaz = _mm512_sub_ps(iota, _mm512_set1_ps(j->zconst));  /* symmetric: one mul a group */ \
    __m512 s[R][MT], t[R];                                                                                 \
    int64_t left = 0, grp = 0, e = 0;                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) s[r][m] = _mm512_setzero_ps();               \
    for (; e + 128 <= K; e += 128) {                                                                       \
        __m512i v[R];                                                                                      \
        for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void *)(p + r * RB + e / 2));         \
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(p + (R + r) * RB + e / 2), WO_HINT);       \
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

/* ---- AVX2 + FMA ------------------------------------------------------------------------------------- */
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#define I8_256(R, MT)                                                                                      \
__attribute__((target("avx2,fma")))                                                                        \
static void i8_256_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const float *x = j->x + m0 * j->K;                                                                     \
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
static void i4_256_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const float *x = j->x + m0 * j->K;                                                                     \
    enum { RR = R, MM = MT };  /* for the slot macros */                                                    \
    const int64_t K = j->K, G = j->G, RB = i4_row_bytes(K), per = j->g / 16;                               \
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

/* ---- int16 activations (int8 per channel, K % 128 == 0; int4 uniform, g % 128 == 0) ---------------------
 * x is quantized per 128-element block to int16 (scale = max |x| / 32767, round to nearest even: relative
 * error <= 2^-16 of the block's largest |x|, finer than bf16's 2^-9) once per call; the weight codes are
 * widened to int16 and multiplied with vpdpwssd (AVX-512 VNNI; vpmaddwd + vpaddd without it), exact int32
 * sums per block, then one fp32 multiply-add by the block's scale. Per 64 bytes of int8 weight that is 2
 * widenings + 2 multiply-adds, against 4 widenings + 4 conversions + 4 FMAs in the fp32 body: the body stops
 * being the limit and the GEMV runs at the memory's speed. int4: the 4 nibbles of each 16-bit word are
 * shifted / masked out (word 2d holds elements 16 i + d, word 2d + 1 elements 16 i + 64 + d: x is stored in
 * that order), y = sum_groups s (sum c x - z sum x), the zero-point term from x's group sums. */
#define DPW_VNNI(a, w, x) _mm512_dpwssd_epi32(a, w, x)
#define DPW_BW(a, w, x) _mm512_add_epi32(a, _mm512_madd_epi16(w, x))

#define I8W_512(NAME, TGT, DP, R, MT)                                                                      \
__attribute__((target(TGT)))                                                                               \
static void NAME##_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const int64_t K = j->K, nb = K / 128, bs = 128 * j->il;                                                \
    const int8_t *w[R];                                                                                    \
    for (int r = 0; r < R; r++) w[r] = i8_rows(j, n + r);                                                  \
    __m512 f[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) f[r][m] = _mm512_setzero_ps();               \
    for (int64_t b = 0; b < nb; b++) {                                                                     \
        __m512i a[R][MT];                                                                                  \
        for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) a[r][m] = _mm512_setzero_si512();         \
        for (int r = 0; r < R; r++) for (int c = 0; c < 128; c += 64) /* prefetching: +5-13 % measured */  \
            _mm_prefetch((const char *)(w[r] + b * bs + c + WO_I8_AHEAD), WO_HINT);                        \
        for (int i = 0; i < 4; i++) {                                                                      \
            __m512i wv[R];                                                                                 \
            for (int r = 0; r < R; r++)                                                                    \
                wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w[r] + b * bs + 32 * i)));     \
            for (int m = 0; m < MT; m++) {                                                                 \
                const __m512i xv = _mm512_loadu_si512((const void *)(j->xq + (m0 + m) * K + b * 128 + 32 * i)); \
                for (int r = 0; r < R; r++) a[r][m] = DP(a[r][m], wv[r], xv);                              \
            }                                                                                              \
        }                                                                                                  \
        for (int m = 0; m < MT; m++) {                                                                     \
            const __m512 sx = _mm512_set1_ps(j->xs[(m0 + m) * nb + b]);                                    \
            for (int r = 0; r < R; r++) f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][m]), sx, f[r][m]); \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = _mm512_reduce_add_ps(f[r][m]); \
}

/* the zero-point term of int4 row c, x row m: sum over groups of s z (sum of the group's dequantized x); four
 * partial sums in registers, so the per-row epilogue is not one chain of G dependent adds (an array of four
 * partial sums went through the stack: -5 % of the int4 GEMV's time with it gone, K = 4096, g = 128) */
static inline float i4_zero_term(const wo_job *j, int64_t c, int64_t m) {
    const int64_t G = j->G;
    const float *s = j->scale + c * G, *xg = j->xg + m * G;
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
    int64_t grp = 0;
    if (j->zero) {
        const uint8_t *z = j->zero + c * G;
        for (; grp + 4 <= G; grp += 4) {
            t0 += s[grp] * (float)z[grp] * xg[grp];
            t1 += s[grp + 1] * (float)z[grp + 1] * xg[grp + 1];
            t2 += s[grp + 2] * (float)z[grp + 2] * xg[grp + 2];
            t3 += s[grp + 3] * (float)z[grp + 3] * xg[grp + 3];
        }
        for (; grp < G; grp++) t0 += s[grp] * (float)z[grp] * xg[grp];
        return (t0 + t1) + (t2 + t3);
    }
    for (; grp + 4 <= G; grp += 4) {
        t0 += s[grp] * xg[grp];
        t1 += s[grp + 1] * xg[grp + 1];
        t2 += s[grp + 2] * xg[grp + 2];
        t3 += s[grp + 3] * xg[grp + 3];
    }
    for (; grp < G; grp++) t0 += s[grp] * xg[grp];
    return ((t0 + t1) + (t2 + t3)) * j->zconst;
}

#define I4W_512(NAME, TGT, DP, R, MT)                                                                      \
__attribute__((target(TGT)))                                                                               \
static void NAME##_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                        \
    const int64_t K = j->K, G = j->G, RB = i4_row_bytes(K), nb = K / 128, per = j->g / 128, bs = 64 * j->il; \
    const uint8_t *p[R];                                                                                   \
    for (int r = 0; r < R; r++) p[r] = i4_rows(j, n + r, RB);                                              \
    const __m512i m0f = _mm512_set1_epi16(0x000F);                                                         \
    __m512 f[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) f[r][m] = _mm512_setzero_ps();               \
    int64_t grp = 0, left = per;                                                                           \
    for (int64_t b = 0; b < nb; b++) {                                                                     \
        __m512i v[R], a[R][MT];                                                                            \
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(p[r] + b * bs + WO_I4_AHEAD), WO_HINT);      \
        for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void *)(p[r] + b * bs));               \
        for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) a[r][m] = _mm512_setzero_si512();         \
        for (int i = 0; i < 4; i++) {                                                                      \
            __m512i wv[R];                                                                                 \
            for (int r = 0; r < R; r++)                                                                    \
                wv[r] = i == 3 ? _mm512_srli_epi16(v[r], 12) : _mm512_and_si512(_mm512_srli_epi16(v[r], 4 * i), m0f); \
            for (int m = 0; m < MT; m++) {                                                                 \
                const __m512i xv = _mm512_loadu_si512((const void *)(j->xq + ((m0 + m) * nb + b) * 128 + 32 * i)); \
                for (int r = 0; r < R; r++) a[r][m] = DP(a[r][m], wv[r], xv);                              \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < R; r++) {                                                                      \
            const float sw = j->scale[(n + r) * G + grp];                                                  \
            for (int m = 0; m < MT; m++)                                                                   \
                f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][m]), _mm512_set1_ps(sw * j->xs[(m0 + m) * nb + b]), f[r][m]); \
        }                                                                                                  \
        if (--left == 0) { grp++; left = per; }                                                            \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++)                                               \
        out[r * WO_MAX_ROWS + m] = _mm512_reduce_add_ps(f[r][m]) - i4_zero_term(j, n + r, m0 + m);         \
}

/* AVX2: the same sums over 16-word halves (the 32-word vector's order: one x layout for both) */
#define I8W_256(R, MT)                                                                                     \
__attribute__((target("avx2,fma")))                                                                        \
static void i8w_256_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                       \
    const int64_t K = j->K, nb = K / 128, bs = 128 * j->il;                                                \
    const int8_t *w[R];                                                                                    \
    for (int r = 0; r < R; r++) w[r] = i8_rows(j, n + r);                                                  \
    __m256 f[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) f[r][m] = _mm256_setzero_ps();               \
    for (int64_t b = 0; b < nb; b++) {                                                                     \
        __m256i a[R][MT];                                                                                  \
        for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) a[r][m] = _mm256_setzero_si256();         \
        for (int i = 0; i < 8; i++) {                                                                      \
            __m256i wv[R];                                                                                 \
            for (int r = 0; r < R; r++)                                                                    \
                wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[r] + b * bs + 16 * i)));      \
            for (int m = 0; m < MT; m++) {                                                                 \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(j->xq + (m0 + m) * K + b * 128 + 16 * i)); \
                for (int r = 0; r < R; r++) a[r][m] = _mm256_add_epi32(a[r][m], _mm256_madd_epi16(wv[r], xv)); \
            }                                                                                              \
        }                                                                                                  \
        for (int m = 0; m < MT; m++) {                                                                     \
            const __m256 sx = _mm256_set1_ps(j->xs[(m0 + m) * nb + b]);                                    \
            for (int r = 0; r < R; r++) f[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][m]), sx, f[r][m]); \
        }                                                                                                  \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) out[r * WO_MAX_ROWS + m] = hsum256(f[r][m]);  \
}

#define I4W_256(R, MT)                                                                                     \
__attribute__((target("avx2,fma")))                                                                        \
static void i4w_256_##R##_##MT(const wo_job *j, int64_t n, int64_t m0, float *out) {                       \
    const int64_t K = j->K, G = j->G, RB = i4_row_bytes(K), nb = K / 128, per = j->g / 128, bs = 64 * j->il; \
    const uint8_t *p[R];                                                                                   \
    for (int r = 0; r < R; r++) p[r] = i4_rows(j, n + r, RB);                                              \
    const __m256i m0f = _mm256_set1_epi16(0x000F);                                                         \
    __m256 f[R][MT];                                                                                       \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) f[r][m] = _mm256_setzero_ps();               \
    int64_t grp = 0, left = per;                                                                           \
    for (int64_t b = 0; b < nb; b++) {                                                                     \
        __m256i a[R][MT];                                                                                  \
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(p[r] + b * bs + WO_I4_AHEAD), WO_HINT);      \
        for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++) a[r][m] = _mm256_setzero_si256();         \
        for (int h = 0; h < 2; h++) {                                                                      \
            __m256i v[R];                                                                                  \
            for (int r = 0; r < R; r++) v[r] = _mm256_loadu_si256((const __m256i *)(p[r] + b * bs + 32 * h));   \
            for (int i = 0; i < 4; i++) {                                                                  \
                __m256i wv[R];                                                                             \
                for (int r = 0; r < R; r++)                                                                \
                    wv[r] = i == 3 ? _mm256_srli_epi16(v[r], 12) : _mm256_and_si256(_mm256_srli_epi16(v[r], 4 * i), m0f); \
                for (int m = 0; m < MT; m++) {                                                             \
                    const __m256i xv = _mm256_loadu_si256(                                                 \
                        (const __m256i *)(j->xq + ((m0 + m) * nb + b) * 128 + 32 * i + 16 * h));           \
                    for (int r = 0; r < R; r++) a[r][m] = _mm256_add_epi32(a[r][m], _mm256_madd_epi16(wv[r], xv)); \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < R; r++) {                                                                      \
            const float sw = j->scale[(n + r) * G + grp];                                                  \
            for (int m = 0; m < MT; m++)                                                                   \
                f[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][m]), _mm256_set1_ps(sw * j->xs[(m0 + m) * nb + b]), f[r][m]); \
        }                                                                                                  \
        if (--left == 0) { grp++; left = per; }                                                            \
    }                                                                                                      \
    for (int r = 0; r < R; r++) for (int m = 0; m < MT; m++)                                               \
        out[r * WO_MAX_ROWS + m] = hsum256(f[r][m]) - i4_zero_term(j, n + r, m0 + m);                      \
}

/* scalar: the same integer sums, one channel, all rows of x */
static void i8w_scalar(const wo_job *j, int64_t n, int64_t m0, float *out) {
    const float *x = j->x + m0 * j->K;
    (void)x;
    const int64_t K = j->K, nb = K / 128, bs = 128 * j->il;
    const int8_t *w = i8_rows(j, n);
    for (int64_t m = 0; m < j->M; m++) {
        float t = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t a = 0;
            for (int k = 0; k < 128; k++) a += (int32_t)w[b * bs + k] * j->xq[m * K + b * 128 + k];
            t += (float)a * j->xs[m * nb + b];
        }
        out[m] = t;
    }
}

static void i4w_scalar(const wo_job *j, int64_t n, int64_t m0, float *out) {
    const float *x = j->x + m0 * j->K;
    (void)x;
    const int64_t K = j->K, G = j->G, nb = K / 128, per = j->g / 128, bs = 64 * j->il;
    const uint8_t *p = i4_rows(j, n, i4_row_bytes(K));
    for (int64_t m = 0; m < j->M; m++) {
        float t = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t a = 0;
            for (int e = 0; e < 128; e++) {  /* element e: nibble e / 16 of dword e % 16 */
                uint32_t word;
                memcpy(&word, p + b * bs + 4 * (e % 16), 4);
                const int i = e / 16, d = e % 16;  /* its int16 x: word 2d (i < 4) or 2d + 1 of slot i % 4 */
                a += (int32_t)((word >> (4 * i)) & 15) * j->xq[(m * nb + b) * 128 + 32 * (i % 4) + 2 * d + i / 4];
            }
            t += (float)a * (j->scale[n * G + b / per] * j->xs[m * nb + b]);
        }
        out[m] = t - i4_zero_term(j, n, m);
    }
}

/* x [M, K] -> int16 per 128-block (int4: [M][K/128][4][16][2], elements 16 i + d and
 * 16 i + 64 + d of a block side by side), the blocks' scales, and for int4 the
 * groups' sums of dequantized x [M, K/g]. Returns -1 when out of memory. */
static int prep_i16(wo_job *j, int16_t **xq, float **xs, float **xg) {
    const int64_t M = j->M, K = j->K, nb = K / 128, G = j->kind == 4 ? K / j->g : 0;
    *xq = (int16_t *)malloc(sizeof(int16_t) * M * K);
    *xs = (float *)malloc(sizeof(float) * M * nb);
    *xg = G ? (float *)calloc(M * G, sizeof(float)) : NULL;
    if (!*xq || !*xs || (G && !*xg)) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = j->x + m * K + b * 128;
            float amax = 0.f;
            for (int k = 0; k < 128; k++) amax = fabsf(xb[k]) > amax ? fabsf(xb[k]) : amax;
            const float s = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
            int64_t sum = 0;
            for (int k = 0; k < 128; k++) {
                const int16_t q = (int16_t)((xb[k] * inv + 12582912.f) - 12582912.f);  /* |v| <= 32767: RNE */
                const int64_t o = j->kind == 4 ? (m * nb + b) * 128 + 32 * ((k % 64) / 16) + 2 * (k % 16) + k / 64
                                               : m * K + b * 128 + k;
                (*xq)[o] = q;
                sum += q;
            }
            (*xs)[m * nb + b] = s;
            if (G) (*xg)[m * G + b * 128 / j->g] += (float)sum * s;
        }
    j->xq = *xq;
    j->xs = *xs;
    j->xg = *xg;
    return 0;
}

I8_512(4, 1) I8_512(4, 2) I8_512(4, 4) I8_512(1, 1) I8_512(1, 2) I8_512(1, 4)
I4_512(4, 1) I4_512(4, 2) I4_512(4, 4) I4_512(1, 1) I4_512(1, 2) I4_512(1, 4)
I8_256(4, 1) I8_256(4, 2) I8_256(1, 1) I8_256(1, 2)
I4_256(2, 1) I4_256(2, 2) I4_256(1, 1) I4_256(1, 2)
#define I16_512(NAME, TGT, DP) I8W_512(i8w_##NAME, TGT, DP, 1, 1) I8W_512(i8w_##NAME, TGT, DP, 1, 2) \
    I8W_512(i8w_##NAME, TGT, DP, 1, 4) I4W_512(i4w_##NAME, TGT, DP, 1, 1) I4W_512(i4w_##NAME, TGT, DP, 1, 2)  \
    I4W_512(i4w_##NAME, TGT, DP, 1, 4)
I16_512(vnni, "avx512f,avx512bw,avx512vnni", DPW_VNNI)
I16_512(bw, "avx512f,avx512bw", DPW_BW)
I4W_512(i4w_vnni, "avx512f,avx512bw,avx512vnni", DPW_VNNI, 4, 1) I4W_512(i4w_vnni, "avx512f,avx512bw,avx512vnni", DPW_VNNI, 4, 2)
I4W_512(i4w_bw, "avx512f,avx512bw", DPW_BW, 4, 1) I4W_512(i4w_bw, "avx512f,avx512bw", DPW_BW, 4, 2)
I8W_512(i8w_vnni, "avx512f,avx512bw,avx512vnni", DPW_VNNI, 2, 1) I8W_512(i8w_vnni, "avx512f,avx512bw,avx512vnni", DPW_VNNI, 2, 2)
I8W_512(i8w_bw, "avx512f,avx512bw", DPW_BW, 2, 1) I8W_512(i8w_bw, "avx512f,avx512bw", DPW_BW, 2, 2)
I8W_256(1, 1) I8W_256(1, 2) I4W_256(1, 1) I4W_256(1, 2)

/* [kind][isa]: block rows R and the kernels for (R, MT = 1, 2, 4) and (1, MT); NULL: tile not built */
typedef struct { int R; blk_fn big[3], one[3]; } isa_table;
/* int16-activation bodies: [int8, int4][isa], and the AVX-512 ones with VNNI (vpdpwssd). One output channel
 * at a time (R = 1): consecutive rows are contiguous, so each thread reads one sequential stream, which the
 * hardware prefetchers follow across rows; R = 4 rows side by side are 4 streams of one 4 KiB page each (an
 * int8 row of K = 4096), restarted at every row -- measured on the Zen 4, 4 x Linear(4096) int8, 2 threads:
 * 27-29 GB/s with R = 4, 30-40 with R = 1, interleaved runs. The fp32 bodies keep R = 4: they are bound by
 * their arithmetic, and sharing each x load over 4 rows is worth more to them (int4: 19-23 vs 12-15 GB/s). */
static const isa_table I16_TABLES[2][3] = {
    {{1, {i8w_scalar, NULL, NULL}, {i8w_scalar, NULL, NULL}},
     {1, {i8w_256_1_1, i8w_256_1_2, NULL}, {i8w_256_1_1, i8w_256_1_2, NULL}},
     {1, {i8w_bw_1_1, i8w_bw_1_2, i8w_bw_1_4}, {i8w_bw_1_1, i8w_bw_1_2, i8w_bw_1_4}}},
    {{1, {i4w_scalar, NULL, NULL}, {i4w_scalar, NULL, NULL}},
     {1, {i4w_256_1_1, i4w_256_1_2, NULL}, {i4w_256_1_1, i4w_256_1_2, NULL}},
     {1, {i4w_bw_1_1, i4w_bw_1_2, i4w_bw_1_4}, {i4w_bw_1_1, i4w_bw_1_2, i4w_bw_1_4}}},
};
static const isa_table I16_VNNI[2] = {
    {1, {i8w_vnni_1_1, i8w_vnni_1_2, i8w_vnni_1_4}, {i8w_vnni_1_1, i8w_vnni_1_2, i8w_vnni_1_4}},
    {1, {i4w_vnni_1_1, i4w_vnni_1_2, i4w_vnni_1_4}, {i4w_vnni_1_1, i4w_vnni_1_2, i4w_vnni_1_4}},
};
/* int4 with rows interleaved by 4: tiles of 4 rows on AVX-512 (one stream, each x load shared over 4 rows); the
 * AVX2 and scalar bodies take one row at a time (its tile's other rows are in L1 when they come) */
static const isa_table I4_TILED[2] = {
    {4, {i4w_bw_4_1, i4w_bw_4_2, NULL}, {i4w_bw_1_1, i4w_bw_1_2, i4w_bw_1_4}},
    {4, {i4w_vnni_4_1, i4w_vnni_4_2, NULL}, {i4w_vnni_1_1, i4w_vnni_1_2, i4w_vnni_1_4}},
};
/* int8 with rows interleaved by 2: tiles of 2 rows on AVX-512, one row at a time elsewhere */
static const isa_table I8_TILED[2] = {
    {2, {i8w_bw_2_1, i8w_bw_2_2, NULL}, {i8w_bw_1_1, i8w_bw_1_2, i8w_bw_1_4}},
    {2, {i8w_vnni_2_1, i8w_vnni_2_2, NULL}, {i8w_vnni_1_1, i8w_vnni_1_2, i8w_vnni_1_4}},
};
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
        fns[0](j, n, 0, acc);
    } else {
        for (int64_t m = 0; m < j->M;) {
            int t = (j->M - m >= 4 && fns[2]) ? 2 : (j->M - m >= 2 && fns[1]) ? 1 : 0;
            fns[t](j, n, m, acc + m);
            m += 1 << t;
        }
    }
    for (int r = 0; r < R; r++) {
        const int64_t c = n + r;
        for (int64_t m = 0; m < j->M; m++) {
            float v = acc[r * WO_MAX_ROWS + m];
            if (j->kind == 0 || j->kind == 3) v = v * j->scale[c] - (j->fix ? j->fix[c] * j->xsum[m] : 0.f);
            j->y[m * j->N + c] = v + (j->bias ? j->bias[c] : 0.f);
        }
    }
}

static void run_range(const wo_job *j, int64_t n0, int64_t n1) {
    const isa_table *tb = j->kind < 2 ? &TABLES[j->kind][j->isa]
                        : j->kind == 4 && j->il == 4 && j->isa >= 2 ? &I4_TILED[j->isa - 2]
                        : j->kind == 3 && j->il == 2 && j->isa >= 2 ? &I8_TILED[j->isa - 2]
                        : j->isa == 3 ? &I16_VNNI[j->kind - 3] : &I16_TABLES[j->kind - 3][j->isa];
    int64_t n = n0;
    for (; n + tb->R <= n1; n += tb->R) run_block(j, tb->big, tb->R, n);
    for (; n < n1; n++) run_block(j, tb->one, 1, n);
}

/* ---- threads ------------------------------------------------------------------------------------------
 * OpenMP, built with -fopenmp against the soname libgomp.so.1: loaded after torch, it resolves to the
 * libgomp torch already loaded, so the kernel's threads are torch's own OpenMP team -- no second set of
 * threads competing for the cores with torch's workers, which keep spinning for a while after each torch
 * op. (A pthread pool of its own, tried before, reached 9-12 GB/s on 4 x Linear(4096) int8 where this
 * reaches 15-17 on the same run, 2 cores.) Chunks of N are claimed dynamically, 4 a thread, so a core
 * another process holds does not stall the call for long. Built without OpenMP: one thread. */
static void run_parallel(const wo_job *j, int nthreads) {
    const int64_t per = (j->N + 4 * nthreads - 1) / (4 * nthreads);
    const int64_t chunk = (per + RMAX - 1) / RMAX * RMAX, count = (j->N + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t c = 0; c < count; c++) run_range(j, c * chunk, c * chunk + chunk < j->N ? c * chunk + chunk : j->N);
}

static int run(wo_job base, int nthreads) {
    base.G = base.g ? base.K / base.g : 0;
    if (base.il < 1) base.il = 1;
    float xsum[WO_MAX_ROWS];
    if (base.fix) {
        for (int64_t m = 0; m < base.M; m++) {
            double s = 0;
            for (int64_t k = 0; k < base.K; k++) s += base.x[m * base.K + k];
            xsum[m] = (float)s;
        }
        base.xsum = xsum;
    }
    int16_t *xq = NULL;
    float *xg = NULL, *xs = NULL;
    if (base.kind >= 3 && prep_i16(&base, &xq, &xs, &xg) != 0) {
        free(xq);
        free(xs);
        free(xg);
        return -2;
    }
    if (nthreads > WO_MAX_THREADS) nthreads = WO_MAX_THREADS;
    if (nthreads <= 1 || base.N < 64 * nthreads) run_range(&base, 0, base.N);  /* small layers: the caller only */
    else run_parallel(&base, nthreads);
    free(xq);
    free(xs);
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

/* int16 activations (x quantized per 128-block, see prep_i16): int8 per channel (K % 128 == 0), and int4
 * uniform codes (g % 128 == 0); isa 3 is AVX-512 with VNNI (vpdpwssd), 2 AVX-512 without (vpmaddwd); -1
 * where they cannot run (the caller takes the fp32 body) */
static int i16_isa_ok(int isa) { return isa >= 0 && isa <= (qc_wo_vnni() ? 3 : qc_wo_isa()); }

/* il: the codes' rows interleaved by 1 (row-major [N, K]) or 2 (pack_int8_rows, N % 2 == 0) */
int qc_wo_int8_linear_i16_il(const float *x, const int8_t *w, const float *scale, const float *fix, const float *bias,
                             float *y, int64_t M, int64_t N, int64_t K, int64_t il, int isa, int nthreads) {
    if (M < 1 || M > WO_MAX_ROWS || N < 1 || K < 128 || K % 128 || !i16_isa_ok(isa)) return -1;
    if ((il != 1 && il != 2) || N % il) return -1;
    wo_job j = {.kind = 3, .isa = isa, .x = x, .scale = scale, .fix = fix, .bias = bias, .w = w, .y = y,
                .M = M, .N = N, .K = K, .il = il};
    return run(j, nthreads);
}

/* il: the codes' rows interleaved by 1 (pack_int4_blocks) or 4 (pack_int4_blocks(..., interleave=4), N % 4 == 0) */
int qc_wo_int4_linear_i16_il(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                             float zconst, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t g,
                             int64_t il, int isa, int nthreads) {
    if (M < 1 || M > WO_MAX_ROWS || N < 1 || g < 128 || g % 128 || K % g || !i16_isa_ok(isa)) return -1;
    if ((il != 1 && il != 4) || N % il) return -1;
    wo_job j = {.kind = 4, .isa = isa, .x = x, .scale = scale, .bias = bias, .w = packed, .zero = zero,
                .zconst = zconst, .base = IOTA16, .y = y, .M = M, .N = N, .K = K, .g = g, .il = il};
    return run(j, nthreads);
}
