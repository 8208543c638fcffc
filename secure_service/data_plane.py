"""TRUSTED side: the data plane of the secure service, whatever carries its bytes.

What this module owns
---------------------
``DataPlane.handle(endpoint, body, sink)``: one data-plane call, from a request body to a reply
written into space the transport provides, or ``Rejected(status, message)``.  Both transports
(``secure_service.transport``: HTTP endpoints and the shared-memory channel) call it, so the checks
are the same on both: protocol gate, strict decoding, per-session sequence numbers (replays and
reordering answer 409), the bundle's ids, shapes and values, the licence of the caller and its
budgets (``secure_service.metering``), and the counters of ``/metrics`` and ``/v1/stats``
(``secure_service.metrics``).  It knows endpoints and frames (``slip_vllm.core.wire``), never
sockets or shared memory.

Order of one call: 1. protocol gate; 2. the caller's licence (``Metering.resolve``: 401/402/403,
before any decoding); 3. strict decoding and the session's sequence number; 4. the frame's session
against the licence's max_sessions and the call's budget units reserved (``Metering.reserve``,
402); 5. compute into the reply; 6. usage committed (written to the usage log before the reply
when the call returns logits), counters.  A refusal at any step releases the reservation; an
integrity failure of a shielded answer (422 "integrity: ...") is also an alarm of the caller's
licence (the alarm policy may lock it out).

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
from secure_service.metering import Metering, Refused
from secure_service.metrics import ServiceMetrics, stats_snapshot
from secure_service.shielded_api import StepRejected
from secure_service.split_executor import RequestRejected, SplitExecutor
from slip_vllm.core.wire import (
    EP_SHIELDED_GEMM, EP_SHIELDED_LOGITS, EP_SHIELDED_STEP, EP_SPLIT_APPLY, KIND_EMBED, KIND_LINEAR, MSG_ANSWER, MSG_ROWS,
    WireError,
    decode_request, decode_shielded_message, decode_shielded_step, reply_into, reply_size,
)

MAX_SESSIONS = 4096
METERED_SESSIONS = 256  # split sessions metered one by one in /v1/stats (most recent first out)
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
        # calls, rows, bytes, refusals and latency per endpoint live in the Prometheus registry
        # (``/metrics``); snapshot() sums them for /v1/stats
        self.metrics = ServiceMetrics()
        # per split session (one per vLLM worker process: every rank of every engine has its own):
        # [calls, rows, bytes_in, bytes_out], so engines sharing one service are metered apart
        self.sessions: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    def count_session(self, session: int, rows: int, bytes_in: int, bytes_out: int) -> None:
        with self.lock:
            meter = self.sessions.get(session)
            if meter is None:
                meter = self.sessions[session] = [0, 0, 0, 0]
                while len(self.sessions) > METERED_SESSIONS:
                    self.sessions.popitem(last=False)
            meter[0] += 1
            meter[1] += rows
            meter[2] += bytes_in
            meter[3] += bytes_out

    def snapshot(self) -> dict:
        with self.lock:
            sessions = {f"{s:#x}": {"calls": c, "rows": r, "bytes_in": bi, "bytes_out": bo}
                        for s, (c, r, bi, bo) in self.sessions.items()}
            return {**stats_snapshot(self.metrics),
                    "sessions": sessions}

    def count_rejected(self, endpoint="http", status: int = 0) -> None:
        self.metrics.count_rejected(endpoint, status)


NO_UNITS: dict = {}


class DataPlane:
    """See the module docstring.  ``shielded``: the ``ShieldedService`` of a shielded bundle."""

    def __init__(self, bundle: Bundle, shielded=None, instance: int = 0, metering: Optional[Metering] = None):
        """instance: this service process's id (``/v1/info``), written into every split reply
        (the shielded service writes its own, with the KV epoch, into its messages).
        metering: licences, budgets and usage (default: one anonymous account, no log)."""
        self.bundle = bundle
        self.instance = instance
        self.split = SplitExecutor(bundle)
        self.shielded = shielded
        self.sessions = SessionGuard()
        self.stats = Stats()
        self.metering = metering or Metering(manifest_sha256=bundle.manifest_sha256)
        # split: the tensors whose KIND_LINEAR rows are logits (the LM head; the embedding when tied)
        self._logit_tensors = {i for i, t in enumerate(bundle.tensors) if t.entry.kind in ("lm_head", "embedding")}

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
               session: Optional[int] = None, credential: Optional[str] = None) -> int:
        """One call; returns the length of the reply written into ``sink(n)``.  session: the
        session a channel was attached with (its frames must carry it); None over HTTP.
        credential: the SHA-256 of the caller's licence key (ignored without licences)."""
        started = time.perf_counter()
        call = _Call(self.metering)
        try:
            self._gate(endpoint)
            try:
                call.account = self.metering.resolve(credential, session)
                if endpoint == EP_SPLIT_APPLY:
                    n, rows = self._split(body, sink, in_place, session, call, credential)
                else:
                    n, rows = self._shielded(endpoint, body, sink, session, call, credential), 0
            except WireError as exc:
                raise Rejected(400, f"bad frame: {exc}") from None
            except (StepRejected, RequestRejected) as exc:
                if exc.status == 422 and str(exc).startswith("integrity:"):
                    self.metering.alarm(call.account, session, str(exc))
                raise Rejected(exc.status, str(exc)) from None
            except Refused as exc:
                raise Rejected(exc.status, exc.message) from None
        except Rejected as exc:
            call.release()
            self.metering.count_refused(call.account)
            self.stats.count_rejected(endpoint, exc.status)
            raise
        except BaseException:
            call.release()
            raise
        self.metering.commit(call.account, call.reserved, rows=rows, bytes_in=len(body), bytes_out=n)
        self.stats.metrics.record(endpoint, rows, len(body), n, time.perf_counter() - started)
        return n

    def _charge(self, call: "_Call", session: Optional[int], credential, units: dict) -> None:
        """Step 4 of the module docstring, once the frame is decoded: the frame's session must fit
        the licence's max_sessions, and the call's units what is left of its budgets."""
        try:
            if self.metering.licensed and session is not None:
                self.metering.resolve(credential, session)
            if units:
                call.reserved = self.metering.reserve(call.account, units)
        except Refused as exc:
            raise Rejected(exc.status, exc.message) from None

    def _split_units(self, req, rows: int) -> dict:
        """Budget units of a split call (the rule in ``secure_service.metering``); of a tensor-
        parallel request only the first shard counts."""
        ranges = getattr(req, "ranges", None)
        if ranges and ranges[0][0] != 0:
            return NO_UNITS
        if req.kind == KIND_EMBED:
            return {"input_tokens": rows, "steps": 1}
        if req.kind == KIND_LINEAR and len(req.tensor_ids) == 1 and req.tensor_ids[0] in self._logit_tensors:
            return {"generated_tokens": rows}
        return NO_UNITS

    def _split(self, body, sink: Sink, in_place: bool, session, call, credential) -> tuple[int, int]:
        req = decode_request(body, copy=not in_place)
        self._admit(req.session, req.seq, session, "frame")
        rows, cols = self.split.output_shape(req)
        self._charge(call, req.session, credential, self._split_units(req, rows))
        dtype = req.payload.dtype if req.kind != KIND_EMBED else self.split.tensors[req.tensor_ids[0]].left.dtype
        size = reply_size(dtype, rows, cols)
        out = reply_into(sink(size), dtype, rows, cols, self.instance)
        self.split.run(req, out)
        self.stats.count_session(req.session, rows, len(body), size)
        return size, rows

    def _shielded(self, endpoint: int, body, sink: Sink, session, call, credential) -> int:
        svc = self.shielded
        if endpoint == EP_SHIELDED_STEP:
            frame = decode_shielded_step(body)
            self._admit(frame.session, frame.seq, session, "step")
            n_tok = int(frame.input_ids.shape[0])
            units = {"input_tokens": n_tok, "steps": 1}
            if not frame.defer_logits:  # the step's last answer returns its logits
                li = frame.logits_indices
                units["generated_tokens"] = n_tok if li is None else int(li.numel())
            self._charge(call, frame.session, credential, units)
            reply = svc.start_step(frame)
        elif endpoint == EP_SHIELDED_GEMM:
            reply = svc.answer(decode_shielded_message(body, expect_kind=MSG_ANSWER))
        else:
            msg = decode_shielded_message(body, expect_kind=MSG_ROWS)
            self._charge(call, None, credential, {"generated_tokens": int(msg.payload.numel())})
            reply = svc.logits(msg)
        buf = sink(len(reply))
        buf[:len(reply)] = reply
        return len(reply)


class _Call:
    """The licence account and the budget units reserved by one call in flight."""

    __slots__ = ("metering", "account", "reserved")

    def __init__(self, metering: Metering):
        self.metering = metering
        self.account = None
        self.reserved = NO_UNITS

    def release(self) -> None:
        if self.account is not None and self.reserved:
            self.metering.release(self.account, self.reserved)
            self.reserved = NO_UNITS
