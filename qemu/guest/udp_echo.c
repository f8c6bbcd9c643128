/*
 * udp_echo: UDP echo test against a remote echo service (RFC 862).
 *
 *   udp_echo IP PORT [MAX]        (default MAX 1472: the largest datagram
 *                                  that fits a 1500-byte MTU unfragmented)
 *
 * For every size 1..MAX: sendto() one datagram of pattern bytes, then
 * recvfrom() until the echo arrives (checked: source, length, every byte).
 * Each datagram gets RETRIES tries of TIMEOUT_MS each, so one lost frame
 * costs a retry, not a hang.  Late echoes of earlier datagrams have another
 * length and are skipped.  Prints a summary and "udp-echo: ok".
 */
#include "common.h"

#define RETRIES 4
#define TIMEOUT_MS 1000
#define MAXLEN 65507

int main(int argc, char **argv)
{
    g_tag = "udp-echo";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3)
        fail("usage: udp_echo IP PORT [MAX]");
    struct sockaddr_in peer = ipv4_addr(argv[1], atoi(argv[2]));
    int max = argc > 3 ? atoi(argv[3]) : 1472;
    if (max < 1 || max > MAXLEN)
        fail("MAX must be 1..%d", MAXLEN);
    alarm(90); /* the last resort: each datagram fails after 4 s of silence */

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        fail("socket: %s", strerror(errno));
    static uint8_t out[MAXLEN], in[MAXLEN + 1];
    unsigned retries = 0, stale = 0;
    double t0 = now();
    for (int size = 1; size <= max; size++) {
        uint32_t seed = 0x0dd0 + size;
        pattern_fill(out, size, 0, seed);
        int ok = 0;
        for (int attempt = 0; attempt < RETRIES && !ok; attempt++) {
            if (attempt)
                retries++;
            if (sendto(fd, out, size, 0, (struct sockaddr *)&peer, sizeof peer) != size)
                fail("sendto %d bytes: %s", size, strerror(errno));
            double deadline = now() + TIMEOUT_MS / 1e3;
            while (!ok) {
                int left = (int)((deadline - now()) * 1e3);
                struct pollfd p = {.fd = fd, .events = POLLIN};
                if (left <= 0 || poll(&p, 1, left) == 0)
                    break; /* timeout: retry */
                struct sockaddr_in from;
                socklen_t flen = sizeof from;
                ssize_t r = recvfrom(fd, in, sizeof in, 0, (struct sockaddr *)&from, &flen);
                if (r < 0) {
                    if (errno == EINTR)
                        continue;
                    fail("recvfrom (size %d): %s", size, strerror(errno));
                }
                if (from.sin_addr.s_addr != peer.sin_addr.s_addr || from.sin_port != peer.sin_port)
                    fail("datagram from %s:%d, expected %s:%s", inet_ntoa(from.sin_addr),
                         ntohs(from.sin_port), argv[1], argv[2]);
                if (r != size) {
                    stale++; /* a late echo of an earlier size */
                    continue;
                }
                long bad = pattern_check(in, r, 0, seed);
                if (bad >= 0)
                    fail("%d-byte datagram: byte %ld is 0x%02x, expected 0x%02x", size, bad,
                         in[bad], pattern_byte(bad, seed));
                ok = 1;
            }
        }
        if (!ok)
            fail("no echo for the %d-byte datagram after %d tries of %d ms", size, RETRIES,
                 TIMEOUT_MS);
    }
    double secs = now() - t0;
    printf("udp-echo: %d datagrams (1..%d bytes) echoed and verified in %.2f s, %u retries, %u late\n",
           max, max, secs, retries, stale);
    printf("udp-echo: ok\n");
    return 0;
}
