/*
 * common.h: helpers shared by the guest test programs (header-only; each
 * program is one static binary built by scripts/build-guest.sh).
 *
 * - pattern_byte(): the test payload.  A hash of the byte offset, so a lost,
 *   duplicated or reordered chunk shows up at once (a counter mod 256 would
 *   repeat every 256 bytes and hide a shift by a multiple of 256).
 * - tcp_connect(): connect with a timeout.
 * - tcp_pump(): send N pattern bytes and verify the N bytes echoed back,
 *   interleaving send()/writev() and recv()/readv() in one poll() loop so
 *   neither side's buffers can fill up and deadlock.
 * - counters: read /sys/class/net/IF/statistics/NAME.
 *
 * Failures print "FAIL: <tag>: ..." and make the caller exit(1).
 */
#ifndef GUEST_COMMON_H
#define GUEST_COMMON_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static const char *g_tag = "test";

static inline void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static inline void fail(const char *fmt, ...)
{
    va_list ap;
    printf("FAIL: %s: ", g_tag);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    exit(1);
}

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline uint8_t pattern_byte(uint64_t offset, uint32_t seed)
{
    uint32_t x = (uint32_t)(offset >> 2) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    return (uint8_t)(x >> (8 * (offset & 3)));
}

static inline void pattern_fill(uint8_t *buf, size_t len, uint64_t offset, uint32_t seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern_byte(offset + i, seed);
}

/* Returns the offset of the first mismatch, or -1 if BUF matches. */
static inline long pattern_check(const uint8_t *buf, size_t len, uint64_t offset, uint32_t seed)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != pattern_byte(offset + i, seed))
            return (long)i;
    return -1;
}

static inline struct sockaddr_in ipv4_addr(const char *ip, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        fail("bad IPv4 address '%s'", ip);
    return a;
}

static inline void set_nonblocking(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK);
}

/* Connect a TCP socket to IP:PORT within TIMEOUT_MS; returns a blocking fd. */
static inline int tcp_connect(const char *ip, int port, int timeout_ms)
{
    struct sockaddr_in a = ipv4_addr(ip, port);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket: %s", strerror(errno));
    set_nonblocking(fd, 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)
        fail("connect %s:%d: %s", ip, port, strerror(errno));
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int n = poll(&p, 1, timeout_ms);
    if (n == 0)
        fail("connect %s:%d: no answer within %d ms", ip, port, timeout_ms);
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
        fail("connect %s:%d: %s", ip, port, strerror(err));
    set_nonblocking(fd, 0);
    return fd;
}

#define PUMP_CHUNK 65536

/*
 * Send TOTAL pattern bytes on FD and verify that the same bytes come back.
 * Sends alternate between send() and a 3-element writev(); receives between
 * recv() and a 2-element readv(), with uneven sizes so iovec boundaries fall
 * everywhere.  Fails if no progress is made for STALL_MS.
 */
static inline void tcp_pump(int fd, size_t total, uint32_t seed, int stall_ms)
{
    static uint8_t out[PUMP_CHUNK], in[PUMP_CHUNK];
    size_t sent = 0, got = 0;
    unsigned nsend = 0, nrecv = 0;
    set_nonblocking(fd, 1);
    while (got < total) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (sent < total ? POLLOUT : 0)};
        int n = poll(&p, 1, stall_ms);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            fail("stalled for %d ms: sent %zu of %zu bytes, %zu echoed back", stall_ms, sent,
                 total, got);
        if (p.revents & (POLLERR | POLLNVAL))
            fail("socket error after sending %zu and receiving %zu bytes", sent, got);
        if ((p.revents & POLLOUT) && sent < total) {
            size_t len = total - sent;
            if (len > PUMP_CHUNK)
                len = PUMP_CHUNK;
            len -= (nsend * 977) % (len / 2 + 1); /* vary write sizes */
            pattern_fill(out, len, sent, seed);
            ssize_t w;
            int use_iov = nsend++ % 2;
            if (!use_iov) {
                w = send(fd, out, len, MSG_NOSIGNAL);
            } else {
                size_t a = len / 3, b = len / 2;
                struct iovec iov[3] = {{out, a}, {out + a, b - a}, {out + b, len - b}};
                w = writev(fd, iov, 3);
            }
            if (w < 0 && errno != EAGAIN && errno != EINTR)
                fail("%s after %zu bytes: %s", use_iov ? "writev" : "send", sent,
                     strerror(errno));
            if (w > 0)
                sent += w;
        }
        if (p.revents & (POLLIN | POLLHUP)) {
            size_t want = total - got;
            if (want > PUMP_CHUNK)
                want = PUMP_CHUNK;
            ssize_t r;
            int use_iov = nrecv++ % 2;
            if (!use_iov) {
                r = recv(fd, in, want, 0);
            } else {
                size_t a = want > 1 ? 1 + (nrecv * 331) % (want - 1) : want;
                struct iovec iov[2] = {{in, a}, {in + a, want - a}};
                r = readv(fd, iov, 2);
            }
            if (r < 0 && errno != EAGAIN && errno != EINTR)
                fail("%s after %zu bytes: %s", use_iov ? "readv" : "recv", got,
                     strerror(errno));
            if (r == 0)
                fail("connection closed by peer after %zu of %zu bytes echoed", got, total);
            if (r > 0) {
                long bad = pattern_check(in, r, got, seed);
                if (bad >= 0)
                    fail("echoed byte %zu is 0x%02x, expected 0x%02x", got + bad, in[bad],
                         pattern_byte(got + bad, seed));
                if (got + r > sent)
                    fail("received %zu bytes but only sent %zu", got + r, sent);
                got += r;
            }
        }
    }
    set_nonblocking(fd, 0);
}

static inline unsigned long long counter(const char *ifname, const char *name)
{
    char path[128];
    unsigned long long v = 0;
    snprintf(path, sizeof path, "/sys/class/net/%s/statistics/%s", ifname, name);
    FILE *f = fopen(path, "r");
    if (!f || fscanf(f, "%llu", &v) != 1)
        fail("cannot read %s", path);
    fclose(f);
    return v;
}

#endif
