/*
 * irqd._hotloop: the interrupt relay on a pthread of its own.
 *
 * A HotLoop owns one epoll set holding the vector eventfds, the client
 * sockets that have output waiting, and an internal wake eventfd. Its thread
 * (a plain pthread, never a Python thread) sleeps in epoll_wait(-1); when a
 * vector fires it reads the eventfd, credits the count to every subscriber's
 * pending counter and writes each such client one `irq` notification per
 * index, the same bytes irqproto.notifications.encode_irq makes:
 *
 *   [2, "irq", [index_name, [v1, n1, v2, n2, ...]]]   (msgpack)
 *
 * Python (Trio, on the main thread) is the control plane: it registers
 * vectors and clients, changes subscriptions, sends every response through
 * send() and holds control notifications with hold_control(), both of which
 * keep each client's byte stream in order with the counts.
 *
 * Thread safety
 * -------------
 * Who owns what:
 *   - The GIL protects only the Python-side fields (thread handle, `closed`,
 *     `joining`). The hot thread never takes the GIL and never touches a
 *     PyObject, so it can never wait for Python.
 *   - Everything else (vectors, subscriptions, clients, pending counters,
 *     output queues, statistics, the failed list) is plain malloc'd C memory
 *     guarded by the one mutex `mu`. It is allocated with malloc, not
 *     PyMem_RawMalloc: tracemalloc's raw hooks take the GIL.
 *   - The epoll fd and the wake eventfd are created with the object and
 *     closed only by close(), after the thread has been joined.
 *   - Vector fds and client sockets belong to Python; the HotLoop never
 *     closes them, only the fds it dup'ed for SCM_RIGHTS.
 *
 * The hot thread calls epoll_wait WITHOUT the mutex, then takes it for one
 * round (reads, credits, encodes, writes) and releases it. Every Python
 * method takes the same mutex: pthread_mutex_trylock first, and if the
 * thread holds it, the GIL is released while blocking on it
 * (Py_BEGIN_ALLOW_THREADS). No deadlock is possible: the hot thread holds
 * only the mutex and waits only in epoll_wait (without it) or in
 * pthread_mutex_lock (without anything else), and a Python thread that
 * blocks on the mutex has given up the GIL first. No Python API is called
 * while the mutex is held (errors and results are built after unlocking), so
 * a garbage collection running a finalizer that re-enters the HotLoop cannot
 * happen under the mutex either.
 *
 * Stale events: the events epoll_wait returned were collected before the
 * mutex was taken, so by the time they are processed Python may have removed
 * the vector or client, and the fd number may already belong to something
 * else. So epoll_data never holds a pointer: a vector's is
 * KIND_VECTOR | token << 32 | fd, looked up by token under the mutex and
 * ignored if absent or registered with another fd; a client's is
 * KIND_CLIENT | cid, and cids are never reused, so a removed client's event
 * finds nothing. An event for a live vector may still be stale because
 * Python read the counter in between (drain_vector); that read happened
 * under the mutex and bumped `py_reads`, and a round that sees `py_reads`
 * changed since the previous round polls each vector fd before reading it,
 * so an eventfd that someone set blocking (O_NONBLOCK lives in the shared
 * open file description) cannot block the thread while it holds the mutex.
 *
 * A count is never read twice or lost: every read of a vector eventfd, by
 * the thread or by Python, happens under the mutex, and in the same critical
 * section the count is added to the vector's total and to the pending
 * counter of exactly the clients subscribed at that moment. A subscription
 * change is therefore atomic with respect to counting: a count belongs to
 * the subscribers of the instant it was read.
 *
 * Epoll facts (see dispatcher.py): vectors are level-triggered EPOLLIN,
 * neither EPOLLET nor EPOLLONESHOT. A vector that reports EPOLLERR/EPOLLHUP,
 * reads 0 or fewer than 8 bytes, or fails with anything but EAGAIN/EINTR is
 * removed from the set at once (level-triggered, it would be reported
 * forever) and its token queued for take_failed().
 *
 * Output: each client has one byte queue. The thread encodes a client's
 * pending counts only when its queue is empty, so a client that does not
 * read costs one counter per pending (index, vector) and never more, and is
 * resumed when its socket becomes writable. A client socket is in the epoll
 * set (EPOLLOUT, level-triggered) only while bytes are queued, and is
 * removed with EPOLL_CTL_DEL when the queue empties rather than modified to
 * no events: EPOLLERR and EPOLLHUP are reported even for an empty event
 * mask, and a peer that hung up would spin the thread until Python gets
 * round to remove_client. All writes use MSG_DONTWAIT | MSG_NOSIGNAL, so a
 * slow or dead client never delays the others; a write error is recorded,
 * the client's queue and pending counts are discarded, it is credited no
 * more, and Python gets the errno as OSError from its next send()/flush().
 *
 * Control notifications (err, resized, shutdown, device_lost) are not
 * queued but held: each client has one control buffer that Python replaces
 * as a whole (hold_control(); Python coalesces what it holds), and the bytes
 * in it go into the queue just ahead of the next encoded counts, whenever
 * those would be encoded (the queue empty, or send()). So a client that
 * does not read costs one control buffer besides its counters, and a control
 * notification still reaches it before every count credited after it was
 * held (a `resized` before the loopback trigger's count).
 *
 * Stream guard (irqd/hotpath/guard.py): after a crash the next process may
 * carry on a client's connection only if its stream stopped at a message
 * boundary. set_guard() hands the loop a writable buffer (a MAP_SHARED
 * memfd, so what is stored there outlives the process), and a client added
 * with a slot has one byte in it that client_write keeps true: before a
 * send it stores 1 unless the send is the whole queue, at most the client's
 * atomic_max bytes and carries no fds (net/unix/af_unix.c,
 * unix_stream_sendmsg: a send that fits in one skb is queued whole or fails
 * with EAGAIN, and the queue holds whole messages, so such a send cannot
 * leave the stream inside a message); once the queue is empty it stores 0.
 * A 0 thus proves the stream is at a boundary. The fd-carrying path
 * (send_fds, one byte with each batch of fds) always marks. The cost is a
 * compare and at most two relaxed byte stores per write, each followed by a
 * compiler barrier so that the 1 is in memory before the send that needs
 * it (the CPU keeps a thread's stores in order with its own syscalls, and
 * a killed process's retired stores still reach the page).
 * The buffer and its length are under the mutex; the Py_buffer holding the
 * exporter alive is the Python side's (GIL), released by set_guard() or
 * close().
 *
 * Not fork-safe: a child of fork() has no hot thread and may inherit a
 * locked mutex. The daemon never forks while a HotLoop exists.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Tokens are index << 16 | vector, and index < MAX_INDEXES: a token fits in
 * 20 bits, leaving epoll_data bits 52..63 free for the kind. */
#define MAX_INDEXES 16
#define TOKEN_BITS 20
#define KIND_SHIFT 60
enum kind { KIND_WAKE = 1, KIND_VECTOR = 2, KIND_CLIENT = 3 };

/* cid = seq << CID_SLOT_BITS | slot; seq counts add_client calls from 1, so
 * a cid is never 0 and never reused, and fits below KIND_SHIFT. */
#define CID_SLOT_BITS 24
#define MAX_CLIENTS (1u << CID_SLOT_BITS)
#define MAX_SEQ (((uint64_t)1 << (KIND_SHIFT - CID_SLOT_BITS)) - 1)

/* include/net/scm.h: the most fds one SCM_RIGHTS message may carry. */
#define SCM_MAX_FD 253

/* Events per epoll_wait. Level-triggered epoll requeues a reported fd at the
 * tail of its ready list, so more ready fds than this are served next round. */
#define HOT_EVENTS 256

/* irqd.stats.LATENCY_BOUNDS_US: 1 << i microseconds, i = 0..20. */
#define LAT_BUCKETS 21

/* msgpack str8 holds at most 255 bytes; index names are short ("msix"). */
#define NAME_MAX_BYTES 255
/* Largest `irq` header: fixarray, 2, "irq", fixarray, str8 name, array32. */
#define IRQ_HEAD_MAX (1 + 1 + 4 + 1 + 2 + NAME_MAX_BYTES + 5)
/* Largest (vector, count) pair: uint16 vector, uint64 count. */
#define IRQ_PAIR_MAX (3 + 9)

/* An emptied output buffer larger than this is freed, not kept for reuse. */
#define OUT_KEEP (64 * 1024)
/* A pending table is freed when an encode used less than 1/8 of a table
 * with more than this many entries (hysteresis: the steady state keeps its
 * table, a burst's high-water mark is given back). */
#define PEND_KEEP 128

/* ---- small growable arrays ------------------------------------------- */

static int
grow(void **arr, uint32_t *cap, size_t elem, uint64_t need, uint32_t first)
{
    if (need <= *cap) {
        return 0;
    }
    uint64_t n = *cap ? *cap : first;
    while (n < need) {
        n *= 2;
    }
    if (n > UINT32_MAX || n > SIZE_MAX / elem) {
        return -1;
    }
    void *p = realloc(*arr, (size_t)n * elem);
    if (p == NULL) {
        return -1;
    }
    *arr = p;
    *cap = (uint32_t)n;
    return 0;
}

static uint64_t
sat_add(uint64_t a, uint64_t b)
{
    uint64_t r;
    return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
}

/* Fibonacci hashing: the top `bits` bits of key * 2^32/phi. */
static uint32_t
home_of(uint32_t key, uint8_t bits)
{
    return (uint32_t)(key * 0x9E3779B1u) >> (32 - bits);
}

/* ---- u32 -> u32 map: open addressing, linear probing, load <= 1/2 ------- */

#define MAP_EMPTY UINT32_MAX

struct u32map {
    uint32_t *kv; /* key, value pairs; key MAP_EMPTY = free */
    uint32_t n;
    uint8_t bits; /* capacity 1 << bits; 0 = not allocated */
};

static uint32_t *
map_get(const struct u32map *m, uint32_t key)
{
    if (m->bits == 0) {
        return NULL;
    }
    uint32_t mask = (1u << m->bits) - 1;
    for (uint32_t i = home_of(key, m->bits);; i = (i + 1) & mask) {
        if (m->kv[2 * i] == key) {
            return &m->kv[2 * i + 1];
        }
        if (m->kv[2 * i] == MAP_EMPTY) {
            return NULL;
        }
    }
}

static void
map_insert_new(struct u32map *m, uint32_t key, uint32_t val)
{
    uint32_t mask = (1u << m->bits) - 1;
    uint32_t i = home_of(key, m->bits);
    while (m->kv[2 * i] != MAP_EMPTY) {
        i = (i + 1) & mask;
    }
    m->kv[2 * i] = key;
    m->kv[2 * i + 1] = val;
    m->n++;
}

