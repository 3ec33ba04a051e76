/* parse.h: always-inline, bounds-checked Ethernet/802.1Q/IPv4/IPv6/TCP parsing helpers. */
#ifndef SYNWAKE_PARSE_H
#define SYNWAKE_PARSE_H

#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef ETH_P_8021Q
#define ETH_P_8021Q 0x8100
#endif
#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif

#define SYNWAKE_IP_OFFSET_MASK 0x1fff
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1

/* A cursor over [pos, end) of the packet; every helper advances it only on success. */
struct cursor {
	void *pos;
	void *end;
};

struct vlan_tag {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* Ethernet header plus at most one 802.1Q/802.1ad tag; returns the inner EtherType
 * (network order) or 0 if the packet is too short. */
static __always_inline __be16 parse_ethernet(struct cursor *c)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return 0;
	__be16 proto = eth->h_proto;
	c->pos = eth + 1;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_tag *tag = c->pos;
		if ((void *)(tag + 1) > c->end)
			return 0;
		proto = tag->encapsulated_proto;
		c->pos = tag + 1;
	}
	return proto;
}

/* IPv4 with any valid IHL; returns the header if it carries the first fragment of TCP. */
static __always_inline struct iphdr *parse_ipv4_tcp(struct cursor *c)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > c->end)
		return NULL;
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	/* Later fragments carry no TCP header. */
	if (ip->frag_off & bpf_htons(SYNWAKE_IP_OFFSET_MASK))
		return NULL;
	if (ip->protocol != IPPROTO_TCP)
		return NULL;
	__u32 hdr_len = ip->ihl * 4;
	if (c->pos + hdr_len > c->end)
		return NULL;
	c->pos += hdr_len;
	return ip;
}

/* Fixed IPv6 header whose next header is TCP (extension headers are not walked). */
static __always_inline struct ipv6hdr *parse_ipv6_tcp(struct cursor *c)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > c->end)
		return NULL;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return NULL;
	c->pos = ip6 + 1;
	return ip6;
}

/* TCP header whose data offset is valid and whose options are all inside the packet;
 * leaves the cursor at the first option byte. */
static __always_inline struct tcphdr *parse_tcp(struct cursor *c)
{
	struct tcphdr *tcp = c->pos;
	if ((void *)(tcp + 1) > c->end)
		return NULL;
	if (tcp->doff < 5)
		return NULL;
	__u32 hdr_len = tcp->doff * 4;
	if (c->pos + hdr_len > c->end)
		return NULL;
	c->pos = tcp + 1;
	return tcp;
}

/* A connection-opening SYN: SYN set; ACK, RST and FIN clear. */
static __always_inline int tcp_is_opening_syn(const struct tcphdr *tcp)
{
	return tcp->syn && !tcp->ack && !tcp->rst && !tcp->fin;
}

#endif
