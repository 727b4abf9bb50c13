/* benchtool: the C side of bench/run.py.
 *
 *   benchtool relay FIRSTFD NFDS SOCKFD...
 *       The reference relay: every eventfd FIRSTFD..FIRSTFD+NFDS-1 in one
 *       epoll set; on each wake, drain every ready one and write ONE `irq`
 *       notification with the same bytes vfio-irqd sends. The notification
 *       is encoded once and written to every SOCKFD in turn (one socket: the
 *       one-client relay; K sockets: the fan-out relay, every client
 *       subscribed to every vector). This is the C floor the daemon is
 *       measured against. Writes block: a relay keeps no queue. With
 *       BENCHTOOL_IDLE_THREAD set in the environment it starts a second
 *       thread that never runs (a diagnostic: see readcost).
 *
 *   benchtool relay-split FIRSTFD NFDS QUIETSOCK STORMSOCK
 *       The same, with vector 0's counts written to QUIETSOCK and every other
 *       vector's to STORMSOCK (two clients; the storm-isolation figure).
 *
 *   benchtool latency SOCKFD EFD SAMPLES [INTERVAL_US [MAX_MS]]
 *       Write 1 to EFD, wait until a whole notification has arrived on
 *       SOCKFD, check it carries exactly one interrupt, repeat; with
 *       INTERVAL_US, start a sample at most every INTERVAL_US (a low, steady
 *       rate), and with MAX_MS stop early after that long. Prints
 *       "p50 p90 p99 max samples" (microseconds; samples actually taken).
 *
 *   benchtool fanlat EFD SAMPLES SOCKFD...
 *       Write 1 to EFD, wait until EVERY SOCKFD has a whole notification
 *       carrying exactly one interrupt, repeat. Prints "p50 p90 p99 max" of
 *       the latency to the last of them, in microseconds, and "wakes": the
 *       mean epoll_wait returns per sample (how many batches the K
 *       notifications arrived in).
 *
 *   benchtool sink SOCKFD EXPECTED
 *       Read notifications until their counts add up to EXPECTED (exact, or
 *       exit 3). Prints "notifications elapsed_ns" from the first byte on.
 *       EXPECTED "-": read it from stdin when it is known (the storm sink,
 *       whose total is only known when `fire 0` has been stopped), reading
 *       the socket meanwhile.
 *
 *   benchtool readcost NFDS ROUNDS
 *       The cost of one eventfd read, the hot loop's main syscall: NFDS
 *       eventfds of its own, each written once and then read, ROUNDS times;
 *       prints ns per read, the median round's and the best round's. With
 *       BENCHTOOL_IDLE_THREAD set, in a multi-threaded process (the kernel
 *       then takes a file reference on every fd lookup); with
 *       BENCHTOOL_RAW_READ set, through syscall(2) rather than read(3).
 *
 *   benchtool fire ROUNDS EFD...
 *       Write 1 to every EFD, ROUNDS times, as fast as possible. ROUNDS 0:
 *       until SIGTERM, then print the number of writes made.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "mpack.h"

#define MAX_EVENTS 2048
#define BUF_SIZE (1 << 16)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static _Noreturn void die(const char *what)
{
    perror(what);
    exit(2);
}

/* Python sockets with a timeout are O_NONBLOCK underneath; we want to block. */
static void make_blocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) die("fcntl");
}

static void write_all(int fd, const uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EPIPE) exit(0); /* the reader went away: done */
            die("write");
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* Every eventfd FIRSTFD.. in one epoll set; each round's ready counts go out
 * as one notification per group: with `split`, vector 0 to socks[0] and the
 * rest to socks[1]; without, every vector to every socket, encoded once. */
static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;) pause();
    return NULL;
}

