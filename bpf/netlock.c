/* orthros network lock: drop the TCP packets of chosen connections, in both directions.
 *
 * Two programs share one hash map of blocked packet 4-tuples:
 *   xdp_netlock  XDP (attached in generic/SKB mode): packets arriving on an interface;
 *   tc_netlock   tc classifier for clsact egress (direct action): packets leaving it.
 * Loaded by orthros_py/netlock/xdp.py through BCC, then pinned under /sys/fs/bpf/orthros/ so that
 * a later orthros process only writes map entries (no compile) and a lock outlives orthros.
 *
 * Map key (struct netlock_key, 40 bytes, no implicit padding):
 *   saddr, daddr  the packet's source and destination address, 16 bytes each, network byte
 *                 order; an IPv4 address is stored IPv4-mapped (::ffff:a.b.c.d);
 *   sport, dport  the packet's TCP source and destination port, network byte order (as on the wire);
 *   family        AF_INET (2) or AF_INET6 (10);
 *   pad           always zero (the kernel compares keys bytewise).
 * The key is oriented as the packet travels (source first), so userspace stores each connection
 * twice: local->remote (matches what tc egress sees) and remote->local (what XDP sees). That
 * costs a second map write per connection but keeps the per-packet path to one lookup with no
 * address comparison; it also makes a lock symmetric on loopback, where both ends are local.
 *
 * Map value (struct netlock_val): a drop count for that key (updated atomically; a rewrite of the
 * entry resets it) and flags; NETLOCK_F_LOCAL_FIRST marks the local->remote entry, so that
 * userspace can list each locked connection once, with its local end first.
 *
 * Caught segments (hash map "caught", same key, struct netlock_caught): while a connection is
 * locked, XDP keeps one segment of what its peer sent, so that the unlock can give it to the
 * restored socket at once (orthros_py/net/replay.py) instead of the peer waiting out its
 * retransmission timer, which doubled with every retransmission the lock dropped. Kept: the
 * earliest segment carrying data or FIN (the one at the receiver's rcv_nxt, whose
 * acknowledgement takes the peer out of its loss state); failing that, the latest pure ACK (it
 * acknowledges what the restored socket sent). SYN and RST are never kept. The IP packet is
 * kept from its IP header, up to CAUGHT_MAX bytes (a longer segment is given back shortened:
 * its acknowledged part still ends the peer's backoff). Not preallocated: memory only for what
 * is caught; userspace deletes the entries at the unlock.
 *
 * Counters (per-CPU array, index below): TCP packets looked up and dropped or passed, per hook.
 * Non-TCP packets, IPv4 non-first fragments, IPv6 packets whose next header is not TCP directly
 * (extension headers) and non-Ethernet frames are passed without being counted. VLAN-tagged
 * frames are not parsed (the program attaches to the VLAN device itself in that case).
 *
 * Only UAPI headers: they build against the 6.1 headers that serve BCC on newer kernels.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#define NETLOCK_AF_INET 2
#define NETLOCK_AF_INET6 10
#define NETLOCK_F_LOCAL_FIRST 1

/* Room for 65,536 locked connections (two entries each). */
#define NETLOCK_MAX_ENTRIES 131072

/* Counter indexes; orthros_py/netlock/xdp.py reads them in this order. */
#define CNT_XDP_PASSED 0
#define CNT_XDP_DROPPED 1
#define CNT_TC_PASSED 2
#define CNT_TC_DROPPED 3
#define CNT_XDP_CAUGHT 4
#define CNT_MAX 5

/* IP bytes of one caught segment: an Ethernet MTU's worth. */
#define CAUGHT_MAX 1500
#define CAUGHT_F_DATA 1

/* Ethernet + IPv4 with options (60) + the 4 bytes of TCP ports: all a lookup needs. */
#define NETLOCK_HEADROOM 78

struct netlock_key {
    __u8 saddr[16];
    __u8 daddr[16];
    __be16 sport;
    __be16 dport;
    __u8 family;
    __u8 pad[3];
};

