/* vhostnet native hot paths, compiled by cffi (stack/native/build.py).
 *
 * Three routines, each with a pure-Python twin in stack/native/fallback.py
 * that must give the same answer (tests/stack/test_native.py holds them to
 * it on random input):
 *
 *   vn_ones_sum      RFC 1071 ones'-complement sum of a buffer
 *   vn_l4_sum        the same over buf[off:off+n] plus the IPv4
 *                    pseudo-header (RFC 768, RFC 793 section 3.1)
 *   vn_copy          copy the concatenation of N source buffers into the
 *                    concatenation of M destination buffers (guest
 *                    scatter/gather lists <-> frames)
 *   vn_segment_tcp   software TSO: one TCP/IPv4 frame -> MSS-sized frames
 *
 * and, in later sections, the ICMP echo reply, the RX scatter and the split
 * ring's batched loops (vn_split_take_writable / vn_split_put_frame /
 * vn_split_put_frames for RX buffers, vn_split_take_readable /
 * vn_split_put_used for TX chains; their twins are held to them by
 * tests/device/test_take_writable.py, test_put_frames.py and
 * test_take_readable.py), and the packed ring's RX run
 * (vn_packed_avail_run, vn_packed_put_frames; test_packed_put_frames.py).
 *
 * Checksums: the ones'-complement sum is independent of byte order
 * (RFC 1071 section 2(B)), so we add native-endian 32-bit loads into a
 * 64-bit accumulator, fold with end-around carry, and swap the folded
 * 16-bit result to network order once at the end.  Folding a non-zero sum
 * never yields 0 (end-around carry keeps it in 1..0xFFFF), so the result
 * is 0 only for an all-zero input with start 0: exactly what the Python
 * version (`int.from_bytes(...) % 0xFFFF`, 0 -> 0xFFFF) returns.
 *
 * Nothing here allocates, keeps a pointer past the call, or reads or
 * writes outside the lengths it is given; the Python side validates the
 * headers before calling vn_segment_tcp.
 */
#include <stdint.h>
#include <string.h>

/* Ethernet + IPv4 + TCP field offsets (IEEE 802.3, RFC 791 section 3.1,
 * RFC 793 section 3.1). */
#define ETH_HLEN        14
#define IP_TOTLEN_OFF   2
#define IP_ID_OFF       4
#define IP_CSUM_OFF     10
#define IP_SRC_OFF      12
#define TCP_SEQ_OFF     4
#define TCP_FLAGS_OFF   13
#define TCP_CSUM_OFF    16
#define IPPROTO_TCP_NUM 6           /* RFC 790 */
#define TCP_FIN 0x01                /* RFC 793 section 3.1 */
#define TCP_PSH 0x08
#define TCP_CWR 0x80                /* RFC 3168 section 6.1 */

static inline uint16_t bswap16(uint16_t v) { return (uint16_t)((v << 8) | (v >> 8)); }

static inline int little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* Fold a 64-bit sum of 16-bit quantities to 16 bits with end-around carry. */
static inline uint32_t fold64(uint64_t s)
{
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFFu) + (s >> 16);
    s = (s & 0xFFFFu) + (s >> 16);
    s = (s & 0xFFFFu) + (s >> 16);
    return (uint32_t)s;
}

/* Native-order partial sum (not folded).  Odd trailing byte: as the high
 * byte of a network-order word, i.e. the first byte in memory. */
static uint64_t sum_native(const uint8_t *p, size_t n)
{
    uint64_t s = 0;
    /* Four independent accumulators let the compiler vectorize / pipeline. */
    uint64_t a = 0, b = 0, c = 0, d = 0;
    while (n >= 16) {
        uint32_t w[4];
        memcpy(w, p, 16);           /* unaligned-safe load */
        a += w[0]; b += w[1]; c += w[2]; d += w[3];
        p += 16;
        n -= 16;
    }
    s = a + b + c + d;
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        s += w;
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        s += h;
        p += 2;
        n -= 2;
    }
    if (n) {
        uint16_t h = 0;
        memcpy(&h, p, 1);           /* [byte, 0] in memory order */
        s += h;
    }
    return s;
}

/* Network-order folded sum of p[0:n] plus `start` (a folded network-order
 * sum; any 32-bit value, folded first).  Returns 0..0xFFFF; 0 only when everything is zero. */
uint32_t vn_ones_sum(const char *buf, size_t n, uint32_t start)
{
    uint64_t s = sum_native((const uint8_t *)buf, n);
    uint32_t st = fold64(start);
    s += little_endian() ? bswap16((uint16_t)st) : st;
    uint32_t r = fold64(s);
    return little_endian() ? bswap16((uint16_t)r) : r;
}

/* Folded sum of the IPv4 pseudo-header (src, dst: 4 bytes each; zero,
 * proto, length n) plus buf[off:off+n], in network order; what a UDP or
 * TCP checksum is the complement of.  buf_len bounds the read: returns
 * VN_OUT_OF_RANGE (not a 16-bit value) when off + n exceeds it. */
#define VN_OUT_OF_RANGE 0x10000u
uint32_t vn_l4_sum(const char *buf, size_t buf_len, size_t off, size_t n,
                   const char *src, const char *dst, uint32_t proto)
{
    if (off > buf_len || n > buf_len - off)
        return VN_OUT_OF_RANGE;
    uint64_t s = sum_native((const uint8_t *)buf + off, n);
    s += sum_native((const uint8_t *)src, 4) + sum_native((const uint8_t *)dst, 4);
    /* proto and length as network-order 16-bit words (n < 2^32 here:
     * split in two words), converted to native order like the data. */
    uint32_t words[3] = { proto & 0xFFFFu, (uint32_t)(n & 0xFFFFu), (uint32_t)((n >> 16) & 0xFFFFu) };
    for (int i = 0; i < 3; i++)
        s += little_endian() ? bswap16((uint16_t)words[i]) : words[i];
    uint32_t r = fold64(s);
    return little_endian() ? bswap16((uint16_t)r) : r;
}

