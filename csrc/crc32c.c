/* CRC32C (Castagnoli) for icafast.
 *
 * Parameters: reflected polynomial 0x82F63B78 (normal form 0x1EDC6F41), initial value and
 * final xor 0xFFFFFFFF.  The public functions use "continue" semantics: the caller passes the
 * previous *result* (0 to start) and gets the CRC of everything fed so far, so
 *     icafast_crc32c(icafast_crc32c(0, a, na), b, nb) == icafast_crc32c(0, a || b, na + nb).
 * Internally every path works on the raw shift register ("state"), which is ~result.
 *
 * Code paths, chosen once at run time (see resolve_impl()):
 *   - "avx512-vpclmulqdq"  x86-64 with AVX-512F and VPCLMULQDQ (AMD Zen 4, Intel Ice Lake and
 *                     later): buffers of FOLD_MIN_LEN bytes or more are folded 256 bytes per step
 *                     with 512-bit carry-less multiplies (see (3) below), about twice the speed of
 *                     the "sse4.2" path on large buffers; shorter ones, and the last < 256 bytes,
 *                     go through the "sse4.2" path.
 *   - "sse4.2"        x86-64 `crc32` instruction, three interleaved streams, combined with
 *                     PCLMULQDQ (or a portable carry-less multiply on the rare SSE4.2 CPUs that
 *                     lack PCLMULQDQ).  Built with target attributes, no global -msse4.2 needed.
 *   - "armv8"         AArch64 CRC extension (__crc32cd/__crc32cb), three interleaved streams for
 *                     large buffers, combined with a portable GF(2) multiply.
 *   - "slicing-by-8"  portable table-driven fallback, also exported as icafast_crc32c_sw().
 * ICAFAST_CRC32C_FORCE_SW=1 in the environment at first use forces the portable path;
 * ICAFAST_CRC32C_NO_VPCLMUL=1 keeps x86-64 on the "sse4.2" path (tests compare the two).
 *
 * ---------------------------------------------------------------------------------------------
 * Polynomial arithmetic used below (everything is over GF(2), modulo P = the CRC polynomial).
 *
 * Reflected representation: a 32-bit value v stands for the polynomial whose coefficient of
 * x^(31-i) is bit i of v; so 0x80000000 is "1" and 0x40000000 is "x".  With that convention the
 * CRC state after a message M (state s before it) is
 *     s' = s * x^(8*len(M)) + M(x) * x^32      (mod P)
 * where M(x) has the first message bit as its highest coefficient.  Two consequences:
 *
 *  (1) Linearity / splitting.  Cut a block into three consecutive parts A|B|C, each L bytes.
 *      Run A from the incoming state s, and B and C from state 0, all three at once:
 *          a = s*x^(8L) + A*x^32,  b = B*x^32,  c = C*x^32          (mod P)
 *      The state after the whole block is
 *          s' = s*x^(24L) + (A*x^(16L) + B*x^(8L) + C)*x^32
 *             = a * x^(16L) + b * x^(8L) + c                        (mod P)
 *      i.e. "shift" a by 2L bytes of zeros, b by L bytes, and xor in c.  This is what lets the
 *      three streams run independently: the crc32 instruction has a latency of 3 cycles but a
 *      throughput of 1 per cycle, so one dependent chain uses a third of the unit; three
 *      independent chains keep it fully busy (8 bytes per cycle).
 *
 *  (2) Shifting with a carry-less multiply.  PCLMULQDQ of two reflected 32-bit values a, k gives
 *      a 63-bit product whose bit j is the coefficient of x^(62-j) of a(x)*k(x).  Feeding that
 *      64-bit word to the crc32 instruction with state 0 computes D(x)*x^32 mod P where D's bit j
 *      is the coefficient of x^(63-j), i.e. D = a*k*x.  Hence
 *          crc32_u64(0, clmul(a, k)) = a * k * x^33   (mod P),
 *      and with k = x^(n-33) mod P this is a * x^n mod P: a shift by n bits in ~3 instructions.
 *      The constants for the block sizes used are computed once at first use (build_tables()).
 *
 *  (3) Folding (the "avx512-vpclmulqdq" path).  Read 16 message bytes as a 128-bit little-endian
 *      value whose bit j is the coefficient of x^(127-j) relative to its place: its low qword
 *      L holds the first 8 bytes (the higher degrees), its high qword H the next 8, so the chunk
 *      is L*x^64 + H.  Moving a chunk D bits further down the message multiplies it by x^D; with
 *      (2)'s reading of a carry-less product (a 64-bit reflected a times a 32-bit reflected k,
 *      bit j of the product is the coefficient of x^(94-j), i.e. as a chunk it is a*k*x^33):
 *          chunk(clmul(L, x^(D+64-33))) ^ chunk(clmul(H, x^(D-33))) = (L*x^64 + H) * x^D
 *      (mod P), a 128-bit value that is xored into the chunk D bits further on.  Four 512-bit
 *      accumulators (16 chunks) cover 256 bytes and fold by D = 2048 per step; at the end they
 *      fold into one another (D = 512) and their four lanes into the last one (D = 384, 256,
 *      128).  The incoming state is xored into the first 4 message bytes (s*x^(8n) is exactly
 *      the state's contribution), and the last chunk C then contributes C*x^32: the state of
 *      the whole is the CRC of C's 16 bytes from state 0, two crc32 instructions.
 * ---------------------------------------------------------------------------------------------
 */
