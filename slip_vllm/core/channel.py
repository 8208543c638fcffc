"""The colocated data plane: one shared-memory mailbox pair per vLLM worker process (both sides; pure code).

What this module owns
---------------------
* the address forms of the secure service (``parse_service_url``): ``http://HOST:PORT`` (data plane
  over HTTP) and ``shm://HOST:PORT`` (control plane over HTTP at HOST:PORT, data plane over shared
  memory; the service must run on the same machine or in a VM that shares its memory);
* ``Channel``: one end of a channel segment: request and reply areas, the sequence words and the
  spin-then-sleep doorbell.  The host end posts requests and waits for replies, the service end the
  other way round; neither knows what the bytes mean (the frames are ``slip_vllm.core.wire``'s).

Segment layout (a memfd the service creates and hands to the host over a Unix socket with
SCM_RIGHTS; no name in /dev/shm, so only a process the service gave the descriptor to can map it)::

    [0, 4096)   control block of int64 words, each group on its own 64-byte line
        word 0   magic b"SLCH" | version << 32      (service, at attach)
        word 1   capacity: bytes per direction      (service, at attach)
        word 2   session id                         (service, at attach)
        word 8   req_seq    the host writes it last, after the request bytes and words 9-11
        word 9   req_endpoint
        word 10  req_len
        word 11  req_offset where the frame starts in the request area (< ALIGN)
        word 16  rep_seq    the service writes it last (= the req_seq it answers)
        word 17  rep_status (HTTP status semantics; the body of a non-200 reply is {"error": ...})
        word 18  rep_len
        word 19  rep_offset where the frame starts in the reply area (< ALIGN)
        word 24  host_waiting      1 while the host sleeps on the doorbell
        word 32  service_waiting   1 while the service sleeps on the doorbell
    [4096, 4096 + capacity)                 request area (host writes, service reads)
    [4096 + capacity, 4096 + 2 * capacity)  reply area (service writes, host reads)

A frame is placed at an offset below ``ALIGN`` chosen so that its payload (after its header) starts
on a 64-byte boundary: the same data then gives the same floating-point result as an HTTP body
(BLAS kernels pick their code path by alignment).  One request is in flight per channel (a worker's protected layers run one after another), so each
direction is a ring of one slot, like the single-writer ring of vLLM's ``shm_broadcast.py``.

Waiting (``_wait``): spin on the sequence word for ``spin_s`` (answers usually arrive while the
waiter spins), then set its waiting word, fence, re-check, and block on the Unix socket; the
notifier stores the sequence word, fences, and sends one doorbell byte only if the peer's waiting
word is set.  With a full fence on both sides one of the two always sees the other's store
(Dekker), so no wake-up is lost; the sleep also times out every ``_SLEEP_POLL_S`` as a belt and
braces re-check.  An idle channel therefore costs no CPU.  The fence is an uncontended
``threading.Lock`` acquire/release (a locked read-modify-write, a full barrier on x86-64); word
stores and loads go through a ``memoryview`` cast to int64, which CPython performs as single aligned
8-byte moves, so a word is never seen half written, and x86-64 keeps stores in order (payload
before sequence word).  On other architectures spinning is turned off and every message rings the
doorbell: the kernel's socket path orders the memory accesses there.

The socket is also the liveness signal: when either process exits or closes its end, the other's
wait ends with ``ChannelClosed`` instead of a timeout.

Security: the host is untrusted and can write anything into the segment at any time.  The service
end therefore reads every control word once into a Python int, bounds lengths by the capacity,
and leaves it to the protocol above whether a payload may be read in place (``split``: the host
can only spoil its own result) or must be copied first (``shielded``: an answer is copied before
its Freivalds check, so it cannot change after the check).
"""

from __future__ import annotations

import mmap
import os
import platform
import select
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ServiceAddress", "parse_service_url", "Channel", "ChannelClosed", "ChannelTimeout",
           "CONTROL_BYTES", "segment_size", "MAGIC_WORD", "VERSION", "ALIGN", "aligned_offset"]

VERSION = 1
MAGIC_WORD = int.from_bytes(b"SLCH", "little") | (VERSION << 32)
CONTROL_BYTES = 4096
W_MAGIC, W_CAPACITY, W_SESSION = 0, 1, 2
W_REQ_SEQ, W_REQ_EP, W_REQ_LEN, W_REQ_OFF = 8, 9, 10, 11
W_REP_SEQ, W_REP_STATUS, W_REP_LEN, W_REP_OFF = 16, 17, 18, 19
ALIGN = 64
W_HOST_WAITING, W_SERVICE_WAITING = 24, 32
_SLEEP_POLL_S = 0.25
_SPIN_OK = platform.machine().lower() in ("x86_64", "amd64")


class ChannelClosed(ConnectionError):
    """The peer closed its end (or exited)."""


class ChannelTimeout(TimeoutError):
    """No message within the deadline."""


@dataclass(frozen=True)
class ServiceAddress:
    scheme: str        # "http" or "shm"
    control_url: str   # http(s)://HOST:PORT of the control plane (health, info, stats, attach)

    @property
    def colocated(self) -> bool:
        return self.scheme == "shm"


