/* The UDP express: a guest's datagram on an established NAT flow, from its
 * Ethernet frame to its host socket in one call (vhostnet/native/build.py).
 *
 * Theory of operation.  A UDP flow's first datagram takes the whole path:
 * the stack parses and checks the frame (stack/interface.py), the flow table
 * queues an event (stack/flows.py), the host proxy opens the flow's
 * connect()ed host socket and sends (vhostnet/hostnet/datagram.py).  Once that
 * socket exists the proxy enters the flow here, keyed by what identifies it
 * to the guest: (destination address, source port, destination port); the
 * source address is always the guest's.  From then on vn_x_send takes every
 * frame of that flow that the stack would have handed to the NAT unchanged,
 * checks it as the stack does, and send()s its payload on the flow's socket.
 * A frame it is not sure of it leaves alone (returns -1), and the stack sees
 * it as before; so every refusal, error and count stays the stack's.
 *
 * What the caller then owes (vhostnet/hostnet/express.py, once per TX step):
 * the counts each touched entry holds (datagrams, bytes, sends dropped on a
 * full socket, the last send error) go to the flow table and the proxy, and
 * the entries are listed in `dirty` in the order they were first touched.
 *
 * The table: an open-addressing index (linear probing, power-of-two size,
 * -1 empty, -2 deleted) over an entry array whose positions never move, so
 * the Python side can keep its relay per position.  The index is at least
 * twice the entries, and the caller rebuilds it (vn_x_rebuild) when deleted
 * marks pile up, so a probe always ends.
 *
 * Nothing here allocates or keeps a pointer past the call, and nothing reads
 * outside the frame length it is given.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

/* IEEE 802.3, RFC 791 section 3.1, RFC 768. */
#define ETH_HLEN        14
#define ETHERTYPE_IPV4_HI 0x08
#define ETHERTYPE_IPV4_LO 0x00
#define IPV4_VER_IHL5   0x45        /* version 4, a 20-byte header: no options */
#define IPV4_HLEN       20
#define IP_FRAG_MASK    0x3FFF      /* MF and the fragment offset (DF may be set) */
#define IP_TTL_OFF      8
#define IP_PROTO_OFF    9
#define IP_SRC_OFF      12
#define IP_DST_OFF      16
#define IPPROTO_UDP_NUM 17          /* RFC 790 */
#define UDP_HLEN        8
#define MAC_LEN         6
#define FRAME_MIN_UDP   (ETH_HLEN + IPV4_HLEN + UDP_HLEN)

#define X_EMPTY   (-1)
#define X_DELETED (-2)
#define X_HASH_MUL 0x9E3779B97F4A7C15ull    /* Fibonacci hashing (Knuth 6.4) */

typedef struct {
    uint8_t gw_mac[6];
    uint8_t guest_mac[6];
    uint8_t guest_ip[4];
} vn_xconf;

typedef struct {
    uint64_t key;
    int32_t fd;             /* the flow's connect()ed host socket; -1: entry free */
    int32_t err;            /* errno of the last failed send since the caller's settle */
    uint32_t sent;          /* datagrams sent ... */
    uint32_t dropped;       /* ... dropped: the socket's buffer full (EAGAIN) ... */
    uint32_t failed;        /* ... refused by send() otherwise */
    uint32_t dirty;         /* listed in `dirty` since the last settle */
    uint64_t bytes;         /* payload bytes of all of them */
} vn_xflow;

static inline uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

/* Folded ones'-complement sum of n bytes in network order (RFC 1071), plus start. */
static uint32_t sum16(const uint8_t *p, size_t n, uint64_t start)
{
    uint64_t s = start;
    while (n >= 2) {
        s += be16(p);
        p += 2;
        n -= 2;
    }
    if (n)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xFFFFu) + (s >> 16);
    return (uint32_t)s;
}

static inline uint32_t slot_of(uint64_t key, uint32_t mask)
{
    return (uint32_t)((key * X_HASH_MUL) >> 32) & mask;
}

static long find(const int32_t *idx, uint32_t mask, const vn_xflow *ent, uint64_t key)
{
    uint32_t h = slot_of(key, mask);
    for (uint32_t i = 0; i <= mask; i++, h = (h + 1) & mask) {
        int32_t e = idx[h];
        if (e == X_EMPTY)
            return -1;
        if (e >= 0 && ent[e].key == key)
            return e;
    }
    return -1;
}

/* Enter entry E under KEY.  Returns its index slot, or -1 if the index is
 * full (the caller keeps it at least twice the entries: never). */
long vn_x_insert(int32_t *idx, uint32_t mask, vn_xflow *ent, uint64_t key, int32_t e)
{
    uint32_t h = slot_of(key, mask);
    for (uint32_t i = 0; i <= mask; i++, h = (h + 1) & mask) {
        if (idx[h] < 0) {
            idx[h] = e;
            ent[e].key = key;
            return h;
        }
    }
    return -1;
}

