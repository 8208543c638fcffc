"""Turning a secure-service outage into request errors instead of a dead engine.

An exception raised inside vLLM's forward pass kills the engine core. So when a data-plane call
fails (after its retries) the worker does not raise: it finishes the step with the public part only
and reports the failure on a per-engine channel. The engine core, before it turns that step's
output into tokens, reads the channel and ends every request of the step with finish reason
``error`` (the OpenAI server answers those with an error), and drops the prefix cache so no KV block
computed without the secret part is ever reused. Requests after the service returns run normally.

The channel is an append-only file named after the engine-core process id (a worker knows it as its
parent's pid, or its own with the in-process executor); one byte is appended per failed call, and
the engine compares the file size with the last size it saw: one ``stat`` per step.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it


def channel_path(engine_key: str) -> Path:
    safe = "".join(c for c in engine_key if c.isalnum() or c in "-_") or "default"
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"slip-step-failures-{safe}"


def report_failure(engine_key: str) -> None:
    fd = os.open(channel_path(engine_key), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


class FailureWatcher:
    def __init__(self, engine_key: str):
        self.path = channel_path(engine_key)
        # A stale file from an earlier process with the same pid must not fail our first step.
        self.path.unlink(missing_ok=True)
        self.seen = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def failed_since_last_check(self) -> bool:
        size = self._size()
        failed = size > self.seen
        self.seen = size
        return failed


_PATCHED = False


def install_scheduler_hook() -> None:
    """Wrap ``Scheduler.update_from_output`` once per process (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    original = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        watcher = getattr(self, "_slip_failure_watcher", None)
        if watcher is None:
            watcher = self._slip_failure_watcher = FailureWatcher(str(os.getpid()))
        errored = []
        if watcher.failed_since_last_check():
            req_ids = list(scheduler_output.num_scheduled_tokens)
            errored = self.finish_requests(req_ids, RequestStatus.FINISHED_ERROR)
            log.error("secure service unavailable: ending %d request(s) of this step with an error", len(errored))
            try:
                self.reset_prefix_cache(reset_running_requests=True)
            except Exception:  # a failed reset only costs cache hits; never take the engine down
                log.exception("could not reset the prefix cache after a failed step")
        outputs = original(self, scheduler_output, model_runner_output)
        for request in errored:
            eco = outputs.get(request.client_index)
            if eco is None:
                eco = outputs[request.client_index] = EngineCoreOutputs()
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=FinishReason.ERROR))
        return outputs

    Scheduler.update_from_output = update_from_output
    _PATCHED = True