#include "crc32c.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ICAFAST_CRC_X86 1
#include <immintrin.h>
#endif

#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__ARM_FEATURE_CRC32) || defined(__linux__))
#define ICAFAST_CRC_ARM 1
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1UL << 7)
#endif
#endif
#endif

#define CRC32C_POLY 0x82F63B78u /* reflected */

/* Block sizes for the interleaved hardware paths (bytes per stream; multiples of 8).
 * LONG_L: the steady-state block for big buffers; the combine step (~15 cycles of latency)
 *         is then noise next to the 3*LONG_L/8 cycles of crc32 work.
 * What is left (< 3*LONG_L) goes in 3-way blocks of L = 8*i bytes per stream, as large as fits
 * but at most TAIL_MAX_L (shift constants are tabulated for every such L), and the last
 * < 3*MIN_L bytes in a serial loop: below MIN_L the combine costs more than it saves.
 * (Tuned on AMD Zen 4; block sizes between 4 KiB and 16 KiB measure the same.) */
#define LONG_L 8192u
#define TAIL_MAX_L 2048u
#define MIN_L 16u
#define X86_3WAY_MIN_LEN 80u /* shorter inputs: serial crc32 has the lower latency */

typedef uint32_t (*crc_fn)(uint32_t crc, const void *buf, size_t len);

/* ------------------------------------------------------------------------------------------ */
/* Tables, built once (thread-safe) at first use.                                              */

static uint32_t g_slice[8][256]; /* slicing-by-8: g_slice[k][b] = state of byte b + k zeros */
/* Carry-less-multiply shift constants (see (2) above): for L = 8*i,
 * g_kshift[i][0] = x^(8L-33), g_kshift[i][1] = x^(16L-33)  (mod P). */
static uint32_t g_kshift[TAIL_MAX_L / 8 + 1][2];
static uint32_t g_klong_clmul[2]; /* same, for L = LONG_L */
static uint32_t g_klong_mul[2];   /* x^(8*LONG_L), x^(16*LONG_L): for the portable combine */
static int g_tables_state;        /* 0 = not built, 1 = being built, 2 = ready */

/* a(x) * b(x) mod P, both reflected.  Constant time, 32 rounds; fine for set-up and for the
 * once-per-24-KiB combine of the paths without a carry-less multiply instruction. */
static uint32_t gf2_mulmod(uint32_t a, uint32_t b)
{
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        prod ^= b & (0u - ((a >> (31 - i)) & 1u)); /* coefficient of x^i in a */
        b = (b >> 1) ^ (CRC32C_POLY & (0u - (b & 1u))); /* b *= x */
    }
    return prod;
}

/* x^n mod P, reflected. */
static uint32_t gf2_xpow(uint64_t n)
{
    uint32_t result = 0x80000000u, base = 0x40000000u; /* 1, x */
    while (n) {
        if (n & 1)
            result = gf2_mulmod(result, base);
        base = gf2_mulmod(base, base);
        n >>= 1;
    }
    return result;
}

#ifdef ICAFAST_CRC_X86
static void build_fold_tables(void); /* the "avx512-vpclmulqdq" path's constants */
#endif