struct netlock_val {
    __u64 packets;
    __u32 flags;
    __u32 pad;
};

struct netlock_caught {
    __u32 len;   /* bytes of pkt used */
    __u32 seq;   /* the segment's TCP sequence number, host order */
    __u32 flags; /* CAUGHT_F_DATA: it carries data or FIN */
    __u32 pad;
    __u8 pkt[CAUGHT_MAX]; /* from the IP header on */
};

BPF_HASH(conns, struct netlock_key, struct netlock_val, NETLOCK_MAX_ENTRIES);
BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);
BPF_F_TABLE("hash", struct netlock_key, struct netlock_caught, caught, NETLOCK_MAX_ENTRIES / 2,
            BPF_F_NO_PREALLOC);
/* A caught segment is built here: too big for the 512-byte stack. */
BPF_PERCPU_ARRAY(caught_scratch, struct netlock_caught, 1);

/* BCC 0.26 declares no wrapper for it (kernel 5.18+). */
static long (*netlock_xdp_load_bytes)(struct xdp_md *ctx, __u32 offset, void *buf, __u32 len) =
    (void *)BPF_FUNC_xdp_load_bytes;

enum parse_result { PARSE_OTHER = 0, PARSE_TCP = 1, PARSE_SHORT = 2 };

/* Fill *key from an Ethernet frame in [data, data_end). PARSE_SHORT: the headers are not all in
 * the linear part (tc may then pull them in and try again). */
static __always_inline int parse_key(void *data, void *data_end, struct netlock_key *key)
{
    struct ethhdr *eth = data;
    void *l4;

    if ((void *)(eth + 1) > data_end)
        return PARSE_SHORT;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        __u32 ihl;

        if ((void *)(ip + 1) > data_end)
            return PARSE_SHORT;
        if (ip->protocol != IPPROTO_TCP)
            return PARSE_OTHER;
        /* A non-first fragment carries no TCP header. */
        if (ip->frag_off & bpf_htons(0x1fff))
            return PARSE_OTHER;
        ihl = ip->ihl * 4;
        if (ihl < sizeof(*ip))
            return PARSE_OTHER;
        l4 = (void *)ip + ihl;
        key->family = NETLOCK_AF_INET;
        key->saddr[10] = 0xff;
        key->saddr[11] = 0xff;
        key->daddr[10] = 0xff;
        key->daddr[11] = 0xff;
        __builtin_memcpy(&key->saddr[12], &ip->saddr, 4);
        __builtin_memcpy(&key->daddr[12], &ip->daddr, 4);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);

        if ((void *)(ip6 + 1) > data_end)
            return PARSE_SHORT;
        if (ip6->nexthdr != IPPROTO_TCP)
            return PARSE_OTHER;
        l4 = (void *)(ip6 + 1);
        key->family = NETLOCK_AF_INET6;
        __builtin_memcpy(key->saddr, &ip6->saddr, 16);
        __builtin_memcpy(key->daddr, &ip6->daddr, 16);
    } else {
        return PARSE_OTHER;
    }
    /* Only the ports are needed: the first 4 bytes of the TCP header. */
    if (l4 + 4 > data_end)
        return PARSE_SHORT;
    __builtin_memcpy(&key->sport, l4, 2);
    __builtin_memcpy(&key->dport, l4 + 2, 2);
    return PARSE_TCP;
}

static __always_inline void count(__u32 idx)
{
    __u64 *c = counters.lookup(&idx);

    if (c)
        *c += 1; /* per-CPU slot: no atomic needed */
}

/* 1 if the packet belongs to a locked connection (and count the drop on its entry). */
static __always_inline int locked(struct netlock_key *key)
{
    struct netlock_val *val = conns.lookup(key);

    if (!val)
        return 0;
    __sync_fetch_and_add(&val->packets, 1);
    return 1;
}

/* Keep the dropped segment of a locked connection if it is a better one to give back than
 * what is kept (see "Caught segments" above). */