/* Make room for one more key; -1 on ENOMEM (the map is unchanged). */
static int
map_reserve(struct u32map *m)
{
    if (m->bits && 2 * (m->n + 1) <= (1u << m->bits)) {
        return 0;
    }
    uint8_t bits = m->bits ? m->bits + 1 : 3;
    if (bits > 30) {
        return -1;
    }
    uint32_t *kv = malloc(sizeof *kv * 2 * ((size_t)1 << bits));
    if (kv == NULL) {
        return -1;
    }
    memset(kv, 0xff, sizeof *kv * 2 * ((size_t)1 << bits));
    struct u32map bigger = {.kv = kv, .n = 0, .bits = bits};
    for (uint32_t i = 0; m->bits && i < (1u << m->bits); i++) {
        if (m->kv[2 * i] != MAP_EMPTY) {
            map_insert_new(&bigger, m->kv[2 * i], m->kv[2 * i + 1]);
        }
    }
    free(m->kv);
    *m = bigger;
    return 0;
}

/* Backward-shift deletion: no tombstones, lookups stay short. */
static void
map_del(struct u32map *m, uint32_t key)
{
    uint32_t *val = map_get(m, key);
    if (val == NULL) {
        return;
    }
    uint32_t mask = (1u << m->bits) - 1;
    uint32_t hole = (uint32_t)(val - m->kv - 1) / 2;
    for (uint32_t j = hole;;) {
        j = (j + 1) & mask;
        uint32_t k = m->kv[2 * j];
        if (k == MAP_EMPTY) {
            break;
        }
        uint32_t h = home_of(k, m->bits);
        if (((j - h) & mask) >= ((j - hole) & mask)) {
            m->kv[2 * hole] = k;
            m->kv[2 * hole + 1] = m->kv[2 * j + 1];
            hole = j;
        }
    }
    m->kv[2 * hole] = MAP_EMPTY;
    m->n--;
}

static void
map_free(struct u32map *m)
{
    free(m->kv);
    *m = (struct u32map){0};
}

/* ---- pending counters of one client: token -> count -------------------- */

/*
 * Dense entries plus an index of positions (position + 1, 0 = free) with
 * load <= 1/2: 24 bytes per pending counter, sized by what is pending, not
 * by the subscriptions. Counts are never removed one by one: unsubscribe
 * sets an entry to 0 (skipped by the encoder), and every encode clears the
 * whole table, which can be done slot by slot in O(entries).
 */
struct pent {
    uint32_t tok;
    uint64_t cnt;
};

struct pending {
    struct pent *ent;
    uint32_t *idx;
    uint32_t n;       /* entries used, zero counts included */
    uint32_t nonzero; /* entries with a count */
    uint8_t bits;     /* index capacity 1 << bits, entry capacity half that */
};

static struct pent *
pend_get(const struct pending *p, uint32_t tok)
{
    if (p->bits == 0) {
        return NULL;
    }
    uint32_t mask = (1u << p->bits) - 1;
    for (uint32_t i = home_of(tok, p->bits); p->idx[i]; i = (i + 1) & mask) {
        struct pent *e = &p->ent[p->idx[i] - 1];
        if (e->tok == tok) {
            return e;
        }
    }
    return NULL;
}

static void
pend_index(struct pending *p, uint32_t pos)
{
    uint32_t mask = (1u << p->bits) - 1;
    uint32_t i = home_of(p->ent[pos].tok, p->bits);
    while (p->idx[i]) {
        i = (i + 1) & mask;
    }
    p->idx[i] = pos + 1;
}

static int
pend_grow(struct pending *p)
{
    uint8_t bits = p->bits ? p->bits + 1 : 4;
    if (bits > 30) {
        return -1;
    }
    uint32_t *idx = calloc((size_t)1 << bits, sizeof *idx);
    struct pent *ent = realloc(p->ent, sizeof *ent * ((size_t)1 << (bits - 1)));
    if (idx == NULL || ent == NULL) {
        free(idx);
        if (ent != NULL) {
            p->ent = ent; /* a bigger entry array is harmless */
        }
        return -1;
    }
    free(p->idx);
    p->ent = ent;
    p->idx = idx;
    p->bits = bits;
    for (uint32_t i = 0; i < p->n; i++) {
        pend_index(p, i);
    }
    return 0;
}

/* Add to tok's counter; -1 on ENOMEM. One probe finds the entry or the free
 * index slot a new one goes into, rather than a lookup and then an insert
 * probing twice. (This, the memset in pend_unindex_sorted and the raw read in
 * read_counter took the hot thread from 330 to 255 instructions per ready
 * vector, callgrind, 64 vectors firing; the C relay spends 51.) */
static int
pend_add(struct pending *p, uint32_t tok, uint64_t cnt)
{
    if (p->bits == 0 && pend_grow(p) < 0) {
        return -1;
    }
    uint32_t mask = (1u << p->bits) - 1;
    uint32_t i = home_of(tok, p->bits);
    struct pent *e = NULL;
    for (; p->idx[i]; i = (i + 1) & mask) {
        if (p->ent[p->idx[i] - 1].tok == tok) {
            e = &p->ent[p->idx[i] - 1];
            break;
        }
    }
    if (e == NULL) {
        if (p->n + 1 > (1u << (p->bits - 1))) {
            if (pend_grow(p) < 0) {
                return -1;
            }
            e = &p->ent[p->n];
            e->tok = tok;
            pend_index(p, p->n++); /* the index was rebuilt: probe it again */
        } else {
            e = &p->ent[p->n];
            e->tok = tok;
            p->idx[i] = ++p->n; /* position + 1 */
        }
        e->cnt = 0;
    }
    if (e->cnt == 0) {
        p->nonzero++;
    }
    e->cnt = sat_add(e->cnt, cnt);
    return 0;
}

/*
 * Empty the index and sort the entries by token (index ascending, then
 * vector ascending), for the encoder or take_pending; the caller then sets
 * n = 0 via pend_done. Each used slot is found by probing from its key's home
 * for its own position, skipping slots already zeroed, so the index is
 * cleared in O(entries) rather than O(capacity).
 */
static int
pent_cmp(const void *a, const void *b)
{
    uint32_t x = ((const struct pent *)a)->tok, y = ((const struct pent *)b)->tok;
    return (x > y) - (x < y);
}

static void
pend_unindex_sorted(struct pending *p)
{
    uint32_t mask = (1u << p->bits) - 1;
    if ((uint64_t)mask < (uint64_t)16 * p->n) {
        /* At most 64 index bytes per entry: one memset is cheaper than a
         * probe per entry (the common case, a table sized by what is pending). */
        memset(p->idx, 0, sizeof *p->idx << p->bits);
    } else {
        for (uint32_t pos = 0; pos < p->n; pos++) {
            uint32_t i = home_of(p->ent[pos].tok, p->bits);
            while (p->idx[i] != pos + 1) {
                i = (i + 1) & mask;
            }
            p->idx[i] = 0;
        }
    }
    /* Entries arrive in the order epoll reported their vectors, which under
     * load is mostly ascending (a level-triggered fd is requeued at the tail
     * of the ready list): count the inversions' first sign before sorting.
     * Measured with perf at 64 vectors firing: qsort was 2.7 % of the hot
     * thread, for lists that were often already in order. */
    uint32_t unsorted = 0;
    for (uint32_t i = 1; i < p->n; i++) {
        unsorted += p->ent[i - 1].tok > p->ent[i].tok;
    }
    if (unsorted == 0) {
        return;
    }
    if (p->n <= 16 || unsorted <= 4) {
        for (uint32_t i = 1; i < p->n; i++) { /* few entries, or few out of place */
            struct pent e = p->ent[i];
            uint32_t j = i;
            for (; j > 0 && p->ent[j - 1].tok > e.tok; j--) {
                p->ent[j] = p->ent[j - 1];
            }
            p->ent[j] = e;
        }
    } else {
        qsort(p->ent, p->n, sizeof *p->ent, pent_cmp);
    }
}

static void
pend_free(struct pending *p)
{
    free(p->ent);
    free(p->idx);
    *p = (struct pending){0};
}

static void
pend_done(struct pending *p)
{
    uint32_t used = p->n;
    p->n = 0;
    p->nonzero = 0;
    if (p->bits > 1 && (1u << (p->bits - 1)) > PEND_KEEP && used * 8 < (1u << (p->bits - 1))) {
        pend_free(p);
    }
}

/* ---- msgpack, the smallest encodings as msgpack-python picks them -------- */

static uint8_t *
mp_be(uint8_t *w, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--) {
        *w++ = (uint8_t)(v >> (8 * i));
    }
    return w;
}

static uint8_t *
mp_uint(uint8_t *w, uint64_t v)
{
    if (v < 0x80) {
        *w++ = (uint8_t)v; /* positive fixint */
        return w;
    }
    if (v <= 0xff) {
        *w++ = 0xcc;
        return mp_be(w, v, 1);
    }
    if (v <= 0xffff) {
        *w++ = 0xcd;
        return mp_be(w, v, 2);
    }
    if (v <= 0xffffffffu) {
        *w++ = 0xce;
        return mp_be(w, v, 4);
    }
    *w++ = 0xcf;
    return mp_be(w, v, 8);
}

static uint8_t *
mp_array(uint8_t *w, uint32_t n)
{
    if (n < 16) {
        *w++ = (uint8_t)(0x90 | n);
        return w;
    }
    if (n <= 0xffff) {
        *w++ = 0xdc;
        return mp_be(w, n, 2);
    }
    *w++ = 0xdd;
    return mp_be(w, n, 4);
}

/* [2, "irq", [name, [v1, n1, ...]]] for the `k` non-zero entries of e[0..n). */
static uint8_t *
mp_irq(uint8_t *w, const char *name, uint8_t name_len, const struct pent *e, uint32_t n,
       uint32_t k)
{
    static const uint8_t head[] = {0x93, 0x02, 0xa3, 'i', 'r', 'q', 0x92};
    memcpy(w, head, sizeof head);
    w += sizeof head;
    if (name_len < 32) {
        *w++ = (uint8_t)(0xa0 | name_len); /* fixstr */
    } else {
        *w++ = 0xd9; /* str8: msgpack-python packs str with use_bin_type */
        *w++ = name_len;
    }
    memcpy(w, name, name_len);
    w += name_len;
    w = mp_array(w, 2 * k);
    for (uint32_t i = 0; i < n; i++) {
        if (e[i].cnt) {
            w = mp_uint(w, e[i].tok & 0xffff);
            w = mp_uint(w, e[i].cnt);
        }
    }
    return w;
}

/* ---- the object --------------------------------------------------------- */

struct vector {
    int fd; /* -1: free slot */
    uint32_t token;
    uint64_t total;
    uint32_t *subs; /* subscribed client slots, ascending: 4 bytes each */
    uint32_t nsubs, subcap;
};

