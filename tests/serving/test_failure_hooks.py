"""The step-failure path (slip_vllm/host/failure.py) is wired into the classes this vLLM really
uses, so a vLLM change that bypasses it fails here instead of serving the public part alone."""

import pytest

pytestmark = pytest.mark.vllm


def _engine_config(model_dir, **kw):
    from vllm.engine.arg_utils import EngineArgs

    from slip_vllm.host.plugin import register

    register()
    return EngineArgs(model=str(model_dir), load_format="slip", max_model_len=256, enforce_eager=True,
                      **kw).create_engine_config()


def test_the_failure_hooks_are_active_on_the_scheduler_and_worker_classes_vllm_resolves(model_factory):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from slip_vllm.host.failure import hooks_active, install_worker_hook

    _, protected = model_factory("llama")
    config = _engine_config(protected / "public")
    install_worker_hook()  # what the slip loader does in the worker process
    scheduler_cls = config.scheduler_config.get_scheduler_cls()
    worker_cls = config.parallel_config.worker_cls
    worker_cls = resolve_obj_by_qualname(worker_cls) if isinstance(worker_cls, str) else worker_cls
    assert hooks_active(scheduler_cls, worker_cls) == {
        "scheduler.update_from_output": True, "worker.execute_model": True, "worker.sample_tokens": True}
    assert config.scheduler_config.async_scheduling is False  # one batch in flight: reports are in order


def test_async_scheduling_and_pipeline_parallelism_are_refused_for_slip_artifacts(model_factory):
    _, protected = model_factory("llama")
    with pytest.raises(ValueError, match="synchronous scheduling"):
        _engine_config(protected / "public", async_scheduling=True)
    with pytest.raises(ValueError, match="pipeline parallelism"):
        _engine_config(protected / "public", pipeline_parallel_size=2)
