/* PLACEHOLDER bitwise CRC32C: being replaced by the accelerated implementation. */
#include "crc32c.h"

uint32_t icafast_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

uint32_t icafast_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return icafast_crc32c_sw(crc, buf, len);
}

const char *icafast_crc32c_backend(void) { return "bitwise"; }
