"""A local image server for the gateway's http(s) image tests: HTTP/1.1 with keep-alive, so that a
client that keeps its connections fetches every image over one."""

from __future__ import annotations

import http.server
import threading


class ImageServer:
    """Answers every GET with body (image/png) and a new cookie; counts the connections it was opened
    on and records each request's Cookie header. A context manager: serving inside, at url."""

    def __init__(self, body: bytes):
        self.body = body
        self.lock = threading.Lock()
        self.connections = 0
        self.cookies: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_GET(self):
                with server.lock:
                    server.cookies.append(self.headers.get("Cookie"))
                    n = len(server.cookies)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(server.body)))
                self.send_header("Set-Cookie", f"session={n}; Path=/")
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.connections = 0
            self.cookies.clear()

    def __enter__(self) -> ImageServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
