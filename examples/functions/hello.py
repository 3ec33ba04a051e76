#!/usr/bin/env python3
"""hello: the smallest synwake function.

Answers every GET with "hello from <SYNWAKE_FUNCTION>: <GREETING>" and GET /healthz with
200 "ok". Listens on 127.0.0.1:$PORT (synwake's process runtime sets PORT and
SYNWAKE_FUNCTION). Python 3.11 standard library only.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("SYNWAKE_FUNCTION", "hello")
GREETING = os.environ.get("GREETING", "hello")


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the gateway reuses its connections
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server_version = "synwake-example-hello"

    def _answer(self, send_body: bool) -> None:
        # Every method may carry a body (faas-cli sends stdin as a GET body): read it all,
        # or its bytes would be parsed as the next request on this kept-alive connection.
        _drain_body(self)
        if self.path.split("?", 1)[0] == "/healthz":
            body = b"ok\n"
        else:
            body = f"hello from {NAME}: {GREETING}\n".encode()
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
    do_PUT = do_GET

    def log_message(self, format: str, *args) -> None:
        # One stderr line per request would flood synwake's log under load.
        pass

    def log_error(self, format: str, *args) -> None:
        sys.stderr.write(f"{NAME}: {format % args}\n")


def _drain_body(handler: BaseHTTPRequestHandler) -> None:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        # Not worth decoding here: answer, then close instead of reusing the connection.
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
        print("hello.py: set PORT (synwake's process runtime does)", file=sys.stderr)
        return 2
    server = Server(("127.0.0.1", int(port)), Hello)
    print(f"hello.py: {NAME} listening on 127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
