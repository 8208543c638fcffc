"""TRUSTED side: the data plane of the secure service, whatever carries its bytes.

What this module owns
---------------------
``DataPlane.handle(endpoint, body, sink)``: one data-plane call, from a request body to a reply
written into space the transport provides, or ``Rejected(status, message)``.  Both transports
(``secure_service.transport``: HTTP endpoints and the shared-memory channel) call it, so the checks
are the same on both: protocol gate, strict decoding, per-session sequence numbers (replays and
reordering answer 409), the bundle's ids, shapes and values, and the counters of ``/v1/stats``.
It knows endpoints and frames (``slip_vllm.core.wire``), never sockets or shared memory.

Endpoints: ``EP_SPLIT_APPLY`` (protocol split, ``SplitExecutor``), ``EP_SHIELDED_STEP``,
``EP_SHIELDED_GEMM``, ``EP_SHIELDED_LOGITS`` (protocol shielded, ``ShieldedService``).

Reading in place: a transport whose buffer is writable shared memory passes ``in_place=True``.
A split request is then computed straight from the host's bytes (the host can only spoil its own
result by changing them mid-call) and its reply is computed straight into the reply area.  Shielded
frames are always copied out by the decoder before they are checked, so an answer cannot change
between its Freivalds check and its use.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Optional

from secure_service.bundle import Bundle
from secure_service.shielded_api import StepRejected
from secure_service.split_executor import RequestRejected, SplitExecutor
from slip_vllm.core.wire import (
    EP_SHIELDED_GEMM, EP_SHIELDED_LOGITS, EP_SHIELDED_STEP, EP_SPLIT_APPLY, KIND_EMBED, MSG_ANSWER, MSG_ROWS, WireError,
    decode_request, decode_shielded_message, decode_shielded_step, reply_into, reply_size,
)

MAX_SESSIONS = 4096
Sink = Callable[[int], memoryview]  # nbytes -> writable space for the reply (valid until it is sent)


class Rejected(Exception):
    """A data-plane call the service refuses; ``status`` has HTTP semantics on every transport."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SessionGuard:
    """Refuses replayed or out-of-order frames: seq must strictly increase within a session."""

    def __init__(self) -> None:
        self._last: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def admit(self, session: int, seq: int) -> bool:
        with self._lock:
            last = self._last.get(session)
            if last is not None and seq <= last:
                return False
            self._last[session] = seq
            self._last.move_to_end(session)
            while len(self._last) > MAX_SESSIONS:
                self._last.popitem(last=False)
            return True


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.rows = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected = 0
        self.compute_s = 0.0
        self.started = time.time()

    def snapshot(self) -> dict:
        with self.lock:
            return {"calls": self.calls, "rows": self.rows, "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out, "rejected": self.rejected,
                    "compute_s": round(self.compute_s, 6), "uptime_s": round(time.time() - self.started, 3)}

    def count_rejected(self) -> None:
        with self.lock:
            self.rejected += 1


class DataPlane:
    """See the module docstring.  ``shielded``: the ``ShieldedService`` of a shielded bundle."""

    def __init__(self, bundle: Bundle, shielded=None, instance: int = 0):
        """instance: this service process's id (``/v1/info``), written into every split reply
        (the shielded service writes its own, with the KV epoch, into its messages)."""
        self.bundle = bundle
        self.instance = instance
        self.split = SplitExecutor(bundle)
        self.shielded = shielded
        self.sessions = SessionGuard()
        self.stats = Stats()

    def _gate(self, endpoint: int) -> None:
        if endpoint == EP_SPLIT_APPLY:
            if self.bundle.protocol != "split":
                raise Rejected(403, f"this bundle uses protocol {self.bundle.protocol!r}; the split data plane is closed")
        elif endpoint in (EP_SHIELDED_STEP, EP_SHIELDED_GEMM, EP_SHIELDED_LOGITS):
            if self.shielded is None:
                raise Rejected(403, f"this bundle uses protocol {self.bundle.protocol!r}; the shielded data plane is closed")
        else:
            raise Rejected(404, f"unknown data-plane endpoint {endpoint}")

    def _admit(self, frame_session: int, seq: int, session: Optional[int], what: str) -> None:
        if session is not None and frame_session != session:
            raise Rejected(403, f"frame of session {frame_session:#x} on the channel of session {session:#x}")
        if not self.sessions.admit(frame_session, seq):
            raise Rejected(409, f"replayed or out-of-order {what} (session {frame_session:#x}, seq {seq})")

    def handle(self, endpoint: int, body: memoryview, sink: Sink, *, in_place: bool = False,
               session: Optional[int] = None) -> int:
        """One call; returns the length of the reply written into ``sink(n)``.  session: the
        session a channel was attached with (its frames must carry it); None over HTTP."""
        started = time.perf_counter()
        try:
            self._gate(endpoint)
            try:
                if endpoint == EP_SPLIT_APPLY:
                    n, rows = self._split(body, sink, in_place, session)
                else:
                    n, rows = self._shielded(endpoint, body, sink, session), 0
            except WireError as exc:
                raise Rejected(400, f"bad frame: {exc}") from None
            except (StepRejected, RequestRejected) as exc:
                raise Rejected(exc.status, str(exc)) from None
        except Rejected:
            self.stats.count_rejected()
            raise
        stats = self.stats
        with stats.lock:
            stats.calls += 1
            stats.rows += rows
            stats.bytes_in += len(body)
            stats.bytes_out += n
            stats.compute_s += time.perf_counter() - started
        return n

    def _split(self, body, sink: Sink, in_place: bool, session) -> tuple[int, int]:
        req = decode_request(body, copy=not in_place)
        self._admit(req.session, req.seq, session, "frame")
        rows, cols = self.split.output_shape(req)
        dtype = req.payload.dtype if req.kind != KIND_EMBED else self.split.tensors[req.tensor_ids[0]].left.dtype
        size = reply_size(dtype, rows, cols)
        out = reply_into(sink(size), dtype, rows, cols, self.instance)
        self.split.run(req, out)
        return size, rows

    def _shielded(self, endpoint: int, body, sink: Sink, session) -> int:
        svc = self.shielded
        if endpoint == EP_SHIELDED_STEP:
            frame = decode_shielded_step(body)
            self._admit(frame.session, frame.seq, session, "step")
            reply = svc.start_step(frame)
        elif endpoint == EP_SHIELDED_GEMM:
            reply = svc.answer(decode_shielded_message(body, expect_kind=MSG_ANSWER))
        else:
            reply = svc.logits(decode_shielded_message(body, expect_kind=MSG_ROWS))
        buf = sink(len(reply))
        buf[:len(reply)] = reply
        return len(reply)
