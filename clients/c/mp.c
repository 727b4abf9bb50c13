/* mp: msgpack writer and reader for the vfio-irqd C client; see mp.h. */
#include "mp.h"

#include <stdlib.h>
#include <string.h>

/* -- writer ------------------------------------------------------------------------------ */

void mp_buf_init(struct mp_buf *b)
{
	memset(b, 0, sizeof(*b));
}

void mp_buf_free(struct mp_buf *b)
{
	free(b->data);
	mp_buf_init(b);
}

static void put(struct mp_buf *b, const void *bytes, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 64;
		while (cap < b->len + n)
			cap *= 2;
		uint8_t *grown = realloc(b->data, cap);
		if (!grown) {
			b->failed = true;
			return;
		}
		b->data = grown;
		b->cap = cap;
	}
	memcpy(b->data + b->len, bytes, n);
	b->len += n;
}

/* A tag byte followed by `size` bytes of `v`, big-endian as msgpack wants. */
static void put_be(struct mp_buf *b, uint8_t tag, uint64_t v, unsigned size)
{
	uint8_t out[9];
	out[0] = tag;
	for (unsigned i = 0; i < size; i++)
		out[1 + i] = (uint8_t)(v >> (8 * (size - 1 - i)));
	put(b, out, 1 + size);
}

void mp_put_nil(struct mp_buf *b)
{
	put_be(b, 0xc0, 0, 0);
}

void mp_put_bool(struct mp_buf *b, bool v)
{
	put_be(b, v ? 0xc3 : 0xc2, 0, 0);
}

void mp_put_int(struct mp_buf *b, int64_t v)
{
	if (v >= 0) {
		uint64_t u = (uint64_t)v;
		if (u <= 0x7f)
			put_be(b, (uint8_t)u, 0, 0);
		else if (u <= 0xff)
			put_be(b, 0xcc, u, 1);
		else if (u <= 0xffff)
			put_be(b, 0xcd, u, 2);
		else if (u <= 0xffffffffu)
			put_be(b, 0xce, u, 4);
		else
			put_be(b, 0xcf, u, 8);
	} else if (v >= -32) {
		put_be(b, (uint8_t)(int8_t)v, 0, 0); /* negative fixint 0xe0..0xff */
	} else if (v >= INT8_MIN) {
		put_be(b, 0xd0, (uint8_t)(int8_t)v, 1);
	} else if (v >= INT16_MIN) {
		put_be(b, 0xd1, (uint16_t)(int16_t)v, 2);
	} else if (v >= INT32_MIN) {
		put_be(b, 0xd2, (uint32_t)(int32_t)v, 4);
	} else {
		put_be(b, 0xd3, (uint64_t)v, 8);
	}
}

void mp_put_str(struct mp_buf *b, const char *s)
{
	size_t n = strlen(s);
	if (n <= 31)
		put_be(b, (uint8_t)(0xa0 | n), 0, 0);
	else if (n <= 0xff)
		put_be(b, 0xd9, n, 1);
	else if (n <= 0xffff)
		put_be(b, 0xda, n, 2);
	else
		put_be(b, 0xdb, n, 4);
	put(b, s, n);
}

void mp_put_array(struct mp_buf *b, uint32_t n)
{
	if (n <= 15)
		put_be(b, (uint8_t)(0x90 | n), 0, 0);
	else if (n <= 0xffff)
		put_be(b, 0xdc, n, 2);
	else
		put_be(b, 0xdd, n, 4);
}

void mp_put_map(struct mp_buf *b, uint32_t n)
{
	if (n <= 15)
		put_be(b, (uint8_t)(0x80 | n), 0, 0);
	else if (n <= 0xffff)
		put_be(b, 0xde, n, 2);
	else
		put_be(b, 0xdf, n, 4);
}

/* -- reader ------------------------------------------------------------------------------ */

struct cursor {
	const uint8_t *p;
	const uint8_t *end;
};