static void build_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        g_slice[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++) {
            uint32_t c = g_slice[k - 1][b];
            g_slice[k][b] = (c >> 8) ^ g_slice[0][c & 0xFF];
        }

    /* g_kshift[i] for L = 8i: x^(64i-33) and x^(128i-33), stepping by x^64 and x^128. */
    uint32_t k1 = gf2_xpow(64 - 33), k2 = gf2_xpow(128 - 33);
    const uint32_t x64 = gf2_xpow(64), x128 = gf2_xpow(128);
    for (unsigned i = 1; i <= TAIL_MAX_L / 8; i++) {
        g_kshift[i][0] = k1;
        g_kshift[i][1] = k2;
        k1 = gf2_mulmod(k1, x64);
        k2 = gf2_mulmod(k2, x128);
    }
    g_klong_clmul[0] = gf2_xpow(8ull * LONG_L - 33);
    g_klong_clmul[1] = gf2_xpow(16ull * LONG_L - 33);
    g_klong_mul[0] = gf2_xpow(8ull * LONG_L);
    g_klong_mul[1] = gf2_xpow(16ull * LONG_L);
#ifdef ICAFAST_CRC_X86
    build_fold_tables();
#endif
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static __attribute__((noinline)) void build_tables_once_slow(void)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&g_tables_state, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                    __ATOMIC_ACQUIRE)) {
        build_tables();
        __atomic_store_n(&g_tables_state, 2, __ATOMIC_RELEASE);
    } else {
        /* Another thread is building them: it takes a few microseconds. */
        while (__atomic_load_n(&g_tables_state, __ATOMIC_ACQUIRE) != 2)
            cpu_relax();
    }
}

static inline void ensure_tables(void)
{
    if (__builtin_expect(__atomic_load_n(&g_tables_state, __ATOMIC_ACQUIRE) != 2, 0))
        build_tables_once_slow();
}

/* ------------------------------------------------------------------------------------------ */
/* Portable path: slicing-by-8.                                                                */

static inline uint32_t rd32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t crc32c_slice8(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t s = ~crc;
    if (len == 0)
        return crc;
    ensure_tables();
    const uint32_t(*T)[256] = (const uint32_t(*)[256])g_slice;

    while (len && ((uintptr_t)p & 7)) {
        s = (s >> 8) ^ T[0][(s ^ *p++) & 0xFF];
        len--;
    }
    /* Eight bytes at a time: byte j of the word still has 7-j bytes to travel through the
     * register, which is exactly what table 7-j accounts for. */
    while (len >= 8) {
        uint32_t lo = s ^ rd32le(p), hi = rd32le(p + 4);
        s = T[7][lo & 0xFF] ^ T[6][(lo >> 8) & 0xFF] ^ T[5][(lo >> 16) & 0xFF] ^ T[4][lo >> 24] ^
            T[3][hi & 0xFF] ^ T[2][(hi >> 8) & 0xFF] ^ T[1][(hi >> 16) & 0xFF] ^ T[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        s = (s >> 8) ^ T[0][(s ^ *p++) & 0xFF];
    return ~s;
}

uint32_t icafast_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_slice8(crc, buf, len);
}

static inline uint64_t rd64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* unaligned-safe; a single load on x86-64/AArch64 (both little-endian) */
    return v;
}

/* ------------------------------------------------------------------------------------------ */
/* x86-64: SSE4.2 crc32 instruction.                                                           */
#ifdef ICAFAST_CRC_X86

#define X86_SSE42 __attribute__((target("sse4.2")))
#define X86_CLMUL __attribute__((target("sse4.2,pclmul")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Serial crc32: 8 bytes per instruction, then 4/2/1 for the tail. */
static ALWAYS_INLINE X86_SSE42 uint64_t x86_serial(uint64_t s, const unsigned char *p, size_t len)
{
    while (len >= 8) {
        s = _mm_crc32_u64(s, rd64(p));
        p += 8;
        len -= 8;
    }
    uint32_t s32 = (uint32_t)s;
    if (len & 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        s32 = _mm_crc32_u32(s32, v);
        p += 4;
    }
    if (len & 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        s32 = _mm_crc32_u16(s32, v);
        p += 2;
    }
    if (len & 1)
        s32 = _mm_crc32_u8(s32, *p);
    return s32;
}

/* Consume at most 7 bytes (u8/u16/u32 steps) so that *pp becomes 8-byte aligned; the 3-way
 * loops then never issue a load that straddles a cache line. Caller guarantees *plen >= 7. */