/* Copy concat(src[i][0:slen[i]]) into concat(dst[j][0:dlen[j]]) up to the
 * shorter of the two totals.  Returns the number of bytes copied. */
size_t vn_copy(char *const *dst, const size_t *dlen, size_t nd,
               const char *const *src, const size_t *slen, size_t ns)
{
    size_t i = 0, j = 0, si = 0, dj = 0, done = 0;
    while (i < ns && j < nd) {
        size_t sl = slen[i] - si, dl = dlen[j] - dj;
        size_t k = sl < dl ? sl : dl;
        if (k) {
            memcpy(dst[j] + dj, src[i] + si, k);
            done += k;
            si += k;
            dj += k;
        }
        if (si == slen[i]) { i++; si = 0; }
        if (dj == dlen[j]) { j++; dj = 0; }
    }
    return done;
}

static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

/* Cut the TCP/IPv4 frame f[0:n] (already validated by the caller: IPv4,
 * TCP, header lengths `ihl` and `doff`, total length tot, payload of plen
 * bytes starting at ETH_HLEN + ihl + doff) into `count` segments of at
 * most `gso` payload bytes, written back to back into out[0:cap].
 * seg_len[i] receives each segment's length.  partial != 0 leaves the
 * pseudo-header sum in the TCP checksum field (CHECKSUM_PARTIAL), else the
 * full checksum is computed.  Returns the number of bytes written, or -1
 * if `cap` or the arguments do not add up (nothing useful written then). */
long vn_segment_tcp(const char *frame, size_t n, uint32_t ihl, uint32_t doff,
                    uint32_t tot, uint32_t gso, uint32_t count, int partial,
                    char *outbuf, size_t cap, uint32_t *seg_len)
{
    const uint8_t *f = (const uint8_t *)frame;
    uint8_t *out = (uint8_t *)outbuf;
    size_t l4 = ETH_HLEN + ihl;
    size_t pay = l4 + doff;
    size_t end = ETH_HLEN + (size_t)tot;
    if (gso == 0 || end > n || pay > end || ihl < 20 || doff < 20)
        return -1;
    size_t plen = end - pay;
    size_t need_count = plen <= gso ? 1 : (plen + gso - 1) / gso;
    if (need_count != count)
        return -1;
    size_t total = count * pay + plen;
    if (total > cap)
        return -1;

    const uint8_t *ip = f + ETH_HLEN;
    uint32_t ident = ((uint32_t)ip[IP_ID_OFF] << 8) | ip[IP_ID_OFF + 1];
    const uint8_t *tcp = f + l4;
    uint32_t seq = ((uint32_t)tcp[TCP_SEQ_OFF] << 24) | ((uint32_t)tcp[TCP_SEQ_OFF + 1] << 16)
                 | ((uint32_t)tcp[TCP_SEQ_OFF + 2] << 8) | tcp[TCP_SEQ_OFF + 3];
    uint8_t flags = tcp[TCP_FLAGS_OFF];
    /* Pseudo-header sum of the addresses and protocol (RFC 793 section
     * 3.1); each segment adds its own TCP length. */
    uint64_t addr = sum_native(ip + IP_SRC_OFF, 8);

    uint8_t *o = out;
    for (uint32_t i = 0; i < count; i++) {
        size_t off = pay + (size_t)i * gso;
        size_t k = end - off < gso ? end - off : gso;
        memcpy(o, f, pay);
        memcpy(o + pay, f + off, k);
        uint8_t *sip = o + ETH_HLEN;
        uint8_t *stcp = o + l4;
        put16(sip + IP_TOTLEN_OFF, (uint32_t)(ihl + doff + k));
        put16(sip + IP_ID_OFF, (ident + i) & 0xFFFFu);
        sip[IP_CSUM_OFF] = sip[IP_CSUM_OFF + 1] = 0;
        put16(sip + IP_CSUM_OFF, (~vn_ones_sum((const char *)sip, ihl, 0)) & 0xFFFFu);
        uint32_t s = (uint32_t)(seq + (uint32_t)((size_t)i * gso));
        stcp[TCP_SEQ_OFF] = (uint8_t)(s >> 24);
        stcp[TCP_SEQ_OFF + 1] = (uint8_t)(s >> 16);
        stcp[TCP_SEQ_OFF + 2] = (uint8_t)(s >> 8);
        stcp[TCP_SEQ_OFF + 3] = (uint8_t)s;
        uint8_t fl = flags;
        if (i != count - 1)
            fl &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i != 0)
            fl &= (uint8_t)~TCP_CWR;
        stcp[TCP_FLAGS_OFF] = fl;
        /* Pseudo-header: addresses + protocol + TCP length, native order. */
        uint32_t tlen = (uint32_t)(doff + k);
        uint32_t pw = (uint32_t)IPPROTO_TCP_NUM + tlen;   /* network-order value */
        uint64_t ps = addr + (little_endian() ? bswap16((uint16_t)(pw & 0xFFFF)) + bswap16((uint16_t)(pw >> 16))
                                              : (pw & 0xFFFF) + (pw >> 16));
        stcp[TCP_CSUM_OFF] = stcp[TCP_CSUM_OFF + 1] = 0;
        if (partial) {
            uint32_t r = fold64(ps);
            put16(stcp + TCP_CSUM_OFF, little_endian() ? bswap16((uint16_t)r) : r);
        } else {
            uint32_t r = fold64(ps + sum_native(stcp, tlen));
            r = little_endian() ? bswap16((uint16_t)r) : r;
            put16(stcp + TCP_CSUM_OFF, (~r) & 0xFFFFu);
        }
        seg_len[i] = (uint32_t)(pay + k);
        o += pay + k;
    }
    return (long)total;
}

