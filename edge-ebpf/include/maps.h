/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * maps.h — every BPF map key and value of the Patronus data plane, in one place.
 *
 * The edge agent mirrors each struct with a #[repr(C)] Rust type and asserts size and field
 * offsets at compile time, so a change here that is not made there fails the build. Sizes are
 * named constants; maps that every CPU updates on every packet are per-CPU.
 *
 * Data flow (steering lands with the eBPF data-plane issue):
 *   XDP on the LAN interface parses the packet and looks its 5-tuple up in FLOW_TABLE (LRU);
 *   on a miss, POLICY_* maps classify it into an application class, CLASS_PATH gives the path
 *   for that class, and the choice reaches TC (which sets skb->mark) through the flow entry.
 */
#ifndef PATRONUS_MAPS_H
#define PATRONUS_MAPS_H

#include <linux/types.h>

/* ---- sizes ---------------------------------------------------------------------------- */
#define PATRONUS_MAX_FLOWS        1048576 /* LRU flow table entries (seed: 1M active flows) */
#define PATRONUS_MAX_POLICIES     1000    /* routing policies per site (seed: 1000) */
#define PATRONUS_MAX_CLASSES      64      /* application classes */
#define PATRONUS_MAX_PATHS        256     /* paths of one site the data plane can steer to */
#define PATRONUS_PATHS_PER_CLASS  8       /* candidate paths per class, best first */

/* ---- counters (per-CPU array, index = enum patronus_counter) --------------------------- */
enum patronus_counter {
	PATRONUS_CNT_PACKETS = 0,  /* every packet seen */
	PATRONUS_CNT_IPV4,
	PATRONUS_CNT_IPV6,
	PATRONUS_CNT_TCP,
	PATRONUS_CNT_UDP,
	PATRONUS_CNT_ICMP,
	PATRONUS_CNT_VLAN,         /* carried one 802.1Q/802.1ad tag */
	PATRONUS_CNT_FRAGMENT,     /* IP fragment: no L4 header to classify, passed */
	PATRONUS_CNT_TRUNCATED,    /* header ran past the packet end: passed, never dropped */
	PATRONUS_CNT_NON_IP,       /* ARP and the rest: passed */
	PATRONUS_CNT_MAX,
};

/* ---- flow table ----------------------------------------------------------------------- */
/* Addresses are 16 bytes; IPv4 uses the IPv4-mapped form ::ffff:a.b.c.d. Network order. */
struct patronus_flow_key {
	__u8  src_addr[16];
	__u8  dst_addr[16];
	__be16 src_port;   /* 0 for protocols without ports */
	__be16 dst_port;
	__u8  protocol;    /* IANA number */
	__u8  pad[3];
};

struct patronus_flow_value {
	__u64 packets;
	__u64 bytes;
	__u64 first_seen_ns;
	__u64 last_seen_ns;
	__u32 path;        /* index into the site's path table */
	__u32 generation;  /* CLASS_PATH generation when chosen; a newer one re-steers the flow */
	__u16 class_id;
	__u16 policy_index;
	__u32 pad;
};

/* ---- classification ------------------------------------------------------------------- */
/* One routing policy's non-prefix match fields; prefixes live in LPM tries keyed by prefix. */
struct patronus_policy_rule {
	__u16 priority;     /* higher wins */
	__u16 class_id;
	__u8  protocol;     /* 0 = any */
	__u8  dscp;         /* 0xff = any */
	__u16 src_port_lo;  /* host order; 0..0xffff = any */
	__u16 src_port_hi;
	__u16 dst_port_lo;
	__u16 dst_port_hi;
	__u16 pad;
};

/* LPM trie key for policy prefixes (IPv4 mapped into IPv6 space, like the flow key). */
struct patronus_prefix_key {
	__u32 prefixlen;
	__u8  addr[16];
};

/* Bitmap of policies whose prefix list contains the address. */
struct patronus_policy_set {
	__u64 bits[(PATRONUS_MAX_POLICIES + 63) / 64];
};

/* ---- steering --------------------------------------------------------------------------- */
enum patronus_lb_mode {
	PATRONUS_LB_FLOW_HASH = 0,
	PATRONUS_LB_WEIGHTED_BANDWIDTH,
	PATRONUS_LB_ROUND_ROBIN,
	PATRONUS_LB_LEAST_FLOWS,
	PATRONUS_LB_ACTIVE_BACKUP,
};

/* What a class of traffic may use now. The agent rewrites one entry on failover. */
struct patronus_class_paths {
	__u32 generation;
	__u8  lb_mode;      /* enum patronus_lb_mode */
	__u8  count;        /* valid entries in paths[] */
	__u16 pad;
	__u32 paths[PATRONUS_PATHS_PER_CLASS];
	__u32 weights[PATRONUS_PATHS_PER_CLASS];
};

/* A path as the kernel sees it: the firewall mark that `ip rule` maps to its table. */
struct patronus_path {
	__u32 mark;
	__u32 flags;        /* bit 0: up */
};

#endif /* PATRONUS_MAPS_H */
