"""Tensor parallelism and several engines, served by real ``vllm serve`` processes.

Golden reference: stock vLLM serving the original model with the same ``--tensor-parallel-size``
and settings.  On this 2-core machine vLLM's CPU workers of a TP-2 engine are each bound to one
core (``VLLM_CPU_OMP_THREADS_BIND="0|1"``).  One stack runs at a time (a TP-2 vLLM server is four
processes): ``Stacks.get`` stops the previous stack before starting the next, so the tests are
ordered by the stack they use.
"""

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from helpers import secure_service, vllm_server
from test_split_serving import PROMPTS, complete_all

pytestmark = pytest.mark.vllm

TP2 = ["--enforce-eager", "--tensor-parallel-size", "2"]
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
CALLS_PER_STEP = 10  # 2 decoder layers x (qkv, o, gate_up, down) + embedding + LM head


class Stack:
    def __init__(self, protected, service, servers):
        self.protected, self.service, self.servers = protected, service, servers

    def stop(self):
        for s in self.servers:
            s.stop()
        self.service.stop()


class Stacks:
    def __init__(self, model_factory, log_dir):
        self.model_factory, self.log_dir = model_factory, log_dir
        self.name, self.stack = None, None

    def get(self, name):
        if self.name != name:
            self.close()
            self.stack, self.name = getattr(self, "_" + name)(), name
        return self.stack

    def close(self):
        if self.stack is not None:
            self.stack.stop()
        self.stack = self.name = None

    def _start(self, family, kv_heads, servers):
        original, protected = self.model_factory(family, kv_heads=kv_heads)
        service = secure_service(protected / "secret", self.log_dir, name=f"tp-{family}-service").start()
        service.wait_ready(60)
        started = [vllm_server(original if model == "original" else protected / "public", self.log_dir, name,
                               slip=model != "original", service_url=service.url, extra_args=args, **env).start()
                   for name, model, args, env in servers]
        with concurrent.futures.ThreadPoolExecutor(len(started)) as pool:
            for f in [pool.submit(s.wait_ready, 900) for s in started]:
                f.result()
        return Stack(protected, service, started)

    def _llama_tp2(self):
        # one kv head for TP 2: vLLM replicates it on both ranks (GQA replication)
        return self._start("llama", 1, [("tp2-llama-slip", "public", TP2, TP_ENV),
                                        ("tp2-llama-stock", "original", TP2, TP_ENV)])

    def _qwen2_tp2(self):
        return self._start("qwen2", 2, [("tp2-qwen2-slip", "public", TP2, TP_ENV),
                                        ("tp2-qwen2-stock", "original", TP2, TP_ENV)])

    def _replicas(self):
        one = ["--enforce-eager"]
        return self._start("llama", 2, [("replica-a", "public", one, {}), ("replica-b", "public", one, {}),
                                        ("replica-stock", "original", one, {})])


@pytest.fixture(scope="module")
def stacks(model_factory, log_dir):
    s = Stacks(model_factory, log_dir)
    yield s
    s.close()


def stats(service):
    return httpx.get(service.url + "/v1/stats", timeout=10).json()


# -- split, TP 2, Llama-style with a replicated kv head --------------------------------------------

def test_split_tp2_llama_replicated_kv_identical_to_stock_tp2_for_20_concurrent_requests(stacks):
    st = stacks.get("llama_tp2")
    slip, stock = st.servers
    got = asyncio.run(complete_all(slip, PROMPTS))
    want = asyncio.run(complete_all(stock, PROMPTS))
    assert len(got) == 20 and got == want


def test_split_tp2_each_rank_calls_once_per_layer_per_step_with_its_own_session(stacks):
    """Both ranks of the engine call the service once per protected layer per step, each over its
    own channel (its own session), with its own rows; the secure side meters them apart."""
    st = stacks.get("llama_tp2")
    slip = st.servers[0]
    before = stats(st.service)
    prompt = "The secure service keeps the secret part"
    n_prompt = len(httpx.post(slip.url + "/tokenize", json={"model": "m", "prompt": prompt}).json()["tokens"])
    asyncio.run(complete_all(slip, [prompt], max_tokens=8))
    after = stats(st.service)
    steps = 8
    assert after["calls"] - before["calls"] == 2 * CALLS_PER_STEP * steps
    assert after["rows"] - before["rows"] == 2 * (9 * (n_prompt + 7) + steps)
    moved = {s: m["calls"] - before["sessions"].get(s, {"calls": 0})["calls"] for s, m in after["sessions"].items()}
    moved = {s: c for s, c in moved.items() if c}
    assert sorted(moved.values()) == [CALLS_PER_STEP * steps] * 2