/* SCM_RIGHTS fds (dup'ed) riding on the byte at stream position `pos`. */
struct fdmark {
    uint64_t pos;
    uint64_t len; /* bytes of the sendmsg that carries them: 1, or the rest of the data */
    int *fds;
    uint32_t nfds;
};

struct client {
    uint64_t cid; /* 0: free slot */
    int fd;
    int err;        /* errno of a failed write; the client is then inert */
    uint8_t dirty;  /* in HotLoop.dirty */
    uint8_t in_epoll;
    struct pending pend;
    /* Held control notifications, whole messages, queued ahead of the next
     * encoded counts: ctl_msgs of them in ctl[0..ctl_len). */
    uint8_t *ctl;
    size_t ctl_len;
    uint64_t ctl_msgs;
    /* Output queue: out[start..end) holds stream bytes pos..pos+end-start. */
    uint8_t *out;
    size_t start, end, cap;
    uint64_t pos;
    struct fdmark *marks;
    uint32_t mhead, mtail, mcap;
    int32_t gslot;            /* byte in HotLoop.guard; -1: none */
    uint32_t atomic_max;      /* sends up to this size are all-or-nothing */
    uint64_t first_credit_ns; /* first credit not yet encoded; 0: none */
    uint64_t lat_since_ns;    /* the encoded credits' first credit time */
    uint64_t lat_end;         /* ...complete when pos reaches this; 0: none */
    uint64_t delivered, notifications;
};

typedef struct {
    PyObject_HEAD
    /* GIL-protected, Python side only. */
    pthread_t thread;
    int thread_started; /* created and not joined */
    int joining;
    int closed;
    int mutex_ready;
    /* Fixed from construction to close(). */
    int epfd, wakefd;
    char *names[MAX_INDEXES];
    uint8_t name_len[MAX_INDEXES];
    Py_buffer guard_view; /* valid while has_guard_view; keeps the exporter alive */
    int has_guard_view;
    /* Everything below: under mu. */
    pthread_mutex_t mu;
    uint8_t *guard; /* the stream guard's bytes (guard_view.buf); NULL: none */
    size_t guard_len;
    int freed;
    int stop_requested, thread_alive, thread_errno;
    uint64_t rounds;
    uint64_t py_reads, seen_py_reads;
    struct vector *vecs;
    uint32_t nvslots, vcap, nvecs;
    uint32_t *vfree;
    uint32_t nvfree, vfreecap;
    struct u32map by_token, by_fd;
    struct client *clients;
    uint32_t ncslots, ccap;
    uint32_t *cfree;
    uint32_t ncfree, cfreecap;
    struct u32map client_fds;
    uint64_t next_seq;
    uint32_t *dirty; /* client slots with work; capacity ccap */
    uint32_t ndirty, dirtycap;
    uint32_t *failed;
    uint32_t nfailed, failedcap; /* failedcap >= nfailed + nvecs always */
    uint64_t lat[LAT_BUCKETS];
} HotLoop;

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
wake(HotLoop *hl)
{
    const uint64_t one = 1;
    /* Only EAGAIN can fail here, with the counter at 2^64-2 pokes: the
     * thread is woken anyway. */
    ssize_t r = write(hl->wakefd, &one, sizeof one);
    (void)r;
}

static struct client *
client_of(HotLoop *hl, uint64_t cid)
{
    uint32_t slot = (uint32_t)(cid & (MAX_CLIENTS - 1));
    if (cid == 0 || slot >= hl->ncslots || hl->clients[slot].cid != cid) {
        return NULL;
    }
    return &hl->clients[slot];
}

static uint32_t
slot_of(HotLoop *hl, const struct client *c)
{
    return (uint32_t)(c - hl->clients);
}

static struct vector *
vector_by(HotLoop *hl, const struct u32map *m, uint32_t key)
{
    uint32_t *slot = map_get(m, key);
    return slot ? &hl->vecs[*slot] : NULL;
}

static void
mark_dirty(HotLoop *hl, struct client *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        hl->dirty[hl->ndirty++] = slot_of(hl, c); /* dirtycap >= ccap */
    }
}