static enum mp_result take_be(struct cursor *c, unsigned size, uint64_t *out)
{
	if ((size_t)(c->end - c->p) < size)
		return MP_INCOMPLETE;
	uint64_t v = 0;
	for (unsigned i = 0; i < size; i++)
		v = (v << 8) | c->p[i];
	c->p += size;
	*out = v;
	return MP_OK;
}

static enum mp_result take_bytes(struct cursor *c, struct mp_value *out, enum mp_type type,
				 uint64_t len)
{
	if (len > (type == MP_STR ? MP_MAX_STR : MP_MAX_BIN))
		return MP_INVALID;
	if ((uint64_t)(c->end - c->p) < len)
		return MP_INCOMPLETE;
	char *copy = malloc(len + 1);
	if (!copy)
		return MP_NOMEM;
	memcpy(copy, c->p, len);
	copy[len] = '\0';
	c->p += len;
	out->type = type;
	out->v.str.ptr = copy;
	out->v.str.len = (uint32_t)len;
	return MP_OK;
}

static enum mp_result decode_value(struct cursor *c, struct mp_value *out, int depth);

/* An array of `n` values, or a map of `n` pairs (2n values). */
static enum mp_result take_seq(struct cursor *c, struct mp_value *out, enum mp_type type,
			       uint64_t n, int depth)
{
	if (depth >= MP_MAX_DEPTH || n > (type == MP_ARRAY ? MP_MAX_ITEMS : MP_MAX_PAIRS))
		return MP_INVALID;
	uint64_t values = type == MP_MAP ? 2 * n : n;
	/* Every value takes at least one byte: don't allocate for bytes not there yet. */
	if ((uint64_t)(c->end - c->p) < values)
		return MP_INCOMPLETE;
	out->type = type;
	out->v.seq.len = (uint32_t)n;
	out->v.seq.items = NULL;
	if (values == 0)
		return MP_OK;
	/* Zeroed: an item not decoded yet is MP_NIL, which mp_free skips. */
	out->v.seq.items = calloc(values, sizeof(struct mp_value));
	if (!out->v.seq.items)
		return MP_NOMEM;
	for (uint64_t i = 0; i < values; i++) {
		enum mp_result r = decode_value(c, &out->v.seq.items[i], depth + 1);
		if (r != MP_OK)
			return r;
	}
	return MP_OK;
}

static enum mp_result decode_value(struct cursor *c, struct mp_value *out, int depth)
{
	uint64_t n;
	enum mp_result r;
	if (c->p >= c->end)
		return MP_INCOMPLETE;
	uint8_t tag = *c->p++;

	if (tag <= 0x7f) {
		out->type = MP_INT;
		out->v.i = tag;
		return MP_OK;
	}
	if (tag >= 0xe0) {
		out->type = MP_INT;
		out->v.i = (int8_t)tag;
		return MP_OK;
	}
	if ((tag & 0xf0) == 0x80)
		return take_seq(c, out, MP_MAP, tag & 0x0f, depth);
	if ((tag & 0xf0) == 0x90)
		return take_seq(c, out, MP_ARRAY, tag & 0x0f, depth);
	if ((tag & 0xe0) == 0xa0)
		return take_bytes(c, out, MP_STR, tag & 0x1f);

