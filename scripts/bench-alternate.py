#!/usr/bin/python3
"""One-connection latency of several HTTP/1.1 targets, measured request by request in turn.

    scripts/bench-alternate.py N HOST:PORT/PATH...

Each target gets one kept-alive connection; every iteration sends one GET to each target,
in an order shuffled per iteration (so no target always follows the same one, and a load
spike from other jobs hits all targets alike), and prints each target's latency quantiles
over the N requests. The client is Python, so absolute figures include its own cost (the
same for every target); compare the differences. Targets must answer with Content-Length.
"""
import random
import socket
import statistics
import sys
import time


def connect(hostport):
    host, port = hostport.split(":")
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def one(target):
    """One request on the target's connection (reopened if the server closed it)."""
    for _ in range(2):
        target["sock"].sendall(target["req"])
        buf = b""
        while True:
            d = target["sock"].recv(65536)
            if not d:
                break
            buf += d
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                continue
            head = buf[:i].lower()
            cl = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buf) >= i + 4 + cl:
                return
        target["sock"].close()
        target["sock"] = connect(target["hostport"])
    raise SystemExit(f"{target['hostport']}: closed twice in a row")


def main():
    n = int(sys.argv[1])
    targets = []
    for t in sys.argv[2:]:
        hostport, path = t.split("/", 1)
        req = f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: bench-alternate\r\n\r\n"
        targets.append({"name": t, "hostport": hostport, "sock": connect(hostport),
                        "req": req.encode(), "lat": []})
    for _ in range(n):
        order = list(range(len(targets)))
        random.shuffle(order)
        for j in order:
            t = targets[j]
            t0 = time.perf_counter_ns()
            one(t)
            t["lat"].append((time.perf_counter_ns() - t0) / 1000)
    for t in targets:
        lat = sorted(t["lat"])
        q = lambda f: lat[int(f * (len(lat) - 1))]
        print(f"{t['name']:40s} p25 {q(0.25):7.1f} p50 {statistics.median(lat):7.1f} "
              f"p75 {q(0.75):7.1f} p90 {q(0.9):7.1f} us")


if __name__ == "__main__":
    main()
