/*
 * mp: the small part of msgpack that a vfio-irqd client needs.
 *
 * Writer: nil, bool, integers, str, array and map headers, into a growing
 * buffer, always in the smallest encoding (docs/protocol.md, "Framing").
 * Reader: decodes one complete msgpack value into a tree, or says that more
 * bytes are needed: the protocol has no length prefix, so a message's end is
 * found by decoding it. Every msgpack type is understood so that a message
 * can be skipped whole; ext types are refused, as the protocol says. Hard
 * limits on nesting and sizes bound what a peer can make us allocate.
 */
#ifndef IRQD_MP_H
#define IRQD_MP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* -- writer ------------------------------------------------------------------------------ */

struct mp_buf {
	uint8_t *data;
	size_t len;
	size_t cap;
	bool failed; /* an allocation failed; the contents are unusable */
};

void mp_buf_init(struct mp_buf *b);
void mp_buf_free(struct mp_buf *b);
void mp_put_nil(struct mp_buf *b);
void mp_put_bool(struct mp_buf *b, bool v);
void mp_put_int(struct mp_buf *b, int64_t v);
void mp_put_str(struct mp_buf *b, const char *s);
void mp_put_array(struct mp_buf *b, uint32_t n);
void mp_put_map(struct mp_buf *b, uint32_t n);

/* -- reader ------------------------------------------------------------------------------ */

enum mp_type {
	MP_NIL,
	MP_BOOL,
	MP_INT, /* fits in int64_t */
	MP_UINT, /* above INT64_MAX */
	MP_FLOAT,
	MP_STR,
	MP_BIN,
	MP_ARRAY,
	MP_MAP,
};

struct mp_value {
	enum mp_type type;
	union {
		bool b;
		int64_t i;
		uint64_t u;
		double f;
		struct {
			const char *ptr; /* NUL-terminated copy */
			uint32_t len;
		} str; /* MP_STR and MP_BIN */
		struct {
			struct mp_value *items; /* maps: key, value, key, value, ... */
			uint32_t len; /* items for arrays, pairs for maps */
		} seq;
	} v;
};

enum mp_result {
	MP_OK = 0,
	MP_INCOMPLETE = 1, /* a prefix of a valid value: read more bytes */
	MP_INVALID = -1, /* not msgpack, an ext type, or over a limit */
	MP_NOMEM = -2,
};

/* Limits (docs/protocol.md, "Limits": what the server stays within). */
#define MP_MAX_DEPTH 16
#define MP_MAX_ITEMS 4096
#define MP_MAX_PAIRS 64
#define MP_MAX_STR 4096
#define MP_MAX_BIN 65536

/*
 * Decode the value at the start of data[0..len). On MP_OK, *used is its size
 * in bytes and *out a tree to release with mp_free(). On anything else
 * nothing is allocated.
 */
enum mp_result mp_decode(const uint8_t *data, size_t len, size_t *used, struct mp_value **out);
void mp_free(struct mp_value *value);

/* Lookups; NULL when absent or of another type. */
const struct mp_value *mp_map_get(const struct mp_value *map, const char *key);
bool mp_is_str(const struct mp_value *v, const char *s);
bool mp_get_int(const struct mp_value *v, int64_t *out);

#endif