static _Noreturn void relay(int first, int nfds, int split, const int *socks, int nsocks)
{
    /* A second thread that never runs: the process is then multi-threaded,
     * like the daemon (its hot thread beside the interpreter's), and the
     * kernel's fd lookups in read/epoll take a file reference each time
     * (fs/file.c: the lockless fast path is for an unshared fd table). */
    pthread_t idle;
    if (getenv("BENCHTOOL_IDLE_THREAD") && pthread_create(&idle, NULL, idle_thread, NULL))
        die("pthread_create");
    static struct epoll_event events[MAX_EVENTS];
    static uint32_t vectors[MAX_EVENTS];
    static uint64_t counts[MAX_EVENTS];
    static uint8_t out[BUF_SIZE];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    if (nfds < 1 || nfds > MAX_EVENTS) die("relay: NFDS");
    for (int i = 0; i < nfds; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, first + i, &ev) < 0) die("epoll_ctl");
    }
    for (int i = 0; i < nsocks; i++) make_blocking(socks[i]);
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        size_t pairs = 0;
        uint64_t quiet = 0;
        int quiet_first = 0;
        for (int i = 0; i < n; i++) {
            uint32_t v = events[i].data.u32;
            uint64_t c;
            if (read(first + (int)v, &c, sizeof c) == (ssize_t)sizeof c) {
                if (split && v == 0) {
                    quiet = c; /* its own client: encoded apart below */
                    quiet_first = pairs == 0;
                    continue;
                }
                vectors[pairs] = v;
                counts[pairs] = c;
                pairs++;
            }
        }
        if (split) {
            /* The clients in the order their first vector was reported, as
             * the daemon serves them: the quiet one is not favoured. */
            const uint32_t zero = 0;
            if (quiet && quiet_first) write_all(socks[0], out, mp_irq(out, &zero, &quiet, 1));
            if (pairs) write_all(socks[1], out, mp_irq(out, vectors, counts, pairs));
            if (quiet && !quiet_first) write_all(socks[0], out, mp_irq(out, &zero, &quiet, 1));
        } else if (pairs) {
            size_t len = mp_irq(out, vectors, counts, pairs);
            for (int i = 0; i < nsocks; i++) write_all(socks[i], out, len);
        }
    }
}

/* A client's receive side: bytes read so far, whole messages taken off the
 * front. */
struct reader {
    int fd;
    uint8_t buf[BUF_SIZE];
    size_t len;
};

/* Take one whole message off r's buffer if there is one: 1 and *sum = the
 * sum of its counts (ints after the type tag, at odd positions), else 0. */
static int take_message(struct reader *r, uint64_t *sum)
{
    static uint64_t ints[2 * MAX_EVENTS + 4];
    size_t nints = 0;
    size_t used = mp_skip(r->buf, r->len, ints, &nints);
    if (used == (size_t)-1) {
        fprintf(stderr, "benchtool: unexpected msgpack byte\n");
        exit(3);
    }
    if (used == 0) return 0;
    memmove(r->buf, r->buf + used, r->len - used);
    r->len -= used;
    if (nints < 1 || ints[0] != 2) {
        fprintf(stderr, "benchtool: not a notification\n");
        exit(3);
    }
    *sum = 0;
    for (size_t i = 2; i < nints; i += 2) *sum += ints[i];
    return 1;
}

/* One read into r's buffer: bytes read, or 0 on EAGAIN; exits on EOF. */
static size_t fill(struct reader *r)
{
    for (;;) {
        if (r->len == sizeof r->buf) {
            fprintf(stderr, "benchtool: message larger than the buffer\n");
            exit(3);
        }
        ssize_t n = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (n <= 0) {
            fprintf(stderr, "benchtool: connection closed\n");
            exit(3);
        }
        r->len += (size_t)n;
        return (size_t)n;
    }
}

/* Read from a blocking socket until one whole message is buffered; returns
 * the sum of its counts. Keeps leftovers. */
