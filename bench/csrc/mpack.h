/* The little msgpack the benchmark's C programs need: write an `irq`
 * notification, and skip one whole object in a byte buffer to find message
 * boundaries. Formats from the msgpack specification (spec.md). */
#ifndef IRQD_BENCH_MPACK_H
#define IRQD_BENCH_MPACK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline size_t mp_put_uint(uint8_t *out, uint64_t v)
{
    if (v < 0x80) { out[0] = (uint8_t)v; return 1; }
    if (v <= 0xff) { out[0] = 0xcc; out[1] = (uint8_t)v; return 2; }
    if (v <= 0xffff) { out[0] = 0xcd; out[1] = (uint8_t)(v >> 8); out[2] = (uint8_t)v; return 3; }
    if (v <= 0xffffffffu) {
        out[0] = 0xce;
        for (int i = 0; i < 4; i++) out[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        return 5;
    }
    out[0] = 0xcf;
    for (int i = 0; i < 8; i++) out[1 + i] = (uint8_t)(v >> (56 - 8 * i));
    return 9;
}

static inline size_t mp_put_array(uint8_t *out, uint32_t n)
{
    if (n < 16) { out[0] = (uint8_t)(0x90 | n); return 1; }
    if (n <= 0xffff) { out[0] = 0xdc; out[1] = (uint8_t)(n >> 8); out[2] = (uint8_t)n; return 3; }
    out[0] = 0xdd;
    for (int i = 0; i < 4; i++) out[1 + i] = (uint8_t)(n >> (24 - 8 * i));
    return 5;
}

static inline size_t mp_put_str(uint8_t *out, const char *s)
{
    size_t n = strlen(s); /* short strings only: "irq", "msix" */
    out[0] = (uint8_t)(0xa0 | n);
    memcpy(out + 1, s, n);
    return n + 1;
}

/* [2, "irq", ["msix", [v1, n1, ...]]] for `pairs` (vector, count) pairs. */
static inline size_t mp_irq(uint8_t *out, const uint32_t *vectors, const uint64_t *counts,
                            size_t pairs)
{
    size_t n = 0;
    n += mp_put_array(out + n, 3);
    n += mp_put_uint(out + n, 2);
    n += mp_put_str(out + n, "irq");
    n += mp_put_array(out + n, 2);
    n += mp_put_str(out + n, "msix");
    n += mp_put_array(out + n, (uint32_t)(2 * pairs));
    for (size_t i = 0; i < pairs; i++) {
        n += mp_put_uint(out + n, vectors[i]);
        n += mp_put_uint(out + n, counts[i]);
    }
    return n;
}

static inline uint64_t mp_be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v = (v << 8) | p[i];
    return v;
}

/* Length of the object at buf[0..len), or 0 if incomplete. Unknown bytes
 * (ext, 0xc1) give (size_t)-1. `sum` adds up every unsigned int seen at odd
 * positions of the innermost array: the counts of an irq notification. */
static size_t mp_skip(const uint8_t *buf, size_t len, uint64_t *ints, size_t *nints)
{
    if (len == 0) return 0;
    uint8_t b = buf[0];
    size_t head = 1, body = 0, items = 0;
    if (b < 0x80 || b >= 0xe0) { if (ints) ints[(*nints)++] = b; return 1; }
    if ((b & 0xf0) == 0x90) items = b & 0x0f;
    else if ((b & 0xf0) == 0x80) items = 2 * (size_t)(b & 0x0f);
    else if ((b & 0xe0) == 0xa0) body = b & 0x1f;
    else switch (b) {
    case 0xc0: case 0xc2: case 0xc3: return 1;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int w = 1 << (b - 0xcc);
        if (len < (size_t)(1 + w)) return 0;
        if (ints) ints[(*nints)++] = mp_be(buf + 1, w);
        return (size_t)(1 + w);
    }
    case 0xd0: return len < 2 ? 0 : 2;
    case 0xd1: return len < 3 ? 0 : 3;
    case 0xd2: case 0xca: return len < 5 ? 0 : 5;
    case 0xd3: case 0xcb: return len < 9 ? 0 : 9;
    case 0xd9: case 0xc4: if (len < 2) return 0; head = 2; body = buf[1]; break;
    case 0xda: case 0xc5: if (len < 3) return 0; head = 3; body = mp_be(buf + 1, 2); break;
    case 0xdb: case 0xc6: if (len < 5) return 0; head = 5; body = mp_be(buf + 1, 4); break;
    case 0xdc: if (len < 3) return 0; head = 3; items = mp_be(buf + 1, 2); break;
    case 0xdd: if (len < 5) return 0; head = 5; items = mp_be(buf + 1, 4); break;
    case 0xde: if (len < 3) return 0; head = 3; items = 2 * mp_be(buf + 1, 2); break;
    case 0xdf: if (len < 5) return 0; head = 5; items = 2 * mp_be(buf + 1, 4); break;
    default: return (size_t)-1;
    }
    if (body) return len < head + body ? 0 : head + body;
    size_t off = head;
    for (size_t i = 0; i < items; i++) {
        size_t n = mp_skip(buf + off, len - off, ints, nints);
        if (n == 0 || n == (size_t)-1) return n;
        off += n;
    }
    return off;
}

#endif
