// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * lan_steer.c — the data plane on the site's LAN interface: two programs sharing the maps of
 * map_defs.h.
 *
 * patronus_xdp_lan (XDP): parse (Ethernet, one VLAN tag, IPv4/IPv6, TCP/UDP/ICMP) with the
 *   bounded parser, find or create the packet's flow (classify on a miss, pick the class's
 *   path), count it, and leave the path's mark in front of the packet as XDP metadata. It
 *   always passes the packet: the data plane never drops what it does not understand.
 * patronus_tc_lan (TC ingress): set skb->mark from the metadata, so `ip rule fwmark` sends the
 *   packet to the path's table and tunnel. Where XDP could not leave metadata (generic XDP,
 *   no headroom), it does the same steering itself from the flow table.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "map_defs.h"
#include "parse.h"
#include "steer.h"

/* Parse, count and steer one packet; the mark to set (0 = none). */
static __always_inline __u32 patronus_handle(void *data, void *data_end, __u64 bytes)
{
	struct patronus_packet pkt = {};
	struct patronus_flow_key key = {};
	int parsed;

	patronus_count(PATRONUS_CNT_PACKETS);
	parsed = patronus_parse(data, data_end, &pkt);
	if (pkt.vlan)
		patronus_count(PATRONUS_CNT_VLAN);
	switch (parsed) {
	case PATRONUS_PARSE_TRUNCATED:
		patronus_count(PATRONUS_CNT_TRUNCATED);
		return 0;
	case PATRONUS_PARSE_NON_IP:
		patronus_count(PATRONUS_CNT_NON_IP);
		return 0;
	case PATRONUS_PARSE_FRAGMENT:
		patronus_count(PATRONUS_CNT_FRAGMENT);
		break;
	default:
		break;
	}
	patronus_count(pkt.l3_proto == ETH_P_IP ? PATRONUS_CNT_IPV4 : PATRONUS_CNT_IPV6);
	if (parsed != PATRONUS_PARSE_OK)
		return 0; /* fragments: no ports to classify by; the default route carries them */
	if (pkt.l4_proto == IPPROTO_TCP)
		patronus_count(PATRONUS_CNT_TCP);
	else if (pkt.l4_proto == IPPROTO_UDP)
		patronus_count(PATRONUS_CNT_UDP);
	else if (pkt.l4_proto == IPPROTO_ICMP || pkt.l4_proto == 58 /* ICMPv6 */)
		patronus_count(PATRONUS_CNT_ICMP);
	if (patronus_flow_key(data, data_end, &pkt, &key) < 0) {
		patronus_count(PATRONUS_CNT_TRUNCATED);
		return 0;
	}
	return patronus_steer(&key, pkt.dscp, bytes);
}

SEC("xdp")
int patronus_xdp_lan(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 mark = patronus_handle(data, data_end, (__u64)(data_end - data));
	struct patronus_meta *meta;

	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(*meta)) < 0) {
		patronus_count(PATRONUS_CNT_META_FAIL);
		return XDP_PASS;
	}
	meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + 1) > (void *)(long)ctx->data) {
		patronus_count(PATRONUS_CNT_META_FAIL);
		return XDP_PASS;
	}
	meta->magic = PATRONUS_META_MAGIC;
	meta->mark = mark;
	return XDP_PASS;
}

SEC("classifier")
int patronus_tc_lan(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct patronus_meta *meta = (void *)(long)skb->data_meta;
	__u32 mark;

	if ((void *)(meta + 1) <= data && meta->magic == PATRONUS_META_MAGIC)
		mark = meta->mark;
	else
		mark = patronus_handle(data, data_end, skb->len);
	if (mark)
		skb->mark = mark;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
