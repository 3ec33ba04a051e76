/* tag.bpf.c: a sockops program that puts the synwake option (kind 253, ExID 0x5357, the
 * function id) into the SYNs that sockets of its cgroup send to configured destinations.
 * Connections to other destinations are never touched; no callback runs once a tagged
 * connection is established. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synwake.h"

#define AF_INET 2
#define AF_INET6 10
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
#define ENOSPC 28

/* Destination prefix + port -> function id (FNV-1a of the name). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct synwake_tag_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} tag_destinations SEC(".maps");

/* Per-CPU counters, indexed by SYNWAKE_TAG_STAT_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SYNWAKE_TAG_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} tag_stats SEC(".maps");

/* The synwake option as it goes on the wire. */
struct synwake_option {
	__u8 kind;
	__u8 len;
	__u16 exid_be;
	__u32 id_be;
} __attribute__((packed));

_Static_assert(sizeof(struct synwake_option) == SYNWAKE_OPT_LEN, "option layout");
_Static_assert(sizeof(struct synwake_tag_key) == SYNWAKE_TAG_KEY_SIZE, "tag key layout");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&tag_stats, &which);
	if (v)
		*v += 1;
}

/* The function id for the connection's destination, or NULL when it is not configured. */
static __always_inline __u32 *destination_id(struct bpf_sock_ops *skops)
{
	struct synwake_tag_key key = {};
	__u32 family = skops->family;

	key.port_be = (__u16)bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	if (family == AF_INET) {
		key.family = SYNWAKE_FAMILY_IPV4;
		__u32 addr = skops->remote_ip4;
		__builtin_memcpy(key.addr, &addr, 4);
		key.prefixlen = SYNWAKE_TAG_KEY_FIXED_BITS + 32;
	} else if (family == AF_INET6) {
		__u32 a0 = skops->remote_ip6[0], a1 = skops->remote_ip6[1];
		__u32 a2 = skops->remote_ip6[2], a3 = skops->remote_ip6[3];
		/* A dual-stack socket's ::ffff:a.b.c.d sends an IPv4 SYN: match it as IPv4. */
		if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff)) {
			key.family = SYNWAKE_FAMILY_IPV4;
			__builtin_memcpy(key.addr, &a3, 4);
			key.prefixlen = SYNWAKE_TAG_KEY_FIXED_BITS + 32;
		} else {
			key.family = SYNWAKE_FAMILY_IPV6;
			__builtin_memcpy(key.addr, &a0, 4);
			__builtin_memcpy(key.addr + 4, &a1, 4);
			__builtin_memcpy(key.addr + 8, &a2, 4);
			__builtin_memcpy(key.addr + 12, &a3, 4);
			key.prefixlen = SYNWAKE_TAG_KEY_FIXED_BITS + 128;
		}
	} else {
		return NULL;
	}
	return bpf_map_lookup_elem(&tag_destinations, &key);
}

static __always_inline int is_opening_syn(struct bpf_sock_ops *skops)
{
	return (skops->skb_tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == TCPHDR_SYN;
}

/* What the tagger knows about one connecting socket, from connect to established. */
struct tag_state {
	__u32 id;       /* the destination's function id, looked up once at connect */
	__u8 reserved;  /* this SYN's 8 bytes were reserved by us (not by another program) */
	__u8 counted;   /* the connection was counted as untagged already (SYN retransmits) */
	__u8 shared;    /* another program had set the header callbacks before us: keep them */
	__u8 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tag_state);
} tag_sockets SEC(".maps");

static __always_inline void count_full(struct tag_state *st)
{
	if (!st->counted) {
		st->counted = 1;
		count(SYNWAKE_TAG_STAT_FULL);
	}
}

SEC("sockops")
int synwake_tag(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct tag_state *st;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		/* Right before the SYN: only configured destinations get the header callbacks. */
		__u32 *id = destination_id(skops);
		if (!id)
			break;
		st = bpf_sk_storage_get(&tag_sockets, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			break;
		st->id = *id;
		st->reserved = 0;
		st->shared = (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) != 0;
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	}
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if (!is_opening_syn(skops))
			break;
		st = bpf_sk_storage_get(&tag_sockets, sk, NULL, 0);
		if (!st)
			break;
		/* -ENOSPC: the SYN's 40 option bytes are taken; it goes out untagged. */
		st->reserved = bpf_reserve_hdr_opt(skops, SYNWAKE_OPT_LEN, 0) == 0;
		if (!st->reserved)
			count_full(st);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB: {
		if (!is_opening_syn(skops))
			break;
		st = bpf_sk_storage_get(&tag_sockets, sk, NULL, 0);
		/* Never write into space another program reserved. */
		if (!st || !st->reserved)
			break;
		struct synwake_option opt = {
			.kind = SYNWAKE_OPT_KIND,
			.len = SYNWAKE_OPT_LEN,
			.exid_be = bpf_htons(SYNWAKE_OPT_EXID),
			.id_be = bpf_htonl(st->id),
		};
		long stored = bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0);
		if (stored == 0)
			count(SYNWAKE_TAG_STAT_TAGGED);
		else if (stored == -ENOSPC)
			count_full(st);
		break;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* Established: no callback for any later packet of this connection. */
		st = bpf_sk_storage_get(&tag_sockets, sk, NULL, 0);
		if (!st)
			break;
		if (!st->shared)
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		bpf_sk_storage_delete(&tag_sockets, sk);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Apache-2.0";
