/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * maps.h — every BPF map key and value of the Patronus data plane, in one place.
 *
 * The edge agent mirrors each struct with a #[repr(C)] Rust type and asserts size and field
 * offsets at compile time, so a change here that is not made there fails the build. Sizes are
 * named constants; maps that every CPU updates on every packet are per-CPU.
 *
 * Data flow: XDP on the LAN interface parses the packet and looks its 5-tuple up in
 *   PATRONUS_FLOWS (LRU); on a miss, the PATRONUS_POLICY_* maps classify it into an
 *   application class, PATRONUS_DEST_SITES tells which peer site the destination is behind,
 *   PATRONUS_CLASS_PATHS gives the paths of that class toward that site, and the chosen
 *   path's mark reaches TC ingress (which sets skb->mark, so `ip rule` picks the path's table)
 *   as XDP metadata, or through the flow entry where metadata is not available.
 * The map definitions themselves are in map_defs.h, grouped by concern.
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
#define PATRONUS_MAX_SITES        1024    /* destination slots per class; slot 0 = no known site */
#define PATRONUS_MAX_DEST_PREFIXES 65536  /* prefixes behind peer sites (LAN, overlay, transit) */

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
	PATRONUS_CNT_FLOW_HIT,     /* flow table hit */
	PATRONUS_CNT_FLOW_MISS,    /* new flow: classified */
	PATRONUS_CNT_REPATH,       /* flow moved because its path left its class (failover) */
	PATRONUS_CNT_META_FAIL,    /* no room for metadata: TC looks the flow up instead */
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
	__u32 path;        /* index into PATRONUS_PATHS; PATRONUS_NO_PATH = default route */
	__u32 mark;        /* the path's firewall mark when chosen (0 = leave the packet alone) */
	__u32 generation;  /* the class's generation when chosen; a newer one re-checks the path */
	__u16 class_id;
	__u16 policy_index; /* PATRONUS_NO_POLICY when no policy matched (default class) */
	__u16 site;         /* destination slot (PATRONUS_DEST_SITES) when the flow was created */
	__u16 pad;
};

#define PATRONUS_NO_PATH   0xffffffffu
#define PATRONUS_NO_POLICY 0xffffu

/* ---- classification ------------------------------------------------------------------- */
/*
 * Policies are numbered by rank: bit/index 0 is the highest priority. The agent compiles the
 * policy list into per-dimension bitmaps (each entry holds the policies that match that value
 * of that dimension, "any" included), so a lookup ANDs four bitmaps and the lowest set bit
 * wins; only the source port and DSCP are checked per candidate, from PATRONUS_POLICY_RULES.
 */
#define PATRONUS_POLICY_WORDS ((PATRONUS_MAX_POLICIES + 63) / 64)

struct patronus_policy_rule {
	__u16 class_id;
	__u16 src_port_lo;  /* host order; lo 0, hi 0xffff = any */
	__u16 src_port_hi;
	__u8  dscp;         /* 0xff = any */
	__u8  pad;
};

/* LPM trie key for policy prefixes (IPv4 mapped into IPv6 space, like the flow key). */
struct patronus_prefix_key {
	__u32 prefixlen;
	__u8  addr[16];
};

/* Bitmap of policies (by rank) that match one value of one dimension. */
struct patronus_policy_set {
	__u64 bits[PATRONUS_POLICY_WORDS];
};

/* ---- steering --------------------------------------------------------------------------- */
enum patronus_lb_mode {
	PATRONUS_LB_FLOW_HASH = 0,        /* hash of the 5-tuple over the paths */
	PATRONUS_LB_WEIGHTED_BANDWIDTH,   /* hash over the paths, weighted by weights[] */
	PATRONUS_LB_ROUND_ROBIN,          /* new flows take turns */
	PATRONUS_LB_LEAST_FLOWS,          /* the path with the fewest flows (PATRONUS_PATH_FLOWS) */
	PATRONUS_LB_ACTIVE_BACKUP,        /* the first path, the next ones only when it is gone */
};

/* class_paths.flags */
#define PATRONUS_CLASS_REPIN 1u /* with a new generation: every flow picks again (failback) */

/* What a class of traffic may use now toward one destination site, best first (a path is a
 * tunnel, and a tunnel can be down toward one peer and fine toward another). Index:
 * class_id * PATRONUS_MAX_SITES + site slot. The agent rewrites one entry on failover
 * (paths[] without the failed path, generation + 1): flows on a path still listed keep it,
 * flows on a path no longer listed pick again on their next packet. */
struct patronus_class_paths {
	__u32 generation;
	__u8  lb_mode;      /* enum patronus_lb_mode */
	__u8  count;        /* valid entries in paths[], 0 = default route; flows on any of
	                     * them stay where they are */
	__u8  flags;
	__u8  pick;         /* new flows choose among paths[0..pick] (the best tier), so a
	                     * healthy path that is merely outranked keeps its flows; 0 = count */
	__u32 paths[PATRONUS_PATHS_PER_CLASS];
	__u32 weights[PATRONUS_PATHS_PER_CLASS];
};

/* The peer site a destination prefix is behind (PATRONUS_DEST_SITES value). */
struct patronus_dest {
	__u16 site;         /* slot 1..PATRONUS_MAX_SITES-1, stable while the peer exists */
	__u16 pad;
};

/* A path as the kernel sees it: the firewall mark that `ip rule` maps to its table. */
struct patronus_path {
	__u32 mark;
	__u32 flags;        /* reserved */
};

/* ---- XDP -> TC -------------------------------------------------------------------------- */
/* XDP leaves this in front of the packet (xdp metadata); TC ingress sets skb->mark from it. */
#define PATRONUS_META_MAGIC 0x50415452u /* "PATR" */
struct patronus_meta {
	__u32 magic;
	__u32 mark;
};

#endif /* PATRONUS_MAPS_H */
