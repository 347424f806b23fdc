"""A small forwarding HTTP proxy on 127.0.0.1 for tests: absolute-URI requests and CONNECT tunnels.

Each client connection is one exchange: the request head is read, the target connected, the head
sent on (``Connection: close``, no ``Proxy-*`` headers), then bytes are copied both ways until
either side closes. ``requests`` counts the exchanges it forwarded.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from urllib.parse import urlsplit

_HEAD_LIMIT = 64 * 1024


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk or len(head) > _HEAD_LIMIT:
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=10)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            kept = [
                line
                for line in header_lines
                if not line.lower().startswith(("proxy-", "connection:", "keep-alive:"))
            ]
            lines = [f"{method} {path} {version}", *kept, "Connection: close"]
            upstream.sendall("".join(f"{line}\r\n" for line in lines).encode("latin-1") + b"\r\n" + rest)
        upstream.settimeout(None)
        self.server.count(method, target)
        with self.server.lock:
            self.server.open_sockets.update({client, upstream})
        backward = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        backward.start()
        _copy(client, upstream)
        backward.join()
        for sock in (client, upstream):
            with self.server.lock:
                self.server.open_sockets.discard(sock)
            sock.close()


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
        try:
            sock.shutdown(how)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.open_sockets: set[socket.socket] = set()

    def count(self, method: str, target: str) -> None:
        with self.lock:
            self.requests.append((method, target))


class ForwardProxy:
    """``with ForwardProxy() as proxy: ... proxy.url``: a real proxy on a free loopback port."""

    def __init__(self) -> None:
        self._server = _Server()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every exchange forwarded so far."""
        with self._server.lock:
            return list(self._server.requests)

    def __enter__(self) -> ForwardProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="forward-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._server.lock:
            sockets = list(self._server.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
