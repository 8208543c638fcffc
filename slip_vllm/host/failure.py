"""Turning a secure-service failure into request errors, tied to the engine step it happened in.

An exception raised inside vLLM's forward pass kills the engine core, so a protected layer whose
secret part cannot be computed does not raise: it records the failure here and the step goes on to
its end.  The failure then travels WITH THAT STEP'S OUTPUT to the scheduler, which ends every
request of the step with an error and drops the prefix cache, so nothing computed without the
secret part is ever served or reused.

What this module owns
---------------------
Worker side (every vLLM worker process), wrapped around vLLM's ``Worker.execute_model`` and
``Worker.sample_tokens`` by ``install_worker_hook``:

1. ``execute_model`` starts a step (one that runs tokens): ``STEP.begin()`` clears the record;
2. during the forward, a protected layer (``host.ops``) or the shielded model
   (``host.shielded_model``) that cannot get the secret part calls ``record_failure(reason)``; the
   rest of the step's service calls are skipped (``step_failed()``), so a dead or hung service costs
   one timeout per step, not one per layer;
3. after the forward, with tensor parallelism, the ranks' records are combined (an all-reduce of one
   flag over the TP group: the rank that returns the output may not be the one that failed);
4. the ``StepReport`` (failed, reason) is attached as ``slip_report`` to the ``ModelRunnerOutput``
   this step returns (from ``execute_model`` for pooling models, else from ``sample_tokens``, which
   may itself compute logits: prompt log-probs).  The
   output reaches the engine core in the same process or pickled through vLLM's message queue;
   either way the report is part of the step's own output, so it cannot be lost or credited to
   another step.

Engine side, wrapped around ``Scheduler.update_from_output`` by ``install_scheduler_hook``:

5. for an engine that serves a SLIP artifact (``--load-format slip``), every output of a step that
   ran tokens must carry a report; a missing report counts as a failure (fail closed: a vLLM change
   that bypasses the worker hook errors every request instead of serving the public part alone);
6. a failed step: its requests end with finish reason ``error`` (the OpenAI server answers those
   with an error) and their tokens are dropped; the prefix cache is reset with every running request
   preempted (their KV may have been computed in the failed step; they are recomputed later).  If
   the reset fails, the engine stops (``RuntimeError``): better no answers than answers from KV
   computed without the secret part.

The reason reaches the client (``install_error_reason_hooks``, installed with the scheduler hook):

7. the scheduler hook puts ``slip-error:STATUS:REASON`` (STATUS: the secure service's refusal
   status found in the reason, e.g. 402 for "licence exhausted", else 500) into the ``stop_reason``
   of the ``EngineCoreOutput`` it emits for each errored request; it travels with the output to
   the API server's output processor, which keeps it on the finished ``CompletionOutput``;
8. in the API-server process, ``RequestState._new_completion_output`` is wrapped: a finished output
   with finish reason ``error`` and such a stop reason gets as finish reason an ``ErrorReason``,
   a ``str`` equal to ``"error"`` that carries the status and the reason;
9. ``GenerateBaseServing._raise_if_error`` (every OpenAI endpoint's check of a finished output)
   is wrapped: for an ``ErrorReason`` it raises vLLM's ``GenerationError`` with that message and
   status (402 / 403 for licence refusals, else 500) instead of the generic "Internal server
   error".  Either wrapper missing leaves the generic error: a failure stays a failure.

vLLM's scheduling must be synchronous for SLIP artifacts (one batch in flight: the plugin turns
async scheduling off and refuses pipeline parallelism), so step k's report is read before step k+1
is scheduled.  ``hooks_active`` lets a test assert that the classes vLLM really uses are wrapped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it

REPORT_ATTR = "slip_report"
_WRAPPED = "_slip_wrapped"
ERROR_PREFIX = "slip-error:"
# "secure service refused a call (402): ..." (split client) or "secure service answered 402: ..."
_STATUS = re.compile(r"secure service (?:refused a call \(|answered )(4\d\d)\b")
CLIENT_STATUS = {401: 403, 402: 402, 403: 403}  # what the OpenAI client sees for a service refusal


def error_stop_reason(reason: str) -> str:
    """The stop_reason of an errored request: ``slip-error:STATUS:REASON``."""
    m = _STATUS.search(reason)
    status = CLIENT_STATUS.get(int(m.group(1)), 500) if m else 500
    return f"{ERROR_PREFIX}{status}:{reason[:1000]}"


class ErrorReason(str):
    """finish_reason "error" that carries the client-facing status and message (see 8.)."""

    status: int = 500
    message: str = ""

    def __new__(cls, stop_reason: str):
        obj = super().__new__(cls, "error")
        _, status, reason = stop_reason.split(":", 2)
        obj.status = int(status) if status.isdigit() else 500
        m = _STATUS.search(reason)
        detail = reason[m.end():].lstrip(": )") if m else reason
        obj.message = f"SLIP: the secure service refused this request: {detail}" if m else f"SLIP: {reason}"
        return obj


@dataclass(frozen=True)
class StepReport:
    """What a worker says about the secret part of one engine step (pickled with its output)."""

    failed: bool
    reason: str = ""


class StepRecord:
    """The failures of the step this worker process is running (one step at a time)."""

    def __init__(self) -> None:
        self.active = False   # inside execute_model: failures belong to a step
        self.failed = False
        self.reason = ""

    def begin(self) -> None:
        self.active, self.failed, self.reason = True, False, ""

    def fail(self, reason: str) -> None:
        if not self.failed:
            self.failed, self.reason = True, reason

    def finish(self) -> StepReport:
        self.active = False
        return StepReport(self.failed, self.reason)


STEP = StepRecord()


def record_failure(reason: str) -> None:
    """Called where the secret part of the running step could not be computed."""
    if not STEP.failed:
        log.error("SLIP: %s; the requests of this engine step will end with an error", reason)
    STEP.fail(reason)


def step_failed() -> bool:
    """True once the running step has failed: its remaining service calls are pointless."""
    return STEP.failed


def in_step() -> bool:
    """True inside an engine step's ``execute_model`` (False in vLLM's warm-up and profiling runs)."""
    return STEP.active


# -- worker side --------------------------------------------------------------------------------

def _combine_over_tensor_parallel(report: StepReport) -> StepReport:
    """With TP, the rank whose output the engine reads must know if any rank failed."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    try:
        if get_tensor_model_parallel_world_size() <= 1:
            return report
    except (AssertionError, RuntimeError):  # no parallel state (a test without vLLM's groups)
        return report
    import torch
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    flag = torch.tensor([1 if report.failed else 0], dtype=torch.int32)
    dist.all_reduce(flag, group=get_tp_group().cpu_group)
    if int(flag.item()) and not report.failed:
        return StepReport(True, "the secure service failed on another tensor-parallel rank")
    return report


