/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * steer.h — flow keys, classification and path choice. Every loop is bounded by a constant
 * from maps.h, so the verifier can see the worst case.
 */
#ifndef PATRONUS_STEER_H
#define PATRONUS_STEER_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "map_defs.h"
#include "parse.h"

static __always_inline void patronus_count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&PATRONUS_COUNTERS, &counter);
	if (value)
		*value += 1;
}

/* The 5-tuple of a parsed packet; returns 0, or -1 when the L4 ports are cut off. */
static __always_inline int patronus_flow_key(void *data, void *data_end,
					     const struct patronus_packet *pkt,
					     struct patronus_flow_key *key)
{
	void *l3 = pkt->l3;
	if (pkt->l3_proto == ETH_P_IP) {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > data_end)
			return -1;
		key->src_addr[10] = 0xff;
		key->src_addr[11] = 0xff;
		key->dst_addr[10] = 0xff;
		key->dst_addr[11] = 0xff;
		__builtin_memcpy(&key->src_addr[12], &ip->saddr, 4);
		__builtin_memcpy(&key->dst_addr[12], &ip->daddr, 4);
	} else {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(key->src_addr, &ip6->saddr, 16);
		__builtin_memcpy(key->dst_addr, &ip6->daddr, 16);
	}
	key->protocol = pkt->l4_proto;
	if (pkt->l4_proto == IPPROTO_TCP || pkt->l4_proto == IPPROTO_UDP) {
		__be16 *ports = pkt->l4;
		if ((void *)(ports + 2) > data_end)
			return -1;
		key->src_port = ports[0];
		key->dst_port = ports[1];
	}
	return 0;
}

/* A well-mixed 32-bit hash of the key (murmur3's finalizer over its words). */
static __always_inline __u32 patronus_flow_hash(const struct patronus_flow_key *key)
{
	const __u32 *words = (const __u32 *)key;
	__u32 h = 0x9747b28c;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*key) / 4); i++) {
		__u32 k = words[i] * 0xcc9e2d51;
		k = (k << 15) | (k >> 17);
		h ^= k * 0x1b873593;
		h = ((h << 13) | (h >> 19)) * 5 + 0xe6546b64;
	}
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Index of the lowest set bit of a non-zero word: the population count of the bits below it
 * (branchless, since BPF has no ctz instruction and branches multiply verifier states). */
static __always_inline __u32 patronus_lowest_bit(__u64 x)
{
	__u64 below = (x & -x) - 1;
	below = below - ((below >> 1) & 0x5555555555555555ull);
	below = (below & 0x3333333333333333ull) + ((below >> 2) & 0x3333333333333333ull);
	below = (below + (below >> 4)) & 0x0f0f0f0f0f0f0f0full;
	return (__u32)((below * 0x0101010101010101ull) >> 56);
}

static __always_inline int patronus_rule_matches(const struct patronus_policy_rule *rule,
						 __u16 src_port, __u8 dscp)
{
	if (src_port < rule->src_port_lo || src_port > rule->src_port_hi)
		return 0;
	return rule->dscp == 0xff || rule->dscp == dscp;
}

/* How many candidates a classification checks at most (the per-candidate checks are the
 * source port and DSCP; policies differing only in those are rare). */
#define PATRONUS_MAX_CANDIDATES 32

struct patronus_classify_ctx {
	__u64 words[PATRONUS_POLICY_WORDS]; /* candidates left, by word */
	__u32 word;                         /* current word */
	__u32 checked;
	__u32 result;                       /* rank, or PATRONUS_NO_POLICY */
	__u16 src_port;                     /* host order */
	__u8  dscp;
	__u8  pad;
};

/* One step of the candidate search, run by bpf_loop (so the verifier checks it once): take
 * the next candidate of the current word, or move to the next word. Returns 1 to stop. */
static long patronus_classify_step(__u64 index, void *arg)
{
	struct patronus_classify_ctx *c = arg;
	struct patronus_policy_rule *rule;
	__u32 word = c->word, rank;
	__u64 candidates;

	if (word >= PATRONUS_POLICY_WORDS)
		return 1;
	candidates = c->words[word];
	if (!candidates) {
		c->word = word + 1;
		return c->word >= PATRONUS_POLICY_WORDS;
	}
	rank = word * 64 + patronus_lowest_bit(candidates);
	c->words[word] = candidates & (candidates - 1);
	if (++c->checked > PATRONUS_MAX_CANDIDATES)
		return 1;
	rule = bpf_map_lookup_elem(&PATRONUS_POLICY_RULES, &rank);
	if (rule && patronus_rule_matches(rule, c->src_port, c->dscp)) {
		c->result = rank;
		return 1;
	}
	return 0;
}

