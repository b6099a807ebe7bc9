/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * parse.h — bounded header parsing for XDP. Every read is checked against data_end first, so a
 * truncated packet can only make a parser return an error, never read past the packet.
 */
#ifndef PATRONUS_PARSE_H
#define PATRONUS_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>

#define PATRONUS_PARSE_OK         0
#define PATRONUS_PARSE_TRUNCATED  1
#define PATRONUS_PARSE_NON_IP     2
#define PATRONUS_PARSE_FRAGMENT   3

struct vlan_hdr_min {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* What the classifier needs from a packet. */
struct patronus_packet {
	__u16 l3_proto;   /* ETH_P_IP or ETH_P_IPV6, host order */
	__u8  l4_proto;   /* IANA number */
	__u8  vlan;       /* 1 when one tag was present */
	__u8  dscp;
	__u8  pad[3];
	void *l3;         /* start of the IP header */
	void *l4;         /* start of the L4 header (not yet bounds-checked beyond its start) */
};

/* Ethernet with at most one VLAN tag, then IPv4 (options allowed) or IPv6 (no extension
 * headers walked: anything but TCP/UDP/ICMPv6 next is classified by protocol only). */
static __always_inline int patronus_parse(void *data, void *data_end, struct patronus_packet *pkt)
{
	struct ethhdr *eth = data;
	void *cursor = eth + 1;
	__u16 proto;

	if (cursor > data_end)
		return PATRONUS_PARSE_TRUNCATED;
	proto = bpf_ntohs(eth->h_proto);
	pkt->vlan = 0;
	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
		struct vlan_hdr_min *vlan = cursor;
		if ((void *)(vlan + 1) > data_end)
			return PATRONUS_PARSE_TRUNCATED;
		proto = bpf_ntohs(vlan->encapsulated_proto);
		cursor = vlan + 1;
		pkt->vlan = 1;
	}
	pkt->l3_proto = proto;
	pkt->l3 = cursor;

	if (proto == ETH_P_IP) {
		struct iphdr *ip = cursor;
		__u32 ihl_bytes;
		if ((void *)(ip + 1) > data_end)
			return PATRONUS_PARSE_TRUNCATED;
		ihl_bytes = ip->ihl * 4;
		if (ihl_bytes < sizeof(*ip) || cursor + ihl_bytes > data_end)
			return PATRONUS_PARSE_TRUNCATED;
		pkt->l4_proto = ip->protocol;
		pkt->dscp = ip->tos >> 2;
		/* More-fragments flag or a non-zero offset: no L4 header here to read. */
		if (ip->frag_off & bpf_htons(0x3fff))
			return PATRONUS_PARSE_FRAGMENT;
		pkt->l4 = cursor + ihl_bytes;
		return PATRONUS_PARSE_OK;
	}
	if (proto == ETH_P_IPV6) {
		struct ipv6hdr *ip6 = cursor;
		if ((void *)(ip6 + 1) > data_end)
			return PATRONUS_PARSE_TRUNCATED;
		pkt->l4_proto = ip6->nexthdr;
		pkt->dscp = ((ip6->priority << 4) | (ip6->flow_lbl[0] >> 4)) >> 2;
		if (ip6->nexthdr == 44 /* fragment header */)
			return PATRONUS_PARSE_FRAGMENT;
		pkt->l4 = ip6 + 1;
		return PATRONUS_PARSE_OK;
	}
	return PATRONUS_PARSE_NON_IP;
}

#endif /* PATRONUS_PARSE_H */
