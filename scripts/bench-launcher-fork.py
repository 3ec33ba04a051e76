#!/usr/bin/env python3
"""The launcher's own time, old (joins the cgroup by a write, execs in place) against new
(forks the instance into its cgroup2 cgroup): from the spawn call (a tracefs marker) and
from the launcher's exec to the function's exec (sched_process_exec timestamps, in a
private tracefs instance), without and with a fresh cgroup2 directory; the function is a
copy of /bin/true run as nobody. Root.

    git show 09c8351:crates/synwake/launcher/main.rs > /tmp/launcher-old.rs
    for v in old new; do rustc --edition 2021 -C opt-level=2 -C target-feature=+crt-static \\
        -o /tmp/launcher-$v $( [ $v = old ] && echo /tmp/launcher-old.rs || echo crates/synwake/launcher/main.rs); done
    sudo python3 scripts/bench-launcher-fork.py /tmp/launcher-old /tmp/launcher-new 40
"""
import os, re, shutil, subprocess, sys, tempfile

old, new = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
cgroup2 = next(p for p in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
               if os.path.exists(p + "/cgroup.procs"))
me = os.getpid()
work = tempfile.mkdtemp(prefix="synwake-launcher-fork-")
os.chmod(work, 0o755)
launchers = {}
for name, path in (("old", old), ("new", new)):
    launchers[name] = os.path.join(work, "launcher-" + name)
    shutil.copy(path, launchers[name])
marker = os.path.join(work, "fn-marker")
shutil.copy("/bin/true", marker)
trace = "/sys/kernel/tracing/instances/synwake-launcher-fork-%d" % me
os.mkdir(trace)
cg = "%s/synwake-launcher-fork-%d" % (cgroup2, me)
os.mkdir(cg)


def w(p, v):
    with open(trace + "/" + p, "w") as f:
        f.write(v)


w("events/sched/sched_process_exec/filter", 'filename ~ "%s/*"' % work)
w("events/sched/sched_process_exec/enable", "1")
res = {}
try:
    for _ in range(n):
        for with_cg in (False, True):
            for name in ("old", "new"):
                w("trace", "")
                w("trace_marker", "spawn")
                r, wr = os.pipe()
                args = [launchers[name], str(me), "65534:65534"] + ([cg] if with_cg else []) + ["--", marker]
                p = subprocess.Popen(args, stdin=wr, stdout=subprocess.DEVNULL)
                os.close(wr)
                line = os.read(r, 100).decode().strip()
                os.close(r)
                p.wait()
                if name == "new":
                    os.waitpid(int(line), 0)
                ts = {}
                for l in open(trace + "/trace").read().splitlines():
                    m = re.search(r" (\d+\.\d+): (\w+): (.*)", l)
                    if not m:
                        continue
                    t, ev, rest = float(m.group(1)), m.group(2), m.group(3)
                    if ev == "tracing_mark_write":
                        ts.setdefault("spawn", t)
                    elif ev == "sched_process_exec":
                        ts.setdefault("fn" if "fn-marker" in rest else "launcher", t)
                if len(ts) == 3:
                    d = res.setdefault(name + ("+cgroup2" if with_cg else ""), ([], []))
                    d[0].append((ts["fn"] - ts["spawn"]) * 1e6)
                    d[1].append((ts["fn"] - ts["launcher"]) * 1e6)
finally:
    w("events/sched/sched_process_exec/enable", "0")
    os.rmdir(trace)
    os.rmdir(cg)
    shutil.rmtree(work)


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * q)))]


print("| launcher | spawn call -> function exec p50 / p90 us | launcher exec -> function exec p50 / p90 us | runs |")
print("|---|---:|---:|---:|")
for k, (sp, ex) in res.items():
    print("| %s | %.0f / %.0f | %.0f / %.0f | %d |" % (k, pct(sp, .5), pct(sp, .9), pct(ex, .5), pct(ex, .9), len(sp)))
