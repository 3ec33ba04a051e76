#!/usr/bin/env python3
"""Analysis half of scripts/bench-serial-path.sh (not run on its own).

  serial-path.py hops PROXY_PORT < tcpdump -tt -n -q text
      Per request, from loopback timestamps of the four data segments (client -> proxy,
      proxy -> function, function -> proxy, proxy -> client): `in`, `fn`, `out` and
      `client`, as p5/p50/p90 in us, and in + out (what the proxy adds).
  serial-path.py gaps < perf script --ns -F tid,time,event,trace (raw_syscalls)
      Per thread, the time from each system call's exit to the next one's entry (user
      code plus the kernel's entry and exit), by pair of calls, and the time inside the
      calls, p10/p50 in us.
"""
import collections
import statistics as st
import sys

SYSCALLS = {0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 44: "sendto",
            45: "recvfrom", 55: "getsockopt", 202: "futex", 232: "epoll_wait",
            281: "epoll_pwait", 288: "accept4", 3: "close", 233: "epoll_ctl"}


def q(xs, n):
    return st.quantiles(xs, n=n) if len(xs) > 1 else [xs[0]] * (n - 1)


def hops(port):
    ev = []
    for line in sys.stdin:
        f = line.split()
        if len(f) < 7 or f[-2] != "tcp" or int(f[-1]) == 0:
            continue
        ts = float(f[0])
        src = int(f[2].rsplit(".", 1)[1])
        dst = int(f[4].rstrip(":").rsplit(".", 1)[1])
        if dst == port:
            kind = "c2p"
        elif src == port:
            kind = "p2c"
        else:
            kind = "p2f" if ev and ev[-1][0] == "c2p" else "f2p"
        ev.append((kind, ts))
    parts = {"in": [], "fn": [], "out": [], "client": [], "in+out": []}
    for i in range(len(ev) - 3):
        if [e[0] for e in ev[i:i + 4]] != ["c2p", "p2f", "f2p", "p2c"]:
            continue
        a, b, c, d = (e[1] * 1e6 for e in ev[i:i + 4])
        parts["in"].append(b - a)
        parts["fn"].append(c - b)
        parts["out"].append(d - c)
        parts["in+out"].append(b - a + d - c)
        if i + 4 < len(ev) and ev[i + 4][0] == "c2p":
            parts["client"].append(ev[i + 4][1] * 1e6 - d)
    if not parts["in"]:
        print("  no complete request in the capture")
        return
    cells = []
    for k, xs in parts.items():
        p = q(xs, 20)
        cells.append(f"{k} {p[0]:.1f}/{st.median(xs):.1f}/{p[17]:.1f}")
    print(f"  requests {len(parts['in'])}; p5/p50/p90 us: " + ", ".join(cells))


def gaps():
    last_exit, entered = {}, {}
    between = collections.defaultdict(list)
    inside = collections.defaultdict(list)
    for line in sys.stdin:
        f = line.split()
        if len(f) < 3:
            continue
        tid, ts, event = int(f[0]), float(f[1].rstrip(":")), f[2].rstrip(":")
        if event.endswith("sys_enter") and "NR" in f:
            name = SYSCALLS.get(int(f[f.index("NR") + 1]), f[f.index("NR") + 1])
            if tid in last_exit:
                prev, t = last_exit[tid]
                between[(prev, name)].append((ts - t) * 1e6)
            entered[tid] = (name, ts)
        elif event.endswith("sys_exit") and tid in entered:
            name, t = entered.pop(tid)
            inside[name].append((ts - t) * 1e6)
            last_exit[tid] = (name, ts)
    for (a, b), xs in sorted(between.items(), key=lambda kv: -len(kv[1]))[:6]:
        print(f"  between {a:>10} -> {b:<10} n={len(xs):6d} p10={q(xs, 10)[0]:6.2f} p50={st.median(xs):6.2f} us")
    for name, xs in sorted(inside.items(), key=lambda kv: -len(kv[1]))[:5]:
        print(f"  inside  {name:<24} n={len(xs):6d} p10={q(xs, 10)[0]:6.2f} p50={st.median(xs):6.2f} us")


if __name__ == "__main__":
    if sys.argv[1:2] == ["hops"] and len(sys.argv) == 3:
        hops(int(sys.argv[2]))
    elif sys.argv[1:] == ["gaps"]:
        gaps()
    else:
        sys.exit(__doc__)