/* ======================================================================
 * ICMP echo reply (issue 12, item 5: the per-frame echo path).
 *
 *   vn_icmp_echo_reply   the reply to a verified-header ICMP echo request,
 *                        built from the request in one call
 *
 * The stack (stack/interface.py `_rx_icmp`) has already checked the IPv4
 * header (check_header: version, IHL 20, total length, header checksum),
 * the addresses, the route and the ICMP type and code; this routine checks
 * the ICMP checksum (RFC 792: over the whole message) and writes the reply:
 *   Ethernet  destination = the request's source, source = gw_mac
 *   IPv4      version 4, IHL 5, TOS kept, total length kept, ID = ident,
 *             no flags or offset, TTL ECHO_TTL, ICMP, addresses swapped,
 *             header checksum computed (20 bytes: cheaper than patching)
 *   ICMP      type ECHO_REPLY, code/id/sequence/data kept, checksum
 *             patched incrementally (RFC 1624 eqn. 3): only the first word
 *             changes, from (8 << 8 | code) to (0 << 8 | code)
 * and zeroes out[end:out_len] (the Ethernet minimum-frame padding).
 * Its Python twin is fallback.icmp_echo_reply.
 * ====================================================================== */
#define ETH_ALEN            6       /* IEEE 802.3: one MAC address */
#define IP_HLEN_PLAIN       20      /* RFC 791 section 3.1: no options */
#define IP_VIHL_PLAIN       0x45    /* version 4, IHL 5 words */
#define IP_FLAGS_OFF        6
#define IP_TTL_OFF          8
#define IP_PROTO_OFF        9
#define IP_DST_OFF          16
#define IPPROTO_ICMP_NUM    1       /* RFC 790 */
#define ECHO_TTL            64      /* the stack's TTL for everything it sends (ipv4.build_header) */
#define ICMP_HLEN           8       /* RFC 792: type, code, checksum, id, sequence */
#define ICMP_CSUM_OFF       2
#define ICMP_ECHO_REPLY_T   0       /* RFC 792 */
/* RFC 1624 eqn. 3 with m = 0x08cc, m' = 0x00cc: ~m + m' = 0xFFFF - 0x0800 = 0xF7FF. */
#define ECHO_TYPE_DELTA     0xF7FFu
#define IP_MAX_TOTLEN       65535   /* RFC 791 section 3.1: a 16-bit total length */
#define VN_ECHO_OK          0
#define VN_ECHO_BAD_CHECKSUM 1      /* the request's ICMP checksum is wrong: nothing written */
#define VN_ECHO_BAD_ARGS    (-1)    /* lengths that do not add up: nothing written */

int vn_icmp_echo_reply(const char *request, size_t req_len, size_t end,
                       char *outbuf, size_t out_len, const char *gw_mac, size_t mac_len,
                       uint32_t ident)
{
    const uint8_t *req = (const uint8_t *)request;
    uint8_t *out = (uint8_t *)outbuf;
    size_t l4 = ETH_HLEN + IP_HLEN_PLAIN;
    if (end < l4 + ICMP_HLEN || end > ETH_HLEN + IP_MAX_TOTLEN || end > req_len || out_len < end
        || mac_len != ETH_ALEN)
        return VN_ECHO_BAD_ARGS;
    /* A correct message sums to 0xFFFF (RFC 1071); vn_ones_sum returns 0
     * only for an all-zero message, which is wrong too. */
    if (vn_ones_sum((const char *)req + l4, end - l4, 0) != 0xFFFFu)
        return VN_ECHO_BAD_CHECKSUM;
    memcpy(out, req, end);
    memset(out + end, 0, out_len - end);
    memcpy(out, req + ETH_ALEN, ETH_ALEN);
    memcpy(out + ETH_ALEN, gw_mac, ETH_ALEN);
    uint8_t *ip = out + ETH_HLEN;
    const uint8_t *rip = req + ETH_HLEN;
    ip[0] = IP_VIHL_PLAIN;
    put16(ip + IP_ID_OFF, ident & 0xFFFFu);
    ip[IP_FLAGS_OFF] = ip[IP_FLAGS_OFF + 1] = 0;
    ip[IP_TTL_OFF] = ECHO_TTL;
    ip[IP_PROTO_OFF] = IPPROTO_ICMP_NUM;
    memcpy(ip + IP_SRC_OFF, rip + IP_DST_OFF, 4);
    memcpy(ip + IP_DST_OFF, rip + IP_SRC_OFF, 4);
    ip[IP_CSUM_OFF] = ip[IP_CSUM_OFF + 1] = 0;
    put16(ip + IP_CSUM_OFF, (~vn_ones_sum((const char *)ip, IP_HLEN_PLAIN, 0)) & 0xFFFFu);
    uint8_t *icmp = out + l4;
    icmp[0] = ICMP_ECHO_REPLY_T;
    uint32_t hc = ((uint32_t)req[l4 + ICMP_CSUM_OFF] << 8) | req[l4 + ICMP_CSUM_OFF + 1];
    uint32_t s = (~hc & 0xFFFFu) + ECHO_TYPE_DELTA;
    s = (s & 0xFFFFu) + (s >> 16);
    uint32_t cs = ~s & 0xFFFFu;
    if (cs == 0) {
        /* The patch cannot tell the two ones'-complement zeros apart;
         * recompute, as the Python path did, so that both store the same
         * bytes (0xFFFF for an all-zero reply, RFC 1624 section 3). */
        icmp[ICMP_CSUM_OFF] = icmp[ICMP_CSUM_OFF + 1] = 0;
        cs = (~vn_ones_sum((const char *)icmp, end - l4, 0)) & 0xFFFFu;
    }
    put16(icmp + ICMP_CSUM_OFF, cs);
    return VN_ECHO_OK;
}