/* The rank of the best matching policy, or PATRONUS_NO_POLICY. */
static __always_inline __u32 patronus_classify(const struct patronus_flow_key *key, __u8 dscp)
{
	struct patronus_prefix_key prefix = { .prefixlen = 128 };
	struct patronus_policy_set *src, *dst, *proto, *dport;
	struct patronus_classify_ctx c = {
		.result = PATRONUS_NO_POLICY,
		.src_port = bpf_ntohs(key->src_port),
		.dscp = dscp,
	};
	__u32 index;

	__builtin_memcpy(prefix.addr, key->src_addr, 16);
	src = bpf_map_lookup_elem(&PATRONUS_POLICY_SRC, &prefix);
	__builtin_memcpy(prefix.addr, key->dst_addr, 16);
	dst = bpf_map_lookup_elem(&PATRONUS_POLICY_DST, &prefix);
	index = key->protocol;
	proto = bpf_map_lookup_elem(&PATRONUS_POLICY_PROTO, &index);
	index = bpf_ntohs(key->dst_port);
	dport = bpf_map_lookup_elem(&PATRONUS_POLICY_DPORT, &index);
	if (!src || !dst || !proto || !dport)
		return PATRONUS_NO_POLICY;
#pragma unroll
	for (int w = 0; w < PATRONUS_POLICY_WORDS; w++)
		c.words[w] = src->bits[w] & dst->bits[w] & proto->bits[w] & dport->bits[w];
	bpf_loop(PATRONUS_POLICY_WORDS + PATRONUS_MAX_CANDIDATES, patronus_classify_step, &c, 0);
	return c.result;
}

/* The slot of the peer site the destination is behind; 0 when no peer announces it. */
static __always_inline __u16 patronus_dest_site(const struct patronus_flow_key *key)
{
	struct patronus_prefix_key prefix = { .prefixlen = 128 };
	struct patronus_dest *dest;

	__builtin_memcpy(prefix.addr, key->dst_addr, 16);
	dest = bpf_map_lookup_elem(&PATRONUS_DEST_SITES, &prefix);
	return dest && dest->site < PATRONUS_MAX_SITES ? dest->site : 0;
}

/* PATRONUS_CLASS_PATHS index of (class, destination slot); out of range -> past the end, so
 * the lookup fails and the flow takes the default route. */
static __always_inline __u32 patronus_class_index(__u32 class_id, __u32 site)
{
	if (class_id >= PATRONUS_MAX_CLASSES || site >= PATRONUS_MAX_SITES)
		return PATRONUS_MAX_CLASSES * PATRONUS_MAX_SITES;
	return class_id * PATRONUS_MAX_SITES + site;
}

static __always_inline int patronus_listed(const struct patronus_class_paths *cp, __u32 path)
{
#pragma unroll
	for (int i = 0; i < PATRONUS_PATHS_PER_CLASS; i++)
		if (i < cp->count && cp->paths[i] == path)
			return 1;
	return 0;
}

/* Pick a path of the class for a new (or re-pathed) flow. */
static __always_inline __u32 patronus_pick(const struct patronus_class_paths *cp, __u32 class_id,
					   __u32 hash)
{
	__u32 count = cp->count;
	__u32 slot = 0;

	if (cp->pick && cp->pick < count)
		count = cp->pick;
	if (count == 0)
		return PATRONUS_NO_PATH;
	if (count > PATRONUS_PATHS_PER_CLASS)
		count = PATRONUS_PATHS_PER_CLASS;
	switch (cp->lb_mode) {
	case PATRONUS_LB_FLOW_HASH:
		slot = hash % count;
		break;
	case PATRONUS_LB_WEIGHTED_BANDWIDTH: {
		__u32 total = 0, point;
#pragma unroll
		for (int i = 0; i < PATRONUS_PATHS_PER_CLASS; i++)
			if (i < count)
				total += cp->weights[i];
		if (total == 0) {
			slot = hash % count;
			break;
		}
		point = hash % total;
#pragma unroll
		for (int i = 0; i < PATRONUS_PATHS_PER_CLASS; i++) {
			if (i < count) {
				if (point < cp->weights[i]) {
					slot = i;
					break;
				}
				point -= cp->weights[i];
			}
		}
		break;
	}
	case PATRONUS_LB_ROUND_ROBIN: {
		__u32 *turn = bpf_map_lookup_elem(&PATRONUS_RR, &class_id);
		if (turn) {
			slot = *turn % count;
			*turn += 1;
		}
		break;
	}
	case PATRONUS_LB_LEAST_FLOWS: {
		__u64 least = ~0ull;
#pragma unroll
		for (int i = 0; i < PATRONUS_PATHS_PER_CLASS; i++) {
			if (i < count) {
				__u32 path = cp->paths[i];
				__u64 *flows = bpf_map_lookup_elem(&PATRONUS_PATH_FLOWS, &path);
				if (flows && *flows < least) {
					least = *flows;
					slot = i;
				}
			}
		}
		break;
	}
	default: /* active-backup: the first listed path */
		slot = 0;
	}
	/* slot < count <= PATRONUS_PATHS_PER_CLASS already; the verifier cannot see it, and the
	 * compiler would drop a plain check, so hide slot from the optimizer and mask it. */
	_Static_assert((PATRONUS_PATHS_PER_CLASS & (PATRONUS_PATHS_PER_CLASS - 1)) == 0,
		       "PATRONUS_PATHS_PER_CLASS must be a power of two");
	asm volatile("" : "+r"(slot));
	slot &= PATRONUS_PATHS_PER_CLASS - 1;
	return cp->paths[slot];
}

