"""Shared real servers for the serving tests: one secure service, one protected vLLM server and one
stock vLLM server per model, started together and shared by the tests of a module."""

import concurrent.futures

import pytest

from helpers import secure_service, vllm_server

pytestmark = pytest.mark.vllm


class Stack:
    def __init__(self, family, original, protected, service, slip, stock, dtype="float32"):
        self.family, self.original, self.protected = family, original, protected
        self.service, self.slip, self.stock = service, slip, stock
        self.dtype = dtype  # vLLM's --dtype of both servers

    def stop(self):
        for server in (self.slip, self.stock, self.service):
            server.stop()


def start_stack(model_factory, log_dir, family, *, tie=False, eager=True, extra_args=(), transport="shm",
                dtype="float32"):
    """transport: the data plane between vLLM and the service ("shm", the default, or "http");
    dtype: vLLM's --dtype, the same for the protected and the stock server."""
    original, protected = model_factory(family, tie=tie)
    service = secure_service(protected / "secret", log_dir, name=f"{family}-service").start().wait_ready(60)
    args = ["--enforce-eager"] if eager else []
    args += list(extra_args)
    slip = vllm_server(protected / "public", log_dir, f"{family}-slip", slip=True, service_url=service.url,
                       extra_args=args, transport=transport, dtype=dtype).start()
    stock = vllm_server(original, log_dir, f"{family}-stock", slip=False, extra_args=args, dtype=dtype).start()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(s.wait_ready, 600) for s in (slip, stock)]:
            f.result()
    return Stack(family, original, protected, service, slip, stock, dtype)