/* ---- RX scatter into one guest region (vhostnet/net/device.py) --------
 *
 * vn_scatter_region: copy hdr[0:hlen] then data[0:dlen] into the
 * concatenation of region[offs[i] : offs[i] + lens[i]], i = 0..n-1, in
 * order, up to the shorter of the two totals.  The RX ring's batched take
 * (split.py / packed.py take_writable) hands the device one guest-memory
 * region and an (offset, length) pair per mergeable RX buffer (virtio 1.2
 * section 5.1.6.4), so one call fills all of a 64 KiB frame's buffers
 * without a Python view per buffer.
 *
 * Every pair is checked against region_len before anything is written, so
 * a bad pair writes nothing: returns VN_SCATTER_OUT_OF_RANGE then, else the
 * number of bytes copied.
 */
#define VN_SCATTER_OUT_OF_RANGE (-1L)
long vn_scatter_region(char *region, size_t region_len, const size_t *offs, const size_t *lens,
                       size_t n, const char *hdr, size_t hlen, const char *data, size_t dlen)
{
    for (size_t i = 0; i < n; i++)
        if (offs[i] > region_len || lens[i] > region_len - offs[i])
            return VN_SCATTER_OUT_OF_RANGE;
    const char *src[2] = { hdr, data };
    size_t slen[2] = { hlen, dlen };
    size_t s = 0, spos = 0, done = 0;
    for (size_t i = 0; i < n && s < 2; i++) {
        char *d = region + offs[i];
        size_t room = lens[i];
        while (room && s < 2) {
            size_t k = slen[s] - spos;
            if (k > room)
                k = room;
            memcpy(d, src[s] + spos, k);
            d += k;
            room -= k;
            spos += k;
            done += k;
            if (spos == slen[s]) {
                s++;
                spos = 0;
            }
        }
    }
    return (long)done;
}

/* ---- RX: the split ring's batched take (vhostnet/virtio/split.py) -----
 *
 * vn_split_take_writable: the loop of SplitRing.take_writable, which takes
 * a frame's mergeable RX buffers (virtio 1.2 section 5.1.6.4) in one call.
 * avail is the driver's avail ring as 16-bit words (flags, idx, ring[num]),
 * desc its descriptor table, held the device's byte per descriptor (taken
 * and not yet returned).  From avail ring index `last` on, for at most
 * `ahead` entries (what the driver made available) and `max_take` chains
 * (the work budget), while the buffers hold less than `need` bytes: take
 * the head if it is in range and not held, and its descriptor is one
 * device-writable buffer (no NEXT, no INDIRECT: so no loop, no chain to
 * walk) of at least min_len bytes wholly inside the guest region
 * [r_gpa, r_end).  The first entry that is anything else ends the run
 * untouched, for the Python pop() to judge.  Taken heads are marked held
 * when `checks`.  heads/offs/lens (max_take entries) receive each buffer's
 * head, offset in the region and length; *room their total.  Returns the
 * number taken, or -1 when the sizes given do not cover num entries.
 *
 * Every read is bounded by the sizes given: a head indexes desc and held
 * only after head < num, and the avail slot is masked to num - 1.
 */
#define VRING_DESC_F_NEXT     1     /* virtio 1.2 section 2.7.5 */
#define VRING_DESC_F_WRITE    2
#define VRING_DESC_F_INDIRECT 4
#define VRING_DESC_SIZE       16    /* struct virtq_desc: addr, len, flags, next */

static inline uint16_t le16(uint16_t v) { return little_endian() ? v : bswap16(v); }
static inline uint32_t le32(uint32_t v) { return little_endian() ? v : __builtin_bswap32(v); }
static inline uint64_t le64(uint64_t v) { return little_endian() ? v : __builtin_bswap64(v); }

/* The driver may write the ring while we read it: each avail entry and
 * each descriptor is copied once into locals behind a compiler barrier,
 * and only the copies are checked and used. */
#define VN_COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

/* One avail entry of a run, the checks every run makes (and pop_fast()
 * in split.py): avail ring index idx names a head in range, not held
 * (when `checks`), whose descriptor has `want` among NEXT|INDIRECT|WRITE
 * (so no chain to walk, no loop) and is one buffer of at least min_len
 * bytes (and at least one) wholly inside the guest region [r_gpa, r_end).
 * Returns 1 and the head, its buffer's offset in the region and its
 * length, the head marked held when `checks` (so a head twice in a run
 * stops it at the second); 0, nothing marked, for anything else.  The
 * caller has checked num against the sizes of avail, desc and held. */
