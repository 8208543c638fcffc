"""Chaos suite: real secure services killed, restarted, hung and shared under real vLLM servers,
for both protocols (docs/SECURITY.md, "Failure modes").

The rule checked in every scenario: no answer served as a success differs from the reference, and
no token streamed before an error differs from it either; every affected request ends with an
error; vLLM stays up and answers correctly after recovery.  References: stock vLLM on the original
checkpoint for ``split``; for ``shielded`` the fixed-point executor decoding each prompt alone,
which the healthy protected server equals token for token (test_shielded_serving.py).

Scenarios (a)-(e) run in order on one fresh stack per protocol: (a) the service SIGKILLed before
vLLM's first engine step, then single-step requests; (b) 16 concurrent clients (half streaming)
while the service is SIGKILLed and restarted twice; (c) an idle restart, then requests that hit
vLLM's prefix cache (prompts of several KV blocks); (d) a second vLLM engine against a shielded
service; (e) a hung service (SIGSTOP: it accepts, never answers).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from helpers import secure_service, vllm_server
from shielded_reference import offline_greedy, validation_prompts

pytestmark = pytest.mark.vllm

BLOCK = 32                       # vLLM's KV block (the CPU attention backend wants a multiple of 32)
CALL_TIMEOUT = {"SLIP_SERVICE_TIMEOUT_S": "3", "SLIP_SERVICE_TIMEOUT_PER_ROW_MS": "1"}
SHIELDED_ENV = {"SLIP_SHIELDED_KV_BLOCKS": "32", "SLIP_SHIELDED_BLOCK_SIZE": str(BLOCK), "SLIP_MASK_POOL_ROWS": "64",
                "SLIP_SHIELDED_OWNER_LEASE_S": "600"}
NEW_TOKENS = 6


class Chaos:
    """One protocol's stack and its reference answers."""

    def __init__(self, protocol, service, slip, reference, stock=None, protected=None):
        self.protocol, self.service, self.slip, self.stock = protocol, service, slip, stock
        self.protected = protected
        self._reference = reference
        self._cache: dict = {}
        self._lock = threading.Lock()

    def reference(self, prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._reference(prompt, n)
            return self._cache[key]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.slip.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(server_url: str, prompt: list[int], n: int, stream: bool = False):
    """("ok", token ids) for a complete answer, ("error", token ids streamed before the error)."""
    c = openai.OpenAI(base_url=server_url + "/v1", api_key="x", max_retries=0, timeout=120)
    kw = dict(model="m", prompt=prompt, max_tokens=n, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    ids: list[int] = []
    try:
        if stream:
            finish = None
            for chunk in c.completions.create(stream=True, **kw):
                choice = chunk.choices[0]
                if choice.logprobs is not None:
                    ids += [int(t.split(":")[1]) for t in choice.logprobs.tokens]
                finish = choice.finish_reason or finish
        else:
            choice = c.completions.create(**kw).choices[0]
            ids, finish = [int(t.split(":")[1]) for t in choice.logprobs.tokens], choice.finish_reason
    except openai.APIError:
        return "error", ids
    if finish != "length" or len(ids) != n:
        return "error", ids  # anything but a complete answer counts as a failure
    return "ok", ids


def check(stack: Chaos, prompt, n, outcome) -> str:
    status, ids = outcome
    want = stack.reference(prompt, n)
    if status == "ok":
        assert ids == want, f"served as a success but differs from the reference: {ids} != {want}"
    else:
        assert ids == want[:len(ids)], f"tokens streamed before an error differ from the reference: {ids}"
    return status


def prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length + i % 5)] for i in range(count)]


def all_correct(stack: Chaos, batch, n=NEW_TOKENS) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        outcomes = list(pool.map(lambda p: ask(stack.slip.url, p, n), batch))
    for p, o in zip(batch, outcomes):
        assert check(stack, p, n, o) == "ok", f"no answer after recovery for {p[:6]}...: {o}"


def recovered(stack: Chaos, batch, attempts: int = 4) -> None:
    """After recovery every prompt is answered correctly (the first steps after a restart may still
    fail their requests, as errors; never with a wrong answer)."""
    for attempt in range(attempts):
        outcomes = [ask(stack.slip.url, p, NEW_TOKENS) for p in batch]
        if all(check(stack, p, NEW_TOKENS, o) == "ok" for p, o in zip(batch, outcomes)):
            return
        time.sleep(1.5)
    all_correct(stack, batch)


