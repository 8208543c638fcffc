"""TRUSTED side: the data plane of protocol ``shielded`` in the secure service (HTTP, binary frames).

What this module owns
---------------------
``ShieldedService``: turns the ``ShieldedExecutor``'s synchronous step (which calls the host back
for every masked GEMM) into a request/response exchange with the untrusted host, and the two
endpoints that expose it (mounted by ``app.create_app`` when the bundle's protocol is shielded):

  POST /v1/shielded/step   body: a step frame (``wire.encode_shielded_step``): the batch metadata of
                           one engine step.  Answer: a MSG_ASK message (step id, call 0, layer key,
                           x~ int64 [T, n]).
  POST /v1/shielded/gemm   body: a MSG_ANSWER message (step id, call index, layer key, y~ int64
                           [T, m] = W_q[key] x~ mod p).  Answer: the next MSG_ASK, or MSG_LOGITS
                           (float32 [R, vocab]) when the step is complete, or MSG_READY for a
                           deferred step whose layers are done.
  POST /v1/shielded/logits body: a MSG_ROWS message (the ready step's id, the next call index, rows
                           int64 [1, R]).  Answer: MSG_ASK for the LM head, then (after its
                           answer) MSG_LOGITS [R, vocab].  Allowed any number of times until the
                           next step starts: vLLM's runner asks for the sampling rows first and
                           then, per request that wants them, for prompt-logprob rows.

Protocol of one step (the host sees only x~, which is uniform in Z_p, and the final logits):
  1. host -> service: the step frame; the session's sequence number must increase (409 otherwise).
     A step still in flight is aborted first (its KV writes rolled back by the executor).
  2. service: a worker thread runs ``ShieldedExecutor.step``; at each masked GEMM it masks the
     activations (one fresh mask row per token row) and hands (key, x~) to the request handler,
     which answers it to the host.
  3. host -> service: y~ for that (step, call, key).  Checked before the executor sees it: the step
     id must be the one in flight, the call index the next one, the key the one asked for (409
     otherwise, the step stays in flight) and y~ of shape [T, m] (422).  The executor then checks y~
     in [0, p) and by Freivalds; on failure the step is aborted (KV rolled back, masks destroyed),
     the alarm counter rises (``/v1/stats``) and the host gets 422 "integrity: ...".
  4. repeat 2-3 (4 calls per decoder layer + the LM head) until the executor returns the logits;
     they go to the host in plaintext for its sampler (black-box output).
     Deferred step (the vLLM integration): the frame asks for no logits; after the last layer the
     service keeps the final-normed hidden rows of the step (secret, never sent) and answers
     MSG_READY; each later MSG_ROWS runs the masked LM head on the chosen rows (steps 2-3 once)
     and returns their logits.  The next step frame discards the kept rows.

Concurrency: the executor owns one KV cache, so ONE step is in flight per service at a time; the
handlers are serialized by a lock.  A step whose host stops answering is aborted after
``SLIP_SHIELDED_STEP_TIMEOUT_S``.

Where it runs and what it holds: inside the secure service; everything secret stays in the
executor (factors, scales, norms, biases, embedding, masks, Freivalds vectors, KV cache).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from typing import Optional

import torch

from secure_service.integrity import IntegrityError
from secure_service.masks import MaskAuditRecorder
from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.core.wire import (
    MSG_ASK, MSG_LOGITS, MSG_READY, ShieldedMessage, ShieldedStep, encode_shielded_message,
)

log = logging.getLogger("slip.service")

__all__ = ["StepRejected", "ShieldedService"]

_ABORT = object()


class StepRejected(Exception):
    """A shielded request the service refuses; carries the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Aborted(Exception):
    pass


class _Ready:
    """A deferred step whose layers are done: its final-normed hidden rows (secret) await MSG_ROWS."""

    def __init__(self, step_id: int, hidden: torch.Tensor, next_call: int):
        self.id = step_id
        self.hidden = hidden
        self.next_call = next_call


class _Run:
    def __init__(self, step_id: Optional[int] = None, ready: Optional[_Ready] = None) -> None:
        self.id = secrets.randbits(63) | 1 if step_id is None else step_id
        self.ready = ready  # set for an LM-head run of a ready step
        self.asks: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.call = -1
        self.key: Optional[str] = None
        self.rows = 0
        self.thread: Optional[threading.Thread] = None


