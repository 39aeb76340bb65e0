/* Does icafast_crc32c() leave the upper halves of the vector registers in use?
 *
 * Built and run by tests/test_crc32c.py (x86-64 only). A function that uses 256- or 512-bit
 * registers must clear their upper halves (VZEROUPPER) before it returns; otherwise later SSE
 * code in the caller (the interpreter, the C library) runs with the upper state "dirty", which on
 * Intel CPUs costs a state transition or a merge per instruction until something clears it.
 * XGETBV with ECX = 1 reads XINUSE: bit 2 is the upper 128 bits of YMM0-15, bit 6 the upper 256
 * bits of ZMM0-15 (bit 7, ZMM16-31, is not cleared by VZEROUPPER and is not checked).
 *
 * Prints "backend <name>" then one line "<length> <xinuse-before> <xinuse-after>" (hex) per call.
 * Exits 77 if the CPU cannot report XINUSE. */
#include "crc32c.h"

#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>

static uint64_t xinuse(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
    return (uint64_t)hi << 32 | lo;
}

int main(void)
{
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 0xd)
        return 77;
    __cpuid_count(0xd, 1, a, b, c, d);
    if (!(a & (1u << 2))) /* XGETBV with ECX = 1 */
        return 77;
    static unsigned char buf[1u << 17];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)(i * 131u + 7u);
    printf("backend %s\n", icafast_crc32c_backend());
    static const size_t lens[] = {1, 63, 100, 255, 256, 511, 512, 513, 700, 1024, 4096, 65536,
                                  65536 + 28, sizeof buf};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint64_t before = xinuse();
        volatile uint32_t r = icafast_crc32c(0, buf + (i & 7), lens[i] - (i & 7));
        (void)r;
        uint64_t after = xinuse();
        printf("%zu %llx %llx\n", lens[i] - (i & 7), (unsigned long long)before,
               (unsigned long long)after);
    }
    return 0;
}
