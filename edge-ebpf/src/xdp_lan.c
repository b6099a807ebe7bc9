// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xdp_lan.c — XDP program for the site's LAN interface.
 *
 * Today: parse every packet with the bounded parser and count what it saw per CPU. It always
 * passes the packet: the data plane never drops what it does not understand. Classification,
 * the flow table and steering build on this parser in the eBPF data-plane issue.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PATRONUS_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} PATRONUS_COUNTERS SEC(".maps");

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&PATRONUS_COUNTERS, &counter);
	if (value)
		*value += 1;
}

SEC("xdp")
int patronus_xdp_lan(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct patronus_packet pkt = {};
	int parsed;

	count(PATRONUS_CNT_PACKETS);
	parsed = patronus_parse(data, data_end, &pkt);
	if (pkt.vlan)
		count(PATRONUS_CNT_VLAN);
	switch (parsed) {
	case PATRONUS_PARSE_TRUNCATED:
		count(PATRONUS_CNT_TRUNCATED);
		return XDP_PASS;
	case PATRONUS_PARSE_NON_IP:
		count(PATRONUS_CNT_NON_IP);
		return XDP_PASS;
	case PATRONUS_PARSE_FRAGMENT:
		count(PATRONUS_CNT_FRAGMENT);
		break;
	default:
		break;
	}
	count(pkt.l3_proto == ETH_P_IP ? PATRONUS_CNT_IPV4 : PATRONUS_CNT_IPV6);
	if (parsed != PATRONUS_PARSE_OK)
		return XDP_PASS;
	if (pkt.l4_proto == IPPROTO_TCP)
		count(PATRONUS_CNT_TCP);
	else if (pkt.l4_proto == IPPROTO_UDP)
		count(PATRONUS_CNT_UDP);
	else if (pkt.l4_proto == IPPROTO_ICMP || pkt.l4_proto == 58 /* ICMPv6 */)
		count(PATRONUS_CNT_ICMP);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
