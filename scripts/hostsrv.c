/*
 * hostsrv: discard, chargen and echo on the host's loopback, for the peers
 * vhostnet is compared with (QEMU's slirp and passt map the guest's
 * 10.0.2.2:PORT to the host's 127.0.0.1:PORT; vhostnet serves these
 * itself).  Built and started by scripts/bench_qemu.py:
 *
 *   gcc -O2 -o hostsrv scripts/hostsrv.c
 *   hostsrv [-a ADDR] [-t SECONDS]
 *
 * It binds TCP discard (RFC 863), TCP chargen (RFC 864), TCP echo and UDP
 * echo (RFC 862, the same port number as TCP echo) to free ports of ADDR
 * (default 127.0.0.1), prints one line
 *
 *   hostsrv: discard=P chargen=P echo=P
 *
 * and serves until SIGTERM/SIGINT, its parent's death (PR_SET_PDEATHSIG),
 * or SECONDS (default 600) have passed, whichever comes first.
 *
 * Design: one thread, epoll, level-triggered, non-blocking sockets.  Each
 * TCP connection has a fixed 64 KiB buffer (echo) and the number of
 * connections is bounded (MAX_CONNS; beyond it new ones are closed at
 * once), so memory never grows with what peers do.
 *   discard  reads until EOF, then closes
 *   chargen  writes the RFC 864 pattern whenever the socket is writable,
 *            reads and drops anything that arrives, closes at EOF
 *   echo     reads up to a buffer, writes it back (waiting for POLLOUT
 *            instead of reading more when the peer is slow), closes at EOF
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAX_CONNS 1024
#define MAX_EVENTS 64

enum kind { L_DISCARD, L_CHARGEN, L_ECHO, U_ECHO, C_DISCARD, C_CHARGEN, C_ECHO };

struct conn {
    enum kind kind;
    int fd;
    size_t off, len;         /* echo: pending bytes buf[off:len]; chargen: pattern offset */
    unsigned char buf[];     /* BUF bytes for echo, none otherwise */
};

static int g_ep;
static int g_conns;
static unsigned char g_pattern[BUF + 7030];   /* chargen: 64 KiB from any offset in a period */
static unsigned char g_scratch[1 << 18];
static volatile sig_atomic_t g_stop;

static void die(const char *what)
{
    fprintf(stderr, "hostsrv: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void chargen_pattern(void)
{
    /* 95 lines of 72 printable characters + CR LF, each line one character on. */
    size_t n = 0;
    while (n < sizeof g_pattern)
        for (int line = 0; line < 95 && n < sizeof g_pattern; line++) {
            for (int i = 0; i < 72 && n < sizeof g_pattern; i++)
                g_pattern[n++] = (unsigned char)(32 + (line + i) % 95);
            if (n < sizeof g_pattern)
                g_pattern[n++] = '\r';
            if (n < sizeof g_pattern)
                g_pattern[n++] = '\n';
        }
}

static void watch(struct conn *c, int op, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(g_ep, op, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static struct conn *new_conn(enum kind kind, int fd)
{
    struct conn *c = calloc(1, sizeof *c + (kind == C_ECHO ? BUF : 0));
    if (!c)
        die("calloc");
    c->kind = kind;
    c->fd = fd;
    return c;
}

static void drop(struct conn *c)
{
    close(c->fd); /* also removes it from the epoll set */
    free(c);
    g_conns--;
}

/* Bind a socket of TYPE to ADDR:PORT (0: any free port); returns the fd. */
static int bind_to(int type, struct in_addr addr, int port, int *bound)
{
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr = addr};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *bound = ntohs(a.sin_port);
    if (type == SOCK_STREAM && listen(fd, 128) < 0)
        die("listen");
    return fd;
}

static void do_accept(struct conn *l)
{
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                fprintf(stderr, "hostsrv: accept: %s\n", strerror(errno));
            return;
        }
        if (g_conns >= MAX_CONNS) {
            close(fd);
            continue;
        }
        g_conns++;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        enum kind k = l->kind == L_DISCARD ? C_DISCARD : l->kind == L_CHARGEN ? C_CHARGEN : C_ECHO;
        struct conn *c = new_conn(k, fd);
        watch(c, EPOLL_CTL_ADD, k == C_CHARGEN ? EPOLLIN | EPOLLOUT : EPOLLIN);
    }
}

/* Read and drop what is there; 1 if the connection is finished (EOF or error). */
static int drain(struct conn *c)
{
    for (int i = 0; i < 16; i++) {
        ssize_t r = read(c->fd, g_scratch, sizeof g_scratch);
        if (r > 0)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return 0;
        return 1;
    }
    return 0;
}

static void on_conn(struct conn *c, unsigned events)
{
    if (c->kind == C_DISCARD) {
        if (drain(c))
            drop(c);
        return;
    }
    if (c->kind == C_CHARGEN) {
        if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && drain(c)) {
            drop(c);
            return;
        }
        if (events & EPOLLOUT) {
            ssize_t w = write(c->fd, g_pattern + c->off, BUF);
            if (w > 0)
                c->off = (c->off + w) % 7030;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                drop(c);
        }
        return;
    }
    /* echo */
    if (c->len == 0) {
        ssize_t r = read(c->fd, c->buf, BUF);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            drop(c);
            return;
        }
        if (r < 0)
            return;
        c->off = 0;
        c->len = r;
    }
    ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
    if (w < 0 && errno != EAGAIN && errno != EINTR) {
        drop(c);
        return;
    }
    if (w > 0)
        c->off += w;
    int was_blocked = events & EPOLLOUT;
    if (c->off == c->len) {
        c->off = c->len = 0;
        if (was_blocked)
            watch(c, EPOLL_CTL_MOD, EPOLLIN);
    } else if (!was_blocked) {
        watch(c, EPOLL_CTL_MOD, EPOLLOUT);
    }
}