def prefix_hits(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


# -- stacks ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_chaos(model_factory, log_dir):
    original, protected = model_factory("llama")
    service = secure_service(protected / "secret", log_dir, name="chaos-split-service").start().wait_ready(60)
    args = ["--enforce-eager", "--block-size", str(BLOCK)]
    slip = vllm_server(protected / "public", log_dir, "chaos-split-slip", slip=True, service_url=service.url,
                       extra_args=args, **CALL_TIMEOUT).start()
    stock = vllm_server(original, log_dir, "chaos-split-stock", slip=False, extra_args=args).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(s.wait_ready, 600) for s in (slip, stock)]:
                f.result()

        def reference(prompt, n):
            status, ids = ask(stock.url, prompt, n)
            assert status == "ok"
            return ids

        stack = Chaos("split", service, slip, reference, stock=stock)
        stack.vocab = json.loads((original / "config.json").read_text())["vocab_size"]
        yield stack
    finally:
        for server in (slip, stock, service):
            server.stop()


@pytest.fixture(scope="module")
def shielded_chaos(tmp_path_factory, log_dir):
    from secure_service.shielded_executor import ShieldedExecutor
    from slip_vllm.evaluation import reference_model as rm

    original = rm.get_reference_model(config=rm.TINY, progress=False)
    out = tmp_path_factory.mktemp("chaos-shielded") / "protected"
    r = subprocess.run([sys.executable, "-m", "slip_vllm.cli", "protect", "--model", str(original), "--out", str(out),
                        "--protocol", "shielded", "--seed", "5"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    service = secure_service(out / "secret", log_dir, name="chaos-shielded-service", **SHIELDED_ENV).start()
    service.wait_ready(120)
    slip = vllm_server(out / "public", log_dir, "chaos-shielded-slip", slip=True, service_url=service.url,
                       extra_args=["--max-model-len", "128", "--enforce-eager"], **SHIELDED_ENV, **CALL_TIMEOUT).start()
    try:
        slip.wait_ready(600)
        executor = ShieldedExecutor.from_bundle(out / "secret", num_blocks=8, block_size=BLOCK, mode="fixed_point")
        torch.set_num_threads(1)
        yield Chaos("shielded", service, slip, lambda prompt, n: offline_greedy(executor, prompt, n), protected=out)
    finally:
        slip.stop()
        service.stop()


def _split_prompts(stack, count, length, seed):
    return prompts(count, length, seed, vocab=stack.vocab)


def _shielded_prompts(count, length, skip=0):
    """Slices of the TINY model's validation text (a trained model: no near-ties in its logits)."""
    return [p[skip:skip + length + i % 5] for i, p in enumerate(validation_prompts(count, skip + length + 5))]


# -- scenarios, shared by both protocols ------------------------------------------------------------

def scenario_killed_before_first_step(stack: Chaos, batch) -> None:
    stack.service.kill()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            outcomes = list(pool.map(lambda p: ask(stack.slip.url, p, 1), batch))
        assert [check(stack, p, 1, o) for p, o in zip(batch, outcomes)] == ["error"] * len(batch)
        assert stack.slip.alive() and httpx.get(stack.slip.url + "/health", timeout=10).status_code == 200
    finally:
        stack.service.start().wait_ready(120)
    recovered(stack, batch)


def scenario_kill_restart_twice_under_load(stack: Chaos, batch) -> None:
    outcomes: list = []
    lock = threading.Lock()

    def client(i):
        for j in range(3):
            p = batch[(i + j) % len(batch)]
            o = ask(stack.slip.url, p, NEW_TOKENS, stream=bool(i % 2))
            with lock:
                outcomes.append((p, o))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, i) for i in range(16)]
        for _ in range(2):
            time.sleep(1.0)
            stack.service.kill()
            time.sleep(0.5)
            stack.service.start().wait_ready(120)
        for f in futures:
            f.result()
    statuses = [check(stack, p, NEW_TOKENS, o) for p, o in outcomes]
    print(f"{stack.protocol}: {len(statuses)} requests under 2 kills: {statuses.count('ok')} correct, "
          f"{statuses.count('error')} errors, 0 wrong")
    assert len(statuses) == 48 and "error" in statuses
    assert stack.slip.alive()
    recovered(stack, batch[:8])