static __always_inline void catch_segment(struct xdp_md *ctx, struct netlock_key *key)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct tcphdr *tcp;
    struct netlock_caught *old, *slot;
    __u32 ip_len, l4_off, hdrs, seq, is_data, zero = 0;
    __u64 len, room; /* 64-bit: the verifier then tracks the bounds on the register passed */

    if ((void *)(eth + 1) > data_end)
        return;
    if (key->family == NETLOCK_AF_INET) {
        struct iphdr *ip = (void *)(eth + 1);

        if ((void *)(ip + 1) > data_end)
            return;
        ip_len = bpf_ntohs(ip->tot_len);
        l4_off = (ip->ihl * 4) & 0x3c;
    } else {
        struct ipv6hdr *ip6 = (void *)(eth + 1);

        if ((void *)(ip6 + 1) > data_end)
            return;
        ip_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
        l4_off = sizeof(*ip6);
    }
    tcp = (void *)(eth + 1) + l4_off;
    if ((void *)(tcp + 1) > data_end)
        return;
    if (tcp->syn || tcp->rst)
        return;
    hdrs = l4_off + tcp->doff * 4;
    if (ip_len < hdrs)
        return;
    is_data = ip_len > hdrs || tcp->fin;
    seq = bpf_ntohl(tcp->seq);
    old = caught.lookup(key);
    if (old) {
        if (old->flags & CAUGHT_F_DATA) {
            /* Data beats a pure ACK; of two data segments the earlier is the one missing. */
            if (!is_data || (__s32)(seq - old->seq) >= 0)
                return;
        }
    }
    slot = caught_scratch.lookup(&zero);
    if (!slot)
        return;
    len = ip_len;
    room = data_end - (void *)(eth + 1);
    if (len > room)
        len = room;
    if (len > CAUGHT_MAX)
        len = CAUGHT_MAX;
    if (len < sizeof(struct iphdr) + sizeof(struct tcphdr))
        return;
    if (netlock_xdp_load_bytes(ctx, sizeof(struct ethhdr), slot->pkt, len) < 0)
        return;
    slot->len = len;
    slot->seq = seq;
    slot->flags = is_data ? CAUGHT_F_DATA : 0;
    slot->pad = 0;
    if (caught.update(key, slot) == 0)
        count(CNT_XDP_CAUGHT);
}

int xdp_netlock(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct netlock_key key;

    __builtin_memset(&key, 0, sizeof(key));
    /* Generic XDP hands over a linear packet: a short one is simply not TCP we can match. */
    if (parse_key(data, data_end, &key) != PARSE_TCP)
        return XDP_PASS;
    if (locked(&key)) {
        count(CNT_XDP_DROPPED);
        catch_segment(ctx, &key);
        return XDP_DROP;
    }
    count(CNT_XDP_PASSED);
    return XDP_PASS;
}

/* Passing returns TC_ACT_UNSPEC, not TC_ACT_OK: OK would end classification and skip any other
 * tool's filters after ours on the same hook; UNSPEC lets them run (and passes if there are none). */
int tc_netlock(struct __sk_buff *skb)
{
    struct netlock_key key;
    int res;

    __builtin_memset(&key, 0, sizeof(key));
    res = parse_key((void *)(long)skb->data, (void *)(long)skb->data_end, &key);
    if (res == PARSE_SHORT) {
        /* Headers in paged data (rare on egress): pull just them into the linear part. */
        __u32 len = skb->len < NETLOCK_HEADROOM ? skb->len : NETLOCK_HEADROOM;

        if (bpf_skb_pull_data(skb, len) < 0)
            return TC_ACT_UNSPEC;
        __builtin_memset(&key, 0, sizeof(key));
        res = parse_key((void *)(long)skb->data, (void *)(long)skb->data_end, &key);
    }
    if (res != PARSE_TCP)
        return TC_ACT_UNSPEC;
    if (locked(&key)) {
        count(CNT_TC_DROPPED);
        return TC_ACT_SHOT;
    }
    count(CNT_TC_PASSED);
    return TC_ACT_UNSPEC;
}
