/*
 * irqd-c-client: a vfio-irqd client in C, written from docs/protocol.md alone.
 *
 * Plain sockets and our own msgpack (mp.c). It says hello, subscribes to
 * VECTORs, receives `irq` notifications and adds up the counts until every
 * vector reached --expect, then unsubscribes (the daemon sends every pending
 * count before that response, so the totals are final) and checks that each
 * total is exactly --expect.
 *
 * With --fire it raises the interrupts itself: `sim.eventfds` hands it the
 * vectors' eventfds with SCM_RIGHTS and it writes each one --expect times, as
 * the kernel does for a real interrupt (simulated device only). Without
 * --fire, something else raises them (the test runs `vfio-irqd sim fire` once
 * this program has printed its "subscribed" line).
 *
 * usage: irqd-c-client --socket PATH [--index msix] --expect N [--fire] [--timeout S] VECTOR...
 * Prints one JSON object per line on stdout; exit status 0 when every count is
 * exact, 1 on any failure (the reason on stderr), 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "mp.h"

#define MAX_VECTORS 2048
/* Linux passes at most this many fds per sendmsg (SCM_MAX_FD). */
#define SCM_MAX_FD 253
#define MAX_MESSAGE (64 * 1024)

enum { REQUEST = 0, RESPONSE = 1, NOTIFICATION = 2 };

struct conn {
	int sock;
	uint8_t *in; /* received bytes not decoded yet */
	size_t in_len;
	int fifo[4 * SCM_MAX_FD]; /* received fds nobody took yet, oldest first */
	size_t nfifo;
	uint32_t next_id;
	/* What the notifications are counted against. */
	const char *index;
	size_t nvectors;
	int64_t vectors[MAX_VECTORS];
	int64_t totals[MAX_VECTORS];
	bool problem; /* a malformed irq was seen */
};