def scenario_idle_restart_with_prefix_cache(stack: Chaos, long_prompt, expect_errors: bool) -> None:
    extended = long_prompt + long_prompt[:7]
    assert ask(stack.slip.url, long_prompt, NEW_TOKENS)[0] == "ok"
    hits = prefix_hits(stack.slip)
    assert check(stack, long_prompt, NEW_TOKENS, ask(stack.slip.url, long_prompt, NEW_TOKENS)) == "ok"
    assert prefix_hits(stack.slip) - hits >= BLOCK, "the prompt did not hit vLLM's prefix cache"
    stack.service.stop()
    stack.service.start().wait_ready(120)
    statuses = [check(stack, p, NEW_TOKENS, ask(stack.slip.url, p, NEW_TOKENS)) for p in (long_prompt, extended)]
    if not expect_errors:
        assert statuses == ["ok", "ok"]  # split keeps nothing in the service: a restart changes nothing
    recovered(stack, [long_prompt, extended])


def scenario_hung_service(stack: Chaos, batch) -> None:
    stack.service.pause()
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            outcomes = list(pool.map(lambda p: ask(stack.slip.url, p, NEW_TOKENS), batch))
        elapsed = time.monotonic() - started
        assert [check(stack, p, NEW_TOKENS, o) for p, o in zip(batch, outcomes)] == ["error"] * len(batch)
        print(f"{stack.protocol}: hung service detected, requests failed after {elapsed:.1f} s")
        assert elapsed < 30, f"a hung service stalled the engine for {elapsed:.0f} s"
        assert httpx.get(stack.slip.url + "/health", timeout=10).status_code == 200
    finally:
        stack.service.resume()
    recovered(stack, batch)


# -- split ----------------------------------------------------------------------------------------

def test_split_a_service_killed_before_the_first_engine_step(split_chaos):
    scenario_killed_before_first_step(split_chaos, _split_prompts(split_chaos, 4, 12, seed=1))


def test_split_b_sixteen_clients_while_the_service_is_killed_twice(split_chaos):
    scenario_kill_restart_twice_under_load(split_chaos, _split_prompts(split_chaos, 16, 20, seed=2))


def test_split_c_idle_restart_then_prefix_cache_hits(split_chaos):
    scenario_idle_restart_with_prefix_cache(split_chaos, _split_prompts(split_chaos, 1, 3 * BLOCK + 5, seed=3)[0],
                                            expect_errors=False)


def test_split_e_hung_service(split_chaos):
    scenario_hung_service(split_chaos, _split_prompts(split_chaos, 2, 10, seed=4))


# -- shielded -------------------------------------------------------------------------------------

def test_shielded_a_service_killed_before_the_first_engine_step(shielded_chaos):
    scenario_killed_before_first_step(shielded_chaos, _shielded_prompts(4, 12))


def test_shielded_b_sixteen_clients_while_the_service_is_killed_twice(shielded_chaos):
    scenario_kill_restart_twice_under_load(shielded_chaos, _shielded_prompts(16, 20, skip=3))


def test_shielded_c_idle_restart_then_prefix_cache_hits(shielded_chaos):
    scenario_idle_restart_with_prefix_cache(shielded_chaos, _shielded_prompts(1, 2 * BLOCK + 9, skip=5)[0],
                                            expect_errors=True)


def test_shielded_d_a_second_engine_is_refused_and_the_first_keeps_serving(shielded_chaos, log_dir):
    stack = shielded_chaos
    batch = _shielded_prompts(2, 16, skip=7)
    all_correct(stack, batch)  # the first engine holds the service
    second = vllm_server(stack.protected / "public", log_dir, "chaos-shielded-second-engine", slip=True,
                         service_url=stack.service.url, extra_args=["--max-model-len", "128", "--enforce-eager"],
                         **SHIELDED_ENV, **CALL_TIMEOUT).start()
    try:
        assert second.wait_exit(600) != 0
        assert "another vLLM engine holds the shielded secure service" in second.tail(200)
    finally:
        second.stop()
    all_correct(stack, batch)


def test_shielded_e_hung_service(shielded_chaos):
    scenario_hung_service(shielded_chaos, _shielded_prompts(2, 10, skip=9))