def _attach(output, report: StepReport) -> bool:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, REPORT_ATTR, report)
        return True
    return False


def _finish_and_attach(output) -> None:
    report = _combine_over_tensor_parallel(STEP.finish())
    if not _attach(output, report):
        # not an output the engine looks into (async scheduling is refused for SLIP artifacts): the
        # engine side finds no report on the step's output and fails the step closed
        log.error("SLIP: cannot attach the step report to a %s", type(output).__name__)


def install_worker_hook() -> None:
    """Wrap vLLM's ``Worker.execute_model`` and ``Worker.sample_tokens`` (idempotent).  Called by
    the slip loader in the worker process, before the first step."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker.execute_model, _WRAPPED, False):
        return
    execute_model, sample_tokens = Worker.execute_model, Worker.sample_tokens

    def slip_execute_model(self, scheduler_output, *args, **kwargs):
        ran = scheduler_output.total_num_scheduled_tokens > 0
        if ran:
            STEP.begin()
        output = execute_model(self, scheduler_output, *args, **kwargs)
        if ran and output is not None:  # the step ends here (pooling models); else sample_tokens follows
            _finish_and_attach(output)
        return output

    def slip_sample_tokens(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)  # may compute more logits (prompt logprobs)
        if STEP.active:
            _finish_and_attach(output)
        return output

    setattr(slip_execute_model, _WRAPPED, True)
    setattr(slip_sample_tokens, _WRAPPED, True)
    Worker.execute_model = slip_execute_model
    Worker.sample_tokens = slip_sample_tokens


# -- engine side --------------------------------------------------------------------------------

def _serves_slip(scheduler) -> bool:
    flag = getattr(scheduler, "_slip_protected", None)
    if flag is None:
        load = getattr(getattr(scheduler, "vllm_config", None), "load_config", None)
        flag = scheduler._slip_protected = getattr(load, "load_format", None) == "slip"
    return flag


def install_scheduler_hook() -> None:
    """Wrap ``Scheduler.update_from_output`` once per process (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler.update_from_output, _WRAPPED, False):
        return
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    original = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        errored = []
        if _serves_slip(self) and scheduler_output.total_num_scheduled_tokens > 0:
            report = getattr(model_runner_output, REPORT_ATTR, None)
            if report is None:
                report = StepReport(True, "the step's output carries no SLIP report (the worker hook did not "
                                          "run): failing closed")
            if report.failed:
                req_ids = list(scheduler_output.num_scheduled_tokens)
                errored = self.finish_requests(req_ids, RequestStatus.FINISHED_ERROR)
                log.error("SLIP: %s: ending %d request(s) of this step with an error and dropping the prefix "
                          "cache", report.reason, len(errored))
                if not self.reset_prefix_cache(reset_running_requests=True):
                    raise RuntimeError("SLIP: the prefix cache could not be reset after a failed step; stopping "
                                       "rather than reusing KV computed without the secret part")
        outputs = original(self, scheduler_output, model_runner_output)
        for request in errored:
            eco = outputs.get(request.client_index)
            if eco is None:
                eco = outputs[request.client_index] = EngineCoreOutputs()
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=FinishReason.ERROR,
                                                stop_reason=error_stop_reason(report.reason)))
        return outputs

    setattr(update_from_output, _WRAPPED, True)
    Scheduler.update_from_output = update_from_output
    if _in_api_server():
        install_error_reason_hooks()


