/* CRC32C (Castagnoli), as used by iSCSI (RFC 3720), ext4, SCTP.
 * Plain C, no Python.h. Hardware accelerated where the CPU allows (chosen at run time). */
#ifndef ICAFAST_CRC32C_H
#define ICAFAST_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Continue a CRC32C: `crc` is a previous result (0 to start); returns the CRC32C of everything
 * fed so far. icafast_crc32c(0, "123456789", 9) == 0xE3069283. Thread-safe. */
uint32_t icafast_crc32c(uint32_t crc, const void *buf, size_t len);

/* Name of the code path chosen at run time: "avx512-vpclmulqdq", "sse4.2", "armv8" or
 * "slicing-by-8".
 * The choice is made once, at the first call of icafast_crc32c() or of this function. If the
 * environment variable ICAFAST_CRC32C_FORCE_SW is "1" at that moment, the portable
 * "slicing-by-8" path is used whatever the CPU offers (for tests and benchmarks); if
 * ICAFAST_CRC32C_NO_VPCLMUL is "1", x86-64 stays on "sse4.2" even where the CPU has AVX-512
 * and VPCLMULQDQ. */
const char *icafast_crc32c_backend(void);

/* The portable table-driven code path, always available (for tests and benchmarks). */
uint32_t icafast_crc32c_sw(uint32_t crc, const void *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
