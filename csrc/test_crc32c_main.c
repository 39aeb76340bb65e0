/* Standalone test and micro-benchmark for csrc/crc32c.c.
 *
 *   gcc -O2 -o /tmp/t csrc/crc32c.c csrc/test_crc32c_main.c && /tmp/t
 *
 * Checks the RFC 3720 (iSCSI) appendix B.4 vectors, then compares the run-time chosen path
 * (icafast_crc32c) with the portable path (icafast_crc32c_sw) and with a bitwise reference on
 * pseudo-random data: every length 0..4096 at 16 alignments, split/continue points, lengths
 * around the internal block sizes, and a few large buffers.  On Linux it also re-runs itself with
 * ICAFAST_CRC32C_FORCE_SW=1 and checks that the override selects "slicing-by-8".
 * On an x86-64 CPU with AVX-512 and VPCLMULQDQ, run it a second time with
 * ICAFAST_CRC32C_NO_VPCLMUL=1 to check the "sse4.2" path as well.
 * Finally it prints throughput of both paths (informational).  Exits non-zero on any mismatch.
 * Options: --no-bench (skip timing), --quick (fewer alignments; for slow emulators). */
#define _GNU_SOURCE
#include "crc32c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__linux__)
#include <sys/wait.h>
#include <unistd.h>
#endif

static int g_failures;

