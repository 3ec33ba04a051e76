#!/usr/bin/python3
"""What a process instance's cgroup costs, per start (as root, hybrid or v2 host): the
daemon's mkdir + open of cgroup.procs + (at stop) cgroup.kill + rmdir in the cgroup2
hierarchy, the same plus a v1 memory cgroup with a limit, and the child's join (one
write of "0" to cgroup.procs). Python's own overhead is included: an upper bound.
Usage: sudo /usr/bin/python3 scripts/bench-cgroup-ops.py [ROUNDS]"""
import os, statistics, sys, time

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
lines = [l.split(":", 2) for l in open("/proc/self/cgroup").read().splitlines()]
v2_own = next(p for _, c, p in lines if c == "")
mem_own = next((p for _, c, p in lines if "memory" in c.split(",")), None)
v2_root = "/sys/fs/cgroup/unified" if os.path.exists("/sys/fs/cgroup/unified/cgroup.procs") else "/sys/fs/cgroup"
base = f"{v2_root}{v2_own.rstrip('/')}/synwake-bench{os.getpid()}"
mem = f"/sys/fs/cgroup/memory{mem_own.rstrip('/')}/synwake-bench{os.getpid()}" if mem_own else None
home = f"{v2_root}{v2_own.rstrip('/')}/cgroup.procs"


def ops(limit):
    t = time.perf_counter()
    d = base + "/f.1"
    os.mkdir(d)
    fds = [os.open(d + "/cgroup.procs", os.O_WRONLY)]
    if limit:
        m = mem + "/f.1"
        os.mkdir(m)
        with open(m + "/memory.limit_in_bytes", "w") as f:
            f.write(str(64 << 20))
        fds.append(os.open(m + "/cgroup.procs", os.O_WRONLY))
    for fd in fds:
        os.close(fd)
    with open(d + "/cgroup.kill", "w") as f:
        f.write("1")
    os.rmdir(d)
    if limit:
        os.rmdir(mem + "/f.1")
    return (time.perf_counter() - t) * 1e6


def join():
    d = base + "/f.2"
    os.mkdir(d)
    fd = os.open(d + "/cgroup.procs", os.O_WRONLY)
    t = time.perf_counter()
    os.write(fd, b"0")
    dt = (time.perf_counter() - t) * 1e6
    os.close(fd)
    with open(home, "w") as f:
        f.write("0")
    os.rmdir(d)
    return dt


os.mkdir(base)
if mem:
    os.mkdir(mem)
try:
    cases = [("v2: create+kill+rmdir", lambda: ops(False)), ("v2: child's join", join)]
    if mem:
        cases.insert(1, ("v2 + v1 memory limit", lambda: ops(True)))
    for name, f in cases:
        xs = sorted(f() for _ in range(rounds))
        print(f"{name:22} p50 {statistics.median(xs):6.0f} us  p90 {xs[int(rounds * 0.9)]:6.0f} us")
finally:
    os.rmdir(base)
    if mem:
        os.rmdir(mem)