static void
epoll_forget(HotLoop *hl, struct client *c)
{
    if (c->in_epoll) {
        (void)epoll_ctl(hl->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        c->in_epoll = 0;
    }
}

static void
drop_marks(struct client *c)
{
    for (uint32_t i = c->mhead; i < c->mtail; i++) {
        for (uint32_t j = 0; j < c->marks[i].nfds; j++) {
            close(c->marks[i].fds[j]);
        }
        free(c->marks[i].fds);
    }
    c->mhead = c->mtail = 0;
}

static void
drop_output(struct client *c)
{
    drop_marks(c);
    c->pos += c->end - c->start;
    c->start = c->end = 0;
    c->lat_end = 0;
}

/* Forget the held control notifications. */
static void
ctl_drop(struct client *c)
{
    free(c->ctl);
    c->ctl = NULL;
    c->ctl_len = 0;
    c->ctl_msgs = 0;
}

/* A write failed (or memory ran out): the client gets nothing more. */
static void
fail_client(HotLoop *hl, struct client *c, int err)
{
    c->err = err ? err : EIO;
    drop_output(c);
    free(c->out);
    c->out = NULL;
    c->cap = 0;
    free(c->marks);
    c->marks = NULL;
    c->mcap = 0;
    pend_free(&c->pend);
    ctl_drop(c);
    c->first_credit_ns = 0;
    epoll_forget(hl, c);
}

static void
credit_client(HotLoop *hl, struct client *c, uint32_t tok, uint64_t cnt, uint64_t *now)
{
    if (c->err || cnt == 0) {
        return;
    }
    if (pend_add(&c->pend, tok, cnt) < 0) {
        fail_client(hl, c, ENOMEM);
        return;
    }
    if (!c->first_credit_ns) {
        if (!*now) {
            *now = now_ns(); /* once per round, for every client credited in it */
        }
        c->first_credit_ns = *now;
    }
    mark_dirty(hl, c);
}

static void
credit_vector(HotLoop *hl, struct vector *v, uint64_t cnt, uint64_t *now)
{
    v->total = sat_add(v->total, cnt);
    for (uint32_t i = 0; i < v->nsubs; i++) {
        credit_client(hl, &hl->clients[v->subs[i]], v->token, cnt, now);
    }
}

/* Room for n > 0 more bytes at c->out + c->end; NULL on ENOMEM. */
static uint8_t *
out_reserve(struct client *c, size_t n)
{
    size_t used = c->end - c->start;
    if (c->cap - c->end >= n) {
        return c->out + c->end;
    }
    if (c->start && c->cap - used >= n) {
        memmove(c->out, c->out + c->start, used);
    } else {
        size_t cap = c->cap ? c->cap : 256;
        while (cap - used < n) {
            if (cap > SIZE_MAX / 2) {
                return NULL;
            }
            cap *= 2;
        }
        uint8_t *out = malloc(cap);
        if (out == NULL) {
            return NULL;
        }
        if (used) {
            memcpy(out, c->out + c->start, used);
        }
        free(c->out);
        c->out = out;
        c->cap = cap;
    }
    c->start = 0;
    c->end = used;
    return c->out + c->end;
}

/* Encoded credits now sit up to the end of the queue: latency is measured
 * until that byte has been handed to the kernel. One observation is open at
 * a time; credits encoded while one is open extend it (the earlier start is
 * kept, so the figure never flatters). */
static void
note_encoded(struct client *c)
{
    if (c->first_credit_ns) {
        if (!c->lat_end) {
            c->lat_since_ns = c->first_credit_ns;
        }
        c->lat_end = c->pos + (c->end - c->start);
    }
    if (!c->pend.nonzero) {
        c->first_credit_ns = 0;
    }
}

/* Everything pending goes into the queue: the held control notifications,
 * then one `irq` per index, indexes and vectors ascending. -1 on ENOMEM
 * (the caller then fails the client). */
static int
encode_pending(HotLoop *hl, struct client *c)
{
    struct pending *p = &c->pend;
    if (c->ctl_len) {
        uint8_t *w = out_reserve(c, c->ctl_len);
        if (w == NULL) {
            return -1;
        }
        memcpy(w, c->ctl, c->ctl_len);
        c->end += c->ctl_len;
        c->notifications = sat_add(c->notifications, c->ctl_msgs);
        ctl_drop(c);
    }
    if (p->n == 0) {
        return 0;
    }
    uint32_t groups = p->n < MAX_INDEXES ? p->n : MAX_INDEXES;
    uint8_t *w = out_reserve(c, (size_t)groups * IRQ_HEAD_MAX + (size_t)p->n * IRQ_PAIR_MAX);
    if (w == NULL) {
        return -1;
    }
    pend_unindex_sorted(p);
    for (uint32_t i = 0; i < p->n;) {
        uint32_t index = p->ent[i].tok >> 16, j = i, k = 0;
        uint64_t sum = 0;
        for (; j < p->n && p->ent[j].tok >> 16 == index; j++) {
            if (p->ent[j].cnt) {
                k++;
                sum = sat_add(sum, p->ent[j].cnt);
            }
        }
        if (k) {
            w = mp_irq(w, hl->names[index], hl->name_len[index], &p->ent[i], j - i, k);
            c->notifications++;
            c->delivered = sat_add(c->delivered, sum);
        }
        i = j;
    }
    c->end = (size_t)(w - c->out);
    pend_done(p);
    note_encoded(c);
    return 0;
}

static ssize_t
send_fds(int sock, const uint8_t *buf, size_t len, const int *fds, uint32_t nfds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = CMSG_SPACE(sizeof(int) * nfds),
    };
    memset(control.buf, 0, sizeof control.buf);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    return sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static void
record_latency(HotLoop *hl, uint64_t ns)
{
    /* bisect_left(bounds, ns / 1000): the first i with 1000 << i >= ns. */
    int slot = 0;
    while (slot < LAT_BUCKETS - 1 && ((uint64_t)1000 << slot) < ns) {
        slot++;
    }
    hl->lat[slot]++;
}

/* Store a stream-guard byte: atomic so that it is never elided or torn,
 * relaxed because only its order against this thread's own send matters,
 * which the compiler barrier keeps (see the header). */
static inline void
guard_store(uint8_t *g, uint8_t value)
{
    __atomic_store_n(g, value, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* Write what the socket takes now; keep EPOLLOUT registered while bytes
 * remain. On an error other than EAGAIN the client fails. */
static void
client_write(HotLoop *hl, struct client *c)
{
    uint8_t *g = c->gslot >= 0 && hl->guard != NULL ? hl->guard + c->gslot : NULL;
    while (c->start < c->end) {
        size_t len = c->end - c->start;
        struct fdmark *m = c->mhead < c->mtail ? &c->marks[c->mhead] : NULL;
        int with_fds = m != NULL && m->pos == c->pos;
        ssize_t r;
        /* All-or-nothing, and the whole queue of whole messages: no mark. */
        if (g != NULL && (m != NULL || len > c->atomic_max)) {
            guard_store(g, 1);
        }
        if (with_fds) {
            if (m->len < len) {
                len = (size_t)m->len;
            }
            r = send_fds(c->fd, c->out + c->start, len, m->fds, m->nfds);
        } else {
            if (m != NULL && m->pos - c->pos < len) {
                len = (size_t)(m->pos - c->pos); /* fds must not ride on earlier bytes */
            }
            r = send(c->fd, c->out + c->start, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            fail_client(hl, c, errno);
            return;
        }
        if (r <= 0) {
            break; /* full */
        }
        if (with_fds) {
            /* Sent with the first byte: the peer has its own references. */
            for (uint32_t j = 0; j < m->nfds; j++) {
                close(m->fds[j]);
            }
            free(m->fds);
            if (++c->mhead == c->mtail) {
                c->mhead = c->mtail = 0;
            }
        }
        c->start += (size_t)r;
        c->pos += (uint64_t)r;
    }
    if (c->lat_end && c->pos >= c->lat_end) {
        record_latency(hl, now_ns() - c->lat_since_ns);
        c->lat_end = 0;
    }
    if (c->start == c->end) {
        if (g != NULL) {
            guard_store(g, 0); /* everything out: the stream is at a boundary */
        }
        c->start = c->end = 0;
        if (c->cap > OUT_KEEP) {
            free(c->out);
            c->out = NULL;
            c->cap = 0;
        }
        epoll_forget(hl, c);
    } else if (!c->in_epoll) {
        struct epoll_event ev = {.events = EPOLLOUT};
        ev.data.u64 = (uint64_t)KIND_CLIENT << KIND_SHIFT | c->cid;
        if (epoll_ctl(hl->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            fail_client(hl, c, errno);
            return;
        }
        c->in_epoll = 1;
    }
}

/* Write the queue, and whenever it empties, encode what is pending and go
 * on: counts are only encoded into an empty queue. */
static void
client_service(HotLoop *hl, struct client *c)
{
    while (!c->err) {
        if (c->start == c->end) {
            if (c->pend.n == 0 && c->ctl_len == 0) {
                return;
            }
            if (encode_pending(hl, c) < 0) {
                fail_client(hl, c, ENOMEM);
                return;
            }
        }
        client_write(hl, c);
        if (c->start != c->end) {
            return;
        }
    }
}

static void
service_dirty(HotLoop *hl)
{
    for (uint32_t i = 0; i < hl->ndirty; i++) {
        struct client *c = &hl->clients[hl->dirty[i]];
        c->dirty = 0;
        client_service(hl, c);
    }
    hl->ndirty = 0;
}

/* 1: *value read; 0: nothing to read; -1: not a working eventfd. `careful`
 * polls first, so a counter someone else emptied cannot block us. */
static int
read_counter(int fd, int careful, uint64_t *value)
{
    if (careful) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r;
        do {
            r = poll(&p, 1, 0);
        } while (r < 0 && errno == EINTR);
        if (r <= 0 || !(p.revents & POLLIN)) {
            return 0;
        }
    }
    /* syscall(2), not read(3): read is a cancellation point, and in a
     * multi-threaded process glibc brackets it with two atomic updates of the
     * caller's cancellation state, 53 instructions per ready vector
     * (callgrind). Nothing in this file is ever cancelled. */
    long got;
    do {
        got = syscall(SYS_read, fd, value, sizeof *value);
    } while (got < 0 && errno == EINTR);
    if (got == (long)sizeof *value) {
        return 1;
    }
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return 0;
    }
    return -1; /* 0 bytes (end of file), a short read (not an eventfd) or an error */
}

static void
forget_vector(HotLoop *hl, struct vector *v)
{
    (void)epoll_ctl(hl->epfd, EPOLL_CTL_DEL, v->fd, NULL);
    map_del(&hl->by_token, v->token);
    map_del(&hl->by_fd, (uint32_t)v->fd);
    free(v->subs);
    v->subs = NULL;
    v->nsubs = v->subcap = 0;
    v->fd = -1;
    hl->vfree[hl->nvfree++] = (uint32_t)(v - hl->vecs);
    hl->nvecs--;
}

static void
hot_vector(HotLoop *hl, uint64_t data, uint32_t events, int careful, uint64_t *now)
{
    uint32_t tok = (uint32_t)(data >> 32) & ((1u << TOKEN_BITS) - 1);
    int fd = (int)(uint32_t)data;
    struct vector *v = vector_by(hl, &hl->by_token, tok);
    if (v == NULL || v->fd != fd) {
        return; /* removed (and maybe replaced) after epoll_wait returned */
    }
    int failed = (events & (EPOLLERR | EPOLLHUP)) != 0;
    if (events & EPOLLIN) {
        uint64_t value;
        int r = read_counter(fd, careful, &value);
        if (r > 0) {
            credit_vector(hl, v, value, now);
        } else if (r < 0) {
            failed = 1;
        }
    }
    if (failed) {
        hl->failed[hl->nfailed++] = tok; /* failedcap >= nfailed + nvecs */
        forget_vector(hl, v);
    }
}

static int
socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
        return errno;
    }
    return err;
}

static void
hot_client(HotLoop *hl, uint64_t cid, uint32_t events)
{
    struct client *c = client_of(hl, cid);
    if (c == NULL || c->err) {
        return; /* removed after epoll_wait returned */
    }
    if (events & (EPOLLERR | EPOLLHUP)) {
        /* The write names the errno; if it somehow gets through, bytes are
         * still queued and the level-triggered event would repeat. */
        client_write(hl, c);
        if (!c->err && c->in_epoll) {
            int err = socket_error(c->fd);
            fail_client(hl, c, err ? err : EPIPE);
        }
        if (c->err) {
            return;
        }
    }
    mark_dirty(hl, c);
}

/* One round, under the mutex. Returns non-zero when the thread must stop. */
static int
hot_round(HotLoop *hl, const struct epoll_event *events, int n)
{
    uint64_t now = 0;
    int careful = hl->py_reads != hl->seen_py_reads;
    for (int i = 0; i < n; i++) {
        uint64_t data = events[i].data.u64;
        switch (data >> KIND_SHIFT) {
        case KIND_WAKE: {
            uint64_t value;
            (void)read_counter(hl->wakefd, 0, &value);
            break;
        }
        case KIND_VECTOR:
            hot_vector(hl, data, events[i].events, careful, &now);
            break;
        case KIND_CLIENT:
            hot_client(hl, data & (((uint64_t)1 << KIND_SHIFT) - 1), events[i].events);
            break;
        default:
            break;
        }
    }
    service_dirty(hl);
    hl->seen_py_reads = hl->py_reads;
    return hl->stop_requested;
}

static void *
hot_main(void *arg)
{
    HotLoop *hl = arg;
    struct epoll_event events[HOT_EVENTS];
    for (;;) {
        int n = epoll_wait(hl->epfd, events, HOT_EVENTS, -1); /* without the mutex */
        int err = n < 0 ? errno : 0;
        if (err == EINTR) {
            continue;
        }
        pthread_mutex_lock(&hl->mu);
        if (err) {
            hl->thread_errno = err; /* EBADF/EINVAL: a bug; `running` turns false */
            break;
        }
        hl->rounds++;
        if (hot_round(hl, events, n)) {
            break;
        }
        pthread_mutex_unlock(&hl->mu);
    }
    uint64_t value;
    (void)read_counter(hl->wakefd, 0, &value); /* no spurious round after a restart */
    hl->thread_alive = 0;
    pthread_mutex_unlock(&hl->mu);
    return NULL;
}

/* ---- Python side: locking and errors ------------------------------------ */

static void
hl_lock(HotLoop *hl)
{
    if (pthread_mutex_trylock(&hl->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&hl->mu);
        Py_END_ALLOW_THREADS
    }
}

static void
hl_unlock(HotLoop *hl)
{
    pthread_mutex_unlock(&hl->mu);
}

static int
check_open(HotLoop *hl)
{
    if (hl->closed) {
        PyErr_SetString(PyExc_ValueError, "HotLoop is closed");
        return -1;
    }
    return 0;
}

/* Take the mutex for a method; ValueError if close() freed the state while
 * this thread waited for it. */
static int
hl_acquire(HotLoop *hl)
{
    if (check_open(hl) < 0) {
        return -1;
    }
    hl_lock(hl);
    if (hl->freed) {
        hl_unlock(hl);
        PyErr_SetString(PyExc_ValueError, "HotLoop is closed");
        return -1;
    }
    return 0;
}

/* An error decided under the mutex, raised after releasing it. */
struct fail {
    PyObject *type; /* NULL: no error */
    int err;        /* errno for OSError and its subclasses; 0: none */
    char msg[160];
};

static void
fail_set(struct fail *f, PyObject *type, int err, const char *fmt, ...)
{
    va_list ap;
    f->type = type;
    f->err = err;
    va_start(ap, fmt);
    vsnprintf(f->msg, sizeof f->msg, fmt, ap);
    va_end(ap);
}

static PyObject *
fail_raise(const struct fail *f)
{
    if (f->type == PyExc_OSError) {
        errno = f->err;
        return PyErr_SetFromErrno(PyExc_OSError); /* BrokenPipeError for EPIPE, ... */
    }
    if (f->err) {
        PyObject *args = Py_BuildValue("(is)", f->err, f->msg);
        if (args != NULL) {
            PyErr_SetObject(f->type, args);
            Py_DECREF(args);
        }
        return NULL;
    }
    if (f->type == PyExc_MemoryError) {
        return PyErr_NoMemory();
    }
    PyErr_SetString(f->type, f->msg);
    return NULL;
}

/* ---- argument parsing --------------------------------------------------- */

static int
arg_u64(PyObject *arg, const char *what, uint64_t max, uint64_t *out)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.80s", what, Py_TYPE(arg)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s out of range (0..%llu): %R", what,
                     (unsigned long long)max, arg);
        return -1;
    }
    if (v > max) {
        PyErr_Format(PyExc_ValueError, "%s out of range (0..%llu): %llu", what,
                     (unsigned long long)max, v);
        return -1;
    }
    *out = v;
    return 0;
}

