"""Protocol ``split`` served by real ``vllm serve --load-format slip`` next to stock vLLM.

Golden reference: stock vLLM serving the original (unprotected) model, same prompts, same settings.
"""

import asyncio
import json

import httpx
import openai
import pytest

from conftest import start_stack

pytestmark = pytest.mark.vllm

PROMPTS = [
    "Hello world", "def add(a, b):", "The secure service", "import os\nimport", "for i in range(10):",
    "class Model:", "Low rank factors", "vLLM serves the public", "How are you today?", "print(sys.argv)",
    "singular values and", "return self.layer", "total += i", "Fine, thanks", "with continuous batching",
    "orthogonal blinding", "the weight matrix", "Hello!", "def forward(self, x):", "keeps the secret",
]


def client(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def complete_all(server, prompts, max_tokens=16):
    c = client(server)
    results = await asyncio.gather(*[
        c.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0, logprobs=1,
                             extra_body={"ignore_eos": True})
        for p in prompts])
    return [(r.choices[0].text, r.choices[0].logprobs.tokens) for r in results]


@pytest.fixture(scope="module")
def llama(model_factory, log_dir):
    # The default (torch.compile) mode for the main model; the others run eager to save CI time.
    stack = start_stack(model_factory, log_dir, "llama", tie=False, eager=False)
    yield stack
    stack.stop()


# every stack talks to its service over the shared-memory channel, except qwen2's: the HTTP data
# plane (a service that is not colocated) keeps a serving test of its own.  qwen2 is served in
# bfloat16 and gpt2 in float16 (both servers of the stack, stock and protected); the others, like
# the llama stack, in float32.
@pytest.fixture(scope="module", params=[("qwen2", True, "http", "bfloat16"), ("gpt2", True, "shm", "float16"),
                                        ("mistral", False, "shm", "float32"), ("qwen3", False, "shm", "float32")],
                ids=lambda p: f"{p[0]}-{p[2]}-{p[3]}")
def other(request, model_factory, log_dir):
    family, tie, transport, dtype = request.param
    stack = start_stack(model_factory, log_dir, family, tie=tie, eager=True, transport=transport, dtype=dtype)
    yield stack
    stack.stop()


