/* icafast frame header codec (see frame.h). */
#include "frame.h"

#include "crc32c.h"

static inline uint16_t load16(const unsigned char *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t load32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint64_t load64(const unsigned char *p)
{
    return ((uint64_t)load32(p) << 32) | (uint64_t)load32(p + 4);
}

static inline void store16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void store32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void store64(unsigned char *p, uint64_t v)
{
    store32(p, (uint32_t)(v >> 32));
    store32(p + 4, (uint32_t)v);
}

int icafast_frame_allowed_flags(unsigned int type)
{
    switch (type) {
    case ICAFAST_FRAME_HELLO:
    case ICAFAST_FRAME_NEW:
    case ICAFAST_FRAME_RESUME:
    case ICAFAST_FRAME_ACCEPT:
    case ICAFAST_FRAME_REJECT:
    case ICAFAST_FRAME_ACK:
    case ICAFAST_FRAME_PING:
    case ICAFAST_FRAME_PONG:
    case ICAFAST_FRAME_CLOSE:
        return 0;
    case ICAFAST_FRAME_DATA:
        return ICAFAST_FLAG_FIN;
    default:
        return -1;
    }
}

void icafast_frame_header_unpack(const unsigned char *buf, icafast_frame_header *h)
{
    h->type = buf[0];
    h->flags = buf[1];
    h->reserved = load16(buf + 2);
    h->length = load32(buf + 4);
    h->seq = load64(buf + 8);
    h->ack = load64(buf + 16);
    h->crc = load32(buf + 24);
}

int icafast_frame_header_check(const icafast_frame_header *h, uint64_t max_payload, uint64_t *a,
                               uint64_t *b)
{
    int allowed = icafast_frame_allowed_flags(h->type);
    if (allowed < 0) {
        *a = h->type;
        *b = 0;
        return ICAFAST_FRAME_ERR_TYPE;
    }
    if (h->reserved != 0) {
        *a = h->reserved;
        *b = 0;
        return ICAFAST_FRAME_ERR_RESERVED;
    }
    if (h->flags & ~(unsigned int)allowed) {
        *a = h->flags;
        *b = h->type;
        return ICAFAST_FRAME_ERR_FLAGS;
    }
    if ((uint64_t)h->length > max_payload) {
        *a = h->length;
        *b = max_payload;
        return ICAFAST_FRAME_ERR_LENGTH;
    }
    return ICAFAST_FRAME_OK;
}

int icafast_frame_header_parse(const unsigned char *buf, uint64_t max_payload,
                               icafast_frame_header *h, uint64_t *a, uint64_t *b)
{
    icafast_frame_header_unpack(buf, h);
    return icafast_frame_header_check(h, max_payload, a, b);
}

uint32_t icafast_frame_crc(const unsigned char *hdr, const void *payload, size_t length)
{
    uint32_t crc = icafast_crc32c(0, hdr, ICAFAST_CRC_COVERED);
    if (length)
        crc = icafast_crc32c(crc, payload, length);
    return crc;
}

int icafast_frame_verify(const unsigned char *hdr, const void *payload, size_t length,
                         uint64_t *a, uint64_t *b)
{
    uint32_t want = load32(hdr + ICAFAST_CRC_COVERED);
    uint32_t got = icafast_frame_crc(hdr, payload, length);
    if (got != want) {
        *a = want;
        *b = got;
        return ICAFAST_FRAME_ERR_CHECKSUM;
    }
    return ICAFAST_FRAME_OK;
}

int icafast_frame_check_args(uint64_t type, uint64_t flags, uint64_t length)
{
    int allowed = type <= 0xFF ? icafast_frame_allowed_flags((unsigned int)type) : -1;
    if (allowed < 0)
        return ICAFAST_FRAME_ERR_TYPE;
    if (flags > 0xFF || (flags & ~(uint64_t)allowed))
        return ICAFAST_FRAME_ERR_FLAGS;
    if (length > ICAFAST_MAX_PAYLOAD_LIMIT)
        return ICAFAST_FRAME_ERR_LENGTH;
    return ICAFAST_FRAME_OK;
}

uint32_t icafast_frame_header_encode(unsigned char *out, uint8_t type, uint8_t flags, uint64_t seq,
                                     uint64_t ack, const void *payload, uint32_t length)
{
    uint32_t crc;
    out[0] = type;
    out[1] = flags;
    store16(out + 2, 0);
    store32(out + 4, length);
    store64(out + 8, seq);
    store64(out + 16, ack);
    crc = icafast_frame_crc(out, payload, length);
    store32(out + 24, crc);
    return crc;
}