static uint64_t next_message(struct reader *r, uint64_t *first_byte_ns)
{
    uint64_t sum;
    while (!take_message(r, &sum)) {
        fill(r);
        if (first_byte_ns && !*first_byte_ns) *first_byte_ns = now_ns();
    }
    return sum;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void print_percentiles(uint64_t *lat, long samples)
{
    qsort(lat, (size_t)samples, sizeof *lat, cmp_u64);
    printf("%.2f %.2f %.2f %.2f", lat[samples / 2] / 1e3, lat[samples * 9 / 10] / 1e3,
           lat[samples * 99 / 100] / 1e3, lat[samples - 1] / 1e3);
}

static void sleep_until(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static int latency(int sock, int efd, long samples, uint64_t interval_ns, uint64_t max_ns)
{
    static struct reader r;
    r.fd = sock;
    /* Not the eventfd: it shares its file status flags with the daemon's
     * copy, and a blocking eventfd would stall the daemon's reads. */
    make_blocking(sock);
    uint64_t *lat = calloc((size_t)samples, sizeof *lat);
    if (!lat) die("calloc");
    const uint64_t one = 1;
    uint64_t start = now_ns(), next = start;
    long taken = 0;
    for (; taken < samples; taken++) {
        if (interval_ns) {
            sleep_until(next);
            next += interval_ns;
        }
        if (max_ns && taken > 0 && now_ns() - start > max_ns) break;
        uint64_t t0 = now_ns();
        if (write(efd, &one, sizeof one) != (ssize_t)sizeof one) die("write eventfd");
        uint64_t got = next_message(&r, NULL);
        lat[taken] = now_ns() - t0;
        if (got != 1) {
            fprintf(stderr, "benchtool: expected 1 interrupt, got %llu\n",
                    (unsigned long long)got);
            return 3;
        }
        if (interval_ns && next < now_ns()) next = now_ns(); /* late: no catching up */
    }
    print_percentiles(lat, taken);
    printf(" %ld\n", taken);
    return 0;
}

/* Latency to the last of K clients: every socket in one epoll set
 * (non-blocking), each must deliver exactly one notification of one
 * interrupt per sample before the next sample starts. */
static int fanlat(int efd, long samples, const int *socks, int k)
{
    struct reader *rs = calloc((size_t)k, sizeof *rs);
    uint64_t *lat = calloc((size_t)samples, sizeof *lat);
    struct epoll_event *events = calloc((size_t)k, sizeof *events);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!rs || !lat || !events || ep < 0) die("fanlat setup");
    for (int i = 0; i < k; i++) {
        rs[i].fd = socks[i];
        int flags = fcntl(socks[i], F_GETFL);
        if (flags < 0 || fcntl(socks[i], F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, socks[i], &ev) < 0) die("epoll_ctl");
    }
    const uint64_t one = 1;
    uint64_t wakes = 0;
    for (long s = 0; s < samples; s++) {
        uint64_t t0 = now_ns();
        if (write(efd, &one, sizeof one) != (ssize_t)sizeof one) die("write eventfd");
        int missing = k;
        while (missing) {
            int n = epoll_wait(ep, events, k, -1);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) die("epoll_wait");
            wakes++;
            for (int i = 0; i < n; i++) {
                struct reader *r = &rs[events[i].data.u32];
                uint64_t sum;
                if (!fill(r) || !take_message(r, &sum)) continue;
                if (sum != 1 || r->len) {
                    fprintf(stderr, "benchtool: client %u: expected 1 interrupt, got %llu%s\n",
                            events[i].data.u32, (unsigned long long)sum,
                            r->len ? " and more" : "");
                    return 3;
                }
                missing--;
            }
        }
        lat[s] = now_ns() - t0;
    }
    print_percentiles(lat, samples);
    printf(" %.2f\n", (double)wakes / (double)samples);
    return 0;
}