static __always_inline __u32 patronus_mark_of(__u32 path)
{
	struct patronus_path *p;
	if (path == PATRONUS_NO_PATH)
		return 0;
	p = bpf_map_lookup_elem(&PATRONUS_PATHS, &path);
	return p ? p->mark : 0;
}

static __always_inline void patronus_assign(struct patronus_flow_value *flow,
					    const struct patronus_class_paths *cp, __u32 path)
{
	if (flow->path != PATRONUS_NO_PATH && flow->path < PATRONUS_MAX_PATHS) {
		__u32 old = flow->path;
		__u64 *flows = bpf_map_lookup_elem(&PATRONUS_PATH_FLOWS, &old);
		if (flows && *flows > 0)
			__sync_fetch_and_add(flows, -1);
	}
	flow->path = path;
	flow->mark = patronus_mark_of(path);
	flow->generation = cp ? cp->generation : 0;
	if (path != PATRONUS_NO_PATH) {
		__u64 *flows = bpf_map_lookup_elem(&PATRONUS_PATH_FLOWS, &path);
		if (flows)
			__sync_fetch_and_add(flows, 1);
	}
}

/*
 * The steering decision for one packet: find or create its flow, re-check the path when the
 * class's generation moved (failover), count it. Returns the mark to set (0 = none).
 */
static __always_inline __u32 patronus_steer(const struct patronus_flow_key *key, __u8 dscp,
					    __u64 bytes)
{
	struct patronus_flow_value *flow = bpf_map_lookup_elem(&PATRONUS_FLOWS, key);
	struct patronus_class_paths *cp;
	__u64 now = bpf_ktime_get_ns();
	__u32 class_id, index;

	if (flow) {
		patronus_count(PATRONUS_CNT_FLOW_HIT);
		__sync_fetch_and_add(&flow->packets, 1);
		__sync_fetch_and_add(&flow->bytes, bytes);
		flow->last_seen_ns = now;
		class_id = flow->class_id;
		index = patronus_class_index(class_id, flow->site);
		cp = bpf_map_lookup_elem(&PATRONUS_CLASS_PATHS, &index);
		if (cp && cp->generation != flow->generation) {
			/* A flow never moves between healthy paths: only when its path left the
			 * class's list, or the agent asks every flow to pick again (failback). */
			if ((cp->flags & PATRONUS_CLASS_REPIN) || !patronus_listed(cp, flow->path)) {
				__u32 path = patronus_pick(cp, class_id, patronus_flow_hash(key));
				if (path != flow->path)
					patronus_count(PATRONUS_CNT_REPATH);
				patronus_assign(flow, cp, path);
			} else {
				flow->generation = cp->generation;
			}
		}
		return flow->mark;
	}

	patronus_count(PATRONUS_CNT_FLOW_MISS);
	{
		struct patronus_flow_value fresh = {
			.packets = 1,
			.bytes = bytes,
			.first_seen_ns = now,
			.last_seen_ns = now,
			.path = PATRONUS_NO_PATH,
		};
		__u32 rank = patronus_classify(key, dscp);
		struct patronus_policy_rule *rule = NULL;
		if (rank != PATRONUS_NO_POLICY)
			rule = bpf_map_lookup_elem(&PATRONUS_POLICY_RULES, &rank);
		fresh.policy_index = rule ? rank : PATRONUS_NO_POLICY;
		class_id = rule ? rule->class_id : 0;
		fresh.class_id = class_id;
		fresh.site = patronus_dest_site(key);
		index = patronus_class_index(class_id, fresh.site);
		cp = bpf_map_lookup_elem(&PATRONUS_CLASS_PATHS, &index);
		if (cp)
			patronus_assign(&fresh, cp, patronus_pick(cp, class_id, patronus_flow_hash(key)));
		bpf_map_update_elem(&PATRONUS_FLOWS, key, &fresh, BPF_ANY);
		return fresh.mark;
	}
}

#endif /* PATRONUS_STEER_H */
