// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* xdp_empty.c — an XDP program that only passes the packet: the baseline that
 * `patronus-edge bench dataplane` measures beside the real programs in the same run. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int patronus_xdp_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