static const char *prog = "irqd-c-client";

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "%s: FAIL: ", prog);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static void usage(const char *why) __attribute__((noreturn));
static void usage(const char *why)
{
	fprintf(stderr,
		"%s: %s\nusage: %s --socket PATH [--index msix] --expect N [--fire] "
		"[--timeout S] VECTOR...\n",
		prog, why, prog);
	exit(2);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* -- I/O ------------------------------------------------------------------------------- */

static void conn_open(struct conn *c, const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(addr.sun_path))
		fail("socket path too long: %s", path);
	strcpy(addr.sun_path, path);
	c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->sock < 0)
		fail("socket: %s", strerror(errno));
	if (connect(c->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		fail("connect %s: %s", path, strerror(errno));
	c->in = malloc(MAX_MESSAGE * 2);
	if (!c->in)
		fail("out of memory");
}

static void send_all(struct conn *c, const struct mp_buf *b)
{
	if (b->failed)
		fail("out of memory");
	size_t off = 0;
	while (off < b->len) {
		ssize_t n = send(c->sock, b->data + off, b->len - off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("send: %s", strerror(errno));
		off += (size_t)n;
	}
}

/* Wait until `deadline` for bytes (and fds) from the daemon; false on timeout. */
static bool receive(struct conn *c, double deadline)
{
	double left = deadline - now();
	if (left <= 0)
		return false;
	struct pollfd p = { .fd = c->sock, .events = POLLIN };
	int ready = poll(&p, 1, (int)(left * 1000) + 1);
	if (ready < 0 && errno == EINTR)
		return true;
	if (ready < 0)
		fail("poll: %s", strerror(errno));
	if (ready == 0)
		return false;

	if (c->in_len >= MAX_MESSAGE * 2)
		fail("protocol error: a message longer than %d bytes", MAX_MESSAGE);
	struct iovec iov = { c->in + c->in_len, MAX_MESSAGE * 2 - c->in_len };
	union {
		char buf[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	ssize_t n = recvmsg(c->sock, &msg, MSG_CMSG_CLOEXEC);
	if (n < 0 && errno == EINTR)
		return true;
	if (n < 0)
		fail("recvmsg: %s", strerror(errno));
	/* Fds first: they may come with the last bytes before EOF. */
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (c->nfifo == sizeof(c->fifo) / sizeof(c->fifo[0]))
				fail("too many unclaimed fds");
			c->fifo[c->nfifo++] = fd;
		}
	}
	if (msg.msg_flags & MSG_CTRUNC)
		fail("protocol error: fds were lost (MSG_CTRUNC)");
	if (n == 0)
		fail("the daemon closed the connection");
	c->in_len += (size_t)n;
	return true;
}

/* The next whole message, or NULL when `deadline` passes first. */
static struct mp_value *next_message(struct conn *c, double deadline)
{
	for (;;) {
		size_t used = 0;
		struct mp_value *msg = NULL;
		enum mp_result r = mp_decode(c->in, c->in_len, &used, &msg);
		if (r == MP_OK) {
			memmove(c->in, c->in + used, c->in_len - used);
			c->in_len -= used;
			if (msg->type != MP_ARRAY || msg->v.seq.len < 3)
				fail("protocol error: a message that is not an array of 3 or 4");
			return msg;
		}
		if (r == MP_INVALID)
			fail("protocol error: bytes that are not msgpack for this protocol");
		if (r == MP_NOMEM)
			fail("out of memory");
		if (!receive(c, deadline))
			return NULL;
	}
}

/* -- notifications ------------------------------------------------------------------------ */

static int vector_slot(const struct conn *c, int64_t vector)
{
	for (size_t i = 0; i < c->nvectors; i++)
		if (c->vectors[i] == vector)
			return (int)i;
	return -1;
}

/* `[2, "irq", [index, [v1, n1, v2, n2, ...]]]`; other notifications are ignored. */
static void on_notification(struct conn *c, const struct mp_value *msg)
{
	const struct mp_value *name = &msg->v.seq.items[1];
	const struct mp_value *params = &msg->v.seq.items[2];
	if (!mp_is_str(name, "irq"))
		return; /* resized, shutdown, ... or newer ones: not counted */
	if (params->type != MP_ARRAY || params->v.seq.len != 2 ||
	    params->v.seq.items[1].type != MP_ARRAY || params->v.seq.items[1].v.seq.len % 2) {
		fprintf(stderr, "%s: malformed irq notification\n", prog);
		c->problem = true;
		return;
	}
	if (!mp_is_str(&params->v.seq.items[0], c->index))
		return;
	const struct mp_value *flat = &params->v.seq.items[1];
	bool seen[MAX_VECTORS] = { false };
	for (uint32_t i = 0; i < flat->v.seq.len; i += 2) {
		int64_t vector, count;
		if (!mp_get_int(&flat->v.seq.items[i], &vector) ||
		    !mp_get_int(&flat->v.seq.items[i + 1], &count) || count < 1) {
			fprintf(stderr, "%s: irq with a bad vector or count\n", prog);
			c->problem = true;
			continue;
		}
		int slot = vector_slot(c, vector);
		if (slot < 0 || seen[slot]) {
			fprintf(stderr, "%s: irq for vector %lld: %s\n", prog, (long long)vector,
				slot < 0 ? "not subscribed" : "twice in one notification");
			c->problem = true;
			continue;
		}
		seen[slot] = true;
		c->totals[slot] += count;
	}
}

/* -- calls -------------------------------------------------------------------------------- */

struct reply {
	struct mp_value *msg; /* the whole response, owns the rest */
	const struct mp_value *result; /* NULL on an error */
	char code[32]; /* the error code, "" on success */
	char message[256];
};

/* Begin a request: `[0, msgid, method, ` then the caller writes the params array. */
static uint32_t begin_request(struct conn *c, struct mp_buf *b, const char *method)
{
	uint32_t msgid = c->next_id++; /* wraps at 2^32, as the protocol allows */
	mp_buf_init(b);
	mp_put_array(b, 4);
	mp_put_int(b, REQUEST);
	mp_put_int(b, msgid);
	mp_put_str(b, method);
	return msgid;
}

/* Send the request in `b` and wait for its response, counting notifications meanwhile. */
static void finish_call(struct conn *c, struct mp_buf *b, uint32_t msgid, const char *method,
			double timeout, struct reply *out)
{
	send_all(c, b);
	mp_buf_free(b);
	double deadline = now() + timeout;
	for (;;) {
		struct mp_value *msg = next_message(c, deadline);
		if (!msg)
			fail("%s: no response within %g s", method, timeout);
		int64_t kind, id;
		if (!mp_get_int(&msg->v.seq.items[0], &kind))
			fail("protocol error: message type is not an int");
		if (kind == NOTIFICATION && msg->v.seq.len == 3) {
			on_notification(c, msg);
			mp_free(msg);
			continue;
		}
		if (kind != RESPONSE || msg->v.seq.len != 4 || !mp_get_int(&msg->v.seq.items[1], &id))
			fail("protocol error: unexpected message from the daemon");
		if (id != msgid)
			fail("protocol error: response to msgid %lld, expected %u", (long long)id, msgid);
		const struct mp_value *error = &msg->v.seq.items[2];
		memset(out, 0, sizeof(*out));
		out->msg = msg;
		if (error->type == MP_NIL) {
			out->result = &msg->v.seq.items[3];
		} else {
			if (error->type != MP_ARRAY || error->v.seq.len != 2 ||
			    error->v.seq.items[0].type != MP_STR || error->v.seq.items[1].type != MP_STR)
				fail("protocol error: malformed error in the %s response", method);
			snprintf(out->code, sizeof(out->code), "%s", error->v.seq.items[0].v.str.ptr);
			snprintf(out->message, sizeof(out->message), "%s",
				 error->v.seq.items[1].v.str.ptr);
		}
		return;
	}
}

static void put_vectors(struct mp_buf *b, const struct conn *c, size_t n)
{
	mp_put_array(b, (uint32_t)n);
	for (size_t i = 0; i < n; i++)
		mp_put_int(b, c->vectors[i]);
}

/* `[index, [vectors...]]`-style call: subscribe, unsubscribe, sim.eventfds. */
static void call_vectors(struct conn *c, const char *method, size_t n, double timeout,
			 struct reply *out)
{
	struct mp_buf b;
	uint32_t id = begin_request(c, &b, method);
	mp_put_array(&b, 2);
	mp_put_str(&b, c->index);
	put_vectors(&b, c, n);
	finish_call(c, &b, id, method, timeout, out);
}

static void expect_ok(const struct reply *r, const char *what)
{
	if (!r->result)
		fail("%s: %s: %s", what, r->code, r->message);
}

static void expect_error(struct reply *r, const char *code, const char *what)
{
	if (r->result)
		fail("%s: expected %s, but it succeeded", what, code);
	if (strcmp(r->code, code) != 0)
		fail("%s: expected %s, got %s: %s", what, code, r->code, r->message);
	mp_free(r->msg);
}

/* The result's "vectors" must be exactly the first `n` of ours, in order. */
static void check_vectors(const struct conn *c, const struct reply *r, size_t n, const char *what)
{
	const struct mp_value *got = mp_map_get(r->result, "vectors");
	if (!got || got->type != MP_ARRAY || got->v.seq.len != n)
		fail("%s: result has no vectors array of %zu", what, n);
	for (size_t i = 0; i < n; i++) {
		int64_t v;
		if (!mp_get_int(&got->v.seq.items[i], &v) || v != c->vectors[i])
			fail("%s: vectors[%zu] is not %lld", what, i, (long long)c->vectors[i]);
	}
}

/* -- the test ------------------------------------------------------------------------------ */

static bool all_reached(const struct conn *c, int64_t expect)
{
	for (size_t i = 0; i < c->nvectors; i++)
		if (c->totals[i] < expect)
			return false;
	return true;
}

static void print_totals(FILE *out, const struct conn *c)
{
	fputc('{', out);
	for (size_t i = 0; i < c->nvectors; i++)
		fprintf(out, "%s\"%lld\":%lld", i ? "," : "", (long long)c->vectors[i],
			(long long)c->totals[i]);
	fputc('}', out);
}

static void fire(struct conn *c, int64_t expect, double timeout)
{
	struct reply r;
	call_vectors(c, "sim.eventfds", c->nvectors, timeout, &r);
	expect_ok(&r, "sim.eventfds");
	check_vectors(c, &r, c->nvectors, "sim.eventfds");
	/* Every fd of a response has arrived once its last byte has; they are
	 * the oldest in the FIFO, in the order of "vectors". */
	if (c->nfifo < c->nvectors)
		fail("sim.eventfds: %zu fds for %zu vectors", c->nfifo, c->nvectors);
	int fds[MAX_VECTORS];
	memcpy(fds, c->fifo, c->nvectors * sizeof(int));
	c->nfifo -= c->nvectors;
	memmove(c->fifo, c->fifo + c->nvectors, c->nfifo * sizeof(int));
	mp_free(r.msg);

	/* One 8-byte write of 1 per interrupt, as the kernel's eventfd_signal. */
	const uint64_t one = 1;
	for (int64_t round = 0; round < expect; round++)
		for (size_t i = 0; i < c->nvectors; i++)
			if (write(fds[i], &one, sizeof(one)) != (ssize_t)sizeof(one))
				fail("write eventfd of vector %lld: %s", (long long)c->vectors[i],
				     strerror(errno));
	for (size_t i = 0; i < c->nvectors; i++)
		close(fds[i]);
}

int main(int argc, char **argv)
{
	static struct conn c; /* static: the count tables are large for a stack */
	const char *path = NULL;
	int64_t expect = 0;
	double timeout = 20.0;
	bool self_fire = false;
	c.index = "msix";

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		bool has_value = i + 1 < argc;
		if (!strcmp(a, "--socket") && has_value) {
			path = argv[++i];
		} else if (!strcmp(a, "--index") && has_value) {
			c.index = argv[++i];
		} else if (!strcmp(a, "--expect") && has_value) {
			expect = strtoll(argv[++i], NULL, 10);
		} else if (!strcmp(a, "--timeout") && has_value) {
			timeout = strtod(argv[++i], NULL);
		} else if (!strcmp(a, "--fire")) {
			self_fire = true;
		} else if (a[0] >= '0' && a[0] <= '9') {
			char *end;
			long long v = strtoll(a, &end, 10);
			if (*end || v >= MAX_VECTORS)
				usage("a VECTOR is 0..2047");
			if (c.nvectors == MAX_VECTORS)
				usage("too many vectors");
			c.vectors[c.nvectors++] = v;
		} else {
			usage("unknown or incomplete argument");
		}
	}
	if (!path || expect < 1 || c.nvectors == 0 || !(timeout > 0))
		usage("--socket, --expect N (N >= 1) and a VECTOR are required");
	for (size_t i = 0; i < c.nvectors; i++)
		if (vector_slot(&c, c.vectors[i]) != (int)i)
			usage("each VECTOR only once");

	conn_open(&c, path);
	struct reply r;
	struct mp_buf b;
	uint32_t id;

	/* Before hello every request is refused with EPROTO; the connection stays usable. */
	id = begin_request(&c, &b, "device.info");
	mp_put_array(&b, 0);
	finish_call(&c, &b, id, "device.info", timeout, &r);
	expect_error(&r, "EPROTO", "device.info before hello");

	id = begin_request(&c, &b, "hello");
	mp_put_array(&b, 1);
	mp_put_map(&b, 2);
	mp_put_str(&b, "client");
	mp_put_str(&b, "c-client");
	mp_put_str(&b, "protocol");
	mp_put_int(&b, 1);
	finish_call(&c, &b, id, "hello", timeout, &r);
	expect_ok(&r, "hello");
	int64_t protocol = 0, table = 0;
	if (!mp_get_int(mp_map_get(r.result, "protocol"), &protocol) || protocol != 1)
		fail("hello: protocol is not 1");
	const struct mp_value *device = mp_map_get(r.result, "device");
	if (!mp_get_int(mp_map_get(mp_map_get(device, "msix"), "count"), &table) || table < 1)
		fail("hello: no device.msix.count");
	mp_free(r.msg);

	/* An error answer leaves the connection usable and changes nothing. */
	if (!strcmp(c.index, "msix") && table < MAX_VECTORS) {
		int64_t saved = c.vectors[0];
		c.vectors[0] = table; /* one past the end of the table */
		call_vectors(&c, "subscribe", 1, timeout, &r);
		c.vectors[0] = saved;
		expect_error(&r, "EINVAL", "subscribe beyond the MSI-X table");
	}

	call_vectors(&c, "subscribe", c.nvectors, timeout, &r);
	expect_ok(&r, "subscribe");
	const struct mp_value *how = mp_map_get(r.result, "how");
	printf("{\"event\":\"subscribed\",\"index\":\"%s\",\"how\":\"%s\",\"vectors\":%zu}\n",
	       c.index, how && how->type == MP_STR ? how->v.str.ptr : "?", c.nvectors);
	fflush(stdout);
	mp_free(r.msg);

	if (self_fire)
		fire(&c, expect, timeout);

	double deadline = now() + timeout;
	while (!all_reached(&c, expect)) {
		struct mp_value *msg = next_message(&c, deadline);
		if (!msg) {
			fprintf(stderr, "%s: FAIL: timed out after %g s with ", prog, timeout);
			print_totals(stderr, &c);
			fputc('\n', stderr);
			return 1;
		}
		int64_t kind;
		if (!mp_get_int(&msg->v.seq.items[0], &kind) || kind != NOTIFICATION ||
		    msg->v.seq.len != 3)
			fail("protocol error: expected only notifications while waiting");
		on_notification(&c, msg);
		mp_free(msg);
	}

	/* Counts pending for these vectors are sent before this response. */
	call_vectors(&c, "unsubscribe", c.nvectors, timeout, &r);
	expect_ok(&r, "unsubscribe");
	mp_free(r.msg);

	bool exact = !c.problem;
	for (size_t i = 0; i < c.nvectors; i++)
		exact = exact && c.totals[i] == expect;
	if (!exact) {
		fprintf(stderr, "%s: FAIL: expected %lld per vector, got ", prog, (long long)expect);
		print_totals(stderr, &c);
		fputc('\n', stderr);
		return 1;
	}
	printf("{\"event\":\"done\",\"index\":\"%s\",\"totals\":", c.index);
	print_totals(stdout, &c);
	printf("}\n");
	for (size_t i = 0; i < c.nfifo; i++)
		close(c.fifo[i]);
	close(c.sock);
	free(c.in);
	return 0;
}