static ALWAYS_INLINE X86_SSE42 uint64_t x86_align(uint64_t s, const unsigned char **pp,
                                                  size_t *plen)
{
    size_t head = (size_t)(-(uintptr_t)*pp & 7);
    s = x86_serial(s, *pp, head);
    *pp += head;
    *plen -= head;
    return s;
}

/* Three independent crc32 chains over p[0,L), p[L,2L), p[2L,3L) (see (1) above).  *a carries
 * the incoming state; *b and *c start from 0.  L is a non-zero multiple of 8. */
static ALWAYS_INLINE X86_SSE42 void x86_3way(uint64_t *a, uint64_t *b, uint64_t *c,
                                             const unsigned char *p, size_t L)
{
    uint64_t s0 = *a, s1 = 0, s2 = 0;
    const unsigned char *q = p + L, *r = p + 2 * L, *end = p + L;
    do {
        s0 = _mm_crc32_u64(s0, rd64(p));
        s1 = _mm_crc32_u64(s1, rd64(q));
        s2 = _mm_crc32_u64(s2, rd64(r));
        p += 8;
        q += 8;
        r += 8;
    } while (p != end);
    *a = s0;
    *b = s1;
    *c = s2;
}

/* state * x^n mod P, given k = x^(n-33) mod P (see (2) above). */
static ALWAYS_INLINE X86_CLMUL uint64_t x86_shift_clmul(uint64_t s, uint32_t k)
{
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)(uint32_t)s),
                                        _mm_cvtsi32_si128((int)k), 0x00);
    return _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

static X86_CLMUL uint32_t crc32c_x86_clmul(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t s = (uint32_t)~crc;
    if (len >= X86_3WAY_MIN_LEN) {
        uint64_t b, c;
        s = x86_align(s, &p, &len);
        while (len >= 3 * LONG_L) {
            x86_3way(&s, &b, &c, p, LONG_L);
            s = x86_shift_clmul(s, g_klong_clmul[1]) ^ x86_shift_clmul(b, g_klong_clmul[0]) ^ c;
            p += 3 * LONG_L;
            len -= 3 * LONG_L;
        }
        while (len >= 3 * MIN_L) {
            size_t L = len / 24 * 8; /* largest multiple of 8 with 3L <= len */
            if (L > TAIL_MAX_L)
                L = TAIL_MAX_L;
            x86_3way(&s, &b, &c, p, L);
            s = x86_shift_clmul(s, g_kshift[L / 8][1]) ^ x86_shift_clmul(b, g_kshift[L / 8][0]) ^ c;
            p += 3 * L;
            len -= 3 * L;
        }
    }
    return ~(uint32_t)x86_serial(s, p, len);
}

/* SSE4.2 without PCLMULQDQ (Nehalem-era CPUs): interleave only the long blocks, where the
 * portable 32-round multiply is cheap compared with the block, and go serial otherwise. */
static X86_SSE42 uint32_t crc32c_x86_sse42(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t s = (uint32_t)~crc;
    if (len >= 3 * LONG_L + 7) {
        uint64_t b, c;
        s = x86_align(s, &p, &len);
        while (len >= 3 * LONG_L) {
            x86_3way(&s, &b, &c, p, LONG_L);
            s = gf2_mulmod((uint32_t)s, g_klong_mul[1]) ^ gf2_mulmod((uint32_t)b, g_klong_mul[0]) ^
                c;
            p += 3 * LONG_L;
            len -= 3 * LONG_L;
        }
    }
    return ~(uint32_t)x86_serial(s, p, len);
}

/* x86-64 with AVX-512F and VPCLMULQDQ: folding, 256 bytes per step (see (3) above). Below
 * FOLD_MIN_LEN the set-up and final reduction cost more than the 3-way crc32 path. */
#define X86_VPCLMUL __attribute__((target("sse4.2,pclmul,avx512f,vpclmulqdq")))
#define FOLD_MIN_LEN 512u

/* Fold constants {x^(D+64-33), x^(D-33)} (mod P) per 128-bit lane: D = 2048 (the main loop),
 * D = 512 (accumulator into accumulator), and D = 384, 256, 128 for lanes 0-2 of the last
 * accumulator (lane 3 is not moved: zero constants, its value is xored in as it is). */