static inline int split_take_one(const uint16_t *avail, const char *desc, uint8_t *held, int checks,
                                 uint32_t num, uint32_t idx, uint64_t r_gpa, uint64_t r_end, uint16_t want,
                                 uint64_t min_len, uint64_t *head_out, uint64_t *off_out, uint64_t *len_out)
{
    uint16_t head;
    memcpy(&head, &avail[2 + (idx & (num - 1))], 2);
    VN_COMPILER_BARRIER();      /* the check below and the use are of this one read */
    head = le16(head);
    if (head >= num || (checks && held[head]))
        return 0;
    char d[VRING_DESC_SIZE];
    memcpy(d, desc + VRING_DESC_SIZE * (size_t)head, VRING_DESC_SIZE);
    VN_COMPILER_BARRIER();
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    memcpy(&addr, d, 8);
    memcpy(&len, d + 8, 4);
    memcpy(&flags, d + 12, 2);
    addr = le64(addr);
    len = le32(len);
    flags = le16(flags);
    if ((flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)) != want
        || len < min_len || len == 0 || addr < r_gpa || addr > r_end || len > r_end - addr)
        return 0;
    if (checks)
        held[head] = 1;
    *head_out = head;
    *off_out = addr - r_gpa;
    *len_out = len;
    return 1;
}

/* The sizes every run checks before it reads: num a power of two that
 * avail (flags, idx, ring[num]), desc and held (when `checks`) cover, and
 * no more entries ahead than the ring holds. */
static inline int split_sizes_ok(size_t avail_words, size_t desc_len, size_t held_len, int checks,
                                 uint32_t num, uint32_t ahead)
{
    return !(num == 0 || (num & (num - 1)) || avail_words < 2 + (size_t)num
             || desc_len < VRING_DESC_SIZE * (size_t)num || (checks && held_len < num) || ahead > num);
}

/* The run of one-descriptor buffers both takes share: `want` is the
 * descriptor's flags among NEXT|INDIRECT|WRITE (WRITE for RX buffers, 0
 * for TX chains); the run stops at `need` bytes, `max_take` buffers or
 * the first other entry. */
static long split_take_run(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                           uint8_t *held, size_t held_len, int checks, uint32_t num, uint32_t last,
                           uint32_t ahead, uint64_t r_gpa, uint64_t r_end, uint16_t want, uint64_t need,
                           uint32_t min_len, uint32_t max_take,
                           uint64_t *heads, uint64_t *offs, uint64_t *lens, uint64_t *room)
{
    if (!split_sizes_ok(avail_words, desc_len, held_len, checks, num, ahead))
        return -1;
    uint64_t total = 0;
    uint32_t n = 0;
    while (total < need && n < ahead && n < max_take
           && split_take_one(avail, desc, held, checks, num, last + n, r_gpa, r_end, want, min_len,
                             &heads[n], &offs[n], &lens[n])) {
        total += lens[n];
        n++;
    }
    *room = total;
    return (long)n;
}

long vn_split_take_writable(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                            uint8_t *held, size_t held_len, int checks, uint32_t num, uint32_t last,
                            uint32_t ahead, uint64_t r_gpa, uint64_t r_end, uint64_t need,
                            uint32_t min_len, uint32_t max_take,
                            uint64_t *heads, uint64_t *offs, uint64_t *lens, uint64_t *room)
{
    return split_take_run(avail, avail_words, desc, desc_len, held, held_len, checks, num, last, ahead,
                          r_gpa, r_end, VRING_DESC_F_WRITE, need, min_len, max_take, heads, offs, lens, room);
}

/* ---- RX: a whole frame into the split ring's next buffers, one call ----
 *
 * vn_split_put_frame: vn_split_take_writable's run, and if the buffers
 * taken hold hdr + data, the copy (vn_scatter_region) and their used
 * elements (virtio 1.2 section 2.7.8: id, bytes written; each full but the
 * last) at used ring index used_idx on, and the number of buffers as a
 * little-endian 16-bit value at count_off of the stream (the virtio-net
 * header's num_buffers, section 5.1.6.4; count_off + 2 <= min_len, so it
 * lies in the first buffer).  Returns the buffers used, their heads in
 * heads[]; 0 when the run does not hold the frame (at most
 * VN_PUT_MAX_BUFFERS buffers, or the ring has fewer): then nothing is
 * written and no head stays marked, and the caller takes the slow way.
 * -1 when the sizes given do not cover the queue.  used_idx/avail index
 * updates stay with the caller (split.py), as does publishing used->idx.
 */
#define VN_PUT_MAX_BUFFERS 256

long vn_split_put_frame(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                        uint8_t *held, size_t held_len, int checks, uint32_t *used, size_t used_words,
                        uint32_t num, uint32_t last, uint32_t ahead, uint32_t used_idx,
                        char *region, uint64_t r_gpa, uint64_t r_size, uint32_t min_len, uint32_t max_take,
                        const char *hdr, size_t hlen, const char *data, size_t dlen, uint32_t count_off,
                        uint64_t *heads)
{
    uint64_t offs[VN_PUT_MAX_BUFFERS], lens[VN_PUT_MAX_BUFFERS], room = 0;
    size_t sizes[VN_PUT_MAX_BUFFERS], starts[VN_PUT_MAX_BUFFERS];
    if (used_words < 1 + 2 * (size_t)num || (size_t)count_off + 2 > min_len || r_size > UINT64_MAX - r_gpa)
        return -1;
    uint64_t need = (uint64_t)hlen + dlen;
    if (max_take > VN_PUT_MAX_BUFFERS)
        max_take = VN_PUT_MAX_BUFFERS;
    long n = vn_split_take_writable(avail, avail_words, desc, desc_len, held, held_len, checks, num, last,
                                    ahead, r_gpa, r_gpa + r_size, need, min_len, max_take,
                                    heads, offs, lens, &room);
    if (n < 0)
        return -1;
    if (n == 0 || room < need) {
        if (checks)
            for (long i = 0; i < n; i++)
                held[heads[i]] = 0;     /* given back: the device no longer holds them */
        return 0;
    }
    for (long i = 0; i < n; i++) {
        starts[i] = (size_t)offs[i];
        sizes[i] = (size_t)lens[i];
    }
    if (vn_scatter_region(region, (size_t)r_size, starts, sizes, (size_t)n, hdr, hlen, data, dlen) != (long)need)
        return -1;                      /* cannot happen: the run holds need bytes inside the region */
    char *first = region + starts[0] + count_off;
    first[0] = (char)(n & 0xFF);
    first[1] = (char)((n >> 8) & 0xFF);
    uint32_t mask = num - 1;
    uint64_t left = need;
    for (long i = 0; i < n; i++) {
        uint32_t slot = (used_idx + (uint32_t)i) & mask;
        uint32_t k = (uint32_t)(lens[i] < left ? lens[i] : left);
        used[1 + 2 * (size_t)slot] = le32((uint32_t)heads[i]);
        used[2 + 2 * (size_t)slot] = le32(k);
        left -= k;
    }
    return n;
}

