/* fill_options.bpf.c: test fixture only. A sockops program that reserves `fill_len` bytes
 * of option space in every outgoing SYN (left as NOPs), standing in for the other option
 * users (MD5, MPTCP, other BPF programs) that can leave no room for the synwake option. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

const volatile __u32 fill_len = 20;

SEC("sockops")
int synwake_fill_options(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if ((skops->skb_tcp_flags & 0x12) == 0x02)
			bpf_reserve_hdr_opt(skops, fill_len, 0);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Apache-2.0";