def test_models_endpoint(llama):
    models = httpx.get(llama.slip.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m"]


def test_llama_greedy_tokens_identical_to_stock_for_20_concurrent_requests(llama):
    got = asyncio.run(complete_all(llama.slip, PROMPTS))
    want = asyncio.run(complete_all(llama.stock, PROMPTS))
    assert len(got) == 20
    assert got == want


UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


async def complete_with_margins(server, prompts, max_tokens=16):
    """Greedy token ids, their log-probs and the top-2 log-probs at every position."""
    c = client(server)
    results = await asyncio.gather(*[
        c.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        for p in prompts])
    out = []
    for r in results:
        lp = r.choices[0].logprobs
        out.append(([int(t.split(":")[1]) for t in lp.tokens], lp.token_logprobs,
                    [sorted(top.values(), reverse=True) for top in lp.top_logprobs]))
    return out


def test_other_families_identical_to_stock(other):
    """float32: greedy tokens and their log-probs identical to stock vLLM's (as the llama tests).

    bfloat16 / float16 (both servers in that dtype): the protected model rounds differently from
    stock (W_D and the secret term are rounded where stock rounds W), so "exact" means: within the
    dtype's rounding of stock.  The bound, derived from the rounding model (every rounded operation
    returns v (1 + e), |e| <= u, u = 2^-8 for bfloat16 and 2^-11 for float16):

    * the logits z are reached through D rounded stages; in a pre-norm model each perturbs the
      logits by at most u times their scale Z = max_i |z_i| (first order: the norms keep the
      residual stream's relative error from growing).  Stock has D_s = 10 L + 3 of them for L
      decoder layers (per layer: 2 norms, 4 GEMM outputs, attention, activation, 2 residual adds;
      then embedding, final norm, LM head); the protected model 2 more per protected linear and
      for the embedding and LM head (the public output and the secret term are rounded, then
      their sum): D_p = D_s + 2 (4 L + 2).  Here L = 2: D_s = 23, D_p = 43;
    * the roundings of the two models are independent, zero-mean errors, so (probabilistic error
      analysis, Higham & Mary 2019) |z_p - z_s| <= 3 sqrt(D_s + D_p) u Z except with probability
      below 2 exp(-9/2) = 2 % per logit; a log-prob z_t - logsumexp(z) moves by at most twice
      the largest logit change, and so does the gap between two tokens' log-probs:

          delta = 6 sqrt(D_s + D_p) u Z = 48.7 u Z    (bfloat16: 0.19 Z; float16: 0.024 Z)

    Asserted, with Z from the float64 model at each position: every log-prob of the common
    greedy prefix within delta of stock's; the greedy tokens identical up to the first position
    where the two servers differ, and there stock's top-2 margin is below delta (a near-tie: a
    flip elsewhere would be a real error); and the protected log-probs are no farther from the
    float64 model than 1.5 x stock's (mean over the compared tokens).  Measured (16 prompts x 16
    tokens, tiny random models, 2026-12-01): qwen2 in bfloat16 141 of 256 tokens identical up to
    the first divergence (flips at stock margins <= 0.08, Z ~ 5, delta ~ 1.0), largest log-prob
    difference 0.073 (18.7 u), 1.19 x stock's error to float64; gpt2 in float16 256 of 256,
    0.0058 (11.9 u), 1.27 x.  The secret term's own precision is tested per layer in
    tests/service/test_split_precision.py."""
    if other.dtype == "float32":
        got = asyncio.run(complete_all(other.slip, PROMPTS[:16]))
        want = asyncio.run(complete_all(other.stock, PROMPTS[:16]))
        assert got == want
        return
    import torch
    import transformers

    prompts = PROMPTS[:16]
    got = asyncio.run(complete_with_margins(other.slip, prompts))
    want = asyncio.run(complete_with_margins(other.stock, prompts))
    arch = json.loads((other.original / "config.json").read_text())["architectures"][0]
    exact = getattr(transformers, arch).from_pretrained(other.original, dtype=torch.float64).eval()
    u, layers = UNIT_ROUNDOFF[other.dtype], 2
    d_stock = 10 * layers + 3
    d_slip = d_stock + 2 * (4 * layers + 2)
    factor = 6 * (d_stock + d_slip) ** 0.5
    compared, err_slip, err_stock = 0, 0.0, 0.0
    for prompt, (ids_p, lp_p, _), (ids_s, lp_s, top_s) in zip(prompts, got, want):
        prompt_ids = httpx.post(other.stock.url + "/tokenize", json={"model": "m", "prompt": prompt}).json()["tokens"]
        with torch.no_grad():
            logits = exact(torch.tensor([prompt_ids + ids_s])).logits[0, len(prompt_ids) - 1:-1]
        lp64 = torch.log_softmax(logits, -1)
        n = next((i for i, (a, b) in enumerate(zip(ids_p, ids_s)) if a != b), len(ids_s))
        for i in range(min(n + 1, len(ids_s))):
            delta = factor * u * float(logits[i].abs().max())
            if i == n:  # the first divergence: only at a near-tie of stock's top two
                assert top_s[i][0] - top_s[i][1] <= delta, (prompt, i, top_s[i], delta)
                break
            assert abs(lp_p[i] - lp_s[i]) <= delta, (prompt, i, lp_p[i], lp_s[i], delta)
            ref = float(lp64[i, ids_s[i]])
            err_slip += abs(lp_p[i] - ref)
            err_stock += abs(lp_s[i] - ref)
            compared += 1
    assert compared >= 64  # a quarter of the tokens at least reach the comparison
    assert err_slip <= 1.5 * err_stock, (err_slip / compared, err_stock / compared)


def test_chat_and_streaming_match_stock(llama):
    async def chat(server, stream):
        c = client(server)
        messages = [{"role": "user", "content": "Tell me about the secure service."}]
        if not stream:
            r = await c.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0,
                                                extra_body={"ignore_eos": True})
            return r.choices[0].message.content
        parts = []
        async for chunk in await c.chat.completions.create(model="m", messages=messages, max_tokens=20,
                                                           temperature=0, stream=True,
                                                           extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    want = asyncio.run(chat(llama.stock, False))
    assert want
    assert asyncio.run(chat(llama.slip, False)) == want
    assert asyncio.run(chat(llama.slip, True)) == want


def test_one_service_call_per_protected_layer_per_step(llama):
    """2 decoder layers x (qkv, o, gate_up, down) + embedding + LM head = 10 calls per engine step,
    whatever the number of tokens in the step."""
    before = httpx.get(llama.service.url + "/v1/stats").json()
    prompt = "The secure service keeps the secret part"
    n_prompt = len(httpx.post(llama.slip.url + "/tokenize", json={"model": "m", "prompt": prompt}).json()["tokens"])
    asyncio.run(complete_all(llama.slip, [prompt], max_tokens=8))
    after = httpx.get(llama.service.url + "/v1/stats").json()
    steps = 8  # one prefill step, then 7 decode steps
    assert after["calls"] - before["calls"] == 10 * steps
    # Linear calls see every token row of the step; the LM head only the rows that are sampled.
    assert after["rows"] - before["rows"] == 9 * (n_prompt + 7) + 1 * steps


def test_service_outage_gives_request_errors_and_recovery(llama):
    """Stop the service while vLLM serves: requests fail cleanly, vLLM stays up, and after the
    restart requests succeed and match stock again."""
    llama.service.stop()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            asyncio.run(complete_all(llama.slip, ["Hello world"], max_tokens=4))
        assert err.value.status_code >= 500
        stream_client = openai.OpenAI(base_url=llama.slip.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in stream_client.completions.create(model="m", prompt="def add(a, b):", max_tokens=4,
                                                      stream=True):
                pass
        assert llama.slip.alive()
        assert httpx.get(llama.slip.url + "/health").status_code == 200
    finally:
        llama.service.start().wait_ready(60)
    got = asyncio.run(complete_all(llama.slip, PROMPTS[:8]))
    want = asyncio.run(complete_all(llama.stock, PROMPTS[:8]))
    assert got == want
