/* icafast frame header codec: parse/validate and encode the fixed 28-byte header.
 *
 * Plain C, no Python.h: byte work only. All multi-byte fields are big-endian.
 *
 *   offset  size  field
 *        0     1  type
 *        1     1  flags
 *        2     2  reserved (must be 0)
 *        4     4  payload length
 *        8     8  seq (absolute stream offset)
 *       16     8  ack (absolute stream offset)
 *       24     4  crc32c over header[0:24] followed by the payload
 *
 * The numbers below repeat icafast/wire.py and icafast/errors.py; a test parses this file and
 * checks that they agree. */
#ifndef ICAFAST_FRAME_H
#define ICAFAST_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ICAFAST_HEADER_SIZE 28
#define ICAFAST_CRC_COVERED 24 /* the checksum covers header[0:24], then the payload */
#define ICAFAST_DEFAULT_MAX_PAYLOAD 262144
#define ICAFAST_MAX_PAYLOAD_LIMIT 0xFFFFFFFF

/* Frame types (icafast.wire.FrameType). */
#define ICAFAST_FRAME_HELLO 0x01
#define ICAFAST_FRAME_NEW 0x02
#define ICAFAST_FRAME_RESUME 0x03
#define ICAFAST_FRAME_ACCEPT 0x04
#define ICAFAST_FRAME_REJECT 0x05
#define ICAFAST_FRAME_DATA 0x10
#define ICAFAST_FRAME_ACK 0x11
#define ICAFAST_FRAME_PING 0x12
#define ICAFAST_FRAME_PONG 0x13
#define ICAFAST_FRAME_CLOSE 0x14

/* Flags (icafast.wire.FLAG_*): DATA may carry FIN, every other type no flag at all. */
#define ICAFAST_FLAG_FIN 0x01

/* Status codes (icafast.errors.FRAME_ERR_*). */
#define ICAFAST_FRAME_OK 0
#define ICAFAST_FRAME_ERR_TYPE 1
#define ICAFAST_FRAME_ERR_RESERVED 2
#define ICAFAST_FRAME_ERR_FLAGS 3
#define ICAFAST_FRAME_ERR_LENGTH 4
#define ICAFAST_FRAME_ERR_CHECKSUM 5
#define ICAFAST_FRAME_ERR_TRUNCATED 6

typedef struct {
    uint8_t type;
    uint8_t flags;
    uint16_t reserved;
    uint32_t length;
    uint64_t seq;
    uint64_t ack;
    uint32_t crc;
} icafast_frame_header;

/* Flag bits frame type `type` may carry, or -1 if `type` is not a known frame type. */
int icafast_frame_allowed_flags(unsigned int type);

/* Split the 28 bytes at `buf` into `h` (no validation). */
void icafast_frame_header_unpack(const unsigned char *buf, icafast_frame_header *h);

/* Validate an unpacked header against the decoder's payload limit. Checks, in this order:
 * type, reserved, flags, length. Returns ICAFAST_FRAME_OK or the first failing status; on
 * failure *a and *b receive the details icafast.errors.frame_error() formats:
 *   ERR_TYPE: a = type;  ERR_RESERVED: a = reserved;  ERR_FLAGS: a = flags, b = type;
 *   ERR_LENGTH: a = length, b = max_payload. */
int icafast_frame_header_check(const icafast_frame_header *h, uint64_t max_payload, uint64_t *a,
                               uint64_t *b);

/* icafast_frame_header_unpack() then icafast_frame_header_check(). */
int icafast_frame_header_parse(const unsigned char *buf, uint64_t max_payload,
                               icafast_frame_header *h, uint64_t *a, uint64_t *b);

/* CRC32C of hdr[0:24] continued over the payload. */
uint32_t icafast_frame_crc(const unsigned char *hdr, const void *payload, size_t length);

/* Check a whole frame's checksum: ICAFAST_FRAME_OK, or ICAFAST_FRAME_ERR_CHECKSUM with *a =
 * the checksum the header carries and *b = the one computed. */
int icafast_frame_verify(const unsigned char *hdr, const void *payload, size_t length,
                         uint64_t *a, uint64_t *b);

/* Validate arguments of an encode: ICAFAST_FRAME_OK, ICAFAST_FRAME_ERR_TYPE (unknown type),
 * ICAFAST_FRAME_ERR_FLAGS (flags wider than 8 bits or not allowed for the type) or
 * ICAFAST_FRAME_ERR_LENGTH (payload longer than 2**32-1 bytes). */
int icafast_frame_check_args(uint64_t type, uint64_t flags, uint64_t length);

/* Write the 28-byte header for `payload` into `out` (checksum included) and return the
 * checksum. The arguments must have passed icafast_frame_check_args(). */
uint32_t icafast_frame_header_encode(unsigned char *out, uint8_t type, uint8_t flags, uint64_t seq,
                                     uint64_t ack, const void *payload, uint32_t length);

#ifdef __cplusplus
}
#endif
#endif