/* The put_frames records, LENS[0..n) bytes back to back, lie inside a blob of BLOB_LEN bytes. */
static int lens_fit(const uint32_t *lens, size_t n, size_t blob_len)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] > blob_len - total)
            return 0;
        total += lens[i];
    }
    return 1;
}

/* ---- RX: a run of small frames, one per buffer, in one call ----------
 *
 * vn_split_put_frames: the common case of a device with MRG_RXBUF
 * negotiated and several small frames waiting (an echo burst, a window's
 * ACKs): each frame goes whole into the next posted buffer, as
 * SplitRing.pop_fast() + NetDevice._write_one did one Python call at a
 * time.  blob holds the records back to back, record i being lens[i]
 * bytes: the frame's virtio-net header (num_buffers 1, section 5.1.6.4)
 * and the frame, built by the device.  For i = 0.. while i < nframes,
 * `ahead` and `max_take` (the work budget, capped at VN_PUT_MAX_BUFFERS):
 * the entry at avail ring index last + i must pass split_take_one with
 * want WRITE and min_len lens[i] (one device-writable buffer that holds
 * the record); then the record is copied to the start of the buffer and
 * its used element (virtio 1.2 section 2.7.8: the head, lens[i] bytes
 * written) stored at used ring index used_idx + i.  The first entry that
 * does not pass ends the run untouched: that frame and the rest go the
 * per-frame way, which judges that entry as before.  Each frame is done
 * when the next is looked at, so nothing is given back.  heads[] receives
 * the heads used; returns their number, or -1 (nothing read or written)
 * when the sizes do not cover the queue, the lengths overrun the blob or
 * the region wraps the address space.  Moving used_idx and the avail
 * index, and publishing used->idx, stay with the caller (split.py).
 */
long vn_split_put_frames(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                         uint8_t *held, size_t held_len, int checks, uint32_t *used, size_t used_words,
                         uint32_t num, uint32_t last, uint32_t ahead, uint32_t used_idx,
                         char *region, uint64_t r_gpa, uint64_t r_size, uint32_t max_take,
                         const char *blob, size_t blob_len, const uint32_t *lens, size_t nframes,
                         uint64_t *heads)
{
    if (!split_sizes_ok(avail_words, desc_len, held_len, checks, num, ahead)
        || used_words < 1 + 2 * (size_t)num || r_size > UINT64_MAX - r_gpa)
        return -1;
    if (!lens_fit(lens, nframes, blob_len))
        return -1;
    if (max_take > VN_PUT_MAX_BUFFERS)
        max_take = VN_PUT_MAX_BUFFERS;
    uint32_t mask = num - 1;
    uint64_t r_end = r_gpa + r_size;
    size_t pos = 0;
    uint32_t n = 0;
    while (n < nframes && n < ahead && n < max_take) {
        uint64_t off, len;
        if (!split_take_one(avail, desc, held, checks, num, last + n, r_gpa, r_end, VRING_DESC_F_WRITE,
                            lens[n], &heads[n], &off, &len))
            break;
        /* off + lens[n] <= off + len <= r_size: inside the region */
        memcpy(region + off, blob + pos, lens[n]);
        pos += lens[n];
        uint32_t slot = (used_idx + n) & mask;
        used[1 + 2 * (size_t)slot] = le32((uint32_t)heads[n]);
        used[2 + 2 * (size_t)slot] = le32(lens[n]);
        n++;
    }
    return (long)n;
}

/* ---- TX: the split ring's batched take (vhostnet/virtio/split.py) -----
 *
 * vn_split_take_readable: the loop of SplitRing.take_readable, which takes
 * the TX ring's common chains (one device-readable buffer each: Linux's TX
 * frame with any_layout, virtio 1.2 section 5.1.6.2) several per call.
 * The same arguments as vn_split_take_writable without need/min_len: from
 * avail ring index `last` on, at most `ahead` entries and `max_take`
 * chains, take the head if it is in range and not held (when `checks`),
 * and its descriptor is one device-readable buffer (no NEXT, no INDIRECT,
 * no WRITE) of at least one byte wholly inside [r_gpa, r_end).  The first
 * entry that is anything else ends the run untouched, for the Python
 * pop() to judge (a device-writable one too: pop() takes it and the device
 * refuses it as a runt, as it did when SplitRing.pop_fast took it).
 * Taken heads are marked held when `checks`, so a head twice in one run
 * stops it at the second.  heads/offs/lens (max_take entries) receive each
 * chain's head, its buffer's offset in the region and its length.
 * Returns the number taken, or -1 when the sizes do not cover num entries.
 * The loop is split_take_run's, vn_split_take_writable's too.
 */