static uint64_t g_fold2048[2], g_fold512[2], g_fold_lanes[8];

static void build_fold_tables(void)
{
    g_fold2048[0] = gf2_xpow(2048 + 64 - 33);
    g_fold2048[1] = gf2_xpow(2048 - 33);
    g_fold512[0] = gf2_xpow(512 + 64 - 33);
    g_fold512[1] = gf2_xpow(512 - 33);
    for (unsigned i = 0; i < 3; i++) {
        unsigned d = 128u * (3 - i);
        g_fold_lanes[2 * i] = gf2_xpow(d + 64 - 33);
        g_fold_lanes[2 * i + 1] = gf2_xpow(d - 33);
    }
    g_fold_lanes[6] = g_fold_lanes[7] = 0;
}

/* x moved D bits further (k: D's constants in every lane), xored into data. */
static ALWAYS_INLINE X86_VPCLMUL __m512i x86_fold(__m512i x, __m512i k, __m512i data)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                     _mm512_clmulepi64_epi128(x, k, 0x11), data, 0x96);
}

static ALWAYS_INLINE X86_VPCLMUL __m512i x86_lanes(const uint64_t k[2])
{
    return _mm512_broadcast_i32x4(_mm_set_epi64x((long long)k[1], (long long)k[0]));
}

static X86_VPCLMUL uint32_t crc32c_x86_vpclmul(uint32_t crc, const void *buf, size_t len)
{
    if (len < FOLD_MIN_LEN)
        return crc32c_x86_clmul(crc, buf, len);
    const unsigned char *p = (const unsigned char *)buf;
    __m512i x0 = _mm512_loadu_si512((const void *)p);
    __m512i x1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i x2 = _mm512_loadu_si512((const void *)(p + 128));
    __m512i x3 = _mm512_loadu_si512((const void *)(p + 192));
    x0 = _mm512_xor_si512(x0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)~crc)));
    p += 256;
    len -= 256;
    const __m512i k2048 = x86_lanes(g_fold2048);
    while (len >= 256) {
        x0 = x86_fold(x0, k2048, _mm512_loadu_si512((const void *)p));
        x1 = x86_fold(x1, k2048, _mm512_loadu_si512((const void *)(p + 64)));
        x2 = x86_fold(x2, k2048, _mm512_loadu_si512((const void *)(p + 128)));
        x3 = x86_fold(x3, k2048, _mm512_loadu_si512((const void *)(p + 192)));
        p += 256;
        len -= 256;
    }
    const __m512i k512 = x86_lanes(g_fold512);
    x1 = x86_fold(x0, k512, x1);
    x2 = x86_fold(x1, k512, x2);
    x3 = x86_fold(x2, k512, x3);
    const __m512i kl = _mm512_loadu_si512((const void *)g_fold_lanes);
    __m512i t = _mm512_xor_si512(_mm512_clmulepi64_epi128(x3, kl, 0x00),
                                 _mm512_clmulepi64_epi128(x3, kl, 0x11));
    __m128i c = _mm_xor_si128(_mm512_extracti32x4_epi32(t, 0), _mm512_extracti32x4_epi32(t, 1));
    c = _mm_xor_si128(c, _mm_xor_si128(_mm512_extracti32x4_epi32(t, 2),
                                       _mm512_extracti32x4_epi32(x3, 3)));
    uint64_t s = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(c));
    s = _mm_crc32_u64(s, (uint64_t)_mm_extract_epi64(c, 1));
    /* Clear the upper halves of the vector registers before going back to SSE code (the tail
     * below, then the caller's). GCC 12 inserts no VZEROUPPER before a tail call to a function
     * of the same file that uses no 256-bit registers, as here. Without it the upper state stays
     * in use after the call, and on Intel CPUs later SSE code of the process pays for that (a
     * state transition or a merge per instruction, by generation) until something clears it:
     * ~160 ns more per call at 512 bytes from Python (tests/avx_state_probe.c checks it). */
    _mm256_zeroupper();
    return crc32c_x86_clmul(~(uint32_t)s, p, len); /* the last < 256 bytes */
}
#endif /* ICAFAST_CRC_X86 */

/* ------------------------------------------------------------------------------------------ */
/* AArch64: ARMv8 CRC extension.                                                               */
#ifdef ICAFAST_CRC_ARM

