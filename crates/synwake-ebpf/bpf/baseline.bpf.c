/* baseline.bpf.c: an XDP program that only passes packets; the benchmark subtracts its
 * cost (the run-time statistics' own clock reads) from the probe's. Not used in production. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int synwake_nop(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