long vn_split_take_readable(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                            uint8_t *held, size_t held_len, int checks, uint32_t num, uint32_t last,
                            uint32_t ahead, uint64_t r_gpa, uint64_t r_end, uint32_t max_take,
                            uint64_t *heads, uint64_t *offs, uint64_t *lens)
{
    uint64_t room;
    return split_take_run(avail, avail_words, desc, desc_len, held, held_len, checks, num, last, ahead,
                          r_gpa, r_end, 0, UINT64_MAX, 1, max_take, heads, offs, lens, &room);
}

/* vn_split_put_used: used elements (id heads[i], len `len`: the bytes
 * written into the buffer, 0 for a TX chain the device only read; virtio
 * 1.2 section 2.7.8) at used ring index used_idx on, n of them, in order.
 * used is the used ring as 32-bit words (flags/idx, then id/len pairs).
 * Returns the used index after them (mod 2^16), or -1 when the used ring
 * given is shorter than num entries, a head is not below num, or n > num
 * (nothing written then).  Publishing used->idx stays with the caller.
 */
long vn_split_put_used(uint32_t *used, size_t used_words, uint32_t num, uint32_t used_idx,
                       const uint64_t *heads, size_t n, uint32_t len)
{
    if (num == 0 || (num & (num - 1)) || used_words < 1 + 2 * (size_t)num || n > num)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (heads[i] >= num)
            return -1;
    uint32_t mask = num - 1;
    for (size_t i = 0; i < n; i++) {
        uint32_t slot = (used_idx + (uint32_t)i) & mask;
        used[1 + 2 * (size_t)slot] = le32((uint32_t)heads[i]);
        used[2 + 2 * (size_t)slot] = le32(len);
    }
    return (long)((used_idx + n) & 0xFFFFu);
}

/* ---- RX: a run of small frames into a packed ring (vhostnet/virtio/packed.py) ----
 *
 * The packed counterpart of vn_split_put_frames (virtio 1.2 section 2.8):
 * one ring of 16-byte descriptors (struct pvirtq_desc: addr, len, id,
 * flags; section 2.8.13) that the driver makes available and the device
 * writes used descriptors back into, both in ring order.
 *
 * vn_packed_avail_run: how many descriptors from ring position pos on are
 * available for wrap counter `wrap` (section 2.8.1: AVAIL equal to it,
 * USED not), at most `limit` (and num).  PackedRing.pending()'s scan; the
 * device asks it for the most frames a run could take.  -1 when the sizes
 * do not cover the ring.
 *
 * vn_packed_put_frames: record i of blob (lens[i] bytes: the frame's
 * virtio-net header, num_buffers 1 (section 5.1.6.4), and the frame) goes
 * whole into the buffer at ring position avail_pos + i if that descriptor
 * is what PackedRing.pop_fast() would take and a device-writable buffer
 * that holds the record: available for the avail wrap counter, neither
 * NEXT nor INDIRECT, WRITE set, len >= lens[i] and non-zero, wholly inside
 * the guest region [r_gpa, r_gpa + r_size), its buffer id below num and
 * not marked in `seen` (ids the device holds, marked by the caller, and
 * those taken earlier in this run).  At most nframes, max_take (the work
 * budget, capped at VN_PUT_MAX_BUFFERS) and free_slots (the slots the
 * device does not hold: past them the ring holds our own earlier
 * positions) of them.  The first descriptor that is anything else ends
 * the run untouched: that frame and the rest go the per-frame way, which
 * judges it.
 *
 * Then the used descriptors (section 2.8.6: the buffer id, lens[i] bytes
 * written, flags AVAIL and USED both equal to the used wrap counter, WRITE
 * as the device wrote) at ring positions used_pos + i, the used wrap
 * counter flipping at the ring's end.  The driver may read the ring at any
 * time: the records go before a release barrier, then every id and len,
 * a barrier, every flags word but the first, a barrier, and the first
 * descriptor's flags last (section 2.8.9 and Linux's vhost / DPDK's
 * "flags of the head last"), so the driver sees the batch all at once or
 * not at all, and no used descriptor before its id and len (section
 * 2.8.15: nothing changes in a descriptor once it is marked used).  The run's
 * used positions trail its avail positions (the caller's free_slots), so
 * a used descriptor only overwrites a descriptor already read.
 *
 * Each descriptor's flags are read first, behind an acquire barrier
 * (section 2.8.21.1: the driver writes them last), then the rest once into
 * locals; only the copies are checked and used.  ids[] receives the buffer
 * ids; the run's own marks in seen are cleared before returning.  Returns
 * the frames written, or -1 (nothing read or written) when the sizes do
 * not cover the ring, a position is outside it, the lengths overrun the
 * blob or the region wraps the address space.  Moving the positions and
 * counters stays with the caller (packed.py).
 */
/* NEXT, WRITE and INDIRECT keep the split ring's values (VRING_DESC_F_*,
 * sections 2.8.6, 2.8.3, 2.8.7); the packed ring adds: */
#define VIRTQ_DESC_F_AVAIL       (1u << 7)     /* virtio 1.2 section 2.8.1 */
#define VIRTQ_DESC_F_USED        (1u << 15)
#define PVIRTQ_DESC_SIZE         16            /* section 2.8.13 struct pvirtq_desc */
#define PVIRTQ_LEN_OFF           8
#define PVIRTQ_ID_OFF            12
#define PVIRTQ_FLAGS_OFF         14
#define VN_PACKED_MAX_QUEUE      32768         /* section 2.8: a queue size up to 32768 */