def _in_api_server() -> bool:
    """The OpenAI server's modules are loaded (``vllm serve`` imports them before the plugins): only
    there do the error-reason hooks matter; engine and worker processes skip their ~1 s import."""
    import sys

    return any(name.startswith(("vllm.entrypoints.launchers", "vllm.entrypoints.openai")) for name in sys.modules)


def install_error_reason_hooks() -> None:
    """Steps 8 and 9 of the module docstring (idempotent; in every process, used in the API server)."""
    try:
        from http import HTTPStatus

        from vllm.entrypoints.generate.base.serving import GenerateBaseServing
        from vllm.exceptions import GenerationError
        from vllm.v1.engine.output_processor import RequestState
    except ImportError as exc:  # another vLLM layout: the generic error stays (still an error)
        log.warning("SLIP: request errors will not carry their reason (%s)", exc)
        return
    if not getattr(RequestState._new_completion_output, _WRAPPED, False):
        new_completion_output = RequestState._new_completion_output

        def _new_completion_output(self, token_ids, finish_reason, stop_reason):
            out = new_completion_output(self, token_ids, finish_reason, stop_reason)
            if out.finish_reason == "error" and isinstance(out.stop_reason, str) \
                    and out.stop_reason.startswith(ERROR_PREFIX):
                out.finish_reason = ErrorReason(out.stop_reason)
            return out

        setattr(_new_completion_output, _WRAPPED, True)
        RequestState._new_completion_output = _new_completion_output
    if not getattr(GenerateBaseServing._raise_if_error, _WRAPPED, False):
        raise_if_error = GenerateBaseServing._raise_if_error

        def _raise_if_error(self, finish_reason, request_id):
            if isinstance(finish_reason, ErrorReason):
                log.error("SLIP: request %s failed: %s", request_id, finish_reason.message)
                err = GenerationError(finish_reason.message)
                err.status_code = HTTPStatus(finish_reason.status)
                raise err
            return raise_if_error(self, finish_reason, request_id)

        setattr(_raise_if_error, _WRAPPED, True)
        GenerateBaseServing._raise_if_error = _raise_if_error


def hooks_active(scheduler_cls, worker_cls) -> dict[str, bool]:
    """Which of the hooks the given (resolved) classes really run."""
    return {
        "scheduler.update_from_output": getattr(scheduler_cls.update_from_output, _WRAPPED, False),
        "worker.execute_model": getattr(worker_cls.execute_model, _WRAPPED, False),
        "worker.sample_tokens": getattr(worker_cls.sample_tokens, _WRAPPED, False),
    }