	switch (tag) {
	case 0xc0:
		out->type = MP_NIL;
		return MP_OK;
	case 0xc2:
	case 0xc3:
		out->type = MP_BOOL;
		out->v.b = tag == 0xc3;
		return MP_OK;
	case 0xc4:
	case 0xc5:
	case 0xc6:
		if ((r = take_be(c, 1u << (tag - 0xc4), &n)) != MP_OK)
			return r;
		return take_bytes(c, out, MP_BIN, n);
	case 0xca: {
		if ((r = take_be(c, 4, &n)) != MP_OK)
			return r;
		uint32_t bits = (uint32_t)n;
		float f;
		memcpy(&f, &bits, sizeof(f));
		out->type = MP_FLOAT;
		out->v.f = f;
		return MP_OK;
	}
	case 0xcb:
		if ((r = take_be(c, 8, &n)) != MP_OK)
			return r;
		out->type = MP_FLOAT;
		memcpy(&out->v.f, &n, sizeof(out->v.f));
		return MP_OK;
	case 0xcc:
	case 0xcd:
	case 0xce:
	case 0xcf:
		if ((r = take_be(c, 1u << (tag - 0xcc), &n)) != MP_OK)
			return r;
		if (n > (uint64_t)INT64_MAX) {
			out->type = MP_UINT;
			out->v.u = n;
		} else {
			out->type = MP_INT;
			out->v.i = (int64_t)n;
		}
		return MP_OK;
	case 0xd0:
	case 0xd1:
	case 0xd2:
	case 0xd3: {
		unsigned size = 1u << (tag - 0xd0);
		if ((r = take_be(c, size, &n)) != MP_OK)
			return r;
		/* Sign-extend from the encoded width. */
		unsigned shift = 64 - 8 * size;
		out->type = MP_INT;
		out->v.i = (int64_t)(n << shift) >> shift;
		return MP_OK;
	}
	case 0xd9:
	case 0xda:
	case 0xdb:
		if ((r = take_be(c, 1u << (tag - 0xd9), &n)) != MP_OK)
			return r;
		return take_bytes(c, out, MP_STR, n);
	case 0xdc:
	case 0xdd:
		if ((r = take_be(c, tag == 0xdc ? 2 : 4, &n)) != MP_OK)
			return r;
		return take_seq(c, out, MP_ARRAY, n, depth);
	case 0xde:
	case 0xdf:
		if ((r = take_be(c, tag == 0xde ? 2 : 4, &n)) != MP_OK)
			return r;
		return take_seq(c, out, MP_MAP, n, depth);
	default:
		/* 0xc1 (never used) and the ext types, which the protocol forbids. */
		return MP_INVALID;
	}
}

static void release(struct mp_value *v)
{
	if (v->type == MP_STR || v->type == MP_BIN) {
		free((void *)v->v.str.ptr);
	} else if ((v->type == MP_ARRAY || v->type == MP_MAP) && v->v.seq.items) {
		uint64_t values = v->type == MP_MAP ? 2 * (uint64_t)v->v.seq.len : v->v.seq.len;
		for (uint64_t i = 0; i < values; i++)
			release(&v->v.seq.items[i]);
		free(v->v.seq.items);
	}
}

enum mp_result mp_decode(const uint8_t *data, size_t len, size_t *used, struct mp_value **out)
{
	struct cursor c = { data, data + len };
	struct mp_value *root = calloc(1, sizeof(*root));
	if (!root)
		return MP_NOMEM;
	enum mp_result r = decode_value(&c, root, 1);
	if (r != MP_OK) {
		release(root);
		free(root);
		return r;
	}
	*used = (size_t)(c.p - data);
	*out = root;
	return MP_OK;
}

void mp_free(struct mp_value *value)
{
	if (value) {
		release(value);
		free(value);
	}
}

bool mp_is_str(const struct mp_value *v, const char *s)
{
	return v && v->type == MP_STR && strlen(s) == v->v.str.len &&
	       memcmp(v->v.str.ptr, s, v->v.str.len) == 0;
}

const struct mp_value *mp_map_get(const struct mp_value *map, const char *key)
{
	if (!map || map->type != MP_MAP)
		return NULL;
	for (uint32_t i = 0; i < map->v.seq.len; i++)
		if (mp_is_str(&map->v.seq.items[2 * i], key))
			return &map->v.seq.items[2 * i + 1];
	return NULL;
}

bool mp_get_int(const struct mp_value *v, int64_t *out)
{
	if (!v || v->type != MP_INT)
		return false;
	*out = v->v.i;
	return true;
}
