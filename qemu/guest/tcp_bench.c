/*
 * tcp_bench: the guest side of scripts/bench_qemu.py.  One program for every
 * backend, so the numbers differ only by what carries the frames.
 *
 *   tcp_bench send IP PORT SECONDS    bulk TCP to a discard service
 *   tcp_bench recv IP PORT SECONDS    bulk TCP from a chargen service
 *   tcp_bench crr  IP PORT SECONDS    connect, 1-byte echo, close; sequential
 *   tcp_bench udp  IP PORT SECONDS    64-byte UDP echo round trips; one in flight
 *
 * Each mode prints "bench: MODE start" once its setup is done (the host
 * samples its CPU counters at that line), then one result line:
 *
 *   bench: send 123.4 Mbit/s bytes=... seconds=...
 *   bench: recv 456.7 Mbit/s bytes=... seconds=...
 *   bench: crr 1049.0 conn/s conns=... seconds=... avg_ms=... p50_us=... p90_us=... p99_us=...
 *   bench: udp 2345.0 rt/s round_trips=... seconds=... lost=... p50_us=... p90_us=... p99_us=...
 *
 * send: write 64 KiB chunks for SECONDS, then shutdown(SHUT_WR) and wait for
 *   the server to close (discard closes after our FIN), so the time counts
 *   until every byte was delivered, not just buffered in the guest.
 * recv: read for SECONDS; the bytes read count.
 * crr: a connection per iteration (the guest's ephemeral ports suffice for a
 *   few seconds at a few thousand per second; TIME-WAIT stays on our side).
 * udp: one datagram outstanding; a datagram lost for 200 ms is sent again.
 *
 * crr and udp also give percentiles of one operation's time (a histogram of
 * LAT_STEP_US buckets): the rate is 1 / the mean, so a backend whose median
 * operation is as fast as another's can still lose on its slow tail.
 *
 * Any failure (timeouts: 10 s to connect, 10 s without progress) prints
 * "FAIL: bench-MODE: ..." and exits 1.
 */
#include "common.h"

#define CHUNK 65536
#define STALL_MS 10000

static double g_seconds;

/* One operation's time, in buckets of LAT_STEP_US up to LAT_BUCKETS of them;
 * anything longer lands in the last. */
#define LAT_STEP_US 5
#define LAT_BUCKETS 4000
static unsigned long g_lat[LAT_BUCKETS];

static void lat_add(double seconds)
{
    long b = (long)(seconds * 1e6 / LAT_STEP_US);
    g_lat[b < 0 ? 0 : b >= LAT_BUCKETS ? LAT_BUCKETS - 1 : b]++;
}

/* The upper edge of the bucket that holds the P-th percentile, in µs. */
static unsigned long lat_pct(unsigned long total, double p)
{
    unsigned long want = (unsigned long)(total * p / 100.0), seen = 0;
    for (long b = 0; b < LAT_BUCKETS; b++) {
        seen += g_lat[b];
        if (seen > want)
            return (unsigned long)(b + 1) * LAT_STEP_US;
    }
    return (unsigned long)LAT_BUCKETS * LAT_STEP_US;
}

static void result(const char *mode, double value, const char *unit, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void result(const char *mode, double value, const char *unit, const char *fmt, ...)
{
    va_list ap;
    printf("bench: %s %.1f %s ", mode, value, unit);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static void started(const char *mode)
{
    printf("bench: %s start\n", mode);
    fflush(stdout);
}

/* Wait until FD is ready for EVENTS; fails after STALL_MS of nothing. */
static void wait_fd(int fd, short events, const char *what)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, STALL_MS);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("poll: %s", strerror(errno));
        if (n == 0)
            fail("%s: no progress for %d ms", what, STALL_MS);
        return;
    }
}

static void bench_send(const char *ip, int port)
{
    static uint8_t buf[CHUNK];
    pattern_fill(buf, sizeof buf, 0, 0xbe7c);
    int fd = tcp_connect(ip, port, 10000);
    set_nonblocking(fd, 1);
    started("send");
    double t0 = now(), deadline = t0 + g_seconds;
    unsigned long long sent = 0;
    while (now() < deadline) {
        ssize_t w = send(fd, buf, sizeof buf, MSG_NOSIGNAL);
        if (w > 0) {
            sent += w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            wait_fd(fd, POLLOUT, "send");
        } else {
            fail("send after %llu bytes: %s", sent, w < 0 ? strerror(errno) : "returned 0");
        }
    }
    double t_written = now();
    if (shutdown(fd, SHUT_WR) < 0)
        fail("shutdown: %s", strerror(errno));
    /* The server closes once it has read our FIN: every byte is through. */
    for (;;) {
        wait_fd(fd, POLLIN, "waiting for the discard server to close");
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r == 0)
            break;
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            fail("recv after shutdown: %s", strerror(errno));
    }
    double t1 = now();
    close(fd);
    double secs = t1 - t0;
    result("send", sent * 8 / secs / 1e6, "Mbit/s", "bytes=%llu seconds=%.3f drain_ms=%.0f",
           sent, secs, (t1 - t_written) * 1e3);
}

