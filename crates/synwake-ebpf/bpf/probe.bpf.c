/* probe.bpf.c: sees connection-opening TCP SYNs at XDP or TC ingress and reports the ones
 * that should wake a synwake function. Packets are never dropped or modified. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synwake.h"
#include "parse.h"

/* 256 KiB: thousands of 40-byte events buffered if userspace stalls. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Indexed by destination port (host order): SYNWAKE_PORT_* (0: not watched).
 * An array, not a hash: its lookup is inlined, which matters on every SYN. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} watched_ports SEC(".maps");

/* Function ids (FNV-1a of the name) that the synwake option may name. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} watched_ids SEC(".maps");

/* Per-CPU counters, indexed by SYNWAKE_STAT_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SYNWAKE_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* TCP options copied to the stack so the bpf_loop callback can index them with a
 * bounded offset (a plain loop over packet memory exceeds the verifier's budget). */
struct option_scan {
	__u8 buf[SYNWAKE_MAX_OPT_BYTES] __attribute__((aligned(4)));
	__u32 len;
	__u32 off;
	__u32 id;
	__u32 found;
};

/* One option per call: returns 1 to stop (end, malformed, or synwake option found). */
static long scan_one_option(__u64 index, void *ctx)
{
	struct option_scan *s = ctx;
	__u32 off = s->off;
	__u32 len = s->len;

	if (off >= len || off >= SYNWAKE_MAX_OPT_BYTES)
		return 1;
	__u8 kind = s->buf[off];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		s->off = off + 1;
		return 0;
	}
	if (off + 1 >= len || off + 1 >= SYNWAKE_MAX_OPT_BYTES)
		return 1;
	__u8 opt_len = s->buf[off + 1];
	if (opt_len < 2)
		return 1;
	if (kind == SYNWAKE_OPT_KIND && opt_len == SYNWAKE_OPT_LEN) {
		if (off + SYNWAKE_OPT_LEN > len || off > SYNWAKE_MAX_OPT_BYTES - SYNWAKE_OPT_LEN)
			return 1;
		if (s->buf[off + 2] == (SYNWAKE_OPT_EXID >> 8) &&
		    s->buf[off + 3] == (SYNWAKE_OPT_EXID & 0xff)) {
			s->id = ((__u32)s->buf[off + 4] << 24) | ((__u32)s->buf[off + 5] << 16) |
				((__u32)s->buf[off + 6] << 8) | (__u32)s->buf[off + 7];
			s->found = 1;
			return 1;
		}
	}
	s->off = off + opt_len;
	return 0;
}

/* Non-zero iff one of the four bytes of w is zero (the classic bit trick, exact). */
static __always_inline __u32 has_zero_byte(__u32 w)
{
	return (w - 0x01010101U) & ~w & 0x80808080U;
}

/* Finds the synwake option among the `len` option bytes at `opts` (a multiple of 4, as
 * TCP's data offset guarantees); returns 1 and sets *id if present. */
static __always_inline int find_synwake_option(void *opts, void *end, __u32 len, __u32 *id)
{
	struct option_scan s = {};
	__u32 *words = opts;

	if (len == 0 || len > SYNWAKE_MAX_OPT_BYTES)
		return 0;
	/* Word copy (at most 10 bounded iterations, cheaper than a helper call) that also
	 * notes whether any byte is the option kind: most SYNs have none and skip the walk. */
	__u32 kind_seen = 0;
	for (int i = 0; i < SYNWAKE_MAX_OPT_BYTES / 4; i++) {
		if (i * 4 >= len)
			break;
		if ((void *)(words + i + 1) > end)
			return 0;
		__u32 w = words[i];
		((__u32 *)s.buf)[i] = w;
		kind_seen |= has_zero_byte(w ^ (SYNWAKE_OPT_KIND * 0x01010101U));
	}
	if (!kind_seen)
		return 0;
	s.len = len;
	bpf_loop(SYNWAKE_MAX_OPT_BYTES, scan_one_option, &s, 0);
	if (!s.found)
		return 0;
	*id = s.id;
	return 1;
}

/* SYNWAKE_PORT_* of the port, 0 if not watched. */
static __always_inline __u8 port_kind(__u32 port)
{
	__u8 *kind = bpf_map_lookup_elem(&watched_ports, &port);
	return kind ? *kind : 0;
}

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += 1;
}

/* The body both hooks share: parse, decide, emit. Never fails the packet. */
static __always_inline void inspect_packet(void *data, void *data_end, __u32 ifindex)
{
	struct cursor c = { .pos = data, .end = data_end };
	struct iphdr *ip = NULL;
	struct ipv6hdr *ip6 = NULL;

	__be16 proto = parse_ethernet(&c);
	if (proto == bpf_htons(ETH_P_IP)) {
		ip = parse_ipv4_tcp(&c);
		if (!ip)
			return;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = parse_ipv6_tcp(&c);
		if (!ip6)
			return;
	} else {
		return;
	}

	struct tcphdr *tcp = parse_tcp(&c);
	if (!tcp || !tcp_is_opening_syn(tcp))
		return;
	__u16 dst_port = bpf_ntohs(tcp->dest);
	__u32 opt_len = tcp->doff * 4 - sizeof(struct tcphdr);

	/* The option names the function exactly, so it wins over the port. */
	__u8 trigger;
	__u32 function_id = 0;
	__u32 id;
	__u8 kind;
	if (find_synwake_option(c.pos, c.end, opt_len, &id) &&
	    bpf_map_lookup_elem(&watched_ids, &id)) {
		trigger = SYNWAKE_TRIGGER_TCP_OPTION;
		function_id = id;
	} else if ((kind = port_kind(dst_port)) == SYNWAKE_PORT_FUNCTION) {
		trigger = SYNWAKE_TRIGGER_SYN;
	} else if (kind == SYNWAKE_PORT_SHARED) {
		trigger = SYNWAKE_TRIGGER_SHARED_PORT;
	} else {
		return;
	}

	struct synwake_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(SYNWAKE_STAT_LOST);
		return;
	}
	e->ktime_ns = bpf_ktime_get_ns();
	e->function_id = function_id;
	e->ifindex = ifindex;
	if (ip) {
		__builtin_memset(e->src_addr, 0, sizeof(e->src_addr));
		__builtin_memcpy(e->src_addr, &ip->saddr, 4);
		e->family = SYNWAKE_FAMILY_IPV4;
	} else if (ip6) {
		__builtin_memcpy(e->src_addr, &ip6->saddr, 16);
		e->family = SYNWAKE_FAMILY_IPV6;
	}
	e->dst_port = dst_port;
	e->src_port = bpf_ntohs(tcp->source);
	e->trigger = trigger;
	e->_pad[0] = 0;
	e->_pad[1] = 0;
	/* Default flags: wake the reader only if it had caught up (it is then in epoll). */
	bpf_ringbuf_submit(e, 0);
	count(SYNWAKE_STAT_EVENTS);
}

SEC("xdp")
int synwake_xdp(struct xdp_md *ctx)
{
	inspect_packet((void *)(long)ctx->data, (void *)(long)ctx->data_end, ctx->ingress_ifindex);
	return XDP_PASS;
}

SEC("classifier")
int synwake_tc(struct __sk_buff *skb)
{
	inspect_packet((void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex);
	return TC_ACT_OK;
}

_Static_assert(sizeof(struct synwake_event) == SYNWAKE_EVENT_SIZE, "synwake_event layout changed");

char LICENSE[] SEC("license") = "Apache-2.0";
