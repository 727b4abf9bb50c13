/* benchtool: the C side of bench/run.py.
 *
 *   benchtool relay SOCKFD FIRSTFD NFDS
 *       The reference relay: every eventfd FIRSTFD..FIRSTFD+NFDS-1 in one
 *       epoll set; on each wake, drain every ready one and write ONE `irq`
 *       notification with the same bytes vfio-irqd sends to SOCKFD. This is
 *       the C floor the daemon is measured against.
 *
 *   benchtool latency SOCKFD EFD SAMPLES
 *       Write 1 to EFD, wait until a whole notification has arrived on
 *       SOCKFD, check it carries exactly one interrupt, repeat. Prints
 *       "p50 p90 p99 max" in microseconds.
 *
 *   benchtool sink SOCKFD EXPECTED
 *       Read notifications until their counts add up to EXPECTED (exact, or
 *       exit 3). Prints "notifications elapsed_ns" from the first byte on.
 *
 *   benchtool fire ROUNDS EFD...
 *       Write 1 to every EFD, ROUNDS times, as fast as possible.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
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

static _Noreturn void relay(int sock, int first, int nfds)
{
    static struct epoll_event events[MAX_EVENTS];
    static uint32_t vectors[MAX_EVENTS];
    static uint64_t counts[MAX_EVENTS];
    static uint8_t out[BUF_SIZE];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < nfds; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, first + i, &ev) < 0) die("epoll_ctl");
    }
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        size_t pairs = 0;
        for (int i = 0; i < n; i++) {
            uint32_t v = events[i].data.u32;
            uint64_t c;
            if (read(first + (int)v, &c, sizeof c) == (ssize_t)sizeof c) {
                vectors[pairs] = v;
                counts[pairs] = c;
                pairs++;
            }
        }
        if (pairs) write_all(sock, out, mp_irq(out, vectors, counts, pairs));
    }
}

/* Read from sock until one whole message is buffered; returns the sum of
 * its counts (ints after the type tag, at odd positions). Keeps leftovers. */
struct reader {
    int fd;
    uint8_t buf[BUF_SIZE];
    size_t len;
};

static uint64_t next_message(struct reader *r, uint64_t *first_byte_ns)
{
    static uint64_t ints[2 * MAX_EVENTS + 4];
    for (;;) {
        size_t nints = 0;
        size_t used = mp_skip(r->buf, r->len, ints, &nints);
        if (used == (size_t)-1) {
            fprintf(stderr, "benchtool: unexpected msgpack byte\n");
            exit(3);
        }
        if (used) {
            memmove(r->buf, r->buf + used, r->len - used);
            r->len -= used;
            if (nints < 1 || ints[0] != 2) {
                fprintf(stderr, "benchtool: not a notification\n");
                exit(3);
            }
            uint64_t sum = 0;
            for (size_t i = 2; i < nints; i += 2) sum += ints[i];
            return sum;
        }
        ssize_t n = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            fprintf(stderr, "benchtool: connection closed\n");
            exit(3);
        }
        if (first_byte_ns && !*first_byte_ns) *first_byte_ns = now_ns();
        r->len += (size_t)n;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int latency(int sock, int efd, long samples)
{
    static struct reader r;
    r.fd = sock;
    /* Not the eventfd: it shares its file status flags with the daemon's
     * copy, and a blocking eventfd would stall the daemon's reads. */
    make_blocking(sock);
    uint64_t *lat = calloc((size_t)samples, sizeof *lat);
    if (!lat) die("calloc");
    const uint64_t one = 1;
    for (long i = 0; i < samples; i++) {
        uint64_t t0 = now_ns();
        if (write(efd, &one, sizeof one) != (ssize_t)sizeof one) die("write eventfd");
        uint64_t got = next_message(&r, NULL);
        lat[i] = now_ns() - t0;
        if (got != 1) {
            fprintf(stderr, "benchtool: expected 1 interrupt, got %llu\n",
                    (unsigned long long)got);
            return 3;
        }
    }
    qsort(lat, (size_t)samples, sizeof *lat, cmp_u64);
    printf("%.2f %.2f %.2f %.2f\n", lat[samples / 2] / 1e3, lat[samples * 9 / 10] / 1e3,
           lat[samples * 99 / 100] / 1e3, lat[samples - 1] / 1e3);
    return 0;
}

static int sink(int sock, uint64_t expected)
{
    static struct reader r;
    r.fd = sock;
    make_blocking(sock);
    uint64_t total = 0, notifications = 0, first = 0;
    while (total < expected) {
        total += next_message(&r, &first);
        notifications++;
    }
    uint64_t elapsed = now_ns() - first;
    if (total != expected) {
        fprintf(stderr, "benchtool: %llu interrupts, expected %llu\n",
                (unsigned long long)total, (unsigned long long)expected);
        return 3;
    }
    printf("%llu %llu\n", (unsigned long long)notifications, (unsigned long long)elapsed);
    return 0;
}

static int fire(long rounds, int argc, char **argv)
{
    const uint64_t one = 1;
    for (long r = 0; r < rounds; r++)
        for (int i = 0; i < argc; i++)
            if (write(atoi(argv[i]), &one, sizeof one) != (ssize_t)sizeof one) die("write");
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc == 5 && !strcmp(argv[1], "relay"))
        relay(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "latency"))
        return latency(atoi(argv[2]), atoi(argv[3]), atol(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "sink"))
        return sink(atoi(argv[2]), strtoull(argv[3], NULL, 10));
    if (argc >= 4 && !strcmp(argv[1], "fire"))
        return fire(atol(argv[2]), argc - 3, argv + 3);
    fprintf(stderr, "usage: see the header of benchtool.c\n");
    return 2;
}
