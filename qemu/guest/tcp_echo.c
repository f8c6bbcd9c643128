/*
 * tcp_echo: TCP echo test against a remote echo service (RFC 862).
 *
 *   tcp_echo IP PORT [BYTES]      (default 1 MiB)
 *
 * Connects with socket()/connect(), sends BYTES of pattern data with
 * send() and writev() and reads the echo back with recv() and readv(), all
 * in one poll() loop (see tcp_pump in common.h), verifying every byte.
 * Prints the throughput and "tcp-echo: ok".
 */
#include "common.h"

int main(int argc, char **argv)
{
    g_tag = "tcp-echo";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3)
        fail("usage: tcp_echo IP PORT [BYTES]");
    const char *ip = argv[1];
    int port = atoi(argv[2]);
    size_t total = argc > 3 ? strtoul(argv[3], NULL, 0) : 1 << 20;
    /* The last resort (tcp_pump fails on a 15 s stall first): 60 s, plus a
     * second per 64 KiB, so a big echo over a bad link (vhostnet fault:
     * 16 MiB through 5% loss and 20 ms delay moves at ~150 KB/s) may finish. */
    alarm(60 + (unsigned)(total >> 16));

    double t0 = now();
    int fd = tcp_connect(ip, port, 10000);
    double t1 = now();
    tcp_pump(fd, total, 0x7ec0, 15000);
    double t2 = now();
    close(fd);

    double secs = t2 - t1;
    printf("tcp-echo: %zu bytes to %s:%d and back in %.2f s (connect %.0f ms), %.2f MB/s each way\n",
           total, ip, port, secs, (t1 - t0) * 1e3, total / secs / 1e6);
    printf("tcp-echo: ok\n");
    return 0;
}
