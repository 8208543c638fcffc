"""A recording TCP proxy for the trust boundary: vLLM talks to the secure service through it, and
every byte that crosses, in each direction, is kept for the tests to decode.

The tests then judge what the host actually received and sent (not what the code says it does):
the proxy is a plain byte pump, independent of the project's client and server code.  HTTP/1.1
messages are split by their Content-Length (the project's client and server never use chunked
bodies; a chunked message fails the parse loudly).

Requests towards the service are forwarded whole (store and forward), so a test can play a
cheating host: ``tamper(path, body)`` may return a replacement body for any request.
"""

from __future__ import annotations

import itertools
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from helpers import free_port


@dataclass
class Exchange:
    order: int          # global position of the request's first byte
    method: str
    path: str
    request: bytes
    status: int
    response: bytes


class RecordingProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._clock = itertools.count()
        self._lock = threading.Lock()
        self._connections: list[dict] = []  # {"up": [(tick, bytes)], "down": [(tick, bytes)]}
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = False
        self.tamper: Optional[Callable[[str, bytes], Optional[bytes]]] = None
        threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept").start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the service is down: the host sees a refused connection
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            record = {"up": [], "down": []}
            with self._lock:
                self._connections.append(record)
            threading.Thread(target=self._forward_requests, args=(client, upstream, record["up"]),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, record["down"]), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, log: list) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                with self._lock:
                    log.append((next(self._clock), data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _forward_requests(self, src: socket.socket, dst: socket.socket, log: list) -> None:
        """Host -> service: forward each request once complete, through ``tamper`` if set."""
        buffer = b""
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                buffer += data
                while True:
                    message = _take_message(buffer)
                    if message is None:
                        break
                    head, body, buffer = message
                    tamper = self.tamper
                    if tamper is not None:
                        path = head.split(b" ", 2)[1].decode("latin-1")
                        replaced = tamper(path, body)
                        if replaced is not None:
                            assert len(replaced) == len(body), "tampering must keep the body length"
                            body = replaced
                    with self._lock:
                        log.append((next(self._clock), head + body))
                    dst.sendall(head + body)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()

    def clear(self) -> None:
        with self._lock:
            for record in self._connections:
                record["up"].clear()
                record["down"].clear()

    def exchanges(self) -> list[Exchange]:
        """Every complete request/response pair so far, in the order the requests started."""
        with self._lock:
            snapshot = [(list(r["up"]), list(r["down"])) for r in self._connections]
        out = []
        for up, down in snapshot:
            requests = _split_messages(up, request=True)
            responses = _split_messages(down, request=False)
            for (tick, start_line, body), (_, status_line, reply) in zip(requests, responses):
                method, path, _ = start_line.split(" ", 2)
                out.append(Exchange(tick, method, path, body, int(status_line.split(" ", 2)[1]), reply))
        return sorted(out, key=lambda e: e.order)


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _take_message(data: bytes):
    """(head incl. the blank line, body, rest) of the first complete HTTP/1.1 message, or None."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = data[:head_end].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    if "chunked" in headers.get("transfer-encoding", ""):
        raise AssertionError("chunked HTTP body on the SLIP data plane: the proxy cannot split it")
    end = head_end + 4 + int(headers.get("content-length", "0"))
    if end > len(data):
        return None
    return data[:head_end + 4], data[head_end + 4:end], data[end:]


def _split_messages(chunks: list, *, request: bool) -> list[tuple[int, str, bytes]]:
    """(tick of the first byte, start line, body) of every complete HTTP/1.1 message in a stream."""
    data = b"".join(c for _, c in chunks)
    starts, pos = [], 0
    for tick, c in chunks:  # byte offset -> tick of the chunk holding it
        starts.append((pos, tick))
        pos += len(c)
    messages, offset = [], 0
    while True:
        head_end = data.find(b"\r\n\r\n", offset)
        if head_end < 0:
            break
        lines = data[offset:head_end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        if "chunked" in headers.get("transfer-encoding", ""):
            raise AssertionError("chunked HTTP body on the SLIP data plane: the recorder cannot split it")
        length = int(headers.get("content-length", "0"))
        end = head_end + 4 + length
        if end > len(data):
            break
        tick = max(t for p, t in starts if p <= offset)
        messages.append((tick, lines[0], data[head_end + 4:end]))
        offset = end
    return messages