#define CHECK_EQ(got, want, ...)                                                                \
    do {                                                                                        \
        uint32_t got_ = (got), want_ = (want);                                                  \
        if (got_ != want_) {                                                                    \
            if (++g_failures <= 20) {                                                           \
                fprintf(stderr, "MISMATCH %s:%d: got %08x want %08x: ", __FILE__, __LINE__,     \
                        (unsigned)got_, (unsigned)want_);                                       \
                fprintf(stderr, __VA_ARGS__);                                                   \
                fputc('\n', stderr);                                                            \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Bit-at-a-time reference, on the raw register (no pre/post inversion). */
static uint32_t ref_update(uint32_t state, const unsigned char *p, size_t len)
{
    while (len--) {
        state ^= *p++;
        for (int k = 0; k < 8; k++)
            state = (state >> 1) ^ (0x82F63B78u & (0u - (state & 1u)));
    }
    return state;
}

static uint32_t ref_crc(uint32_t crc, const void *buf, size_t len)
{
    return ~ref_update(~crc, (const unsigned char *)buf, len);
}

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    /* xorshift64* */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}

static void test_vectors(void)
{
    unsigned char v[32];
    struct {
        const char *name;
        uint32_t want;
    } cases[4] = {{"32 x 0x00", 0x8A9136AAu},
                  {"32 x 0xFF", 0x62A8AB43u},
                  {"0..31", 0x46DD794Eu},
                  {"31..0", 0x113FDB5Cu}};
    for (int c = 0; c < 4; c++) {
        for (int i = 0; i < 32; i++)
            v[i] = c == 0 ? 0x00 : c == 1 ? 0xFF : c == 2 ? (unsigned char)i : (unsigned char)(31 - i);
        CHECK_EQ(icafast_crc32c(0, v, 32), cases[c].want, "RFC 3720 %s (accelerated)", cases[c].name);
        CHECK_EQ(icafast_crc32c_sw(0, v, 32), cases[c].want, "RFC 3720 %s (sw)", cases[c].name);
        CHECK_EQ(ref_crc(0, v, 32), cases[c].want, "RFC 3720 %s (reference)", cases[c].name);
    }
    CHECK_EQ(icafast_crc32c(0, "123456789", 9), 0xE3069283u, "check value (accelerated)");
    CHECK_EQ(icafast_crc32c_sw(0, "123456789", 9), 0xE3069283u, "check value (sw)");
    CHECK_EQ(ref_crc(0, "123456789", 9), 0xE3069283u, "check value (reference)");

    /* Empty input, including a NULL pointer, leaves the CRC unchanged. */
    CHECK_EQ(icafast_crc32c(0, NULL, 0), 0u, "NULL/0");
    CHECK_EQ(icafast_crc32c(0xDEADBEEFu, NULL, 0), 0xDEADBEEFu, "NULL/0 continue");
    CHECK_EQ(icafast_crc32c_sw(0, NULL, 0), 0u, "sw NULL/0");
    CHECK_EQ(icafast_crc32c_sw(0x12345678u, NULL, 0), 0x12345678u, "sw NULL/0 continue");
    CHECK_EQ(icafast_crc32c(0, "", 0), 0u, "empty");
}

/* Every length 0..4096 at `nalign` starting alignments, against the incrementally updated
 * bitwise reference, plus a random two-way split per case checking "continue" semantics. */
static void test_all_lengths(const unsigned char *data, int nalign)
{
    const size_t maxlen = 4096;
    for (int off = 0; off < nalign; off++) {
        const unsigned char *p = data + off;
        uint32_t state = 0xFFFFFFFFu; /* reference register for p[0..len) */
        for (size_t len = 0; len <= maxlen; len++) {
            uint32_t want = ~state;
            uint32_t hw = icafast_crc32c(0, p, len), sw = icafast_crc32c_sw(0, p, len);
            CHECK_EQ(hw, want, "accelerated off=%d len=%zu", off, len);
            CHECK_EQ(sw, want, "sw off=%d len=%zu", off, len);
            size_t cut = len ? (size_t)(rnd() % (len + 1)) : 0;
            CHECK_EQ(icafast_crc32c(icafast_crc32c(0, p, cut), p + cut, len - cut), want,
                     "accelerated split off=%d len=%zu cut=%zu", off, len, cut);
            CHECK_EQ(icafast_crc32c_sw(icafast_crc32c_sw(0, p, cut), p + cut, len - cut), want,
                     "sw split off=%d len=%zu cut=%zu", off, len, cut);
            if (len < maxlen)
                state = ref_update(state, p + len, 1);
        }
    }
}

/* Continue from arbitrary (non-zero) CRC values, and three-way splits. */
static void test_continue(const unsigned char *data)
{
    for (int i = 0; i < 3000; i++) {
        size_t len = (size_t)(rnd() % 20000), off = (size_t)(rnd() % 64);
        uint32_t init = (uint32_t)rnd();
        const unsigned char *p = data + off;
        uint32_t want = ref_crc(init, p, len);
        CHECK_EQ(icafast_crc32c(init, p, len), want, "init=%08x off=%zu len=%zu", (unsigned)init,
                 off, len);
        CHECK_EQ(icafast_crc32c_sw(init, p, len), want, "sw init=%08x off=%zu len=%zu",
                 (unsigned)init, off, len);
        size_t c1 = len ? (size_t)(rnd() % (len + 1)) : 0;
        size_t c2 = c1 + (len - c1 ? (size_t)(rnd() % (len - c1 + 1)) : 0);
        uint32_t h = icafast_crc32c(init, p, c1);
        h = icafast_crc32c(h, p + c1, c2 - c1);
        h = icafast_crc32c(h, p + c2, len - c2);
        CHECK_EQ(h, want, "3-split off=%zu len=%zu cuts=%zu,%zu", off, len, c1, c2);
    }
}

/* Lengths around the block sizes of the interleaved paths (3 x 8192, 3 x 2048, 3 x 16 ...),
 * and large buffers, at several alignments: accelerated vs sw (sw is checked against the
 * reference above and on the largest buffer here). */
static void test_big(const unsigned char *data, size_t datalen, int nalign)
{
    static const size_t bases[] = {3 * 16,    3 * 32,         3 * 1024,      3 * 2048,
                                   3 * 8192,  2 * 3 * 8192,   65536,         3 * 8192 + 3 * 2048,
                                   100000,    200003,         1 << 20,       (1 << 20) + 13};
    for (size_t b = 0; b < sizeof bases / sizeof bases[0]; b++)
        for (int d = -17; d <= 17; d++)
            for (int off = 0; off < nalign; off++) {
                size_t len = bases[b] + (size_t)d;
                if (len + (size_t)off > datalen)
                    continue;
                const unsigned char *p = data + off;
                CHECK_EQ(icafast_crc32c(0, p, len), icafast_crc32c_sw(0, p, len),
                         "big off=%d len=%zu", off, len);
            }
    size_t len = (1 << 20) + 13;
    for (int off = 0; off < 3; off++)
        CHECK_EQ(icafast_crc32c(0, data + off, len), ref_crc(0, data + off, len),
                 "1MiB+13 vs reference off=%d", off);
    for (int i = 0; i < 200; i++) {
        size_t l = (size_t)(rnd() % (datalen - 64)), off = (size_t)(rnd() % 64);
        CHECK_EQ(icafast_crc32c(0, data + off, l), icafast_crc32c_sw(0, data + off, l),
                 "random big off=%zu len=%zu", off, l);
    }
}

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* GB/s (1e9 bytes per second) of fn over `len` bytes, best of a few ~50 ms runs. */
static double bench(uint32_t (*fn)(uint32_t, const void *, size_t), const unsigned char *p,
                    size_t len, uint32_t *sink)
{
    double best = 0;
    size_t iters = 1;
    uint32_t acc = 0;
    for (;;) { /* calibrate */
        double t0 = now_sec();
        for (size_t i = 0; i < iters; i++)
            acc ^= fn(acc, p, len);
        double dt = now_sec() - t0;
        if (dt > 0.02)
            break;
        iters *= 2;
    }
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_sec();
        for (size_t i = 0; i < iters; i++)
            acc ^= fn(acc, p, len);
        double dt = now_sec() - t0;
        double gbs = (double)len * (double)iters / dt / 1e9;
        if (gbs > best)
            best = gbs;
    }
    *sink ^= acc;
    return best;
}

static void run_bench(const unsigned char *data)
{
    static const size_t sizes[] = {64, 1024, 16384, 65536, 1 << 20};
    uint32_t sink = 0;
    printf("throughput (GB/s)      %-12s  slicing-by-8\n", icafast_crc32c_backend());
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        double hw = bench(icafast_crc32c, data, sizes[i], &sink);
        double sw = bench(icafast_crc32c_sw, data, sizes[i], &sink);
        printf("  %8zu bytes       %8.2f      %8.2f\n", sizes[i], hw, sw);
    }
    if (sink == 0x12345678u)
        printf("(sink)\n");
}

