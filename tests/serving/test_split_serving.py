"""Protocol ``split`` served by real ``vllm serve --load-format slip`` next to stock vLLM.

Golden reference: stock vLLM serving the original (unprotected) model, same prompts, same settings.
"""

import asyncio

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
# plane (a service that is not colocated) keeps a serving test of its own
@pytest.fixture(scope="module", params=[("qwen2", True, "http"), ("gpt2", True, "shm"), ("mistral", False, "shm"),
                                        ("qwen3", False, "shm")],
                ids=lambda p: f"{p[0]}-{p[2]}")
def other(request, model_factory, log_dir):
    family, tie, transport = request.param
    stack = start_stack(model_factory, log_dir, family, tie=tie, eager=True, transport=transport)
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


def test_other_families_identical_to_stock(other):
    got = asyncio.run(complete_all(other.slip, PROMPTS[:16]))
    want = asyncio.run(complete_all(other.stock, PROMPTS[:16]))
    assert got == want


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