/* Expected total "-": poll stdin for it while reading the socket. */
static int sink(int sock, const char *expected_arg)
{
    static struct reader r;
    r.fd = sock;
    int known = strcmp(expected_arg, "-") != 0;
    uint64_t expected = known ? strtoull(expected_arg, NULL, 10) : UINT64_MAX;
    uint64_t total = 0, notifications = 0, first = 0, sum;
    if (known) {
        make_blocking(sock);
    } else {
        int flags = fcntl(sock, F_GETFL);
        if (flags < 0 || fcntl(sock, F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl");
    }
    while (total < expected) {
        if (take_message(&r, &sum)) {
            total += sum;
            notifications++;
            continue;
        }
        if (!known) {
            struct pollfd p[2] = {{.fd = sock, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
            if (poll(p, 2, -1) < 0) {
                if (errno == EINTR) continue;
                die("poll");
            }
            if (p[1].revents) {
                char line[32] = {0};
                if (read(0, line, sizeof line - 1) <= 0) die("sink: no total on stdin");
                expected = strtoull(line, NULL, 10);
                known = 1;
            }
            if (!(p[0].revents & POLLIN)) continue;
        }
        if (fill(&r) && !first) first = now_ns();
    }
    uint64_t elapsed = now_ns() - first;
    if (total != expected || r.len) {
        fprintf(stderr, "benchtool: %llu interrupts, expected %llu\n",
                (unsigned long long)total, (unsigned long long)expected);
        return 3;
    }
    printf("%llu %llu\n", (unsigned long long)notifications, (unsigned long long)elapsed);
    return 0;
}

static int *fd_args(int argc, char **argv)
{
    int *fds = calloc((size_t)argc, sizeof *fds);
    if (!fds) die("calloc");
    for (int i = 0; i < argc; i++) fds[i] = atoi(argv[i]);
    return fds;
}

static int readcost(int nfds, long rounds)
{
    pthread_t idle;
    if (getenv("BENCHTOOL_IDLE_THREAD") && pthread_create(&idle, NULL, idle_thread, NULL))
        die("pthread_create");
    int *fds = calloc((size_t)nfds, sizeof *fds);
    if (!fds) die("calloc");
    for (int i = 0; i < nfds; i++)
        if ((fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) die("eventfd");
    /* BENCHTOOL_RAW_READ: syscall(2) rather than read(3), which in a
     * multi-threaded process brackets the call with glibc's cancellation
     * bookkeeping (two atomic operations). */
    int raw = getenv("BENCHTOOL_RAW_READ") != NULL;
    uint64_t *spent = calloc((size_t)rounds, sizeof *spent);
    if (!spent) die("calloc");
    const uint64_t one = 1;
    uint64_t value;
    for (long r = 0; r < rounds; r++) {
        for (int i = 0; i < nfds; i++)
            if (write(fds[i], &one, sizeof one) != (ssize_t)sizeof one) die("write");
        uint64_t t0 = now_ns();
        for (int i = 0; i < nfds; i++) {
            ssize_t got = raw ? syscall(SYS_read, fds[i], &value, sizeof value)
                              : read(fds[i], &value, sizeof value);
            if (got != (ssize_t)sizeof value) die("read");
        }
        spent[r] = now_ns() - t0;
    }
    /* The median and the best round: on a loaded machine the mean is mostly
     * other processes' time slices. */
    qsort(spent, (size_t)rounds, sizeof *spent, cmp_u64);
    printf("%.1f %.1f\n", (double)spent[rounds / 2] / nfds, (double)spent[0] / nfds);
    return 0;
}

static volatile sig_atomic_t stop_firing;

static void on_term(int sig)
{
    (void)sig;
    stop_firing = 1;
}

static int fire(long rounds, int argc, char **argv)
{
    const uint64_t one = 1;
    const int *fds = fd_args(argc, argv);
    if (rounds > 0) {
        for (long r = 0; r < rounds; r++)
            for (int i = 0; i < argc; i++)
                if (write(fds[i], &one, sizeof one) != (ssize_t)sizeof one) die("write");
        return 0;
    }
    /* Until SIGTERM; a write the signal interrupted did not happen (EINTR). */
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    uint64_t writes = 0;
    while (!stop_firing) {
        for (int i = 0; i < argc && !stop_firing; i++) {
            ssize_t n = write(fds[i], &one, sizeof one);
            if (n == (ssize_t)sizeof one) writes++;
            else if (n >= 0 || errno != EINTR) die("write");
        }
    }
    printf("%llu\n", (unsigned long long)writes);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 5 && !strcmp(argv[1], "relay"))
        relay(atoi(argv[2]), atoi(argv[3]), 0, fd_args(argc - 4, argv + 4), argc - 4);
    if (argc == 6 && !strcmp(argv[1], "relay-split"))
        relay(atoi(argv[2]), atoi(argv[3]), 1, fd_args(2, argv + 4), 2);
    if (argc >= 5 && argc <= 7 && !strcmp(argv[1], "latency"))
        return latency(atoi(argv[2]), atoi(argv[3]), atol(argv[4]),
                       argc > 5 ? strtoull(argv[5], NULL, 10) * 1000 : 0,
                       argc > 6 ? strtoull(argv[6], NULL, 10) * 1000000 : 0);
    if (argc >= 5 && !strcmp(argv[1], "fanlat"))
        return fanlat(atoi(argv[2]), atol(argv[3]), fd_args(argc - 4, argv + 4), argc - 4);
    if (argc == 4 && !strcmp(argv[1], "sink"))
        return sink(atoi(argv[2]), argv[3]);
    if (argc == 4 && !strcmp(argv[1], "readcost")) return readcost(atoi(argv[2]), atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "fire"))
        return fire(atol(argv[2]), argc - 3, argv + 3);
    fprintf(stderr, "usage: see the header of benchtool.c\n");
    return 2;
}