#if defined(__linux__)
/* Re-run this program with ICAFAST_CRC32C_FORCE_SW=1 and check that it picks the portable
 * path (the choice is made once per process, so it needs a fresh process). */
static void test_force_sw_env(void)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        g_failures++;
        return;
    }
    if (pid == 0) {
        setenv("ICAFAST_CRC32C_FORCE_SW", "1", 1);
        execl("/proc/self/exe", "test_crc32c", "--forced-sw-child", (char *)NULL);
        perror("exec");
        _exit(77); /* e.g. under qemu-user without binfmt: cannot re-exec ourselves */
    }
    int status = 0;
    int ok = waitpid(pid, &status, 0) == pid && WIFEXITED(status);
    if (ok && WEXITSTATUS(status) == 77) {
        printf("note: could not re-exec for the ICAFAST_CRC32C_FORCE_SW check; skipped\n");
    } else if (!ok || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "MISMATCH: ICAFAST_CRC32C_FORCE_SW=1 child failed (status %d)\n", status);
        g_failures++;
    }
}
#endif

int main(int argc, char **argv)
{
    int bench_wanted = 1, nalign = 16;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-bench") == 0) {
            bench_wanted = 0;
        } else if (strcmp(argv[i], "--quick") == 0) {
            nalign = 4;
        } else if (strcmp(argv[i], "--forced-sw-child") == 0) {
            const char *b = icafast_crc32c_backend();
            int ok = strcmp(b, "slicing-by-8") == 0 &&
                     icafast_crc32c(0, "123456789", 9) == 0xE3069283u;
            if (!ok)
                fprintf(stderr, "forced-sw child: backend %s\n", b);
            return ok ? 0 : 1;
        } else {
            fprintf(stderr, "usage: %s [--no-bench] [--quick]\n", argv[0]);
            return 2;
        }
    }

    const size_t datalen = (2u << 20) + 4096;
    unsigned char *data = malloc(datalen);
    if (!data) {
        perror("malloc");
        return 2;
    }
    for (size_t i = 0; i < datalen; i++)
        data[i] = (unsigned char)(rnd() >> 56);

    printf("backend: %s\n", icafast_crc32c_backend());
    test_vectors();
    test_all_lengths(data, nalign);
    test_continue(data);
    test_big(data, datalen, nalign < 8 ? nalign : 8);
#if defined(__linux__)
    if (!getenv("ICAFAST_CRC32C_FORCE_SW"))
        test_force_sw_env();
#endif

    if (g_failures) {
        printf("FAILED: %d mismatches\n", g_failures);
        free(data);
        return 1;
    }
    printf("all crc32c checks passed\n");
    if (bench_wanted)
        run_bench(data);
    free(data);
    return 0;
}