class ShieldedService:
    """One executor, one step in flight at a time (see the module docstring)."""

    def __init__(self, bundle_dir, *, num_blocks: int, block_size: int, timeout_s: float = 60.0,
                 pool_rows: Optional[int] = None, mask_audit: bool = False):
        """mask_audit: fingerprint every mask row handed out (``MaskAuditRecorder``) and report the
        audit in ``stats()`` (rows, unique rows, repeats)."""
        self.audit = MaskAuditRecorder() if mask_audit else None
        self.executor = ShieldedExecutor.from_bundle(bundle_dir, num_blocks=num_blocks, block_size=block_size,
                                                     pool_rows=pool_rows, mask_recorder=self.audit)
        self.timeout_s = float(timeout_s)
        self.shapes = {k: tuple(w.shape) for k, w in self.executor.public_weights().items()}
        self._lock = threading.Lock()
        self._run: Optional[_Run] = None
        self._ready: Optional[_Ready] = None
        self._counts = {"steps_started": 0, "steps_completed": 0, "steps_aborted": 0, "steps_refused": 0,
                        "host_calls": 0, "masked_rows": 0, "logits_requests": 0}

    # -- public facts --------------------------------------------------------------------------

    def info(self) -> dict:
        ex = self.executor
        return {"p": ex.p, "masked_gemms_per_step": len(ex.layer_keys()), "kv_blocks": ex.cache.num_blocks,
                "block_size": ex.cache.block_size, "steps_in_flight_max": 1}

    def stats(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        alarms = self.executor.alarms.snapshot()
        masks = self.executor.masks.stats() if self.executor.masks is not None else {}
        out = {**counts, "integrity_alarms": alarms["count"], "alarms_per_layer": alarms["per_layer"],
               "masks": masks}
        if self.audit is not None:
            out["mask_audit"] = {"rows_recorded": self.audit.rows_recorded, "unique_rows": self.audit.unique_rows,
                                 "repeats": len(self.audit.duplicates)}
        return out

    # -- the worker ------------------------------------------------------------------------------

    def _work(self, run: _Run, task) -> None:
        """Run ``task(host_gemm) -> (event kind, tensor)`` in the worker thread, reporting its
        asks and its end through ``run.asks``."""

        def host(key: str, x_masked: torch.Tensor) -> torch.Tensor:
            run.asks.put(("ask", key, x_masked))
            try:
                y = run.answers.get(timeout=self.timeout_s)
            except queue.Empty:
                raise _Aborted(f"no host answer within {self.timeout_s:g} s") from None
            if y is _ABORT:
                raise _Aborted("aborted")
            return y

        try:
            run.asks.put(task(host))
        except IntegrityError as exc:
            run.asks.put(("integrity", exc))
        except _Aborted as exc:
            run.asks.put(("aborted", exc))
        except (ValueError, IndexError) as exc:
            run.asks.put(("invalid", exc))
        except BaseException as exc:  # a bug: reported as 500, the service stays up
            log.exception("shielded step failed")
            run.asks.put(("error", exc))

    def _abort_locked(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        run.answers.put(_ABORT)
        if run.thread is not None:
            run.thread.join(timeout=self.timeout_s)
        self._counts["steps_aborted"] += 1

    def _next_locked(self, run: _Run) -> bytes:
        """Wait for the worker's next event and turn it into the reply (or a refusal)."""
        try:
            event = run.asks.get(timeout=self.timeout_s)
        except queue.Empty:
            self._abort_locked()
            raise StepRejected(503, "the step did not progress in time and was aborted") from None
        kind = event[0]
        if kind == "ask":
            _, key, x_masked = event
            run.call += 1
            run.key, run.rows = key, int(x_masked.shape[0])
            self._counts["host_calls"] += 1
            self._counts["masked_rows"] += run.rows
            return encode_shielded_message(MSG_ASK, run.id, run.call, key, x_masked)
        self._run = None
        if run.thread is not None:
            run.thread.join(timeout=self.timeout_s)
        if kind == "ready":
            self._counts["steps_completed"] += 1
            hidden = event[1]
            self._ready = _Ready(run.id, hidden, run.call + 1)
            rows = torch.tensor([[int(hidden.shape[0])]], dtype=torch.int64)
            return encode_shielded_message(MSG_READY, run.id, run.call + 1, "", rows)
        if kind == "logits":
            if run.ready is None:
                self._counts["steps_completed"] += 1
            else:
                run.ready.next_call = run.call + 1
            logits = event[1].to(torch.float32)
            return encode_shielded_message(MSG_LOGITS, run.id, run.call + 1, "", logits)
        if run.ready is not None:
            self._ready = None  # a refused LM head leaves nothing to ask again: fail closed
        if kind == "integrity":
            self._counts["steps_aborted"] += 1
            raise StepRejected(422, f"integrity: {event[1]}; the step was aborted and its KV writes rolled back")
        if kind == "invalid":
            self._counts["steps_refused"] += 1
            raise StepRejected(422, f"invalid step: {event[1]}")
        self._counts["steps_aborted"] += 1
        if kind == "aborted":  # the worker gave up waiting for this host's answer
            raise StepRejected(409, f"step aborted: {event[1]}")
        raise StepRejected(500, "internal error in the shielded step (see the service log)")

    # -- the two calls ---------------------------------------------------------------------------

    def start_step(self, frame: ShieldedStep) -> bytes:
        n = int(frame.input_ids.shape[0])
        if n > self.executor.cache.num_slots or int(frame.seq_lens.shape[0]) > n:
            raise StepRejected(422, f"a step holds 1..{self.executor.cache.num_slots} tokens (the KV cache's "
                                    f"slots) and at most one sequence per token")
        li = frame.logits_indices
        if li is not None and (int(li.min()) < 0 or int(li.max()) >= n):
            raise StepRejected(422, f"logits_indices must lie in [0, {n})")
        ex = self.executor
        if frame.defer_logits:
            def task(host):
                return ("ready", ex.forward_layers(frame.input_ids, frame.positions, frame.slot_mapping,
                                                   frame.query_start_loc, frame.seq_lens, frame.block_tables,
                                                   host_gemm=host))
        else:
            def task(host):
                return ("logits", ex.step(frame.input_ids, frame.positions, frame.slot_mapping,
                                          frame.query_start_loc, frame.seq_lens, frame.block_tables,
                                          host_gemm=host, logits_indices=frame.logits_indices))
        with self._lock:
            self._abort_locked()
            self._ready = None
            run = _Run()
            run.thread = threading.Thread(target=self._work, args=(run, task), name="slip-shielded-step",
                                          daemon=True)
            self._run = run
            self._counts["steps_started"] += 1
            run.thread.start()
            return self._next_locked(run)

    def logits(self, msg: ShieldedMessage) -> bytes:
        """MSG_ROWS for the ready step: run the masked LM head on those rows (see the docstring)."""
        with self._lock:
            ready = self._ready
            if ready is None or msg.step != ready.id:
                raise StepRejected(409, f"no ready step {msg.step:#x} (unknown, superseded, or its layers "
                                        f"are still running)")
            if self._run is not None:
                raise StepRejected(409, "a logits request of this step is still in flight")
            if msg.call != ready.next_call:
                raise StepRejected(409, f"replayed or out-of-order request: call {msg.call}, "
                                        f"expected {ready.next_call}")
            rows = msg.payload.reshape(-1)
            n = int(ready.hidden.shape[0])
            if msg.payload.shape[0] != 1 or int(rows.min()) < 0 or int(rows.max()) >= n:
                raise StepRejected(422, f"rows must be one row of token indices in [0, {n})")
            hidden_rows = ready.hidden[rows]
            ex = self.executor
            run = _Run(step_id=ready.id, ready=ready)
            run.call = ready.next_call - 1
            run.thread = threading.Thread(target=self._work, args=(run, lambda host: ("logits", ex.head(hidden_rows, host))),
                                          name="slip-shielded-head", daemon=True)
            self._run = run
            self._counts["logits_requests"] += 1
            run.thread.start()
            return self._next_locked(run)

    def answer(self, msg: ShieldedMessage) -> bytes:
        with self._lock:
            run = self._run
            if run is None or msg.step != run.id:
                raise StepRejected(409, f"no step {msg.step:#x} in flight (finished, aborted or unknown)")
            if msg.call != run.call:
                raise StepRejected(409, f"replayed or out-of-order answer: call {msg.call}, expected {run.call}")
            if msg.key not in self.shapes:
                raise StepRejected(404, f"unknown layer key {msg.key!r}")
            if msg.key != run.key:
                raise StepRejected(409, f"answer for layer {msg.key!r}; the service asked for {run.key!r}")
            want = (run.rows, self.shapes[msg.key][0])
            if tuple(msg.payload.shape) != want:
                raise StepRejected(422, f"answer has shape {tuple(msg.payload.shape)}, expected {want}")
            run.answers.put(msg.payload)
            return self._next_locked(run)

    def close(self) -> None:
        with self._lock:
            self._abort_locked()
        self.executor.close()
