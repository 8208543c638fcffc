"""Encoders on /v1/embeddings, the offline LLM API, and start-up failures that must be loud."""

import json
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import start_stack
from helpers import REPO, base_env, secure_service, vllm_server

pytestmark = pytest.mark.vllm

TEXTS = ["Hello world", "def add(a, b): return a + b", "The secure service keeps the secret part",
         "orthogonal blinding matrices", "How are you today?", "for i in range(10): total += i"]


def test_bert_embeddings_match_stock(model_factory, log_dir):
    stack = start_stack(model_factory, log_dir, "bert", eager=True, extra_args=["--runner", "pooling"])
    try:
        def embed(server):
            r = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": TEXTS}, timeout=120)
            assert r.status_code == 200, r.text
            return torch.tensor([d["embedding"] for d in r.json()["data"]], dtype=torch.float64)

        got, want = embed(stack.slip), embed(stack.stock)
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert got.shape == want.shape and got.shape[0] == len(TEXTS)
        assert cosine.min().item() >= 0.9999, cosine
        stats = httpx.get(stack.service.url + "/v1/stats").json()
        assert stats["calls"] > 0
    finally:
        stack.stop()


def _sentence_transformers_layout(model_dir, width: int) -> None:
    """The files sentence-transformers writes next to the encoder: mean pooling, then L2 norm."""
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": width, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
        "sentence_bert_config.json": {"max_seq_length": 512, "do_lower_case": False},
        "config_sentence_transformers.json": {"__version__": {"sentence_transformers": "3.0.1"},
                                              "similarity_fn_name": "cosine"},
    }
    for rel, content in files.items():
        (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / rel).write_text(json.dumps(content))
    (model_dir / "2_Normalize").mkdir(exist_ok=True)


def test_sentence_transformers_checkpoint_keeps_its_pooling(tmp_path, log_dir):
    """A sentence-transformers layout (mean pooling + normalisation, in modules.json and 1_Pooling/):
    OUT/public carries those files, so protected vLLM pools like stock vLLM (before, it fell back to
    CLS pooling without normalisation: cosine 0.52)."""
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect
    from slip_vllm.protect.tiny_models import make_tiny_model

    original = make_tiny_model("bert", tmp_path / "st-bert", hidden=128, layers=2, heads=4, kv_heads=4, seed=3)
    _sentence_transformers_layout(original, 128)
    protect(original, tmp_path / "out", ProtectConfig(default_rank=RankPolicy(absolute=16), seed=7), progress=False)
    public = tmp_path / "out" / "public"
    assert json.loads((public / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    service = secure_service(tmp_path / "out" / "secret", log_dir, name="st-bert-service").start().wait_ready(60)
    args = ["--enforce-eager", "--runner", "pooling"]
    slip = vllm_server(public, log_dir, "st-bert-slip", slip=True, service_url=service.url, extra_args=args).start()
    stock = vllm_server(original, log_dir, "st-bert-stock", slip=False, extra_args=args).start()
    try:
        for server in (slip, stock):
            server.wait_ready(600)

        def embed(server):
            r = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": TEXTS}, timeout=120)
            assert r.status_code == 200, r.text
            return torch.tensor([d["embedding"] for d in r.json()["data"]], dtype=torch.float64)

        got, want = embed(slip), embed(stock)
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cosine.min().item() >= 0.9999, cosine
        # both normalised: the Normalize module of modules.json was read on both sides
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS), dtype=torch.float64), atol=1e-4)
        assert torch.allclose(want.norm(dim=-1), torch.ones(len(TEXTS), dtype=torch.float64), atol=1e-4)
    finally:
        for server in (slip, stock, service):
            server.stop()


def test_start_fails_clearly_without_a_service(model_factory, log_dir):
    _, protected = model_factory("llama", tie=False)
    server = vllm_server(protected / "public", log_dir, "no-service", slip=True,
                         service_url="http://127.0.0.1:9", extra_args=["--enforce-eager"],
                         SLIP_STARTUP_WAIT_S="1").start()
    try:
        assert server.wait_exit(300) != 0
    finally:
        server.stop()
    assert "secure service at http://127.0.0.1:9 is not reachable" in server.tail(400)
    assert "slip secure-service --bundle" in server.tail(400)


def test_start_fails_clearly_with_a_mismatched_bundle(model_factory, log_dir):
    _, protected = model_factory("llama", tie=False)
    _, other = model_factory("qwen2", tie=True)
    service = secure_service(other / "secret", log_dir, name="wrong-service").start().wait_ready(60)
    server = vllm_server(protected / "public", log_dir, "wrong-bundle", slip=True, service_url=service.url,
                         extra_args=["--enforce-eager"]).start()
    try:
        assert server.wait_exit(300) != 0
    finally:
        server.stop()
        service.stop()
    assert "holds a bundle for another artifact" in server.tail(400)


OFFLINE = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], load_format=sys.argv[2], dtype="float32", max_model_len=256,
              enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(["Hello world", "def add(a, b):", "The secure service"], params)
    print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
'''


def test_offline_llm_api_matches_transformers(model_factory, log_dir, tmp_path):
    """The offline ``LLM`` API on the protected artifact against Hugging Face transformers running
    the original weights (golden reference, greedy)."""
    import transformers

    original, protected = model_factory("llama", tie=False)
    service = secure_service(protected / "secret", log_dir, name="offline-service").start().wait_ready(60)
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    try:
        env = base_env(SLIP_SERVICE_URL=service.url.replace("http://", "shm://"))
        proc = subprocess.run([sys.executable, str(script), str(protected / "public"), "slip"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        service.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS=")[1].splitlines()[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(original)
    model = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    for prompt, tokens in zip(["Hello world", "def add(a, b):", "The secure service"], got):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert out[0, ids.shape[1]:].tolist() == tokens, prompt
