#!/usr/bin/env python3
"""echo: sends every request body straight back, streaming.

Any method with a body (Content-Length or chunked) gets it back with the same
Content-Type. The body is copied 64 KiB at a time as it arrives, so large uploads never
sit in memory and the response starts before the upload ends (so the client must read
while it sends, as curl and hyper do; one that reads only after sending everything stalls
once the socket buffers, a few MiB, are full). A request without a body
gets a one-line hint; GET /healthz answers 200 "ok". Listens on 127.0.0.1:$PORT.
Python 3.11 standard library only.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("SYNWAKE_FUNCTION", "echo")
CHUNK = 64 * 1024


class BodyError(Exception):
    """The request body was malformed or the client went away mid-body."""


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "synwake-example-echo"

    def _plain(self, status: int, text: str, send_body: bool = True) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _echo(self) -> None:
        if self.path.split("?", 1)[0] == "/healthz" and self.command == "GET":
            self._plain(200, "ok\n")
            return
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_header = self.headers.get("Content-Length")
        if not chunked and length_header is None:
            self._plain(200, f"{NAME}: send a body (POST or PUT) and it comes back\n",
                        send_body=self.command != "HEAD")
            return
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        if not chunked and not length_header.strip().isdigit():
            self.close_connection = True
            self._plain(400, f"{NAME}: invalid Content-Length {length_header!r}\n")
            return
        try:
            if chunked:
                self._stream_chunked(content_type)
            else:
                self._stream_fixed(content_type, int(length_header))
        except (BodyError, ValueError) as err:
            # Headers may already be out; the only honest signal left is closing.
            self.log_error("echo: %s", err)
            self.close_connection = True

    def _stream_fixed(self, content_type: str, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        while length > 0:
            chunk = self.rfile.read1(min(length, CHUNK))
            if not chunk:
                raise BodyError(f"client closed with {length} body bytes still due")
            self.wfile.write(chunk)
            length -= len(chunk)

    def _stream_chunked(self, content_type: str) -> None:
        # Re-chunk on the way out: the total length is unknown until the last chunk.
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise BodyError("client closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            remaining = size
            while remaining > 0:
                data = self.rfile.read1(min(remaining, CHUNK))
                if not data:
                    raise BodyError("client closed inside a chunk")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                remaining -= len(data)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise BodyError("chunk not followed by CRLF")
        # Skip trailers up to the blank line that ends the body.
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass
        self.wfile.write(b"0\r\n\r\n")

    do_POST = _echo
    do_PUT = _echo
    do_PATCH = _echo
    do_GET = _echo

    def do_HEAD(self) -> None:
        # A HEAD with a body is odd but legal: never leave its bytes on the connection.
        self.close_connection = True
        if self.path.split("?", 1)[0] == "/healthz":
            self._plain(200, "ok\n", send_body=False)
        else:
            self._plain(200, f"{NAME}: send a body (POST or PUT) and it comes back\n",
                        send_body=False)

    def log_message(self, format: str, *args) -> None:
        pass

    def log_error(self, format: str, *args) -> None:
        # Errors are rare and worth a line in synwake's log (stderr is captured there).
        sys.stderr.write(f"echo.py: {format % args}\n")


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
        print("echo.py: set PORT (synwake's process runtime does)", file=sys.stderr)
        return 2
    server = Server(("127.0.0.1", int(port)), Echo)
    print(f"echo.py: {NAME} listening on 127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