#if defined(__ARM_FEATURE_CRC32)
#define ARM_CRC /* enabled for the whole file already */
#elif defined(__clang__)
#define ARM_CRC __attribute__((target("crc")))
#else
#define ARM_CRC __attribute__((target("+crc")))
#endif

static inline ARM_CRC uint32_t arm_serial(uint32_t s, const unsigned char *p, size_t len)
{
    while (len >= 8) {
        s = __crc32cd(s, rd64(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        s = __crc32cb(s, *p++);
    return s;
}

/* Same scheme as x86 (see (1) above); the combine uses the portable multiply, so only the long
 * blocks are interleaved. */
static ARM_CRC uint32_t crc32c_armv8(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t s = ~crc;
    if (len >= 3 * LONG_L + 7) {
        size_t head = (size_t)(-(uintptr_t)p & 7);
        s = arm_serial(s, p, head);
        p += head;
        len -= head;
        while (len >= 3 * LONG_L) {
            uint32_t s1 = 0, s2 = 0;
            const unsigned char *q = p + LONG_L, *r = p + 2 * LONG_L, *end = p + LONG_L;
            do {
                s = __crc32cd(s, rd64(p));
                s1 = __crc32cd(s1, rd64(q));
                s2 = __crc32cd(s2, rd64(r));
                p += 8;
                q += 8;
                r += 8;
            } while (p != end);
            s = gf2_mulmod(s, g_klong_mul[1]) ^ gf2_mulmod(s1, g_klong_mul[0]) ^ s2;
            p = r;
            len -= 3 * LONG_L;
        }
    }
    return ~arm_serial(s, p, len);
}
#endif /* ICAFAST_CRC_ARM */

/* ------------------------------------------------------------------------------------------ */
/* Dispatch.                                                                                   */

static crc_fn g_impl; /* NULL until resolved; written atomically, always to the same value */

static __attribute__((noinline)) crc_fn resolve_impl(void)
{
    crc_fn f = crc32c_slice8;
    /* Tables first: the accelerated paths read the shift constants, and the release store of
     * g_impl below publishes them to every thread that later loads g_impl (acquire). */
    ensure_tables();
    const char *force = getenv("ICAFAST_CRC32C_FORCE_SW");
    if (!(force && strcmp(force, "1") == 0)) {
#if defined(ICAFAST_CRC_X86)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("sse4.2"))
        {
#ifdef ICAFAST_CRC32C_TEST_NO_PCLMUL /* compile-time knob to exercise the fallback in tests */
            f = crc32c_x86_sse42;
#else
            f = __builtin_cpu_supports("pclmul") ? crc32c_x86_clmul : crc32c_x86_sse42;
            const char *no_vpclmul = getenv("ICAFAST_CRC32C_NO_VPCLMUL");
            if (f == crc32c_x86_clmul && __builtin_cpu_supports("avx512f") &&
                __builtin_cpu_supports("vpclmulqdq") &&
                !(no_vpclmul && strcmp(no_vpclmul, "1") == 0))
                f = crc32c_x86_vpclmul;
#endif
        }
#elif defined(ICAFAST_CRC_ARM)
#if defined(__ARM_FEATURE_CRC32)
        f = crc32c_armv8;
#else
        if (getauxval(AT_HWCAP) & HWCAP_CRC32)
            f = crc32c_armv8;
#endif
#endif
    }
    __atomic_store_n(&g_impl, f, __ATOMIC_RELEASE);
    return f;
}

static inline crc_fn get_impl(void)
{
    crc_fn f = __atomic_load_n(&g_impl, __ATOMIC_ACQUIRE);
    if (__builtin_expect(f == NULL, 0))
        f = resolve_impl();
    return f;
}

uint32_t icafast_crc32c(uint32_t crc, const void *buf, size_t len)
{
    if (len == 0)
        return crc;
    return get_impl()(crc, buf, len);
}

const char *icafast_crc32c_backend(void)
{
    crc_fn f = get_impl();
#if defined(ICAFAST_CRC_X86)
    if (f == crc32c_x86_vpclmul)
        return "avx512-vpclmulqdq";
    if (f == crc32c_x86_clmul || f == crc32c_x86_sse42)
        return "sse4.2";
#elif defined(ICAFAST_CRC_ARM)
    if (f == crc32c_armv8)
        return "armv8";
#endif
    (void)f;
    return "slicing-by-8";
}