def test_service_killed_under_tp2_gives_errors_never_wrong_tokens(stacks):
    """SIGKILL the service while a TP-2 engine serves: every request errors (whichever rank's call
    failed, the flag is all-reduced over the TP group), vLLM stays up, and after a restart the
    answers are stock's again."""
    st = stacks.get("llama_tp2")
    slip, stock = st.servers
    st.service.kill()
    try:
        c = openai.AsyncOpenAI(base_url=slip.url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one(p):
            try:
                await c.completions.create(model="m", prompt=p, max_tokens=6, temperature=0)
            except openai.APIStatusError as exc:
                return exc.status_code
            return "answered"

        async def all_of(ps):
            return await asyncio.gather(*[one(p) for p in ps])

        outcomes = asyncio.run(all_of(PROMPTS[:6]))
        assert all(o != "answered" and o >= 500 for o in outcomes), outcomes
        assert slip.alive() and httpx.get(slip.url + "/health").status_code == 200
    finally:
        st.service.start().wait_ready(60)
    time.sleep(1.5)  # the client's breaker stays open for a moment after the failures
    got = asyncio.run(complete_all(slip, PROMPTS[:8]))
    want = asyncio.run(complete_all(stock, PROMPTS[:8]))
    assert got == want


# -- split, TP 2, Qwen2-style (q/k/v biases: vLLM adds them on their own shards) -------------------

def test_split_tp2_qwen2_biases_identical_to_stock_tp2_for_16_concurrent_requests(stacks):
    st = stacks.get("qwen2_tp2")
    slip, stock = st.servers
    got = asyncio.run(complete_all(slip, PROMPTS[:16]))
    want = asyncio.run(complete_all(stock, PROMPTS[:16]))
    assert got == want


# -- shielded: refused at start under TP 2 --------------------------------------------------------

def test_shielded_refused_at_start_under_tp2(stacks, model_factory, tmp_path, log_dir):
    stacks.close()
    original, _ = model_factory("llama")
    out = tmp_path / "shielded"
    r = subprocess.run([sys.executable, "-m", "slip_vllm.cli", "protect", "--model", str(original), "--out", str(out),
                        "--protocol", "shielded", "--seed", "3"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    server = vllm_server(out / "public", log_dir, "tp2-shielded", slip=True, service_url="http://127.0.0.1:9",
                         extra_args=TP2, **TP_ENV).start()
    try:
        assert server.wait_exit(300) != 0
        assert "shielded artifacts are served with --tensor-parallel-size 1 only (asked for 2)" in server.tail(200)
    finally:
        server.stop()


# -- several engines on one split service ---------------------------------------------------------

def test_two_replicas_on_one_split_service_serve_concurrently_and_are_metered_apart(stacks):
    st = stacks.get("replicas")
    a, b, stock = st.servers
    before = stats(st.service)

    async def both():
        return await asyncio.gather(complete_all(a, PROMPTS), complete_all(b, PROMPTS[::-1]))

    got_a, got_b = asyncio.run(both())
    want = asyncio.run(complete_all(stock, PROMPTS))
    assert got_a == want
    assert got_b == want[::-1]
    after = stats(st.service)
    moved = {s: m["calls"] - before["sessions"].get(s, {"calls": 0})["calls"] for s, m in after["sessions"].items()}
    moved = {s: c for s, c in moved.items() if c}
    assert len(moved) == 2, moved  # one session per engine (each TP 1: one worker each)
    assert sum(moved.values()) == after["calls"] - before["calls"]
    assert all(c >= CALLS_PER_STEP * 16 for c in moved.values())  # at least 16 steps each
