/*
 * tcp_loopback: a TCP connection to our own address that must travel
 * through eth0 and come back through the vhost-user backend, which injects
 * frames addressed to the guest back into its RX queue.
 *
 *   tcp_loopback IP PORT [BYTES]  (IP: the guest's own address; default 256 KiB)
 *
 * The init script first routes locally generated traffic to IP out of eth0
 * (policy rule + static neighbour entry + accept_local).  This program
 * listens on PORT, forks a child that connects to IP:PORT and pumps BYTES of
 * pattern data through the connection while the parent echoes them back.
 *
 * It then proves the path: eth0's tx and rx packet counters must have grown
 * by at least the handshake and data segments, and the loopback device's
 * must not have moved (nothing else in the guest uses lo).
 */
#include <sys/wait.h>

#include "common.h"

#define MIN_PACKETS 5 /* SYN, SYN-ACK, ACK, data, FIN at the very least */

int main(int argc, char **argv)
{
    g_tag = "tcp loopback";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3)
        fail("usage: tcp_loopback IP PORT [BYTES]");
    const char *ip = argv[1];
    int port = atoi(argv[2]);
    size_t total = argc > 3 ? strtoul(argv[3], NULL, 0) : 256 << 10;
    alarm(60);

    unsigned long long tx0 = counter("eth0", "tx_packets"), rx0 = counter("eth0", "rx_packets");
    unsigned long long lo0 = counter("lo", "tx_packets");

    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(port)};
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&any, sizeof any) < 0 || listen(ls, 1) < 0)
        fail("listen on port %d: %s", port, strerror(errno));

    double t0 = now();
    pid_t child = fork();
    if (child < 0)
        fail("fork: %s", strerror(errno));
    if (child == 0) {
        g_tag = "tcp loopback (client)";
        close(ls);
        int fd = tcp_connect(ip, port, 10000);
        tcp_pump(fd, total, 0x100b, 15000);
        close(fd);
        exit(0);
    }

    /* Parent: accept one connection and echo everything back. */
    struct sockaddr_in from;
    socklen_t flen = sizeof from;
    int fd = accept(ls, (struct sockaddr *)&from, &flen);
    if (fd < 0)
        fail("accept: %s", strerror(errno));
    if (strcmp(inet_ntoa(from.sin_addr), ip) != 0)
        fail("connection came from %s, expected %s", inet_ntoa(from.sin_addr), ip);
    static uint8_t buf[65536];
    size_t echoed = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail("server recv after %zu bytes: %s", echoed, strerror(errno));
        if (r == 0)
            break;
        for (ssize_t off = 0; off < r;) {
            ssize_t w = send(fd, buf + off, r - off, MSG_NOSIGNAL);
            if (w < 0)
                fail("server send after %zu bytes: %s", echoed, strerror(errno));
            off += w;
        }
        echoed += r;
    }
    close(fd);
    int status;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        exit(1); /* the client printed its FAIL line */
    double secs = now() - t0;

    unsigned long long tx = counter("eth0", "tx_packets") - tx0;
    unsigned long long rx = counter("eth0", "rx_packets") - rx0;
    unsigned long long lo = counter("lo", "tx_packets") - lo0;
    printf("net: tcp loopback: %zu bytes to %s:%d and back in %.2f s; eth0 tx +%llu rx +%llu "
           "packets, lo +%llu\n",
           total, ip, port, secs, tx, rx, lo);
    if (tx < MIN_PACKETS || rx < MIN_PACKETS)
        fail("the connection did not go through eth0 (eth0 tx +%llu rx +%llu, lo +%llu)", tx, rx,
             lo);
    if (lo > 0)
        fail("%llu packets went through lo: the policy routing to eth0 is not in effect", lo);
    printf("net: tcp loopback ok\n");
    return 0;
}
