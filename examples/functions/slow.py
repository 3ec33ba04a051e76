#!/usr/bin/env python3
"""slow: a function with a slow start, to make the cold-start cost visible.

Sleeps INIT_MS milliseconds (default 300) *before* it opens its listening socket, the way
a function that loads a model or warms a cache would, then answers every GET with how long
its start took. GET /healthz answers 200 "ok". Listens on 127.0.0.1:$PORT.
Python 3.11 standard library only.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("SYNWAKE_FUNCTION", "slow")


class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "synwake-example-slow"
    init_ms = 0

    def _answer(self, send_body: bool) -> None:
        # Read any body first (see hello.py): unread bytes would become the next request.
        _drain_body(self)
        if self.path.split("?", 1)[0] == "/healthz":
            body = b"ok\n"
        else:
            body = f"hello from {NAME}: ready after {self.init_ms} ms of init\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    do_POST = do_GET

    def log_message(self, format: str, *args) -> None:
        pass

    def log_error(self, format: str, *args) -> None:
        sys.stderr.write(f"{NAME}: {format % args}\n")


def _drain_body(handler: BaseHTTPRequestHandler) -> None:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        # Not decoded here: answer, then close instead of reusing the connection.
        handler.close_connection = True
        return
    length = int(handler.headers.get("Content-Length") or 0)
    while length > 0:
        chunk = handler.rfile.read(min(length, 65536))
        if not chunk:
            break
        length -= len(chunk)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client hanging up early (synwake's readiness check does) is normal: no traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def main() -> int:
    port = os.environ.get("PORT")
    if not port:
        print("slow.py: set PORT (synwake's process runtime does)", file=sys.stderr)
        return 2
    try:
        init_ms = int(os.environ.get("INIT_MS", "300"))
    except ValueError:
        print(f"slow.py: INIT_MS must be whole milliseconds, got {os.environ['INIT_MS']!r}",
              file=sys.stderr)
        return 2
    # The sleep comes before bind(): until it ends, a connect to PORT is refused, so
    # synwake's readiness check really waits for the whole init.
    time.sleep(max(init_ms, 0) / 1000)
    Slow.init_ms = init_ms
    server = Server(("127.0.0.1", int(port)), Slow)
    print(f"slow.py: {NAME} listening on 127.0.0.1:{port} after {init_ms} ms init", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