static void on_udp(struct conn *u)
{
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in from;
        socklen_t flen = sizeof from;
        ssize_t r = recvfrom(u->fd, g_scratch, sizeof g_scratch, 0, (struct sockaddr *)&from, &flen);
        if (r < 0)
            return;
        sendto(u->fd, g_scratch, r, 0, (struct sockaddr *)&from, flen);
    }
}

int main(int argc, char **argv)
{
    const char *addr_text = "127.0.0.1";
    int seconds = 600, opt;
    while ((opt = getopt(argc, argv, "a:t:")) != -1) {
        if (opt == 'a')
            addr_text = optarg;
        else if (opt == 't')
            seconds = atoi(optarg);
        else {
            fprintf(stderr, "usage: hostsrv [-a ADDR] [-t SECONDS]\n");
            return 2;
        }
    }
    struct in_addr addr;
    if (inet_pton(AF_INET, addr_text, &addr) != 1) {
        fprintf(stderr, "hostsrv: bad address %s\n", addr_text);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        return 1; /* the parent is gone already */
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    alarm(seconds > 0 ? seconds : 600);
    chargen_pattern();

    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0)
        die("epoll_create1");
    int ports[3], fds[4] = {-1, -1, -1, -1}, udp_port = 0;
    for (int k = 0; k < 3; k++)
        if ((fds[k] = bind_to(SOCK_STREAM, addr, 0, &ports[k])) < 0)
            die("bind");
    /* UDP echo on the TCP echo port number; if that is taken, a new TCP port. */
    for (int tries = 0; tries < 50 && fds[3] < 0; tries++) {
        fds[3] = bind_to(SOCK_DGRAM, addr, ports[2], &udp_port);
        if (fds[3] < 0) {
            close(fds[2]);
            if ((fds[2] = bind_to(SOCK_STREAM, addr, 0, &ports[2])) < 0)
                die("bind");
        }
    }
    if (fds[3] < 0)
        die("bind udp echo");
    for (int k = 0; k < 4; k++)
        watch(new_conn((enum kind)k, fds[k]), EPOLL_CTL_ADD, EPOLLIN);
    printf("hostsrv: discard=%d chargen=%d echo=%d\n", ports[0], ports[1], ports[2]);
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    while (!g_stop) {
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->kind <= L_ECHO)
                do_accept(c);
            else if (c->kind == U_ECHO)
                on_udp(c);
            else
                on_conn(c, evs[i].events);
        }
    }
    return 0;
}