/* Take KEY out of the index (a deleted mark).  Returns its entry or -1. */
long vn_x_remove(int32_t *idx, uint32_t mask, const vn_xflow *ent, uint64_t key)
{
    uint32_t h = slot_of(key, mask);
    for (uint32_t i = 0; i <= mask; i++, h = (h + 1) & mask) {
        int32_t e = idx[h];
        if (e == X_EMPTY)
            return -1;
        if (e >= 0 && ent[e].key == key) {
            idx[h] = X_DELETED;
            return e;
        }
    }
    return -1;
}

/* The index again from the live entries (fd >= 0): no deleted marks left. */
void vn_x_rebuild(int32_t *idx, uint32_t mask, vn_xflow *ent, uint32_t nent)
{
    for (uint32_t h = 0; h <= mask; h++)
        idx[h] = X_EMPTY;
    for (uint32_t e = 0; e < nent; e++)
        if (ent[e].fd >= 0)
            vn_x_insert(idx, mask, ent, ent[e].key, (int32_t)e);
}

/* The frame F (N bytes, Ethernet on; CSUM_OK: its L4 checksum is the
 * driver's to vouch for, NEEDS_CSUM or DATA_VALID) if it is a datagram the
 * stack would hand to the NAT for an entered flow: its payload is sent and
 * the entry's counts taken.  Returns the entry, or -1: not taken, untouched.
 *
 * The checks are the stack's for the same frame (Stack._rx_ipv4, check_header,
 * _rx_udp), narrowed: from the guest's MAC and address to the gateway's MAC,
 * no IP options, not a fragment, TTL above 1, a valid header checksum, a UDP
 * length inside the IP datagram and, unless CSUM_OK, a valid UDP checksum. */
long vn_x_send(const char *frame, size_t n, int csum_ok, const vn_xconf *c,
               const int32_t *idx, uint32_t mask, vn_xflow *ent,
               uint32_t *dirty, uint32_t *ndirty)
{
    const uint8_t *f = (const uint8_t *)frame;
    if (n < FRAME_MIN_UDP)
        return -1;
    if (memcmp(f, c->gw_mac, MAC_LEN) || memcmp(f + MAC_LEN, c->guest_mac, MAC_LEN)
        || f[12] != ETHERTYPE_IPV4_HI || f[13] != ETHERTYPE_IPV4_LO)
        return -1;
    const uint8_t *ip = f + ETH_HLEN;
    if (ip[0] != IPV4_VER_IHL5 || ip[IP_PROTO_OFF] != IPPROTO_UDP_NUM || ip[IP_TTL_OFF] <= 1
        || (be16(ip + 6) & IP_FRAG_MASK) || memcmp(ip + IP_SRC_OFF, c->guest_ip, 4))
        return -1;
    uint32_t tot = be16(ip + 2);
    if (tot < IPV4_HLEN + UDP_HLEN || ETH_HLEN + (size_t)tot > n)
        return -1;
    if (sum16(ip, IPV4_HLEN, 0) != 0xFFFF)
        return -1;
    const uint8_t *udp = ip + IPV4_HLEN;
    uint32_t ulen = be16(udp + 4);
    if (ulen < UDP_HLEN || IPV4_HLEN + ulen > tot)
        return -1;
    if (!csum_ok && be16(udp + 6)) {
        /* RFC 768: pseudo-header (src, dst, zero, proto, length) + the datagram. */
        uint64_t ps = be16(ip + IP_SRC_OFF) + be16(ip + IP_SRC_OFF + 2)
                    + be16(ip + IP_DST_OFF) + be16(ip + IP_DST_OFF + 2)
                    + IPPROTO_UDP_NUM + ulen;
        if (sum16(udp, ulen, ps) != 0xFFFF)
            return -1;
    }
    uint64_t key = ((uint64_t)be16(ip + IP_DST_OFF) << 48) | ((uint64_t)be16(ip + IP_DST_OFF + 2) << 32)
                 | ((uint64_t)be16(udp) << 16) | be16(udp + 2);
    long e = find(idx, mask, ent, key);
    if (e < 0)
        return -1;
    vn_xflow *x = &ent[e];
    size_t len = ulen - UDP_HLEN;
    ssize_t r = send(x->fd, udp + UDP_HLEN, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r >= 0) {
        x->sent++;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        x->dropped++;           /* as a router would: the datagram-relay's rule */
    } else {
        x->failed++;
        x->err = errno;
    }
    x->bytes += len;
    if (!x->dirty) {
        x->dirty = 1;
        dirty[(*ndirty)++] = (uint32_t)e;
    }
    return e;
}
