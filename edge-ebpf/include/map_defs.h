/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * map_defs.h — the data plane's maps, grouped by concern. Types and sizes are in maps.h; the
 * agent opens these by name (the names are part of the agent's contract, see dataplane.rs).
 */
#ifndef PATRONUS_MAP_DEFS_H
#define PATRONUS_MAP_DEFS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

/* Distinct policy prefixes per direction (a policy may list several). */
#define PATRONUS_MAX_PREFIXES 16384

/* ---- counters ------------------------------------------------------------------------ */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PATRONUS_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} PATRONUS_COUNTERS SEC(".maps");

/* ---- flows --------------------------------------------------------------------------- */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PATRONUS_MAX_FLOWS);
	__type(key, struct patronus_flow_key);
	__type(value, struct patronus_flow_value);
} PATRONUS_FLOWS SEC(".maps");

/* ---- classification (written by the agent from the intent's policies) ----------------- */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PATRONUS_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct patronus_prefix_key);
	__type(value, struct patronus_policy_set);
} PATRONUS_POLICY_SRC SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PATRONUS_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct patronus_prefix_key);
	__type(value, struct patronus_policy_set);
} PATRONUS_POLICY_DST SEC(".maps");

/* Index: IANA protocol number. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct patronus_policy_set);
} PATRONUS_POLICY_PROTO SEC(".maps");

/* Index: destination port, host order (0 for protocols without ports). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct patronus_policy_set);
} PATRONUS_POLICY_DPORT SEC(".maps");

/* Index: policy rank. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PATRONUS_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct patronus_policy_rule);
} PATRONUS_POLICY_RULES SEC(".maps");

/* ---- steering (written by the agent from path state) ---------------------------------- */
/* Index: class_id * PATRONUS_MAX_SITES + destination slot (an array: the lookup on every
 * packet is an index, not a hash). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PATRONUS_MAX_CLASSES * PATRONUS_MAX_SITES);
	__type(key, __u32);
	__type(value, struct patronus_class_paths);
} PATRONUS_CLASS_PATHS SEC(".maps");

/* Destination prefix -> the peer site behind it (written by the agent from the intent). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PATRONUS_MAX_DEST_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct patronus_prefix_key);
	__type(value, struct patronus_dest);
} PATRONUS_DEST_SITES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PATRONUS_MAX_PATHS);
	__type(key, __u32);
	__type(value, struct patronus_path);
} PATRONUS_PATHS SEC(".maps");

/* Flows assigned to each path (least-flows mode); the agent recounts from the flow table. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PATRONUS_MAX_PATHS);
	__type(key, __u32);
	__type(value, __u64);
} PATRONUS_PATH_FLOWS SEC(".maps");

/* Round-robin turn per class, per CPU (no contention; the turns interleave across CPUs). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PATRONUS_MAX_CLASSES);
	__type(key, __u32);
	__type(value, __u32);
} PATRONUS_RR SEC(".maps");

#endif /* PATRONUS_MAP_DEFS_H */
