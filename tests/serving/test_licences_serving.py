"""Licences end to end: a real secure service with a licences file, a real vLLM server holding a
licence key, the real OpenAI client.  Budget exhaustion and revocation become request errors that
carry the reason; a renewed licence restores service without restarting anything; the service's
per-licence meters equal what the client was served."""

import subprocess
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import secure_service, vllm_server
from slip_vllm.launch import BIN

pytestmark = pytest.mark.vllm

PROMPT = "The quick brown fox"


def slip_license(*args: str) -> str:
    out = subprocess.run([str(BIN / "slip"), "license", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def issue(licences, bundle, *flags) -> tuple[str, str]:
    out = slip_license("issue", "--file", str(licences), "--bundle", str(bundle), *flags)
    lid = out.split()[0]
    key = out.strip().rsplit(" ", 1)[-1]
    assert lid.startswith("lic_") and key.startswith("slip-")
    return lid, key


def licence_meter(service, licence: str) -> dict[str, float]:
    text = httpx.get(service.url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("slip_licence_") and s.labels.get("licence") == licence:
                out[s.name] = s.value
    return out


@pytest.fixture(scope="module")
def stack(model_factory, log_dir, tmp_path_factory):
    _, protected = model_factory("llama")
    work = tmp_path_factory.mktemp("licences")
    licences = work / "licences.json"
    lid, key = issue(licences, protected / "secret", "--generated-tokens", "100", "--holder", "test")
    service = secure_service(protected / "secret", log_dir, name="licence-service", SLIP_LICENCES_FILE=str(licences),
                             SLIP_LICENCES_POLL_S="0.2", SLIP_USAGE_FLUSH_S="0.2").start().wait_ready(60)
    vllm = vllm_server(protected / "public", log_dir, "licence-slip", slip=True, service_url=service.url,
                       extra_args=["--enforce-eager"], SLIP_SERVICE_TOKEN=key).start()
    try:
        vllm.wait_ready(600)
        client = openai.OpenAI(base_url=vllm.url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield {"service": service, "vllm": vllm, "client": client, "licences": licences, "first": lid, "key": key}
    finally:
        vllm.stop()
        service.stop()


def complete(client, max_tokens=16, prompt=PROMPT):
    return client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_budget_serves_about_100_tokens_then_licence_exhausted_and_renewal_restores(stack):
    client, service = stack["client"], stack["service"]
    served, error = 0, None
    for _ in range(10):
        try:
            served += complete(client).usage.completion_tokens
        except openai.APIStatusError as exc:
            error = exc
            break
    assert error is not None, f"{served} tokens served and no refusal"
    assert error.status_code == 402 and "licence exhausted" in str(error), error
    assert 100 - 16 <= served <= 100
    metered = licence_meter(service, stack["first"])["slip_licence_generated_tokens_total"]
    assert served <= metered <= 100  # the failed request's tokens were computed, never served
    with pytest.raises(openai.APIStatusError, match="licence exhausted"):
        complete(client, max_tokens=4)

    # a new licence for the key the engine holds: served again, nothing restarted
    out = slip_license("renew", "--file", str(stack["licences"]), stack["first"], "--generated-tokens", "100000")
    stack["renewed"] = out.split()[0]
    deadline = time.monotonic() + 5
    while True:
        try:
            assert complete(client, max_tokens=8).usage.completion_tokens == 8
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the renewed licence was not picked up within 5 s"
            time.sleep(0.2)


def test_metrics_of_the_licence_equal_what_the_client_was_served(stack):
    client, service, lid = stack["client"], stack["service"], stack["renewed"]
    before = licence_meter(service, lid)
    usage = [complete(client, max_tokens=n, prompt=p).usage
             for n, p in ((5, "Hello"), (9, PROMPT), (13, "one two three four five six"))]
    after = licence_meter(service, lid)
    gen = after["slip_licence_generated_tokens_total"] - before["slip_licence_generated_tokens_total"]
    inp = after["slip_licence_input_tokens_total"] - before["slip_licence_input_tokens_total"]
    steps = after["slip_licence_steps_total"] - before["slip_licence_steps_total"]
    assert gen == sum(u.completion_tokens for u in usage)
    # every prompt token and every generated token but the last is fed through the embedding once
    assert inp == sum(u.prompt_tokens + u.completion_tokens - 1 for u in usage)
    assert steps == sum(u.completion_tokens for u in usage)  # one request at a time: one step per token
    stats = httpx.get(service.url + "/v1/stats", timeout=10).json()
    assert stats["licences"][lid]["generated_tokens"] == after["slip_licence_generated_tokens_total"]


def test_revoking_mid_stream_ends_the_request_with_an_error_within_2s(stack):
    client, lid = stack["client"], stack["renewed"]
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks, revoked_at, failed_at, error = 0, None, None, None
    revoker = None
    try:
        for _ in stream:
            chunks += 1
            if chunks == 5:
                def revoke():
                    nonlocal revoked_at
                    slip_license("revoke", "--file", str(stack["licences"]), lid, "--reason", "test")
                    revoked_at = time.monotonic()

                revoker = threading.Thread(target=revoke)
                revoker.start()
    except openai.APIError as exc:
        failed_at, error = time.monotonic(), exc
    revoker.join()
    assert error is not None, f"the stream ended normally after {chunks} chunks"
    assert "licence revoked" in str(error)
    assert chunks < 400
    assert failed_at - revoked_at <= 2.0, failed_at - revoked_at
    with pytest.raises(openai.APIStatusError, match="licence revoked") as info:
        complete(client, max_tokens=2)
    assert info.value.status_code == 403
