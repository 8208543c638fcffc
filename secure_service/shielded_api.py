"""TRUSTED side: the data plane of protocol ``shielded`` in the secure service (HTTP, binary frames).

What this module owns
---------------------
``ShieldedService``: turns the ``ShieldedExecutor``'s step generators (which yield one (layer key,
x~) per masked GEMM and are resumed with the host's y~) into a request/response exchange with the
untrusted host, and the two endpoints that expose it (mounted by ``app.create_app`` when the
bundle's protocol is shielded):

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
                           At most as many rows as the step has tokens, each in range
                           (``step_checks.check_rows``: 413/422).

Protocol of one step (the host sees only x~, which is uniform in Z_p, and the final logits):
  1. host -> service: the step frame; the session's sequence number must increase (409 otherwise).
     Its metadata is bound and capped by ``step_checks.check_step`` (tokens per step, block-table
     width, seq_len <= max_model_len, positions, slot_mapping == the block-table slot; 413/422)
     before anything else; the KV slots it reads are checked by the executor when the step starts
     (written in this KV epoch, for that position and token prefix; 422).
     A step still in flight is aborted first: its generator is closed, which rolls its KV writes
     back and destroys its pending masks before the new step runs.
  2. service: the step's generator (``ShieldedExecutor.step_gen`` / ``forward_layers_gen`` /
     ``head_gen``) is advanced in the request's own thread until its next masked GEMM: it masks the
     activations (one fresh mask row per token row) and yields (key, x~), which is the reply.
  3. host -> service: y~ for that (step, call, key).  Checked before the executor sees it: the step
     id must be the one in flight, the call index the next one, the key the one asked for (409
     otherwise, the step stays in flight) and y~ of shape [T, m] (422).  It is then sent into the
     generator, which checks y~ in [0, p) and by Freivalds; on failure the step is aborted (KV
     rolled back, masks destroyed), the alarm counter rises (``/v1/stats``) and the host gets 422
     "integrity: ...".  Otherwise the generator runs on to its next ask (step 2).
  4. repeat 2-3 (4 calls per decoder layer + the LM head) until the generator returns the logits;
     they go to the host in plaintext for its sampler (black-box output), through the service's
     logits policy (``logits_policy.LogitsPolicy``: ``full``, or only the top-K logits per row).
     Deferred step (the vLLM integration): the frame asks for no logits; after the last layer the
     service keeps the final-normed hidden rows of the step (secret, never sent) and answers
     MSG_READY; each later MSG_ROWS runs the masked LM head on the chosen rows (steps 2-3 once)
     and returns their logits.  The next step frame discards the kept rows.

Concurrency and time-outs: there are no worker threads and no queues.  The executor owns one KV
cache, so ONE step is in flight per service: ``_run`` holds its generator, and one lock serializes
the handlers (each advances the generator at most to its next ask, so the lock is held for one
stretch of service compute, never while waiting for the host).  A step whose host stops answering
(``timeout_s`` + ``timeout_per_row_s`` x the rows of the ask waiting for its answer;
``SLIP_SHIELDED_STEP_TIMEOUT_S``, ``SLIP_SHIELDED_STEP_TIMEOUT_PER_ROW_S``: a prefill of thousands
of rows takes the host longer than a decode) is aborted lazily: the next call of any endpoint
that finds the step in flight idle (no ask answered) for longer than that closes its
generator (roll-back) before doing anything else, and an answer for that step gets 409 "step
aborted: ...".  Until then the idle step holds only its own pending masks and KV writes, which no
other step can observe, since any other step must first go through this service's lock and abort
it.  A new step frame aborts the step in flight whatever its age.

One engine per service: the executor's KV cache mirrors ONE vLLM engine's paged cache.  The step
frame names the service instance and KV epoch of the host's view; epoch 0 claims the service for
the frame's session (refused with 409 while another engine's lease runs, ``owner_lease_s`` after its
last frame), empties the KV cache and starts a new epoch.  A frame for another instance or epoch,
or from a session that does not hold the service, is refused with 410 "stale KV view" before it
touches anything: a restarted service (new instance, empty cache) or one claimed by another engine
is never read as if it held this engine's KV.  Every reply carries (instance, epoch).

Where it runs and what it holds: inside the secure service; everything secret stays in the
executor (factors, scales, norms, biases, embedding, masks, Freivalds vectors, KV cache).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Optional

import torch

from secure_service.integrity import IntegrityError
from secure_service.logits_policy import LogitsPolicy
from secure_service.masks import MaskAuditRecorder
from secure_service.shielded_executor import ShieldedExecutor, StepGen
from secure_service.step_checks import StepLimits, StepRejected, check_rows, check_step
from slip_vllm.core.wire import (
    MSG_ASK, MSG_LOGITS, MSG_READY, ShieldedMessage, ShieldedStep, encode_shielded_message,
)

log = logging.getLogger("slip.service")

__all__ = ["StepRejected", "ShieldedService"]


class _Ready:
    """A deferred step whose layers are done: its final-normed hidden rows (secret) await MSG_ROWS."""

    def __init__(self, step_id: int, hidden: torch.Tensor, next_call: int):
        self.id = step_id
        self.hidden = hidden
        self.next_call = next_call


class _Run:
    """The step (or LM-head request) in flight: its generator and the ask the host must answer."""

    def __init__(self, gen: StepGen, kind: str, step_id: Optional[int] = None, ready: Optional[_Ready] = None,
                 call: int = -1) -> None:
        self.gen = gen
        self.kind = kind    # "step" (logits at the end), "layers" (deferred: MSG_READY) or "head"
        self.id = secrets.randbits(63) | 1 if step_id is None else step_id
        self.ready = ready  # the ready step of a "head" run
        self.call = call    # index of the last ask sent
        self.key: Optional[str] = None
        self.rows = 0
        self.last = time.monotonic()  # when the last ask was sent (or the run was created)


class ShieldedService:
    """One executor, one step in flight at a time (see the module docstring)."""

    def __init__(self, bundle_dir, *, num_blocks: int, block_size: int, timeout_s: float = 60.0,
                 pool_rows: Optional[int] = None, mask_audit: bool = False, owner_lease_s: float = 60.0,
                 instance: int = 0, timeout_per_row_s: float = 0.0, max_model_len: int = 0,
                 max_step_tokens: int = 8192, logits_policy: Optional[LogitsPolicy] = None):
        """mask_audit: fingerprint every mask row handed out (``MaskAuditRecorder``) and report the
        audit in ``stats()`` (rows, unique rows, repeats).  instance: the service process's id
        (random if 0); owner_lease_s: see "One engine per service" in the module docstring.
        bundle_dir: the secret bundle's directory, or the ``bundle.Bundle`` the caller loaded (and
        hashed) already, so it is loaded once.  timeout_s + timeout_per_row_s * rows: how long an
        ask of that many rows waits for the host's answer.  max_model_len (0: the model's
        max_position_embeddings) and max_step_tokens: the caps of ``step_checks.StepLimits``.
        logits_policy: what every MSG_LOGITS reply lets out (None: ``full``, for in-process use;
        the service app passes ``SLIP_SHIELDED_LOGITS_POLICY``, default ``topk``)."""
        self.logits_policy = logits_policy if logits_policy is not None else LogitsPolicy("full")
        self.audit = MaskAuditRecorder() if mask_audit else None
        self.executor = ShieldedExecutor.from_bundle(bundle_dir, num_blocks=num_blocks, block_size=block_size,
                                                     pool_rows=pool_rows, mask_recorder=self.audit,
                                                     max_model_len=max_model_len)
        if timeout_s <= 0 or timeout_per_row_s < 0:
            raise ValueError("the step timeout must be > 0 s and its per-row part >= 0 s")
        self.timeout_s = float(timeout_s)
        self.timeout_per_row_s = float(timeout_per_row_s)
        self.limits = StepLimits(num_blocks=self.executor.cache.num_blocks, block_size=self.executor.cache.block_size,
                                 max_model_len=self.executor.max_model_len, max_step_tokens=int(max_step_tokens),
                                 vocab=self.executor.vocab)
        self.shapes = {k: tuple(w.shape) for k, w in self.executor.public_weights().items()}
        self._lock = threading.Lock()          # the step in flight, the ready step
        self._counts_lock = threading.Lock()   # the counters (so stats() never waits for compute)
        self._run: Optional[_Run] = None
        self._ready: Optional[_Ready] = None
        self.instance = int(instance) or (secrets.randbits(63) | 1)
        self.epoch = 0                         # 0: no engine has claimed the KV cache yet
        self.owner: Optional[int] = None       # the session of the engine that holds it
        self.owner_seen = 0.0
        self.owner_lease_s = float(owner_lease_s)
        self._counts = {"steps_started": 0, "steps_completed": 0, "steps_aborted": 0, "steps_refused": 0,
                        "host_calls": 0, "masked_rows": 0, "logits_requests": 0, "claims": 0,
                        "claims_refused": 0, "stale_steps": 0}

    # -- public facts --------------------------------------------------------------------------

    def info(self) -> dict:
        ex = self.executor
        return {"p": ex.p, "masked_gemms_per_step": len(ex.layer_keys()), "kv_blocks": ex.cache.num_blocks,
                "block_size": ex.cache.block_size, "steps_in_flight_max": 1, "max_model_len": self.limits.max_model_len,
                "step_timeout_s": self.timeout_s, "step_timeout_per_row_s": self.timeout_per_row_s,
                "logits_policy": self.logits_policy.describe()}

    def step_timeout(self, rows: int) -> float:
        """Seconds an ask of ``rows`` token rows may wait for its answer: timeout_s + timeout_per_row_s * rows."""
        return self.timeout_s + self.timeout_per_row_s * rows

    def identity(self) -> dict:
        """Public: who answers, which KV epoch, and whether an engine holds the service now."""
        idle = time.monotonic() - self.owner_seen
        held = self.owner is not None and idle < self.owner_lease_s
        return {"instance": self.instance, "kv_epoch": self.epoch, "engine_attached": held,
                "owner_lease_s": self.owner_lease_s}

    def stats(self) -> dict:
        with self._counts_lock:
            counts = dict(self._counts)
        alarms = self.executor.alarms.snapshot()
        masks = self.executor.masks.stats() if self.executor.masks is not None else {}
        out = {**counts, "integrity_alarms": alarms["count"], "alarms_per_layer": alarms["per_layer"],
               "masks": masks}
        if self.audit is not None:
            out["mask_audit"] = {"rows_recorded": self.audit.rows_recorded, "unique_rows": self.audit.unique_rows,
                                 "repeats": len(self.audit.duplicates)}
        return out

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    # -- the step in flight (all under self._lock) ------------------------------------------------

    def _abort_locked(self) -> None:
        """Abort the run in flight (if any): closing its generator rolls the step's KV writes back
        and destroys its pending masks, synchronously.  An aborted LM-head request also drops the
        ready step's rows (fail closed: nothing is left to ask again)."""
        run, self._run = self._run, None
        if run is None:
            return
        if run.ready is not None:
            self._ready = None
        self._count("steps_aborted")
        run.gen.close()

    def _expire_locked(self) -> Optional[_Run]:
        """Abort the run in flight if it has been idle for longer than ``timeout_s``; returns it."""
        run = self._run
        if run is not None and time.monotonic() - run.last > self.step_timeout(run.rows):
            log.warning("shielded step %#x: no host answer within %g s, aborted", run.id, self.step_timeout(run.rows))
            self._abort_locked()
            return run
        return None

    def _claim_locked(self, frame: ShieldedStep) -> None:
        """One engine per service, and no step on a KV view the service does not hold.

        epoch 0 in the frame claims the service: refused (409) while another engine's lease runs;
        else the caller becomes the holder, the KV cache is emptied (nothing of an earlier epoch can
        be read) and a new epoch begins.  Any other frame must name this instance, the current
        epoch and come from the holder, else 410: the host's view is stale (the service restarted,
        or another engine claimed it since) and it must reset and claim again."""
        now = time.monotonic()
        if frame.epoch == 0:
            if self.owner is not None and self.owner != frame.session and now - self.owner_seen < self.owner_lease_s:
                self._count("claims_refused")
                raise StepRejected(409, f"another engine holds this shielded service (its KV cache serves one engine; "
                                        f"last seen {now - self.owner_seen:.0f} s ago, released after "
                                        f"{self.owner_lease_s:g} s of silence): start one secure service per vLLM "
                                        f"engine")
            self._abort_locked()
            self._ready = None
            self.executor.cache.reset()
            self.epoch += 1
            if self.owner != frame.session:
                log.info("shielded service claimed by session %#x (KV epoch %d)", frame.session, self.epoch)
            self.owner = frame.session
            self._count("claims")
        elif frame.instance != self.instance or frame.epoch != self.epoch or frame.session != self.owner:
            self._count("stale_steps")
            raise StepRejected(410, f"stale KV view: this service is instance {self.instance:#x} at KV epoch "
                                    f"{self.epoch}, the step was built for instance {frame.instance:#x} epoch "
                                    f"{frame.epoch} (the service restarted, or another engine claimed it): reset "
                                    f"and claim again")
        self.owner_seen = now

    def _message(self, kind: int, step: int, call: int, key: str, payload: torch.Tensor) -> bytes:
        return encode_shielded_message(kind, step, call, key, payload, instance=self.instance, epoch=self.epoch)

    def _advance_locked(self, run: _Run, y: Optional[torch.Tensor]) -> bytes:
        """Resume ``run``'s generator (with the host's answer y, or start it) up to its next ask or
        its end, and turn that into the reply (or a refusal)."""
        try:
            key, x_masked = next(run.gen) if y is None else run.gen.send(y)
        except StopIteration as stop:
            return self._finish_locked(run, stop.value)
        except BaseException as exc:
            # the generator has already rolled its step back and destroyed its masks
            self._run = None
            if run.ready is not None:
                self._ready = None  # a refused LM head leaves nothing to ask again: fail closed
            if isinstance(exc, IntegrityError):
                self._count("steps_aborted")
                raise StepRejected(422, f"integrity: {exc}; the step was aborted and its KV writes "
                                        f"rolled back") from None
            if isinstance(exc, (ValueError, IndexError)):
                self._count("steps_refused")
                raise StepRejected(422, f"invalid step: {exc}") from None
            self._count("steps_aborted")
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: not ours to swallow
            log.exception("shielded step failed")  # a bug: reported as 500, the service stays up
            raise StepRejected(500, "internal error in the shielded step (see the service log)") from None
        run.call += 1
        run.key, run.rows = key, int(x_masked.shape[0])
        run.last = self.owner_seen = time.monotonic()
        self._count("host_calls")
        self._count("masked_rows", run.rows)
        return self._message(MSG_ASK, run.id, run.call, key, x_masked)

    def _finish_locked(self, run: _Run, result: torch.Tensor) -> bytes:
        self._run = None
        if run.kind == "layers":
            self._count("steps_completed")
            self._ready = _Ready(run.id, result, run.call + 1)
            rows = torch.tensor([[int(result.shape[0])]], dtype=torch.int64)
            return self._message(MSG_READY, run.id, run.call + 1, "", rows)
        if run.kind == "step":
            self._count("steps_completed")
        else:
            run.ready.next_call = run.call + 1
        return self._message(MSG_LOGITS, run.id, run.call + 1, "", self.logits_policy.apply(result))

    # -- the three calls -------------------------------------------------------------------------

    def start_step(self, frame: ShieldedStep) -> bytes:
        check_step(frame, self.limits)  # metadata bound and capped (slots, sequences, logits rows) first
        ex = self.executor
        batch = (frame.input_ids, frame.positions, frame.slot_mapping, frame.query_start_loc, frame.seq_lens,
                 frame.block_tables)
        with self._lock:
            self._claim_locked(frame)
            self._abort_locked()  # rolled back before the new step touches the cache
            self._ready = None
            if frame.defer_logits:
                run = _Run(ex.forward_layers_gen(*batch), "layers")
            else:
                run = _Run(ex.step_gen(*batch, logits_indices=frame.logits_indices), "step")
            self._run = run
            self._count("steps_started")
            return self._advance_locked(run, None)

    def logits(self, msg: ShieldedMessage) -> bytes:
        """MSG_ROWS for the ready step: run the masked LM head on those rows (see the docstring)."""
        with self._lock:
            self._expire_locked()
            ready = self._ready
            if ready is None or msg.step != ready.id:
                raise StepRejected(409, f"no ready step {msg.step:#x} (unknown, superseded, or its layers "
                                        f"are still running)")
            if self._run is not None:
                raise StepRejected(409, "a logits request of this step is still in flight")
            if msg.call != ready.next_call:
                raise StepRejected(409, f"replayed or out-of-order request: call {msg.call}, "
                                        f"expected {ready.next_call}")
            rows = check_rows(msg.payload, int(ready.hidden.shape[0]), self.limits)
            run = _Run(self.executor.head_gen(ready.hidden[rows]), "head", step_id=ready.id, ready=ready,
                       call=ready.next_call - 1)
            self._run = run
            self._count("logits_requests")
            return self._advance_locked(run, None)

    def answer(self, msg: ShieldedMessage) -> bytes:
        with self._lock:
            expired = self._expire_locked()
            if expired is not None and msg.step == expired.id:
                raise StepRejected(409, f"step aborted: no host answer within {self.step_timeout(expired.rows):g} s; "
                                        f"its KV writes were rolled back")
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
            return self._advance_locked(run, msg.payload)

    def close(self) -> None:
        with self._lock:
            self._abort_locked()
        self.executor.close()
