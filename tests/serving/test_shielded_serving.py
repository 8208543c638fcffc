"""Protocol ``shielded`` served by the real `vllm serve --load-format slip`, against stock vLLM and
against the fixed-point reference, with everything crossing the trust boundary recorded.

Model: the TINY reference LM of the evaluation (trained on the Python standard library, cached),
because agreement and perplexity targets only mean something on a trained model (a random tiny
model's logits are nearly flat, so int8 rounding flips near-ties).  Protected with
`slip protect --protocol shielded` (rank 1/8, fixed seed, the default lock ``block:32``: every
public weight locked with its own secret transforms, undone in the service; the replay below
checks the whole served path against the fixed-point specification, lock included).

Stacks (one each per module):
* ``stack``: secure service (shielded bundle, mask audit on) <- recording TCP proxy <- vLLM serving
  OUT/public over the HTTP data plane (the proxy must see the bytes: replay, boundary inspection, a
  cheating host); and a stock vLLM on the original checkpoint;
* ``shm_stack``: a second secure service on the same bundle <- vLLM over the colocated
  shared-memory channel (the default data plane): concurrency under preemption, outage and recovery.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from boundary import RecordingProxy
from shielded_reference import offline_greedy as _offline_greedy
from shielded_reference import validation_prompts as _validation_prompts
from helpers import secure_service, vllm_server
from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.core import wire
from slip_vllm.core.quantize import quantize_activations
from slip_vllm.evaluation import reference_model as rm

pytestmark = pytest.mark.vllm

# 16 blocks of 32 tokens: small enough that the concurrency test makes vLLM preempt requests
KV_BLOCKS, BLOCK_SIZE = 16, 32
SERVICE_ENV = {"SLIP_SHIELDED_KV_BLOCKS": str(KV_BLOCKS), "SLIP_SHIELDED_BLOCK_SIZE": str(BLOCK_SIZE),
               "SLIP_MASK_AUDIT": "1", "SLIP_MASK_POOL_ROWS": "64"}
MAX_MODEL_LEN = 128  # the TINY model's max_position_embeddings
SEED = 5


class Stack:
    def __init__(self, original, protected, service, proxy, slip, stock):
        self.original, self.protected, self.service, self.proxy = original, protected, service, proxy
        self.slip, self.stock = slip, stock
        self.p = None

    def client(self, server) -> OpenAI:
        return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def stats(self) -> dict:
        return httpx.get(self.service.url + "/v1/stats", timeout=10).json()["shielded"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, log_dir):
    original = rm.get_reference_model(config=rm.TINY, progress=False)
    out = tmp_path_factory.mktemp("shielded-serving") / "protected"
    r = subprocess.run([sys.executable, "-m", "slip_vllm.cli", "protect", "--model", str(original), "--out", str(out),
                        "--protocol", "shielded", "--seed", str(SEED)],  # default rank: 1/8 of min(m, n)
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    # full logits: this stack measures the model's own log-probs and replays every logit bit for bit
    # (shm_stack serves the default policy, topk:20, and checks greedy tokens)
    service = secure_service(out / "secret", log_dir, name="shielded-service", SLIP_SHIELDED_LOGITS_POLICY="full",
                             **SERVICE_ENV).start().wait_ready(120)
    proxy = RecordingProxy("127.0.0.1", service.port)
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    slip = vllm_server(out / "public", log_dir, "shielded-slip", slip=True, service_url=proxy.url,
                       extra_args=args, transport="http", **SERVICE_ENV).start()
    stock = vllm_server(original, log_dir, "shielded-stock", slip=False, extra_args=args).start()
    st = Stack(original, out, service, proxy, slip, stock)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(s.wait_ready, 600) for s in (slip, stock)]:
                f.result()
        st.p = int(httpx.get(service.url + "/v1/info", timeout=10).json()["p"])
        yield st
    finally:
        for server in (slip, stock, service):
            server.stop()
        proxy.stop()


@pytest.fixture(scope="module")
def shm_stack(stack, log_dir):
    service = secure_service(stack.protected / "secret", log_dir, name="shielded-shm-service",
                             **SERVICE_ENV).start().wait_ready(120)
    slip = vllm_server(stack.protected / "public", log_dir, "shielded-shm-slip", slip=True, service_url=service.url,
                       extra_args=["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"], **SERVICE_ENV).start()
    st = Stack(stack.original, stack.protected, service, None, slip, None)
    try:
        slip.wait_ready(600)
        st.p = stack.p
        yield st
    finally:
        slip.stop()
        service.stop()


def _prompt_scores(client: OpenAI, prompts: list[list[int]]):
    """Per prompt position (after the first): (log p of the actual token, top-1 token id)."""
    scores = []
    for prompt in prompts:
        r = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 1})
        choice = r.choices[0]
        entries = getattr(choice, "prompt_logprobs", None) or (choice.model_extra or {})["prompt_logprobs"]
        for pos, entry in enumerate(entries[1:], start=1):
            actual = entry[str(prompt[pos])]["logprob"]
            top = min(entry.items(), key=lambda kv: kv[1]["rank"])[0]
            scores.append((actual, int(top)))
    return scores


# ---------------------------------------------------------------------------------------------


def test_quality_matches_stock_vllm_on_the_reference_model(stack):
    """Teacher-forced over validation text: the shielded server's argmax equals stock vLLM's on
    >= 99 % of positions and its perplexity is within 1 % (prompt log-probs through the API)."""
    prompts = _validation_prompts(24, 64)
    ours = _prompt_scores(stack.client(stack.slip), prompts)
    stock = _prompt_scores(stack.client(stack.stock), prompts)
    assert len(ours) == len(stock) == 24 * 63
    agree = sum(a[1] == b[1] for a, b in zip(ours, stock)) / len(ours)
    ppl_ours = math.exp(-sum(a[0] for a in ours) / len(ours))
    ppl_stock = math.exp(-sum(b[0] for b in stock) / len(stock))
    print(f"shielded vs stock vLLM: argmax agreement {agree:.4f} over {len(ours)} positions, "
          f"perplexity {ppl_ours:.3f} vs {ppl_stock:.3f} (ratio {ppl_ours / ppl_stock:.4f})")
    assert agree >= 0.99
    assert abs(ppl_ours / ppl_stock - 1) <= 0.01


def _preemptions(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def test_sixteen_concurrent_clients_streaming_and_not_get_the_reference_tokens(shm_stack):
    """Over the shared-memory channel: 20 concurrent completions (half streaming) in continuous
    batches, with more KV demand than the 16 blocks hold so vLLM preempts and recomputes requests:
    every answer is complete and equals the fixed-point reference's greedy decode of that prompt
    alone."""
    stack = shm_stack
    prompts = [p[: 8 + (i % 5) * 7] for i, p in enumerate(_validation_prompts(20, 40))]
    new_tokens = 12
    client = stack.client(stack.slip)

    def ask(i):
        kw = dict(model="m", prompt=prompts[i], max_tokens=new_tokens, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        if i % 2:
            ids, finish = [], None
            for chunk in client.completions.create(stream=True, **kw):
                c = chunk.choices[0]
                if c.logprobs is not None:
                    ids += [t for t in c.logprobs.tokens]
                finish = c.finish_reason or finish
            return ids, finish
        c = client.completions.create(**kw).choices[0]
        return list(c.logprobs.tokens), c.finish_reason

    before, preempted = stack.stats(), _preemptions(stack.slip)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    after = stack.stats()
    preempted = _preemptions(stack.slip) - preempted
    print(f"concurrency: {len(prompts)} requests, {after['steps_completed'] - before['steps_completed']} steps, "
          f"{preempted:.0f} preemptions")
    assert preempted > 0
    assert after["steps_completed"] - before["steps_completed"] < len(prompts) * (new_tokens + 1)  # batched

    torch.set_num_threads(1)
    ref = ShieldedExecutor.from_bundle(stack.protected / "secret", num_blocks=8, block_size=BLOCK_SIZE,
                                       mode="fixed_point")
    for i, (pieces, finish) in enumerate(answers):
        assert finish == "length" and len(pieces) == new_tokens, (i, finish, pieces)
        expected = [f"token_id:{t}" for t in _offline_greedy(ref, prompts[i], new_tokens)]
        assert pieces == expected, f"prompt {i}: served {pieces} != reference {expected}"


def test_served_logits_equal_the_fixed_point_replay_of_the_recorded_traffic(stack):
    """Replays every step frame and logits request the host sent (as recorded at the boundary)
    through an in-process fixed-point executor: every logits tensor the host received is equal bit
    for bit.  Chat with streaming and a prompt-logprob request make the traffic mixed.  Everything
    since the server started is replayed (vLLM's prefix cache reuses blocks of earlier requests).
    The artifact carries the default lock, which the replaying executor reads from the bundle."""
    import json

    from slip_vllm.core.lock import DEFAULT_LOCK

    assert json.loads((stack.protected / "secret" / "bundle.json").read_text())["lock"] == DEFAULT_LOCK != "none"
    client = stack.client(stack.slip)
    prompts = _validation_prompts(6, 30)

    def work(i):
        if i % 3 == 0:
            stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"def f{i}():"}],
                                                    max_tokens=6, temperature=0, stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        r = client.completions.create(model="m", prompt=prompts[i], max_tokens=5, temperature=0,
                                      extra_body={"prompt_logprobs": 1} if i == 1 else {})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(work, range(6)))
    assert all(isinstance(t, str) and t for t in texts)
    # the same 70-token prompt twice: the second prefill reuses two cached 32-token blocks
    repeated = _validation_prompts(7, 70)[6]
    again = [client.completions.create(model="m", prompt=repeated, max_tokens=3, temperature=0).choices[0].text
             for _ in range(2)]
    assert again[0] == again[1]
    after = stack.stats()

    rep = _replay(stack)
    assert rep.prefix_hits >= 1  # a prefill step that read KV blocks computed by an earlier request
    assert rep.steps == after["steps_completed"] > 0
    assert rep.compared == after["logits_requests"] >= rep.steps
    print(f"replayed {rep.steps} steps and {rep.compared} logits requests bit for bit")


class _Replay:
    steps = compared = prefix_hits = 0
    asks: list  # (layer key, x~ as received by the host, plaintext x_q of the same call in the replay)
    answers: list  # y~ as sent by the host


def _replay(stack) -> "_Replay":
    """Replay the recorded boundary traffic through a fixed-point executor (once per module):
    compares every logits reply bit for bit and pairs every masked activation the host received
    with the plaintext quantized activation of the same call."""
    if getattr(stack, "replayed", None) is not None:
        return stack.replayed
    torch.set_num_threads(1)
    exchanges = [e for e in stack.proxy.exchanges() if e.path.startswith("/v1/shielded/")]
    assert exchanges and all(e.status == 200 for e in exchanges)
    replay = ShieldedExecutor.from_bundle(stack.protected / "secret", num_blocks=KV_BLOCKS, block_size=BLOCK_SIZE,
                                          mode="fixed_point")
    plaintext = []
    linear = replay._linear

    def recording_linear(key, x):  # the executor's projections are generators (see ShieldedExecutor._linear)
        plaintext.append((key, quantize_activations(x, replay.act_bits)[0]))
        return (yield from linear(key, x))

    replay._linear = recording_linear
    out = _Replay()
    out.asks, out.answers, received = [], [], []
    hidden = pending = None
    for e in exchanges:
        if e.path == "/v1/shielded/step":
            frame = wire.decode_shielded_step(e.request)
            assert frame.defer_logits and frame.logits_indices is None
            hidden = replay.forward_layers(frame.input_ids, frame.positions, frame.slot_mapping,
                                           frame.query_start_loc, frame.seq_lens, frame.block_tables)
            out.steps += 1
            q_lens = frame.query_start_loc[1:] - frame.query_start_loc[:-1]
            first_positions = frame.positions[frame.query_start_loc[:-1]]
            # a sequence whose first scheduled token is a whole number of blocks in, in a step
            # that schedules several of its tokens: a prefill that starts after cached blocks
            out.prefix_hits += int(((q_lens > 1) & (first_positions > 0) & (first_positions % BLOCK_SIZE == 0)).sum())
        elif e.path == "/v1/shielded/logits":
            rows = wire.decode_shielded_message(e.request, expect_kind=wire.MSG_ROWS).payload.reshape(-1)
            pending = replay.head(hidden[rows])
        else:
            out.answers.append(wire.decode_shielded_message(e.request, expect_kind=wire.MSG_ANSWER).payload)
        reply = wire.decode_shielded_message(e.response)
        if reply.kind == wire.MSG_LOGITS:
            assert torch.equal(reply.payload, pending), "served logits differ from the fixed-point replay"
            out.compared += 1
        elif reply.kind == wire.MSG_ASK:
            received.append((reply.key, reply.payload))
        else:
            assert reply.kind == wire.MSG_READY and reply.payload.shape == (1, 1)
    assert [k for k, _ in received] == [k for k, _ in plaintext]
    out.asks = [(k, x, xq) for (k, x), (_, xq) in zip(received, plaintext)]
    stack.replayed = out
    return out


def test_the_host_receives_only_uniform_one_time_masked_values(stack):
    """What crossed the boundary (recorded by the proxy, decoded independently of the client):
    towards the host only masked activations x~ in [0, p), step-ready notices and final logits;
    x~ - x_q mod p (the mask) is never zero beyond chance, x~ is uncorrelated with the plaintext
    x_q and uniform over Z_p (chi-square), no two masked rows are equal, and the service's mask
    audit saw every mask row once."""
    from scipy.stats import chisquare, pearsonr

    from slip_vllm.core.quantize import centered_lift

    rep = _replay(stack)
    p = stack.p
    assert len(rep.asks) >= 100
    masked = torch.cat([x.reshape(-1) for _, x, _ in rep.asks])
    plain = torch.cat([xq.reshape(-1) for _, _, xq in rep.asks])
    assert int(masked.min()) >= 0 and int(masked.max()) < p
    assert all(int(y.min()) >= 0 and int(y.max()) < p for y in rep.answers)
    masks = (masked - plain) % p
    zero_share = float((masks == 0).double().mean())
    assert zero_share < 1e-6  # ~1/p for uniform masks; a skipped mask would make it 1
    corr = pearsonr(centered_lift(masked, p).double().numpy(), plain.double().numpy()).statistic
    assert abs(corr) < 0.02, corr
    buckets = torch.bincount((masked.double() / p * 64).long(), minlength=64).numpy()
    uniform_p = chisquare(buckets).pvalue
    assert uniform_p > 1e-4, uniform_p
    rows = torch.cat([x for _, x, _ in rep.asks if x.shape[1] == rep.asks[0][1].shape[1]])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    stats = stack.stats()
    audit = stats["mask_audit"]
    assert audit["repeats"] == 0 and audit["unique_rows"] == audit["rows_recorded"] == stats["masked_rows"]
    print(f"boundary: {len(rep.asks)} masked GEMM calls, {masked.numel()} field elements, p={p}; "
          f"corr(x~, x_q)={corr:+.4f}; chi-square p={uniform_p:.3f}; mask rows audited {audit['rows_recorded']}, "
          f"repeats {audit['repeats']}; pool hits {stats['masks']['pool_hits']}, misses {stats['masks']['pool_misses']}")


def test_a_host_that_alters_one_result_element_is_caught_and_only_that_request_fails(stack):
    """The proxy plays a cheating host: it changes one element of one masked GEMM result on its
    way to the service.  The service's Freivalds check refuses the step (alarm counter + 1), vLLM
    ends that request with an error and stays up, and the next request is answered correctly."""
    p = stack.p
    armed = {"left": 1}

    def alter_one_element(path, body):
        if path != "/v1/shielded/gemm" or not armed["left"]:
            return None
        armed["left"] -= 1
        msg = wire.decode_shielded_message(body, expect_kind=wire.MSG_ANSWER)
        y = msg.payload.clone()
        y[-1, 0] = (y[-1, 0] + 1) % p
        return wire.encode_shielded_message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y)

    before = stack.stats()
    client = stack.client(stack.slip)
    prompt = _validation_prompts(1, 20)[0]
    stack.proxy.tamper = alter_one_element
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
        assert err.value.status_code >= 500
    finally:
        stack.proxy.tamper = None
    after = stack.stats()
    assert armed["left"] == 0
    assert after["integrity_alarms"] == before["integrity_alarms"] + 1
    assert after["steps_aborted"] == before["steps_aborted"] + 1
    assert httpx.get(stack.slip.url + "/health", timeout=10).status_code == 200
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True}, logprobs=1)
    ref = ShieldedExecutor.from_bundle(stack.protected / "secret", num_blocks=4, block_size=BLOCK_SIZE,
                                       mode="fixed_point")
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in _offline_greedy(ref, prompt, 4)]


def test_service_outage_gives_request_errors_and_recovery(shm_stack):
    """Over the shared-memory channel: stop the service while vLLM serves: requests fail cleanly
    (streaming too), vLLM stays up; after a restart (empty KV cache; vLLM dropped its prefix cache on
    the failure) the channel is attached anew and requests are answered correctly again."""
    stack = shm_stack
    client = stack.client(stack.slip)
    prompt = _validation_prompts(2, 20)[1]
    stack.service.stop()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
        assert err.value.status_code >= 500
        with pytest.raises(openai.APIError):
            for _ in client.completions.create(model="m", prompt=prompt, max_tokens=4, stream=True):
                pass
        assert stack.slip.alive()
        assert httpx.get(stack.slip.url + "/health", timeout=10).status_code == 200
    finally:
        stack.service.start().wait_ready(120)
    r = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    ref = ShieldedExecutor.from_bundle(stack.protected / "secret", num_blocks=4, block_size=BLOCK_SIZE,
                                       mode="fixed_point")
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in _offline_greedy(ref, prompt, 6)]


def test_start_refuses_a_kv_geometry_the_service_does_not_mirror(stack, log_dir):
    """The service mirrors vLLM's paged KV cache: a different block size on the command line is
    refused before the engine starts, and a service with fewer blocks than vLLM would use stops
    vLLM's loader (either would silently corrupt attention otherwise)."""
    wrong_block = vllm_server(stack.protected / "public", log_dir, "shielded-wrong-block", slip=True,
                              service_url=stack.service.url, extra_args=["--max-model-len", "128", "--block-size", "64"],
                              **SERVICE_ENV).start()
    small = secure_service(stack.protected / "secret", log_dir, name="shielded-small-service",
                           **{**SERVICE_ENV, "SLIP_SHIELDED_KV_BLOCKS": "8"}).start().wait_ready(120)
    too_many = vllm_server(stack.protected / "public", log_dir, "shielded-too-many-blocks", slip=True,
                           service_url=small.url, extra_args=["--max-model-len", "128"], **SERVICE_ENV).start()
    try:
        assert wrong_block.wait_exit(300) != 0
        assert too_many.wait_exit(300) != 0
    finally:
        for server in (wrong_block, too_many, small):
            server.stop()
    assert "differs from SLIP_SHIELDED_BLOCK_SIZE=32" in wrong_block.tail(400)
    assert "set the same SLIP_SHIELDED_KV_BLOCKS" in too_many.tail(400)