def parse_service_url(url: str) -> ServiceAddress:
    """``http(s)://HOST:PORT`` -> HTTP data plane; ``shm://HOST:PORT`` -> shared-memory data plane
    attached through the control plane at http://HOST:PORT."""
    parts = urlsplit(url.strip())
    if parts.scheme in ("http", "https") and parts.netloc:
        return ServiceAddress(parts.scheme, url.strip().rstrip("/"))
    if parts.scheme == "shm" and parts.netloc:
        if parts.path not in ("", "/"):
            raise ValueError(f"service address {url!r}: shm://HOST:PORT takes no path")
        return ServiceAddress("shm", f"http://{parts.netloc}")
    raise ValueError(f"service address {url!r} is neither http://HOST:PORT nor shm://HOST:PORT")


def aligned_offset(header_bytes: int) -> int:
    """Where to start a frame whose header has this length so that its payload is ALIGN-aligned."""
    return -int(header_bytes) % ALIGN


def segment_size(capacity: int) -> int:
    return CONTROL_BYTES + 2 * int(capacity)


class Channel:
    """One end of a channel (see the module docstring).  ``role`` is "host" or "service".

    fd: the memfd of the segment (this object maps it and closes the descriptor); sock: the
    connected Unix socket (doorbell and liveness).  ``request_area`` / ``reply_area`` are writable
    memoryviews of the two areas.
    """

    def __init__(self, fd: int, sock: socket.socket, role: str, *, spin_s: float = 50e-6):
        if role not in ("host", "service"):
            raise ValueError("role must be 'host' or 'service'")
        try:
            size = os.fstat(fd).st_size
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._ctrl = memoryview(self._mm)[:CONTROL_BYTES].cast("q")
        self.capacity = int(self._ctrl[W_CAPACITY])
        if self._ctrl[W_MAGIC] != MAGIC_WORD or size != segment_size(self.capacity):
            self._ctrl.release()
            self._mm.close()
            raise ValueError("not a SLIP channel segment of this version")
        self.session = int(self._ctrl[W_SESSION])
        whole = memoryview(self._mm)
        self.request_area = whole[CONTROL_BYTES:CONTROL_BYTES + self.capacity]
        self.reply_area = whole[CONTROL_BYTES + self.capacity:CONTROL_BYTES + 2 * self.capacity]
        self._whole = whole
        self.sock = sock
        self.role = role
        self.spin_s = float(spin_s) if _SPIN_OK else 0.0
        self._always_ring = not _SPIN_OK
        self._fence_lock = threading.Lock()
        self._mine = W_HOST_WAITING if role == "host" else W_SERVICE_WAITING
        self._peer = W_SERVICE_WAITING if role == "host" else W_HOST_WAITING
        self.closed = False

    # -- creation (service side) -----------------------------------------------------------------

    @staticmethod
    def create_segment(capacity: int, session: int) -> int:
        """A new anonymous segment with its control block written; returns the memfd."""
        fd = os.memfd_create("slip-channel", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, segment_size(capacity))
            with mmap.mmap(fd, CONTROL_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                ctrl = memoryview(mm).cast("q")
                ctrl[W_CAPACITY] = int(capacity)
                ctrl[W_SESSION] = int(session) & (2**63 - 1)
                ctrl[W_MAGIC] = MAGIC_WORD
                ctrl.release()
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- the words -----------------------------------------------------------------------------

    def word(self, index: int) -> int:
        return self._ctrl[index]

    def set_word(self, index: int, value: int) -> None:
        self._ctrl[index] = value

    def _fence(self) -> None:
        self._fence_lock.acquire()
        self._fence_lock.release()

    def ring(self) -> None:
        """Wake the peer if it sleeps (call after storing the sequence word)."""
        self._fence()
        if self._always_ring or self._ctrl[self._peer]:
            try:
                self.sock.send(b"\x01", socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass  # bytes are already pending: the peer will wake
            except OSError as exc:
                raise ChannelClosed(f"channel peer is gone ({exc})") from None

    def wait(self, index: int, unchanged_from: int, timeout: float | None) -> int:
        """Wait until word ``index`` differs from ``unchanged_from``; returns its new value."""
        ctrl = self._ctrl
        value = ctrl[index]
        if value != unchanged_from:
            return value
        start = time.perf_counter()
        if self.spin_s > 0:
            spin_until = start + self.spin_s
            while True:
                value = ctrl[index]
                if value != unchanged_from:
                    return value
                if time.perf_counter() >= spin_until:
                    break
        deadline = None if timeout is None else start + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            ctrl[self._mine] = 1
            self._fence()
            value = ctrl[index]
            if value != unchanged_from:
                ctrl[self._mine] = 0
                return value
            wait_s = _SLEEP_POLL_S
            if deadline is not None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    ctrl[self._mine] = 0
                    raise ChannelTimeout(f"no message within {timeout:g} s")
                wait_s = min(wait_s, left)
            events = poller.poll(wait_s * 1000.0)
            ctrl[self._mine] = 0
            if events:
                try:
                    data = self.sock.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = b"\x01"
                except OSError:
                    data = b""
                if not data:
                    value = ctrl[index]  # the last message may have been posted just before closing
                    if value != unchanged_from:
                        return value
                    self.closed = True
                    raise ChannelClosed("the channel's peer closed its end")

    def close(self) -> None:
        if self.closed and self._mm.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for view in (self.request_area, self.reply_area, self._ctrl, self._whole):
            try:
                view.release()
            except BufferError:
                pass  # a tensor still views the segment: the mapping lives until it is freed
        try:
            self._mm.close()
        except BufferError:
            pass
