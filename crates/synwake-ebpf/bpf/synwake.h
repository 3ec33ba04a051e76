/* synwake.h: the probe's event record and constants, shared by the BPF program and Rust. */
#ifndef SYNWAKE_H
#define SYNWAKE_H

#include <linux/types.h>

/* Why an event was emitted. */
#define SYNWAKE_TRIGGER_SYN 1        /* SYN to a port in watched_ports */
#define SYNWAKE_TRIGGER_TCP_OPTION 2 /* SYN carrying the synwake option with an id in watched_ids */
#define SYNWAKE_TRIGGER_SHARED_PORT 3 /* SYN to a shared port: the client address may name the function (affinity) */

/* Values in the map `watched_ports`. */
#define SYNWAKE_PORT_FUNCTION 1 /* a function's own port: trigger syn */
#define SYNWAKE_PORT_SHARED 2   /* a shared gateway port: trigger shared_port */

/* The synwake TCP option (RFC 6994 experimental): kind, length, ExID, 4-byte id. */
#define SYNWAKE_OPT_KIND 253
#define SYNWAKE_OPT_LEN 8
#define SYNWAKE_OPT_EXID 0x5357

/* Address families carried in synwake_event.family. */
#define SYNWAKE_FAMILY_IPV4 4
#define SYNWAKE_FAMILY_IPV6 6

/* Indexes of the per-CPU counters in map `stats`. */
#define SYNWAKE_STAT_EVENTS 0
#define SYNWAKE_STAT_LOST 1
#define SYNWAKE_STAT_COUNT 2

/* Maximum TCP option bytes (60-byte header - 20 fixed). */
#define SYNWAKE_MAX_OPT_BYTES 40

/*
 * One SYN that should wake a function. All multi-byte fields are in host byte order
 * except src_addr, which holds the address bytes as on the wire (IPv4 in bytes 0..4).
 */
struct synwake_event {
	__u64 ktime_ns;     /* bpf_ktime_get_ns() when the SYN was seen (CLOCK_MONOTONIC) */
	__u32 function_id;  /* id from the option (tcp_option), 0 for trigger syn */
	__u32 ifindex;      /* interface the SYN arrived on */
	__u8 src_addr[16];  /* client address */
	__u16 dst_port;     /* destination port of the SYN */
	__u16 src_port;     /* client port */
	__u8 trigger;       /* SYNWAKE_TRIGGER_* */
	__u8 family;        /* SYNWAKE_FAMILY_* */
	__u8 _pad[2];
};

#define SYNWAKE_EVENT_SIZE 40

/* The tagger (tag.bpf.c): which outgoing SYNs carry the synwake option. */

/* Indexes of the per-CPU counters in the tagger's map `tag_stats`. */
#define SYNWAKE_TAG_STAT_TAGGED 0 /* SYNs sent with the option */
#define SYNWAKE_TAG_STAT_FULL 1   /* connections sent untagged: the 40 option bytes were full */
#define SYNWAKE_TAG_STAT_COUNT 2

/* Prefix bits of synwake_tag_key before the address: family, pad and port. */
#define SYNWAKE_TAG_KEY_FIXED_BITS 32

/*
 * Key of the LPM trie `tag_destinations`: a destination address prefix and port. The
 * trie matches `prefixlen` leading bits of everything after it, so family and port are
 * always matched in full (SYNWAKE_TAG_KEY_FIXED_BITS) and then the address's prefix.
 */
struct synwake_tag_key {
	__u32 prefixlen;    /* SYNWAKE_TAG_KEY_FIXED_BITS + address prefix length */
	__u8 family;        /* SYNWAKE_FAMILY_* */
	__u8 _pad;
	__u16 port_be;      /* destination port, network byte order */
	__u8 addr[16];      /* destination address as on the wire (IPv4 in bytes 0..4) */
};

#define SYNWAKE_TAG_KEY_SIZE 24

#endif