static inline int packed_sizes_ok(size_t desc_len, uint32_t num, uint32_t pos)
{
    return num != 0 && num <= VN_PACKED_MAX_QUEUE && desc_len >= PVIRTQ_DESC_SIZE * (size_t)num && pos < num;
}

/* The flags of descriptor pos, read before anything else of it. */
static inline uint16_t packed_flags(const char *desc, uint32_t pos)
{
    uint16_t f;
    memcpy(&f, desc + PVIRTQ_DESC_SIZE * (size_t)pos + PVIRTQ_FLAGS_OFF, 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return le16(f);
}

static inline uint16_t packed_avail_bits(int wrap)
{
    return (uint16_t)(wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
}

long vn_packed_avail_run(const char *desc, size_t desc_len, uint32_t num, uint32_t pos, int wrap,
                         uint32_t limit)
{
    if (!packed_sizes_ok(desc_len, num, pos))
        return -1;
    if (limit > num)
        limit = num;
    uint16_t expect = packed_avail_bits(wrap);
    uint32_t n = 0;
    while (n < limit && (packed_flags(desc, pos) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) == expect) {
        n++;
        if (++pos == num) {
            pos = 0;
            expect = packed_avail_bits(!wrap);
            wrap = !wrap;
        }
    }
    return (long)n;
}

static inline void packed_store16(char *p, uint16_t v)
{
    v = le16(v);
    memcpy(p, &v, 2);
}

long vn_packed_put_frames(char *desc, size_t desc_len, uint8_t *seen, size_t seen_len, uint32_t num,
                          uint32_t avail_pos, int avail_wrap, uint32_t used_pos, int used_wrap,
                          uint32_t free_slots, char *region, uint64_t r_gpa, uint64_t r_size,
                          uint32_t max_take, const char *blob, size_t blob_len,
                          const uint32_t *lens, size_t nframes, uint64_t *ids)
{
    if (!packed_sizes_ok(desc_len, num, avail_pos) || used_pos >= num || seen_len < num || free_slots > num
        || r_size > UINT64_MAX - r_gpa)
        return -1;
    if (!lens_fit(lens, nframes, blob_len))
        return -1;
    if (max_take > VN_PUT_MAX_BUFFERS)
        max_take = VN_PUT_MAX_BUFFERS;
    uint64_t r_end = r_gpa + r_size;
    uint16_t expect = packed_avail_bits(avail_wrap);
    uint32_t pos = avail_pos;
    size_t bpos = 0;
    uint32_t n = 0;
    while (n < nframes && n < max_take && n < free_slots) {
        uint16_t flags = packed_flags(desc, pos);
        if ((flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) != expect
            || (flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)) != VRING_DESC_F_WRITE)
            break;
        char d[PVIRTQ_FLAGS_OFF];
        memcpy(d, desc + PVIRTQ_DESC_SIZE * (size_t)pos, PVIRTQ_FLAGS_OFF);
        VN_COMPILER_BARRIER();      /* the checks below and the use are of this one read */
        uint64_t addr;
        uint32_t len;
        uint16_t id;
        memcpy(&addr, d, 8);
        memcpy(&len, d + PVIRTQ_LEN_OFF, 4);
        memcpy(&id, d + PVIRTQ_ID_OFF, 2);
        addr = le64(addr);
        len = le32(len);
        id = le16(id);
        if (len < lens[n] || len == 0 || addr < r_gpa || addr > r_end || len > r_end - addr
            || id >= num || seen[id])
            break;
        seen[id] = 1;           /* an id twice in the run stops it at the second */
        /* addr - r_gpa + lens[n] <= addr - r_gpa + len <= r_size: inside the region */
        memcpy(region + (addr - r_gpa), blob + bpos, lens[n]);
        bpos += lens[n];
        ids[n] = id;
        n++;
        if (++pos == num) {
            pos = 0;
            avail_wrap = !avail_wrap;
            expect = packed_avail_bits(avail_wrap);
        }
    }
    for (uint32_t i = 0; i < n; i++)
        seen[ids[i]] = 0;
    if (n == 0)
        return 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);        /* the frames before their used descriptors */
    pos = used_pos;
    for (uint32_t i = 0; i < n; i++) {
        char *d = desc + PVIRTQ_DESC_SIZE * (size_t)pos;
        uint32_t len = le32(lens[i]);
        memcpy(d + PVIRTQ_LEN_OFF, &len, 4);
        packed_store16(d + PVIRTQ_ID_OFF, (uint16_t)ids[i]);
        if (++pos == num)
            pos = 0;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);        /* ids and lens before any flags */
    uint16_t used_bits = used_wrap ? (uint16_t)(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0;
    uint16_t head_flags = (uint16_t)(used_bits | (lens[0] ? VRING_DESC_F_WRITE : 0));
    pos = used_pos;
    for (uint32_t i = 1; i < n; i++) {
        if (++pos == num) {
            pos = 0;
            used_bits ^= (uint16_t)(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
        }
        packed_store16(desc + PVIRTQ_DESC_SIZE * (size_t)pos + PVIRTQ_FLAGS_OFF,
                       (uint16_t)(used_bits | (lens[i] ? VRING_DESC_F_WRITE : 0)));
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);        /* the first descriptor's flags last */
    packed_store16(desc + PVIRTQ_DESC_SIZE * (size_t)used_pos + PVIRTQ_FLAGS_OFF, head_flags);
    return (long)n;
}
