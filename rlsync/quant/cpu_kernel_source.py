"""The C source of `cpu_kernel` (built on first use; see that module for why, how and the proofs of its bits).

Kept apart from the ctypes binding so each file reads on its own: this one is the arithmetic (rows, casts,
the checked copy), `cpu_kernel` is how it is built, called and split over threads.
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the per-channel scale's lower clamp, 1 / (448 * 512), as reference.fp8_per_channel */
static const float min_scale = 1.0f / 229376.0f;

static inline float bf16_f32(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }

#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RLSYNC_AVX512 1  /* 16 fp32 lanes, byte narrowing (vpmovdb) and per-byte masks */
#endif

#ifdef __AVX2__
/* the largest of 16 unsigned 16-bit lanes */
static inline uint16_t max_epu16_16(__m256i v) {
    __m128i x = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_max_epu16(x, _mm_srli_si128(x, 8));
    x = _mm_max_epu16(x, _mm_srli_si128(x, 4));
    x = _mm_max_epu16(x, _mm_srli_si128(x, 2));
    return (uint16_t)_mm_extract_epi16(x, 0);
}

/* 8 rows' scales (amax / 448, clamped below: max(x, min) is the scalar clamp for these finite, non-negative
   values) and their reciprocals, one vector division each: lane for lane the scalar IEEE operations */
static inline void scales8(const float *amax, float *sc, float *rc) {
    __m256 v = _mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(amax), _mm256_set1_ps(448.0f)), _mm256_set1_ps(min_scale));
    _mm256_storeu_ps(sc, v);
    _mm256_storeu_ps(rc, _mm256_div_ps(_mm256_set1_ps(1.0f), v));
}
#endif

/* max |w| of one row as bf16 bits (for finite values the integer order is the float order); with AVX2 16 at a
   time by hand (GCC's loop for an unknown k spends more on its set-up than a 32-element row takes) */
static inline __attribute__((always_inline)) uint16_t row_absmax(const uint16_t *row, int64_t k) {
    uint16_t m = 0;
    int64_t j = 0;
#ifdef __AVX2__
    if (k >= 16) {
        const __m256i nosign = _mm256_set1_epi16(0x7FFF);
        __m256i v = _mm256_setzero_si256();
#ifdef RLSYNC_AVX512
        if (k >= 32) {  /* 32 at a time, folded into the 16-wide maximum */
            const __m512i nosign32 = _mm512_set1_epi16(0x7FFF);
            __m512i w = _mm512_setzero_si512();
            for (; j + 32 <= k; j += 32)
                w = _mm512_max_epu16(w, _mm512_and_si512(_mm512_loadu_si512((const void *)(row + j)), nosign32));
            v = _mm256_max_epu16(_mm512_castsi512_si256(w), _mm512_extracti64x4_epi64(w, 1));
        }
#endif
        for (; j + 16 <= k; j += 16)
            v = _mm256_max_epu16(v, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(row + j)), nosign));
        m = max_epu16_16(v);
    }
#endif
    for (; j < k; j++) { uint16_t a = row[j] & 0x7FFF; m = a > m ? a : m; }
    return m;
}

/* clamp to +-448, then rlsync.quant.e4m3.from_fp32, for finite x; branch-free so the loops vectorize */
static inline uint8_t e4m3_clamped(float x) {
    uint32_t b; memcpy(&b, &x, 4);
    int32_t mag = (int32_t)(b & 0x7FFFFFFFu);
    mag = mag > 0x43E00000 ? 0x43E00000 : mag;              /* |x| > 448 -> 448 (finite x only) */
    float magf; memcpy(&magf, &mag, 4);
    float sf = magf + 16384.0f;                             /* below 2^-6: round into the subnormal steps */
    int32_t sub; memcpy(&sub, &sf, 4);
    sub -= (141 << 23);
    int32_t norm = (mag + (int32_t)(-1006108673) + ((mag >> 20) & 1)) >> 20;
    int32_t code = mag < (121 << 23) ? sub : norm;
    return (uint8_t)((uint32_t)code | ((b >> 24) & 0x80u));
}

#ifdef __AVX2__
#include <immintrin.h>
/* e4m3_clamped of 8 non-negative finite floats given as bits (|x|), codes 0..0x7E in 32-bit lanes: the same
   integer steps, written so that no lane needs masking before the byte packs. */
static inline __m256i e4m3_mag8(__m256i mag) {
    mag = _mm256_min_epi32(mag, _mm256_set1_epi32(0x43E00000));
    __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(16384.0f))),
                                   _mm256_set1_epi32(141 << 23));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
    __m256i norm = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(-1006108673)), odd), 20);
    return _mm256_blendv_epi8(norm, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), mag));
}

/* 32 codes (four vectors of 8, elements a..d in the lane order the unpacks below give) as bytes in element order,
   with the signs (0x80 per byte, same order) or-ed in */
static inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d, __m256i signs) {
    __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    return _mm256_permute4x64_epi64(_mm256_or_si256(p, signs), 0xD8);
}

/* 32 bf16 (two loads of 16) -> |x| as fp32 in four vectors, and the 32 signs as bytes in pack32's order */
#define ROW_FP8_AVX2(OP, PREFETCH)                                                                         \
    const __m256i zero = _mm256_setzero_si256(), nosign = _mm256_set1_epi16(0x7FFF);                       \
    const __m256i sign8 = _mm256_set1_epi8((char)0x80);                                                    \
    for (; j + 32 <= k; j += 32) {                                                                         \
        PREFETCH;                                                                                          \
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(row + j));                                       \
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(row + j + 16));                                  \
        __m256i signs = _mm256_and_si256(_mm256_packus_epi16(_mm256_srli_epi16(v0, 8), _mm256_srli_epi16(v1, 8)), sign8); \
        v0 = _mm256_and_si256(v0, nosign);                                                                 \
        v1 = _mm256_and_si256(v1, nosign);                                                                 \
        __m256i a = e4m3_mag8(_mm256_castps_si256(OP(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0))))); \
        __m256i b = e4m3_mag8(_mm256_castps_si256(OP(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0))))); \
        __m256i c = e4m3_mag8(_mm256_castps_si256(OP(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1))))); \
        __m256i d = e4m3_mag8(_mm256_castps_si256(OP(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1))))); \
        _mm256_storeu_si256((__m256i *)(out + j), pack32(a, b, c, d, signs));                             \
    }
#endif

#ifdef RLSYNC_AVX512
/* e4m3_mag8 on 16 lanes: the same integer steps, the blend by a mask register */
static inline __m512i e4m3_mag16(__m512i mag) {
    mag = _mm512_min_epi32(mag, _mm512_set1_epi32(0x43E00000));
    __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(16384.0f))),
                                   _mm512_set1_epi32(141 << 23));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
    __m512i norm = _mm512_srai_epi32(_mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(-1006108673)), odd), 20);
    return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32(121 << 23), mag), norm, sub);
}

/* |x| / s on 16 lanes without the divider (`vs` = s, `vr` = 1 / s in scope): row_div_r's AVX2 + FMA steps */
#define DIV_S512(x) _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_mul_ps((x), vr), vs, (x)), vr, _mm512_mul_ps((x), vr))

/* OP and the cast on 16 fp32 lanes given as bits */
#define CODES_F32_AVX512(OP, bits) e4m3_mag16(_mm512_castps_si512(OP(_mm512_castsi512_ps(bits))))

/* 32 bf16 |x| (sign cleared, one register) -> 32 codes as bytes in element order. Unpacking with zero words
   gives the fp32 bits (bf16 << 16) of elements 8L..8L+3 (lo) and 8L+4..8L+7 (hi) of each 128-bit lane L;
   packus_epi32 puts each lane's 8 codes back in element order, vpmovwb narrows. Five shuffle-port uops per 32
   elements, against nine for widening each half (vpmovzxwd) and narrowing it (vpmovdb): that port bounded the
   loop (a 32-element row took 1.6-1.8x the time of its bytes in long rows) */
#define CODES32_AVX512(OP, v) \
    _mm512_cvtepi16_epi8(_mm512_packus_epi32(CODES_F32_AVX512(OP, _mm512_unpacklo_epi16(_mm512_setzero_si512(), (v))), \
                                             CODES_F32_AVX512(OP, _mm512_unpackhi_epi16(_mm512_setzero_si512(), (v)))))

/* 32 bf16 per step (codes in element order: CODES32_AVX512, whose shuffles stay within 128-bit lanes); the signs
   are the bf16 sign bits as a 32-bit mask, or-ed into their bytes at the end */
#define ROW_FP8_AVX512(OP, PREFETCH)                                                                       \
    const __m512i nosign512 = _mm512_set1_epi16(0x7FFF);                                                   \
    const __m256i sign8 = _mm256_set1_epi8((char)0x80);                                                    \
    for (; j + 32 <= k; j += 32) {                                                                         \
        PREFETCH;                                                                                          \
        __m512i v = _mm512_loadu_si512((const void *)(row + j));                                           \
        __mmask32 neg = _mm512_movepi16_mask(v);                                                           \
        v = _mm512_and_si512(v, nosign512);                                                                \
        __m256i codes = CODES32_AVX512(OP, v);                                                             \
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_or_si256(codes, _mm256_maskz_mov_epi8(neg, sign8)));          \
    }
#endif

/* Rows: |x| op scale, then the cast, with x's sign (IEEE multiply and divide are sign-symmetric, so this is
   the reference's x op scale, cast). With AVX2, 32 elements per step by hand (GCC's own vectorization of the
   scalar loop spent about twice the instructions on widening, masking and repacking); the tail, and CPUs
   without AVX2, take the scalar loop. */
static inline __attribute__((always_inline)) void row_div_r(const uint16_t *row, uint8_t *out, int64_t k, float s, float r, const uint16_t *next) {
    int64_t j = 0;
    (void)r;
#if defined(RLSYNC_AVX512) && defined(__FMA__)
    /* as the AVX2 + FMA branch below, on 16 lanes */
    const __m512 vs = _mm512_set1_ps(s), vr = _mm512_set1_ps(r);
    ROW_FP8_AVX512(DIV_S512, _mm_prefetch((const char *)(next + j), _MM_HINT_T0))
#elif defined(__AVX2__) && defined(__FMA__)
    /* |x| / s without the divider, which bounds this loop otherwise (one vdivps per 8 elements, ~5 cycles):
       q = |x| * r with r = 1 / s rounded, then one Markstein correction by fused multiply-adds (the residual
       |x| - q s is exact). Equal to IEEE |x| / s for every bf16 x with |x| <= amax and every scale
       rlsync_channel derives from that amax: rlsync_division_mismatches compares all of those pairs
       (scripts/check_e4m3_cast.py --division; a sample in tests/unit/test_quant_cpu_kernel.py). */
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(r);
#define DIV_S(x) _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_mul_ps((x), vr), vs, (x)), vr, _mm256_mul_ps((x), vr))
    ROW_FP8_AVX2(DIV_S, _mm_prefetch((const char *)(next + j), _MM_HINT_T0))
#undef DIV_S
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s);
#define DIV_S(x) _mm256_div_ps((x), vs)
    ROW_FP8_AVX2(DIV_S, _mm_prefetch((const char *)(next + j), _MM_HINT_T0))
#undef DIV_S
#endif
    for (; j < k; j++) out[j] = e4m3_clamped(bf16_f32(row[j]) / s);
}

/* `r`: 1 / s, rounded (computed by the caller, in a vector for 8 rows at a time when rows are short) */
static void row_div(const uint16_t *row, uint8_t *out, int64_t k, float s, const uint16_t *next) {
    row_div_r(row, out, k, s, 1.0f / s, next);
}

/* The proof of row_div: for every amax with bf16 bits in [a0, a1) and every bf16 x with |x| <= amax (both signs),
   row_div's e4m3 codes against IEEE division's, then the same cast. Returns the number of differing (amax, x)
   pairs, the first in bad[0] (amax bits) and bad[1] (x bits); -1 when out of memory. */
int64_t rlsync_division_mismatches(int64_t a0, int64_t a1, int64_t *bad) {
    uint16_t *xs = malloc(65536 * sizeof(uint16_t));
    uint8_t *got = malloc(65536);
    int64_t count = 0;
    if (!xs || !got) { free(xs); free(got); return -1; }
    for (int64_t a = a0; a < a1; a++) {
        float s = bf16_f32((uint16_t)a) / 448.0f;
        s = s < min_scale ? min_scale : s;
        int64_t n = 0;
        for (int64_t m = 0; m <= a; m++) { xs[n++] = (uint16_t)m; xs[n++] = (uint16_t)(m | 0x8000); }
        row_div(xs, got, n, s, xs);
        for (int64_t i = 0; i < n; i++)
            if (got[i] != e4m3_clamped(bf16_f32(xs[i]) / s) && count++ == 0) { bad[0] = a; bad[1] = xs[i]; }
    }
    free(xs); free(got);
    return count;
}

/* The proof of rlsync_channel's rows as a whole (the 32-element register path above included): for every amax
   with bf16 bits in [a0, a1), every bf16 x with |x| <= amax (both signs) in rows of k elements whose first is
   the amax, rlsync_channel's scale and codes against the scalar reference's. Returns the number of differing
   elements (a wrong scale counts its row), the first in bad[0] (amax bits) and bad[1] (x bits); -1 when out of
   memory. */
int rlsync_channel(const uint16_t *w, int64_t r0, int64_t r1, int64_t n, int64_t k, int64_t ws, int64_t wr,
                   uint8_t *q, int64_t qs, int64_t qr, float *scale, int64_t ss, int64_t sr);
int64_t rlsync_row_mismatches(int64_t a0, int64_t a1, int64_t k, int64_t *bad) {
    int64_t per = k - 1, max_rows = (2 * 65536) / per + 2;
    uint16_t *w = malloc(max_rows * k * sizeof(uint16_t));
    uint8_t *q = malloc(max_rows * k);
    float *sc = malloc(max_rows * sizeof(float));
    int64_t count = 0;
    if (!w || !q || !sc || k < 2) { free(w); free(q); free(sc); return -1; }
    for (int64_t a = a0; a < a1; a++) {
        int64_t rows = 0, j = per;
        for (int64_t m = 0; m <= a; m++)
            for (int sign = 0; sign < 2; sign++) {
                if (j == per) { w[rows * k] = (uint16_t)a; rows++; j = 0; }
                w[(rows - 1) * k + 1 + j++] = (uint16_t)(m | (sign ? 0x8000 : 0));
            }
        for (; j < per; j++) w[(rows - 1) * k + 1 + j] = 0;  /* the last row's tail: zeros */
        if (rlsync_channel(w, 0, rows, rows, k, 0, k, q, 0, k, sc, 0, 1)) { count++; bad[0] = a; bad[1] = a; continue; }
        float s = bf16_f32((uint16_t)a) / 448.0f;
        s = s < min_scale ? min_scale : s;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t e = 0; e < k; e++) {
                uint16_t x = w[r * k + e];
                if ((sc[r] != s || q[r * k + e] != e4m3_clamped(bf16_f32(x) / s)) && count++ == 0) { bad[0] = a; bad[1] = x; }
            }
    }
    free(w); free(q); free(sc);
    return count;
}

/* `next`: bytes to fetch into the cache meanwhile, as many as the row's (NULL: none) */
static void row_mul(const uint16_t *row, uint8_t *out, int64_t k, float inv, const uint16_t *next) {
    int64_t j = 0;
#if defined(RLSYNC_AVX512)
    const __m512 vi = _mm512_set1_ps(inv);
#define MUL_I(x) _mm512_mul_ps((x), vi)
    ROW_FP8_AVX512(MUL_I, if (next) _mm_prefetch((const char *)(next + j), _MM_HINT_T0))
#undef MUL_I
#elif defined(__AVX2__)
    const __m256 vi = _mm256_set1_ps(inv);
#define MUL_I(x) _mm256_mul_ps((x), vi)
    ROW_FP8_AVX2(MUL_I, if (next) _mm_prefetch((const char *)(next + j), _MM_HINT_T0))
#undef MUL_I
#endif
    for (; j < k; j++) out[j] = e4m3_clamped(bf16_f32(row[j]) * inv);
}

/* per-channel FP8 of rows [r0, r1) of S stacked weights of n rows each (row r: weight r / n, row r % n;
   `*s` strides step between weights, `*r` between rows); returns 1 when a row holds a NaN or an infinity */
int rlsync_channel(const uint16_t *w, int64_t r0, int64_t r1, int64_t n, int64_t k, int64_t ws, int64_t wr,
                   uint8_t *q, int64_t qs, int64_t qr, float *scale, int64_t ss, int64_t sr) {
    int64_t s = r0 / n, i = r0 % n;  /* (weight, row) of r, stepped (no division per row: an expert's rows are short) */
    int64_t r = r0;
#ifdef __AVX2__
    /* Short rows (256 experts' down projections: 32 elements) spent half their time on two scalar divisions per
       row (scale, reciprocal); here 8 rows share one vector division of each, lane for lane the same IEEE ops. */
#if defined(RLSYNC_AVX512) && defined(__FMA__)
    /* 32-element rows (a 256-expert layer's down projections), 8 at a time, each one register: loaded once for
       its amax and its codes (the steps of row_absmax, the 8-row scale division below and row_div_r's
       AVX-512 loop, on values already in registers) */
    for (; k == 32 && r + 8 <= r1; r += 8) {
        __m512i v[8]; __mmask32 neg[8]; uint8_t *outs[8]; float *scales[8]; float amax[8], sc[8], rc[8];
        const __m512i nosign512 = _mm512_set1_epi16(0x7FFF);
        for (int t = 0; t < 8; t++) {
            __m512i x = _mm512_loadu_si512((const void *)(w + s * ws + i * wr));
            outs[t] = q + s * qs + i * qr; scales[t] = scale + s * ss + i * sr;
            neg[t] = _mm512_movepi16_mask(x);
            v[t] = _mm512_and_si512(x, nosign512);
            if (++i == n) { i = 0; s++; }
        }
        /* the 8 rows' maxima together (a transposing tree: 14 shuffles for 8 rows, not 6 per row), as fp32 bits
           in the order ORDER8 gives */
        __m512i p0 = _mm512_max_epu16(_mm512_shuffle_i64x2(v[0], v[1], 0x44), _mm512_shuffle_i64x2(v[0], v[1], 0xEE));
        __m512i p1 = _mm512_max_epu16(_mm512_shuffle_i64x2(v[2], v[3], 0x44), _mm512_shuffle_i64x2(v[2], v[3], 0xEE));
        __m512i p2 = _mm512_max_epu16(_mm512_shuffle_i64x2(v[4], v[5], 0x44), _mm512_shuffle_i64x2(v[4], v[5], 0xEE));
        __m512i p3 = _mm512_max_epu16(_mm512_shuffle_i64x2(v[6], v[7], 0x44), _mm512_shuffle_i64x2(v[6], v[7], 0xEE));
        /* each 128-bit lane L: row L's 8 maxima (rows 0-3), rows 4-7 */
        __m512i q0 = _mm512_max_epu16(_mm512_shuffle_i64x2(p0, p1, 0x88), _mm512_shuffle_i64x2(p0, p1, 0xDD));
        __m512i q1 = _mm512_max_epu16(_mm512_shuffle_i64x2(p2, p3, 0x88), _mm512_shuffle_i64x2(p2, p3, 0xDD));
        /* 64-bit lane 2L: row L's 4 maxima, 2L + 1: row L + 4's; then within each 64-bit lane */
        __m512i m8 = _mm512_max_epu16(_mm512_unpacklo_epi64(q0, q1), _mm512_unpackhi_epi64(q0, q1));
        m8 = _mm512_max_epu16(m8, _mm512_srli_epi64(m8, 32));
        m8 = _mm512_max_epu16(m8, _mm512_srli_epi64(m8, 16));
        __m256i bits = _mm256_slli_epi32(_mm512_cvtepi64_epi32(_mm512_and_si512(m8, _mm512_set1_epi64(0x7FFF))), 16);
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi32(bits, _mm256_set1_epi32(0x7F7FFFFF)))) return 1;  /* Inf / NaN */
        _mm256_storeu_ps(amax, _mm256_castsi256_ps(bits));
        scales8(amax, sc, rc);
        const __m256i sign8 = _mm256_set1_epi8((char)0x80);
        static const int ORDER8[8] = {0, 2, 4, 6, 1, 3, 5, 7};  /* row t's place in amax / sc / rc */
        for (int t = 0; t < 8; t++) {
            *scales[t] = sc[ORDER8[t]];
            const __m512 vs = _mm512_set1_ps(sc[ORDER8[t]]), vr = _mm512_set1_ps(rc[ORDER8[t]]);
            __m256i codes = CODES32_AVX512(DIV_S512, v[t]);
            _mm256_storeu_si256((__m256i *)outs[t], _mm256_or_si256(codes, _mm256_maskz_mov_epi8(neg[t], sign8)));
        }
    }
#endif
    for (; k <= 128 && r + 8 <= r1; r += 8) {
        const uint16_t *rows[8]; uint8_t *outs[8]; float *scales[8]; float amax[8], sc[8], rc[8];
        for (int t = 0; t < 8; t++) {
            rows[t] = w + s * ws + i * wr; outs[t] = q + s * qs + i * qr; scales[t] = scale + s * ss + i * sr;
            uint16_t m = row_absmax(rows[t], k);
            if (m >= 0x7F80) return 1;
            amax[t] = bf16_f32(m);
            if (++i == n) { i = 0; s++; }
        }
        scales8(amax, sc, rc);
        for (int t = 0; t < 8; t++) {
            *scales[t] = sc[t];
            row_div_r(rows[t], outs[t], k, sc[t], rc[t], t < 7 ? rows[t + 1] : rows[t]);
        }
    }
#endif
    for (; r < r1; r++) {
        const uint16_t *row = w + s * ws + i * wr;
        uint16_t m = row_absmax(row, k);
        if (m >= 0x7F80) return 1;
        float sc = bf16_f32(m) / 448.0f;
        sc = sc < min_scale ? min_scale : sc;
        scale[s * ss + i * sr] = sc;
        uint8_t *out = q + s * qs + i * qr;
        if (++i == n) { i = 0; s++; }
        /* the next row's bytes are fetched while this one is quantized (its amax pass then reads the cache) */
        row_div(row, out, k, sc, r + 1 < r1 ? w + s * ws + i * wr : row);
    }
    return 0;
}

/* max |w| of rows [r0, r1) as bf16 bits, 0xFFFF when a NaN or an infinity is among them */
int rlsync_absmax(const uint16_t *w, int64_t r0, int64_t r1, int64_t k, int64_t ws) {
    uint16_t m = 0;
    for (int64_t i = r0; i < r1; i++) {
#ifdef __AVX2__
        if (i + 1 < r1)  /* the next row fetched meanwhile */
            for (int64_t j = 0; j < k; j += 32) _mm_prefetch((const char *)(w + (i + 1) * ws + j), _MM_HINT_T0);
#endif
        uint16_t rm = row_absmax(w + i * ws, k);
        m = rm > m ? rm : m;
    }
    return m >= 0x7F80 ? 0xFFFF : m;
}

/* dst = src for n bf16 values, in one pass that also takes their max |x|: returns it as bf16
   bits, 0xFFFF when a NaN or an infinity is among them. With AVX2 the stores bypass the cache (dst is not read
   again soon, and a streaming store does not first read the line it overwrites). */
int rlsync_copy_absmax(const uint16_t *src, uint16_t *dst, int64_t n) {
    uint16_t m = 0;
    int64_t j = 0;
#ifdef __AVX2__
    for (; j < n && ((uintptr_t)(dst + j) & 31); j++) { uint16_t v = src[j]; dst[j] = v; uint16_t a = v & 0x7FFF; m = a > m ? a : m; }
    const __m256i nosign = _mm256_set1_epi16(0x7FFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (; j + 32 <= n; j += 32) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(src + j)), v1 = _mm256_loadu_si256((const __m256i *)(src + j + 16));
        _mm256_stream_si256((__m256i *)(dst + j), v0);
        _mm256_stream_si256((__m256i *)(dst + j + 16), v1);
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(v0, nosign));
        m1 = _mm256_max_epu16(m1, _mm256_and_si256(v1, nosign));
    }
    _mm_sfence();
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_max_epu16(m0, m1));
    for (int i = 0; i < 16; i++) m = lanes[i] > m ? lanes[i] : m;
#endif
    for (; j < n; j++) { uint16_t v = src[j]; dst[j] = v; uint16_t a = v & 0x7FFF; m = a > m ? a : m; }
    return m >= 0x7F80 ? 0xFFFF : m;
}

/* rlsync_copy_absmax over `rows` rows of k elements, row strides ss (src) and ds (dst); every row is copied */
int rlsync_copy_absmax_rows(const uint16_t *src, uint16_t *dst, int64_t rows, int64_t k, int64_t ss, int64_t ds) {
    int m = 0;
    for (int64_t r = 0; r < rows; r++) {
        int a = rlsync_copy_absmax(src + r * ss, dst + r * ds, k);
        m = a > m ? a : m;
    }
    return m;
}

/* per-block FP8 (reference.fp8_per_block) of block rows [b0, b1) of w (n x k), blocks bn x bk:
   amax per block clamped below at 1e-4, scale = amax / 448, values w * (1 / scale), saturating cast;
   returns 1 when a block holds a NaN or an infinity (then stops); `m` is kb floats of scratch */
int rlsync_block(const uint16_t *w, int64_t b0, int64_t b1, int64_t n, int64_t k, int64_t ws, int64_t bn, int64_t bk,
                 uint8_t *q, int64_t qs, float *scale, int64_t ss, float *m) {
    int64_t kb = (k + bk - 1) / bk;
    for (int64_t b = b0; b < b1; b++) {
        int64_t r0 = b * bn, r1 = r0 + bn < n ? r0 + bn : n;
        for (int64_t c = 0; c < kb; c++) {
            int64_t c0 = c * bk, len = c0 + bk < k ? bk : k - c0;
            uint16_t mc = 0;
            for (int64_t i = r0; i < r1; i++) { uint16_t a = row_absmax(w + i * ws + c0, len); mc = a > mc ? a : mc; }
            if (mc >= 0x7F80) return 1;
            float a = bf16_f32(mc);
            a = a < 1e-4f ? 1e-4f : a;
            float sc = a / 448.0f;
            scale[b * ss + c] = sc;
            m[c] = 1.0f / sc;
        }
        /* the next block row's bytes are fetched while this one is quantized (its amax pass then reads the cache) */
        for (int64_t i = r0; i < r1; i++)
            for (int64_t c = 0; c < kb; c++) {
                int64_t c0 = c * bk, len = c0 + bk < k ? bk : k - c0;
                row_mul(w + i * ws + c0, q + i * qs + c0, len, m[c], i + bn < n && b + 1 < b1 ? w + (i + bn) * ws + c0 : NULL);
            }
    }
    return 0;
}

/* e4m3_clamped over n floats: for scripts/check_e4m3_cast.py and the tests (the proof of the cast above) */
void rlsync_cast(const float *x, uint8_t *out, int64_t n) {
    int64_t j = 0;
#if defined(RLSYNC_AVX512)
    const __m512i nosign = _mm512_set1_epi32(0x7FFFFFFF);
    for (; j + 16 <= n; j += 16) {  /* the rows' 16-lane cast, e4m3_mag16, on every input */
        __m512i b = _mm512_loadu_si512((const void *)(x + j));
        __mmask16 neg = _mm512_cmplt_epi32_mask(b, _mm512_setzero_si512());
        __m128i codes = _mm512_cvtepi32_epi8(e4m3_mag16(_mm512_and_si512(b, nosign)));
        _mm_storeu_si128((__m128i *)(out + j), _mm_or_si128(codes, _mm_maskz_mov_epi8(neg, _mm_set1_epi8((char)0x80))));
    }
#elif defined(__AVX2__)
    const __m256i nosign = _mm256_set1_epi32(0x7FFFFFFF), sign8 = _mm256_set1_epi8((char)0x80);
    for (; j + 32 <= n; j += 32) {  /* the rows' vector cast, e4m3_mag8 and pack32, on every input */
        __m256i v[4], s[4];
        for (int i = 0; i < 4; i++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(x + j + 8 * i));
            s[i] = _mm256_srli_epi32(b, 24);
            v[i] = e4m3_mag8(_mm256_and_si256(b, nosign));
        }
        /* pack32 takes its vectors in the unpacks' lane order: a = elements 0-3 | 8-11, b = 4-7 | 12-15, ... */
        __m256i a = _mm256_permute2x128_si256(v[0], v[1], 0x20), b = _mm256_permute2x128_si256(v[0], v[1], 0x31);
        __m256i c = _mm256_permute2x128_si256(v[2], v[3], 0x20), d = _mm256_permute2x128_si256(v[2], v[3], 0x31);
        __m256i sa = _mm256_permute2x128_si256(s[0], s[1], 0x20), sb = _mm256_permute2x128_si256(s[0], s[1], 0x31);
        __m256i sc = _mm256_permute2x128_si256(s[2], s[3], 0x20), sd = _mm256_permute2x128_si256(s[2], s[3], 0x31);
        __m256i signs = _mm256_and_si256(_mm256_packus_epi16(_mm256_packus_epi32(sa, sb), _mm256_packus_epi32(sc, sd)), sign8);
        _mm256_storeu_si256((__m256i *)(out + j), pack32(a, b, c, d, signs));
    }
#endif
    for (; j < n; j++) out[j] = e4m3_clamped(x[j]);
}

/* rows [r0, r1) of S stacked weights (as rlsync_channel) times inv[weight] (each per-tensor scale's fp32
   reciprocal), clamped, cast; finite rows only */
void rlsync_tensor(const uint16_t *w, int64_t r0, int64_t r1, int64_t n, int64_t k, int64_t ws, int64_t wr,
                   uint8_t *q, int64_t qs, int64_t qr, const float *inv) {
    int64_t s = r0 / n, i = r0 % n;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = w + s * ws + i * wr;
        uint8_t *out = q + s * qs + i * qr;
        float f = inv[s];
        if (++i == n) { i = 0; s++; }
        row_mul(row, out, k, f, r + 1 < r1 ? w + s * ws + i * wr : NULL);  /* the next row fetched meanwhile */
    }
}
"""