static int
arg_fd(PyObject *arg, const char *what, int *out)
{
    uint64_t v;
    if (arg_u64(arg, what, INT32_MAX, &v) < 0) {
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* A token whose index has a name. */
static int
arg_token(HotLoop *hl, PyObject *arg, uint32_t *out)
{
    uint64_t v;
    if (arg_u64(arg, "token", UINT32_MAX, &v) < 0) {
        return -1;
    }
    if (v >> 16 >= MAX_INDEXES) {
        PyErr_Format(PyExc_ValueError, "token %llu: its index (token >> 16) must be < %d",
                     (unsigned long long)v, MAX_INDEXES);
        return -1;
    }
    if (hl->names[v >> 16] == NULL) {
        PyErr_Format(PyExc_ValueError, "token %llu: index %llu has no name",
                     (unsigned long long)v, (unsigned long long)(v >> 16));
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int
arg_cid(PyObject *arg, uint64_t *out)
{
    return arg_u64(arg, "client id", UINT64_MAX, out);
}

/* Release the mutex, then raise the error decided under it or return None. */
static PyObject *
unlock_none(HotLoop *hl, const struct fail *f)
{
    hl_unlock(hl);
    if (f->type) {
        return fail_raise(f);
    }
    Py_RETURN_NONE;
}

/* Parse a client id, take the mutex and find the client. NULL, with an
 * exception set and the mutex released, if any of that fails. */
static struct client *
begin_client(HotLoop *hl, PyObject *cid_arg)
{
    uint64_t cid;
    if (arg_cid(cid_arg, &cid) < 0 || hl_acquire(hl) < 0) {
        return NULL;
    }
    struct client *c = client_of(hl, cid);
    if (c == NULL) {
        hl_unlock(hl);
        PyErr_Format(PyExc_KeyError, "no client %llu", (unsigned long long)cid);
    }
    return c;
}

/* The same for a vector, by the fd it was registered with. */
static struct vector *
begin_vector(HotLoop *hl, PyObject *fd_arg)
{
    int fd;
    if (arg_fd(fd_arg, "fd", &fd) < 0 || hl_acquire(hl) < 0) {
        return NULL;
    }
    struct vector *v = vector_by(hl, &hl->by_fd, (uint32_t)fd);
    if (v == NULL) {
        hl_unlock(hl);
        PyErr_Format(PyExc_KeyError, "fd %d is not registered", fd);
    }
    return v;
}

/* ---- lifecycle ----------------------------------------------------------- */

static void
free_state(HotLoop *hl)
{
    for (uint32_t i = 0; i < hl->ncslots; i++) {
        struct client *c = &hl->clients[i];
        drop_marks(c);
        free(c->marks);
        free(c->out);
        pend_free(&c->pend);
        free(c->ctl);
    }
    for (uint32_t i = 0; i < hl->nvslots; i++) {
        free(hl->vecs[i].subs);
    }
    free(hl->clients);
    free(hl->cfree);
    free(hl->vecs);
    free(hl->vfree);
    free(hl->dirty);
    free(hl->failed);
    map_free(&hl->by_token);
    map_free(&hl->by_fd);
    map_free(&hl->client_fds);
    hl->clients = NULL;
    hl->cfree = NULL;
    hl->vecs = NULL;
    hl->vfree = NULL;
    hl->dirty = NULL;
    hl->failed = NULL;
    hl->ncslots = hl->ccap = hl->ncfree = hl->cfreecap = 0;
    hl->nvslots = hl->vcap = hl->nvfree = hl->vfreecap = hl->nvecs = 0;
    hl->ndirty = hl->dirtycap = hl->nfailed = hl->failedcap = 0;
}

static PyObject *
hl_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"index_names", NULL};
    PyObject *names_arg;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:HotLoop", kwlist, &names_arg)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(names_arg, "index_names must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count > MAX_INDEXES) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "index_names: at most %d entries, got %zd", MAX_INDEXES,
                     count);
        return NULL;
    }
    HotLoop *hl = (HotLoop *)type->tp_alloc(type, 0);
    if (hl == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    hl->epfd = hl->wakefd = -1;
    hl->next_seq = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (item == Py_None) {
            continue;
        }
        if (!PyUnicode_Check(item)) {
            PyErr_Format(PyExc_TypeError, "index_names[%zd] must be str or None, not %.80s", i,
                         Py_TYPE(item)->tp_name);
            goto error;
        }
        Py_ssize_t len;
        const char *utf8 = PyUnicode_AsUTF8AndSize(item, &len);
        if (utf8 == NULL) {
            goto error;
        }
        if (len < 1 || len > NAME_MAX_BYTES) {
            PyErr_Format(PyExc_ValueError, "index_names[%zd] must be 1..%d bytes of UTF-8: %R", i,
                         NAME_MAX_BYTES, item);
            goto error;
        }
        hl->names[i] = malloc((size_t)len);
        if (hl->names[i] == NULL) {
            PyErr_NoMemory();
            goto error;
        }
        memcpy(hl->names[i], utf8, (size_t)len);
        hl->name_len[i] = (uint8_t)len;
    }
    Py_CLEAR(seq);
    if (pthread_mutex_init(&hl->mu, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        goto error;
    }
    hl->mutex_ready = 1;
    hl->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (hl->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    hl->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (hl->wakefd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = (uint64_t)KIND_WAKE << KIND_SHIFT;
    if (epoll_ctl(hl->epfd, EPOLL_CTL_ADD, hl->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    return (PyObject *)hl;

error:
    Py_XDECREF(seq);
    Py_DECREF(hl);
    return NULL;
}

/* Ask the thread to stop and join it. -1 with an exception if another
 * Python thread is already joining it. */
static int
stop_thread(HotLoop *hl)
{
    if (!hl->thread_started) {
        return 0;
    }
    if (hl->joining) {
        PyErr_SetString(PyExc_RuntimeError, "another thread is stopping this HotLoop");
        return -1;
    }
    hl->joining = 1;
    hl_lock(hl);
    hl->stop_requested = 1;
    hl_unlock(hl);
    wake(hl);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(hl->thread, NULL);
    Py_END_ALLOW_THREADS
    hl->thread_started = 0;
    hl->joining = 0;
    hl_lock(hl);
    hl->stop_requested = 0;
    hl_unlock(hl);
    return 0;
}

static int
close_loop(HotLoop *hl)
{
    if (hl->closed) {
        return 0;
    }
    if (stop_thread(hl) < 0) {
        return -1;
    }
    hl->closed = 1;
    if (hl->mutex_ready) {
        hl_lock(hl);
        free_state(hl);
        hl->guard = NULL;
        hl->guard_len = 0;
        hl->freed = 1;
        hl_unlock(hl);
    }
    if (hl->has_guard_view) {
        PyBuffer_Release(&hl->guard_view);
        hl->has_guard_view = 0;
    }
    if (hl->epfd >= 0) {
        close(hl->epfd);
        hl->epfd = -1;
    }
    if (hl->wakefd >= 0) {
        close(hl->wakefd);
        hl->wakefd = -1;
    }
    return 0;
}

static void
hl_dealloc(HotLoop *hl)
{
    PyTypeObject *type = Py_TYPE(hl);
    if (close_loop(hl) < 0) {
        PyErr_WriteUnraisable((PyObject *)hl);
    }
    if (hl->mutex_ready) {
        pthread_mutex_destroy(&hl->mu);
    }
    for (int i = 0; i < MAX_INDEXES; i++) {
        free(hl->names[i]);
    }
    type->tp_free((PyObject *)hl);
    Py_DECREF(type);
}

PyDoc_STRVAR(start_doc, "start()\n\nSpawn the relay thread. RuntimeError if it is running.");

static PyObject *
hl_start(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    if (check_open(hl) < 0) {
        return NULL;
    }
    if (hl->joining) {
        PyErr_SetString(PyExc_RuntimeError, "the HotLoop is being stopped");
        return NULL;
    }
    if (hl->thread_started) {
        hl_lock(hl);
        int alive = hl->thread_alive;
        hl_unlock(hl);
        if (alive) {
            PyErr_SetString(PyExc_RuntimeError, "the HotLoop is already running");
            return NULL;
        }
        if (stop_thread(hl) < 0) { /* it died (thread_errno): reap it */
            return NULL;
        }
    }
    hl_lock(hl);
    hl->stop_requested = 0;
    hl->thread_alive = 1;
    hl->thread_errno = 0;
    hl->seen_py_reads = hl->py_reads;
    int backlog = hl->ndirty > 0;
    hl_unlock(hl);
    /* The thread blocks every signal: they stay with the main thread, where
     * Python's handlers run, and never interrupt a round. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&hl->thread, NULL, hot_main, hl);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        hl_lock(hl);
        hl->thread_alive = 0;
        hl_unlock(hl);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    hl->thread_started = 1;
    if (backlog) {
        wake(hl); /* credits made while stopped */
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc,
             "stop()\n\nStop the relay thread and wait for it; idempotent. All state is kept,\n"
             "so start() may be called again.");

static PyObject *
hl_stop(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    if (check_open(hl) < 0 || stop_thread(hl) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(close_doc,
             "close()\n\nStop the thread and free everything; idempotent. Registered vector\n"
             "fds and client sockets are not closed (they are the caller's).");

static PyObject *
hl_close(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    if (close_loop(hl) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(poke_doc, "poke()\n\nWake the thread for one round.");

static PyObject *
hl_poke(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    if (check_open(hl) < 0) {
        return NULL;
    }
    wake(hl);
    Py_RETURN_NONE;
}

static PyObject *
hl_get_running(HotLoop *hl, void *Py_UNUSED(closure))
{
    int alive = 0;
    if (hl->thread_started && !hl->closed) {
        hl_lock(hl);
        alive = hl->thread_alive;
        hl_unlock(hl);
    }
    return PyBool_FromLong(alive);
}

static PyObject *
hl_get_rounds(HotLoop *hl, void *Py_UNUSED(closure))
{
    if (hl_acquire(hl) < 0) {
        return NULL;
    }
    uint64_t rounds = hl->rounds;
    hl_unlock(hl);
    return PyLong_FromUnsignedLongLong(rounds);
}

/* ---- vectors ------------------------------------------------------------- */

PyDoc_STRVAR(add_vector_doc,
             "add_vector(fd, token)\n\nRegister an eventfd (EPOLLIN, level-triggered) under\n"
             "token = index << 16 | vector. FileExistsError if fd is registered,\n"
             "ValueError if token is.");

static PyObject *
hl_add_vector(HotLoop *hl, PyObject *args)
{
    PyObject *fd_arg, *tok_arg;
    int fd;
    uint32_t tok;
    struct fail f = {0};
    if (!PyArg_ParseTuple(args, "OO:add_vector", &fd_arg, &tok_arg) ||
        arg_fd(fd_arg, "fd", &fd) < 0 || arg_token(hl, tok_arg, &tok) < 0 ||
        hl_acquire(hl) < 0) {
        return NULL;
    }
    if (map_get(&hl->by_fd, (uint32_t)fd) != NULL) {
        fail_set(&f, PyExc_FileExistsError, EEXIST, "fd %d is already registered", fd);
        goto out;
    }
    struct vector *other = vector_by(hl, &hl->by_token, tok);
    if (other != NULL) {
        fail_set(&f, PyExc_ValueError, 0, "token %u is already registered (fd %d)", tok,
                 other->fd);
        goto out;
    }
    /* Every allocation first, so that nothing can fail after epoll_ctl. */
    if (grow((void **)&hl->vecs, &hl->vcap, sizeof *hl->vecs, (uint64_t)hl->nvslots + 1, 8) < 0 ||
        grow((void **)&hl->vfree, &hl->vfreecap, sizeof *hl->vfree, hl->vcap, 8) < 0 ||
        grow((void **)&hl->failed, &hl->failedcap, sizeof *hl->failed,
             (uint64_t)hl->nfailed + hl->nvecs + 1, 8) < 0 ||
        map_reserve(&hl->by_fd) < 0 || map_reserve(&hl->by_token) < 0) {
        fail_set(&f, PyExc_MemoryError, 0, "");
        goto out;
    }
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = (uint64_t)KIND_VECTOR << KIND_SHIFT | (uint64_t)tok << 32 | (uint32_t)fd;
    if (epoll_ctl(hl->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        fail_set(&f, PyExc_OSError, errno, "");
        goto out;
    }
    uint32_t slot = hl->nvfree ? hl->vfree[--hl->nvfree] : hl->nvslots++;
    hl->vecs[slot] = (struct vector){.fd = fd, .token = tok};
    map_insert_new(&hl->by_fd, (uint32_t)fd, slot);
    map_insert_new(&hl->by_token, tok, slot);
    hl->nvecs++;
out:
    return unlock_none(hl, &f);
}

/* Read a vector's counter now (under the mutex) and credit it. Returns the
 * count; *woke tells whether any client got work. */
static uint64_t
drain_now(HotLoop *hl, struct vector *v, int *woke)
{
    uint64_t value = 0, now = 0;
    hl->py_reads++; /* the thread's events for this fd may be stale now */
    if (read_counter(v->fd, 1, &value) <= 0) {
        return 0; /* a failing fd is left for the thread to report */
    }
    credit_vector(hl, v, value, &now);
    *woke = hl->ndirty > 0;
    return value;
}

static PyObject *
vector_op(HotLoop *hl, PyObject *fd_arg, int remove)
{
    struct vector *v = begin_vector(hl, fd_arg);
    if (v == NULL) {
        return NULL;
    }
    int woke = 0;
    uint64_t count = drain_now(hl, v, &woke);
    if (remove) {
        forget_vector(hl, v);
    }
    hl_unlock(hl);
    if (woke) {
        wake(hl);
    }
    return PyLong_FromUnsignedLongLong(count);
}

PyDoc_STRVAR(remove_vector_doc,
             "remove_vector(fd) -> int\n\nDrain like drain_vector, then deregister and forget\n"
             "the vector and its subscriptions. Returns the count drained. Close fd after.");

static PyObject *
hl_remove_vector(HotLoop *hl, PyObject *fd_arg)
{
    return vector_op(hl, fd_arg, 1);
}

PyDoc_STRVAR(drain_vector_doc,
             "drain_vector(fd) -> int\n\nRead the counter now (never blocking) and credit it to\n"
             "the current subscribers. Returns the count, 0 if none.");

static PyObject *
hl_drain_vector(HotLoop *hl, PyObject *fd_arg)
{
    return vector_op(hl, fd_arg, 0);
}

PyDoc_STRVAR(vector_total_doc, "vector_total(fd) -> int\n\nEvery count read since add_vector.");

static PyObject *
hl_vector_total(HotLoop *hl, PyObject *fd_arg)
{
    struct vector *v = begin_vector(hl, fd_arg);
    if (v == NULL) {
        return NULL;
    }
    uint64_t total = v->total;
    hl_unlock(hl);
    return PyLong_FromUnsignedLongLong(total);
}

/* A list of ints from a C array, built after the mutex is released. */
static PyObject *
list_of_u64(const uint64_t *values, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
        if (v == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

PyDoc_STRVAR(take_failed_doc,
             "take_failed() -> list[int]\n\nTokens of vectors the thread dropped (EPOLLERR,\n"
             "EPOLLHUP, a 0-byte or short read, a read error); each reported once.");

static PyObject *
hl_take_failed(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    if (hl_acquire(hl) < 0) {
        return NULL;
    }
    uint32_t n = hl->nfailed;
    uint64_t *tokens = malloc(sizeof *tokens * (n ? n : 1));
    if (tokens != NULL) {
        for (uint32_t i = 0; i < n; i++) {
            tokens[i] = hl->failed[i];
        }
        hl->nfailed = 0;
    }
    hl_unlock(hl);
    if (tokens == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *list = list_of_u64(tokens, n);
    free(tokens);
    return list;
}

/* ---- clients -------------------------------------------------------------- */

PyDoc_STRVAR(add_client_doc,
             "add_client(sockfd, guard_slot=-1, atomic_max=0) -> int\n\nTake a connected\n"
             "stream socket (not owned, never closed here). Returns a client id, never reused\n"
             "by this HotLoop. With guard_slot >= 0 the client's byte in the stream guard\n"
             "(set_guard) is kept: 0 whenever its stream is at a message boundary; sends of\n"
             "at most atomic_max bytes are taken as all-or-nothing. ValueError if the slot\n"
             "is outside the guard.");

static PyObject *
hl_add_client(HotLoop *hl, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"sockfd", "guard_slot", "atomic_max", NULL};
    PyObject *fd_arg;
    int gslot = -1;
    unsigned int atomic_max = 0;
    int fd;
    struct stat st;
    struct fail f = {0};
    uint64_t cid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|iI:add_client", kwlist, &fd_arg, &gslot,
                                     &atomic_max)) {
        return NULL;
    }
    if (arg_fd(fd_arg, "sockfd", &fd) < 0) {
        return NULL;
    }
    if (gslot < -1) {
        PyErr_Format(PyExc_ValueError, "guard_slot must be -1 (none) or a slot, not %d", gslot);
        return NULL;
    }
    if (fstat(fd, &st) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!S_ISSOCK(st.st_mode)) {
        PyErr_Format(PyExc_ValueError, "fd %d is not a socket", fd);
        return NULL;
    }
    if (hl_acquire(hl) < 0) {
        return NULL;
    }
    if (map_get(&hl->client_fds, (uint32_t)fd) != NULL) {
        fail_set(&f, PyExc_FileExistsError, EEXIST, "fd %d is already a client", fd);
        goto out;
    }
    if (gslot >= 0 && (size_t)gslot >= hl->guard_len) {
        fail_set(&f, PyExc_ValueError, 0, "guard slot %d is outside the guard (%zu bytes)", gslot,
                 hl->guard_len);
        goto out;
    }
    if (hl->ncfree == 0 && hl->ncslots >= MAX_CLIENTS) {
        fail_set(&f, PyExc_ValueError, 0, "too many clients (%u)", MAX_CLIENTS);
        goto out;
    }
    if (hl->next_seq > MAX_SEQ) {
        fail_set(&f, PyExc_OverflowError, 0, "client ids exhausted");
        goto out;
    }
    if (grow((void **)&hl->clients, &hl->ccap, sizeof *hl->clients, (uint64_t)hl->ncslots + 1,
             4) < 0 ||
        grow((void **)&hl->cfree, &hl->cfreecap, sizeof *hl->cfree, hl->ccap, 4) < 0 ||
        grow((void **)&hl->dirty, &hl->dirtycap, sizeof *hl->dirty, hl->ccap, 4) < 0 ||
        map_reserve(&hl->client_fds) < 0) {
        fail_set(&f, PyExc_MemoryError, 0, "");
        goto out;
    }
    uint32_t slot = hl->ncfree ? hl->cfree[--hl->ncfree] : hl->ncslots++;
    cid = hl->next_seq++ << CID_SLOT_BITS | slot;
    hl->clients[slot] =
        (struct client){.cid = cid, .fd = fd, .gslot = gslot, .atomic_max = atomic_max};
    map_insert_new(&hl->client_fds, (uint32_t)fd, slot);
out:
    hl_unlock(hl);
    return f.type ? fail_raise(&f) : PyLong_FromUnsignedLongLong(cid);
}

static uint32_t
lower_bound(const uint32_t *a, uint32_t n, uint32_t x)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (a[mid] < x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Remove client slot `slot` from v's subscribers; 0 if it was not one. */
static int
unsubscribe_slot(struct vector *v, uint32_t slot)
{
    uint32_t i = lower_bound(v->subs, v->nsubs, slot);
    if (i == v->nsubs || v->subs[i] != slot) {
        return 0;
    }
    memmove(&v->subs[i], &v->subs[i + 1], sizeof *v->subs * (v->nsubs - i - 1));
    v->nsubs--;
    if (v->subcap > 4 && v->nsubs * 4 <= v->subcap) {
        uint32_t *smaller = realloc(v->subs, sizeof *v->subs * (v->subcap / 2));
        if (smaller != NULL) {
            v->subs = smaller;
            v->subcap /= 2;
        }
    }
    return 1;
}

PyDoc_STRVAR(remove_client_doc,
             "remove_client(cid)\n\nForget a client: its subscriptions, pending counts, held\n"
             "control notifications and queued output (dup'ed fds closed). Call before\n"
             "closing the socket.");

static PyObject *
hl_remove_client(HotLoop *hl, PyObject *cid_arg)
{
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        return NULL;
    }
    uint32_t slot = slot_of(hl, c);
    /* O(vectors * log subscribers), and no per-client subscription list. */
    for (uint32_t i = 0; i < hl->nvslots; i++) {
        if (hl->vecs[i].fd >= 0) {
            unsubscribe_slot(&hl->vecs[i], slot);
        }
    }
    if (c->dirty) {
        for (uint32_t i = 0; i < hl->ndirty; i++) {
            if (hl->dirty[i] == slot) {
                hl->dirty[i] = hl->dirty[--hl->ndirty];
                break;
            }
        }
    }
    epoll_forget(hl, c);
    drop_marks(c);
    free(c->marks);
    free(c->out);
    pend_free(&c->pend);
    free(c->ctl);
    map_del(&hl->client_fds, (uint32_t)c->fd);
    *c = (struct client){0};
    hl->cfree[hl->ncfree++] = slot;
    hl_unlock(hl);
    Py_RETURN_NONE;
}

/* Parse (cid, token) and find both under the mutex; on error the mutex is
 * not held and an exception is set. */
static int
client_token_args(HotLoop *hl, PyObject *args, const char *fmt, struct client **c,
                  struct vector **v, uint32_t *tok)
{
    PyObject *cid_arg, *tok_arg;
    if (!PyArg_ParseTuple(args, fmt, &cid_arg, &tok_arg) || arg_token(hl, tok_arg, tok) < 0 ||
        (*c = begin_client(hl, cid_arg)) == NULL) {
        return -1;
    }
    *v = vector_by(hl, &hl->by_token, *tok);
    if (*v == NULL) {
        hl_unlock(hl);
        PyErr_Format(PyExc_KeyError, "no vector with token %u", *tok);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(subscribe_doc,
             "subscribe(cid, token)\n\nCredit the vector's counts to the client from now on;\n"
             "idempotent. KeyError if the client or the vector is unknown.");

static PyObject *
hl_subscribe(HotLoop *hl, PyObject *args)
{
    struct client *c;
    struct vector *v;
    uint32_t tok;
    if (client_token_args(hl, args, "OO:subscribe", &c, &v, &tok) < 0) {
        return NULL;
    }
    uint32_t slot = slot_of(hl, c);
    uint32_t i = lower_bound(v->subs, v->nsubs, slot);
    int nomem = 0;
    if (i == v->nsubs || v->subs[i] != slot) {
        if (grow((void **)&v->subs, &v->subcap, sizeof *v->subs, (uint64_t)v->nsubs + 1, 4) < 0) {
            nomem = 1;
        } else {
            memmove(&v->subs[i + 1], &v->subs[i], sizeof *v->subs * (v->nsubs - i));
            v->subs[i] = slot;
            v->nsubs++;
        }
    }
    hl_unlock(hl);
    if (nomem) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(unsubscribe_doc,
             "unsubscribe(cid, token)\n\nStop crediting; a count still pending for token is\n"
             "queued now as an irq notification. KeyError if not subscribed.");

static PyObject *
hl_unsubscribe(HotLoop *hl, PyObject *args)
{
    struct client *c;
    struct vector *v;
    uint32_t tok;
    if (client_token_args(hl, args, "OO:unsubscribe", &c, &v, &tok) < 0) {
        return NULL;
    }
    if (!unsubscribe_slot(v, slot_of(hl, c))) {
        unsigned long long cid = c->cid;
        hl_unlock(hl);
        PyErr_Format(PyExc_KeyError, "client %llu is not subscribed to token %u", cid, tok);
        return NULL;
    }
    int woke = 0;
    struct pent *e = c->err ? NULL : pend_get(&c->pend, tok);
    if (e != NULL && e->cnt) {
        uint8_t *w = out_reserve(c, IRQ_HEAD_MAX + IRQ_PAIR_MAX);
        if (w == NULL) {
            fail_client(hl, c, ENOMEM);
        } else {
            uint32_t index = tok >> 16;
            c->end = (size_t)(mp_irq(w, hl->names[index], hl->name_len[index], e, 1, 1) - c->out);
            c->notifications++;
            c->delivered = sat_add(c->delivered, e->cnt);
            e->cnt = 0; /* stays as a zero entry until the next encode clears the table */
            c->pend.nonzero--;
            note_encoded(c);
            mark_dirty(hl, c);
            woke = 1;
        }
    }
    hl_unlock(hl);
    if (woke) {
        wake(hl);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(credit_doc,
             "credit(cid, token, count)\n\nAdd to the client's pending counter for token,\n"
             "subscribed or not (a session adopted after a restart).");

static PyObject *
hl_credit(HotLoop *hl, PyObject *args)
{
    PyObject *cid_arg, *tok_arg, *count_arg;
    uint64_t count, now = 0;
    uint32_t tok;
    struct client *c;
    if (!PyArg_ParseTuple(args, "OOO:credit", &cid_arg, &tok_arg, &count_arg) ||
        arg_token(hl, tok_arg, &tok) < 0 || arg_u64(count_arg, "count", UINT64_MAX, &count) < 0 ||
        (c = begin_client(hl, cid_arg)) == NULL) {
        return NULL;
    }
    credit_client(hl, c, tok, count, &now);
    int woke = c->dirty;
    hl_unlock(hl);
    if (woke) {
        wake(hl);
    }
    Py_RETURN_NONE;
}

static void
close_fds(const int *fds, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        close(fds[i]);
    }
}

/* Queue data, its fds riding on its first bytes in batches of SCM_MAX_FD
 * (one byte per batch, the last batch with the rest), as session._sendall
 * does. The dups are owned by the queue on success. -1 on ENOMEM. */
static int
queue_data(struct client *c, const Py_buffer *data, int *dups, Py_ssize_t ndups)
{
    uint32_t batches = (uint32_t)((ndups + SCM_MAX_FD - 1) / SCM_MAX_FD);
    if (batches && grow((void **)&c->marks, &c->mcap, sizeof *c->marks,
                        (uint64_t)c->mtail + batches, 4) < 0) {
        return -1;
    }
    /* n = 0 would be "no room needed" on a client without a buffer yet. */
    uint8_t *w = data->len ? out_reserve(c, (size_t)data->len) : NULL;
    if (data->len && w == NULL) {
        return -1;
    }
    uint64_t at = c->pos + (c->end - c->start);
    for (uint32_t b = 0; b < batches; b++) {
        uint32_t n = (uint32_t)(ndups - (Py_ssize_t)b * SCM_MAX_FD);
        n = n < SCM_MAX_FD ? n : SCM_MAX_FD;
        int *fds = malloc(sizeof *fds * n);
        if (fds == NULL) {
            for (uint32_t k = c->mtail; k < c->mtail + b; k++) {
                free(c->marks[k].fds); /* the dups themselves are still the caller's */
            }
            return -1;
        }
        memcpy(fds, dups + (size_t)b * SCM_MAX_FD, sizeof *fds * n);
        int last = b + 1 == batches;
        c->marks[c->mtail + b] = (struct fdmark){
            .pos = at + b,
            .len = last ? (uint64_t)data->len - b : 1,
            .fds = fds,
            .nfds = n,
        };
    }
    c->mtail += batches;
    if (data->len) {
        memcpy(w, data->buf, (size_t)data->len);
    }
    c->end += (size_t)data->len;
    return 0;
}

PyDoc_STRVAR(send_doc,
             "send(cid, data, fds=()) -> int\n\nQueue everything pending (held control\n"
             "notifications, then counts), then data (fds dup'ed and sent with SCM_RIGHTS on\n"
             "its first bytes), and write what the socket takes.\n"
             "Returns the bytes still queued. OSError if the socket has failed.");

static PyObject *
hl_send(HotLoop *hl, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"cid", "data", "fds", NULL};
    PyObject *cid_arg, *fds_arg = NULL;
    Py_buffer data;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*|O:send", kwlist, &cid_arg, &data,
                                     &fds_arg)) {
        return NULL;
    }
    PyObject *seq = NULL;
    int *dups = NULL;
    Py_ssize_t nfds = 0, ndups = 0;
    PyObject *result = NULL;
    struct fail f = {0};
    if (fds_arg != NULL) {
        seq = PySequence_Fast(fds_arg, "fds must be a sequence of ints");
        if (seq == NULL) {
            goto done;
        }
        nfds = PySequence_Fast_GET_SIZE(seq);
    }
    if (nfds && data.len < (nfds + SCM_MAX_FD - 1) / SCM_MAX_FD) {
        PyErr_Format(PyExc_ValueError,
                     "%zd fds need at least %zd bytes of data (one per batch of %d)", nfds,
                     (nfds + SCM_MAX_FD - 1) / SCM_MAX_FD, SCM_MAX_FD);
        goto done;
    }
    if (nfds) {
        dups = PyMem_Malloc(sizeof *dups * (size_t)nfds);
        if (dups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        int fd;
        if (arg_fd(PySequence_Fast_GET_ITEM(seq, i), "fds item", &fd) < 0) {
            goto done;
        }
        dups[i] = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (dups[i] < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        ndups++;
    }
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        goto done;
    }
    size_t queued = 0;
    if (c->err) {
        fail_set(&f, PyExc_OSError, c->err, "");
    } else if (encode_pending(hl, c) < 0 || queue_data(c, &data, dups, ndups) < 0) {
        fail_client(hl, c, ENOMEM);
        fail_set(&f, PyExc_OSError, ENOMEM, "");
    } else {
        ndups = 0; /* the queue owns them now */
        client_service(hl, c);
        if (c->err) {
            fail_set(&f, PyExc_OSError, c->err, "");
        }
        queued = c->end - c->start;
    }
    hl_unlock(hl);
    if (f.type) {
        fail_raise(&f);
    } else {
        result = PyLong_FromSize_t(queued);
    }
done:
    close_fds(dups, ndups);
    PyMem_Free(dups);
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(hold_control_doc,
             "hold_control(cid, data, count, replace=False) -> bool\n\n"
             "Hold data (count whole control notifications) in place of what was held, to be\n"
             "queued ahead of the next encoded counts. With replace, only if what was held\n"
             "before is still held: False, and nothing held, if it was queued already.\n"
             "Writes at once if the queue is empty. OSError if the socket has failed.");

static PyObject *
hl_hold_control(HotLoop *hl, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"cid", "data", "count", "replace", NULL};
    PyObject *cid_arg;
    Py_buffer data;
    unsigned long long count;
    int replace = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*K|p:hold_control", kwlist, &cid_arg, &data,
                                     &count, &replace)) {
        return NULL;
    }
    if (data.len == 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "nothing to hold");
        return NULL;
    }
    /* Copied before the mutex is taken: it is held as briefly as possible. */
    uint8_t *copy = malloc((size_t)data.len);
    if (copy == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    memcpy(copy, data.buf, (size_t)data.len);
    size_t len = (size_t)data.len;
    PyBuffer_Release(&data);
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        free(copy);
        return NULL;
    }
    int err = c->err, held = 0;
    if (!err && (!replace || c->ctl_len)) {
        free(c->ctl);
        c->ctl = copy;
        c->ctl_len = len;
        c->ctl_msgs = count;
        copy = NULL;
        held = 1;
        if (c->start == c->end) {
            client_service(hl, c);
        }
    }
    hl_unlock(hl);
    free(copy);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(held);
}

/* The per-client operations that return a number. */
enum client_query { Q_FLUSH, Q_QUEUED, Q_CONTROL };

static PyObject *
client_query(HotLoop *hl, PyObject *cid_arg, enum client_query q)
{
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        return NULL;
    }
    if (q == Q_FLUSH && !c->err) {
        client_service(hl, c);
    }
    int err = q == Q_FLUSH ? c->err : 0;
    size_t queued = q == Q_CONTROL ? (size_t)c->ctl_msgs : c->end - c->start;
    hl_unlock(hl);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSize_t(queued);
}

PyDoc_STRVAR(flush_doc,
             "flush(cid) -> int\n\nQueue what is pending if the queue is empty and write what\n"
             "the socket takes. Returns the bytes still queued. OSError if failed.");

static PyObject *
hl_flush(HotLoop *hl, PyObject *cid_arg)
{
    return client_query(hl, cid_arg, Q_FLUSH);
}

PyDoc_STRVAR(queued_doc, "queued(cid) -> int\n\nBytes queued for the client.");

static PyObject *
hl_queued(HotLoop *hl, PyObject *cid_arg)
{
    return client_query(hl, cid_arg, Q_QUEUED);
}

PyDoc_STRVAR(held_control_doc,
             "held_control(cid) -> int\n\nControl notifications held (hold_control), not queued yet.");

static PyObject *
hl_held_control(HotLoop *hl, PyObject *cid_arg)
{
    return client_query(hl, cid_arg, Q_CONTROL);
}

PyDoc_STRVAR(client_stats_doc,
             "client_stats(cid) -> (delivered, notifications, pending_counters, pending_total,\n"
             "queued_bytes, errno_or_0)");

static PyObject *
hl_client_stats(HotLoop *hl, PyObject *cid_arg)
{
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        return NULL;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < c->pend.n; i++) {
        total = sat_add(total, c->pend.ent[i].cnt);
    }
    unsigned long long stats[6] = {c->delivered, c->notifications, c->pend.nonzero, total,
                                   c->end - c->start, (unsigned long long)c->err};
    hl_unlock(hl);
    return Py_BuildValue("(KKKKKK)", stats[0], stats[1], stats[2], stats[3], stats[4], stats[5]);
}

PyDoc_STRVAR(take_pending_doc,
             "take_pending(cid) -> list[tuple[int, int]]\n\nRemove and return the pending\n"
             "(token, count) pairs, tokens ascending.");

static PyObject *
hl_take_pending(HotLoop *hl, PyObject *cid_arg)
{
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        return NULL;
    }
    uint32_t n = 0;
    struct pent *pairs = malloc(sizeof *pairs * (c->pend.nonzero ? c->pend.nonzero : 1));
    if (pairs != NULL && c->pend.n) {
        pend_unindex_sorted(&c->pend);
        for (uint32_t i = 0; i < c->pend.n; i++) {
            if (c->pend.ent[i].cnt) {
                pairs[n++] = c->pend.ent[i];
            }
        }
        pend_done(&c->pend);
        c->first_credit_ns = 0;
    }
    hl_unlock(hl);
    PyObject *list = pairs ? PyList_New(n) : PyErr_NoMemory();
    for (uint32_t i = 0; list != NULL && i < n; i++) {
        PyObject *pair = Py_BuildValue("(kK)", (unsigned long)pairs[i].tok,
                                       (unsigned long long)pairs[i].cnt);
        if (pair == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    free(pairs);
    return list;
}

PyDoc_STRVAR(take_output_doc,
             "take_output(cid) -> bytes\n\nRemove and return the unsent queued bytes, then the\n"
             "held control notifications (a hand-over). ValueError if dup'ed fds are still\n"
             "queued.");

static PyObject *
hl_take_output(HotLoop *hl, PyObject *cid_arg)
{
    struct client *c = begin_client(hl, cid_arg);
    if (c == NULL) {
        return NULL;
    }
    if (c->mhead < c->mtail) {
        unsigned long long cid = c->cid;
        hl_unlock(hl);
        PyErr_Format(PyExc_ValueError, "client %llu still has fds queued", cid);
        return NULL;
    }
    /* Hand the buffers themselves over; the client starts new ones. The held
     * control notifications count as written: the next process writes them
     * as plain bytes. */
    uint8_t *buf = c->out, *ctl = c->ctl;
    size_t start = c->start, len = c->end - c->start, ctl_len = c->ctl_len;
    c->pos += len;
    c->out = NULL;
    c->cap = c->start = c->end = 0;
    c->lat_end = 0;
    c->notifications = sat_add(c->notifications, c->ctl_msgs);
    c->ctl = NULL;
    c->ctl_len = 0;
    c->ctl_msgs = 0;
    epoll_forget(hl, c);
    hl_unlock(hl);
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len + ctl_len));
    if (result != NULL) {
        if (len) {
            memcpy(PyBytes_AS_STRING(result), buf + start, len);
        }
        if (ctl_len) {
            memcpy(PyBytes_AS_STRING(result) + len, ctl, ctl_len);
        }
    }
    free(buf);
    free(ctl);
    return result;
}

PyDoc_STRVAR(latency_doc,
             "latency() -> list[int]\n\nObservations per bucket since creation, the buckets of\n"
             "irqd.stats.LatencyHistogram (1 << i us, i = 0..20, the last also holds slower):\n"
             "from a client's first pending credit until its bytes were handed to the kernel.");

static PyObject *
hl_latency(HotLoop *hl, PyObject *Py_UNUSED(ignored))
{
    uint64_t lat[LAT_BUCKETS];
    if (hl_acquire(hl) < 0) {
        return NULL;
    }
    memcpy(lat, hl->lat, sizeof lat);
    hl_unlock(hl);
    return list_of_u64(lat, LAT_BUCKETS);
}

PyDoc_STRVAR(set_guard_doc,
             "set_guard(buffer)\n\nUse buffer (writable, one byte per stream-guard slot; held\n"
             "until replaced or close()) for the marks of clients added with a guard_slot.\n"
             "None: no guard. ValueError while a client with a slot is registered.");

static PyObject *
hl_set_guard(HotLoop *hl, PyObject *buffer)
{
    Py_buffer view = {0};
    int has_view = 0;
    if (buffer != Py_None) {
        if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            return NULL;
        }
        has_view = 1;
    }
    if (hl_acquire(hl) < 0) {
        goto error;
    }
    for (uint32_t i = 0; i < hl->ncslots; i++) {
        if (hl->clients[i].cid != 0 && hl->clients[i].gslot >= 0) {
            unsigned long long cid = hl->clients[i].cid;
            hl_unlock(hl);
            PyErr_Format(PyExc_ValueError, "client %llu has a guard slot", cid);
            goto error;
        }
    }
    hl->guard = has_view ? view.buf : NULL;
    hl->guard_len = has_view ? (size_t)view.len : 0;
    hl_unlock(hl);
    /* The thread no longer sees the old buffer: let its exporter go. */
    if (hl->has_guard_view) {
        PyBuffer_Release(&hl->guard_view);
    }
    hl->guard_view = view;
    hl->has_guard_view = has_view;
    Py_RETURN_NONE;
error:
    if (has_view) {
        PyBuffer_Release(&view);
    }
    return NULL;
}

/* ---- the type and the module ---------------------------------------------- */

static PyMethodDef hl_methods[] = {
    {"start", (PyCFunction)hl_start, METH_NOARGS, start_doc},
    {"stop", (PyCFunction)hl_stop, METH_NOARGS, stop_doc},
    {"close", (PyCFunction)hl_close, METH_NOARGS, close_doc},
    {"poke", (PyCFunction)hl_poke, METH_NOARGS, poke_doc},
    {"add_vector", (PyCFunction)hl_add_vector, METH_VARARGS, add_vector_doc},
    {"remove_vector", (PyCFunction)hl_remove_vector, METH_O, remove_vector_doc},
    {"drain_vector", (PyCFunction)hl_drain_vector, METH_O, drain_vector_doc},
    {"vector_total", (PyCFunction)hl_vector_total, METH_O, vector_total_doc},
    {"take_failed", (PyCFunction)hl_take_failed, METH_NOARGS, take_failed_doc},
    {"add_client", (PyCFunction)(void (*)(void))hl_add_client, METH_VARARGS | METH_KEYWORDS,
     add_client_doc},
    {"set_guard", (PyCFunction)hl_set_guard, METH_O, set_guard_doc},
    {"remove_client", (PyCFunction)hl_remove_client, METH_O, remove_client_doc},
    {"subscribe", (PyCFunction)hl_subscribe, METH_VARARGS, subscribe_doc},
    {"unsubscribe", (PyCFunction)hl_unsubscribe, METH_VARARGS, unsubscribe_doc},
    {"credit", (PyCFunction)hl_credit, METH_VARARGS, credit_doc},
    {"send", (PyCFunction)(void (*)(void))hl_send, METH_VARARGS | METH_KEYWORDS, send_doc},
    {"hold_control", (PyCFunction)(void (*)(void))hl_hold_control, METH_VARARGS | METH_KEYWORDS,
     hold_control_doc},
    {"held_control", (PyCFunction)hl_held_control, METH_O, held_control_doc},
    {"flush", (PyCFunction)hl_flush, METH_O, flush_doc},
    {"queued", (PyCFunction)hl_queued, METH_O, queued_doc},
    {"client_stats", (PyCFunction)hl_client_stats, METH_O, client_stats_doc},
    {"take_pending", (PyCFunction)hl_take_pending, METH_O, take_pending_doc},
    {"take_output", (PyCFunction)hl_take_output, METH_O, take_output_doc},
    {"latency", (PyCFunction)hl_latency, METH_NOARGS, latency_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef hl_getset[] = {
    {"running", (getter)hl_get_running, NULL, "True while the relay thread runs.", NULL},
    {"rounds", (getter)hl_get_rounds, NULL, "Rounds (epoll_wait returns) the thread processed.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(hl_doc,
             "HotLoop(index_names)\n\nForwards interrupts from vector eventfds to client sockets\n"
             "on a pthread of its own. index_names[i] is the wire name of IRQ index i\n"
             "(token >> 16), at most 16; None marks an unused index.");

static PyType_Slot hl_slots[] = {
    {Py_tp_new, hl_new},
    {Py_tp_dealloc, hl_dealloc},
    {Py_tp_methods, hl_methods},
    {Py_tp_getset, hl_getset},
    {Py_tp_doc, (void *)hl_doc},
    {0, NULL},
};

static PyType_Spec hl_spec = {
    .name = "irqd._hotloop.HotLoop",
    .basicsize = sizeof(HotLoop),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = hl_slots,
};

static int
hotloop_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &hl_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int rc = PyModule_AddObjectRef(module, "HotLoop", type);
    Py_DECREF(type);
    if (rc < 0 || PyModule_AddIntConstant(module, "SCM_MAX_FD", SCM_MAX_FD) < 0 ||
        PyModule_AddIntConstant(module, "MAX_INDEXES", MAX_INDEXES) < 0 ||
        PyModule_AddIntConstant(module, "LATENCY_BUCKETS", LAT_BUCKETS) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot hotloop_slots[] = {
    {Py_mod_exec, hotloop_exec},
    {0, NULL},
};

static struct PyModuleDef hotloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "irqd._hotloop",
    .m_doc = "The interrupt relay on a pthread of its own (see the header of _hotloop.c).",
    .m_size = 0,
    .m_slots = hotloop_slots,
};

PyMODINIT_FUNC
PyInit__hotloop(void)
{
    return PyModuleDef_Init(&hotloop_module);
}