static void bench_recv(const char *ip, int port)
{
    static uint8_t buf[CHUNK];
    int fd = tcp_connect(ip, port, 10000);
    set_nonblocking(fd, 1);
    started("recv");
    double t0 = now(), deadline = t0 + g_seconds, t;
    unsigned long long got = 0;
    while ((t = now()) < deadline) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r > 0) {
            got += r;
        } else if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            wait_fd(fd, POLLIN, "recv");
        } else {
            fail("recv after %llu bytes: %s", got, r < 0 ? strerror(errno) : "peer closed");
        }
    }
    close(fd);
    double secs = t - t0;
    result("recv", got * 8 / secs / 1e6, "Mbit/s", "bytes=%llu seconds=%.3f", got, secs);
}

static void bench_crr(const char *ip, int port)
{
    started("crr");
    double t0 = now(), deadline = t0 + g_seconds, t;
    unsigned long conns = 0;
    while ((t = now()) < deadline) {
        double op0 = t;
        int fd = tcp_connect(ip, port, 10000);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char c = (char)conns, back;
        if (send(fd, &c, 1, MSG_NOSIGNAL) != 1)
            fail("connection %lu: send: %s", conns, strerror(errno));
        set_nonblocking(fd, 1);
        for (;;) {
            ssize_t r = recv(fd, &back, 1, 0);
            if (r == 1)
                break;
            if (r == 0)
                fail("connection %lu: closed before the echo", conns);
            if (errno != EAGAIN && errno != EINTR)
                fail("connection %lu: recv: %s", conns, strerror(errno));
            wait_fd(fd, POLLIN, "echo");
        }
        if (back != c)
            fail("connection %lu: echoed 0x%02x, sent 0x%02x", conns, back & 0xff, c & 0xff);
        close(fd);
        conns++;
        lat_add(now() - op0);
    }
    double secs = t - t0;
    result("crr", conns / secs, "conn/s", "conns=%lu seconds=%.3f avg_ms=%.3f p50_us=%lu p90_us=%lu p99_us=%lu",
           conns, secs, conns ? secs * 1e3 / conns : 0.0,
           lat_pct(conns, 50), lat_pct(conns, 90), lat_pct(conns, 99));
}

static void bench_udp(const char *ip, int port)
{
    struct sockaddr_in peer = ipv4_addr(ip, port);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        fail("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&peer, sizeof peer) < 0)
        fail("connect: %s", strerror(errno));
    uint8_t out[64], in[128];
    unsigned long n = 0, lost = 0;
    started("udp");
    double t0 = now(), deadline = t0 + g_seconds, t, last_ok = t0;
    while ((t = now()) < deadline) {
        double op0 = t;
        memcpy(out, &n, sizeof n);
        memset(out + sizeof n, 'u', sizeof out - sizeof n);
        if (send(fd, out, sizeof out, 0) != (ssize_t)sizeof out)
            fail("send: %s", strerror(errno));
        int ok = 0;
        while (!ok) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int k = poll(&p, 1, 200);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                break; /* lost: send again */
            ssize_t r = recv(fd, in, sizeof in, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                fail("recv: %s", strerror(errno));
            }
            ok = r == (ssize_t)sizeof out && memcmp(in, out, sizeof out) == 0;
            /* anything else is a late echo of an earlier datagram */
        }
        if (ok) {
            n++;
            last_ok = now();
            lat_add(last_ok - op0);
        } else {
            lost++;
            if (now() - last_ok > STALL_MS / 1e3)
                fail("no UDP echo for %d ms (%lu round trips, %lu lost)", STALL_MS, n, lost);
        }
    }
    close(fd);
    double secs = t - t0;
    result("udp", n / secs, "rt/s", "round_trips=%lu seconds=%.3f lost=%lu p50_us=%lu p90_us=%lu p99_us=%lu",
           n, secs, lost, lat_pct(n, 50), lat_pct(n, 90), lat_pct(n, 99));
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5)
        fail("usage: tcp_bench send|recv|crr|udp IP PORT SECONDS");
    const char *mode = argv[1], *ip = argv[2];
    int port = atoi(argv[3]);
    g_seconds = atof(argv[4]);
    static char tag[32];
    snprintf(tag, sizeof tag, "bench-%s", mode);
    g_tag = tag;
    if (g_seconds <= 0 || port <= 0 || port > 65535)
        fail("bad PORT %s or SECONDS %s", argv[3], argv[4]);
    /* The last resort: every wait above fails after STALL_MS on its own. */
    alarm((unsigned)g_seconds + 60);
    if (!strcmp(mode, "send"))
        bench_send(ip, port);
    else if (!strcmp(mode, "recv"))
        bench_recv(ip, port);
    else if (!strcmp(mode, "crr"))
        bench_crr(ip, port);
    else if (!strcmp(mode, "udp"))
        bench_udp(ip, port);
    else
        fail("unknown mode '%s' (send, recv, crr, udp)", mode);
    return 0;
}
