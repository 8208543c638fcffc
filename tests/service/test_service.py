"""The secure service over a real socket: golden outputs, every bad input answered 4xx, fuzzing."""

import json
import random
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file

from helpers import secure_service
from slip_vllm.core import wire


@pytest.fixture(scope="module")
def artifact(model_factory):
    return model_factory("llama", tie=False)


@pytest.fixture(scope="module")
def service(artifact, log_dir):
    server = secure_service(artifact[1] / "secret", log_dir, name="service-unit").start().wait_ready(60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact[1] / "public" / "slip_manifest.json").read_text())


def secret_of(artifact, name):
    """W_C = W - W_D from the original and public checkpoints (the golden reference)."""
    w = load_file(str(artifact[0] / "model.safetensors"))[name].double()
    d = load_file(str(artifact[1] / "public" / "model.safetensors"))[name].double()
    return w - d


def post(service, body: bytes, **headers) -> httpx.Response:
    return httpx.post(service.url + "/v1/split/apply", content=body, timeout=10,
                      headers={"content-type": "application/octet-stream", **headers})


_seq = iter(range(1, 10**9))


def frame(kind, ids, payload, session=77):
    return wire.encode_request(kind, ids, payload, session=session, seq=next(_seq))


def raw_status(port: int, request: bytes) -> int:
    """Status code of a hand-written HTTP request (httpx refuses to send a lying Content-Length)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_health_and_info_reveal_no_secrets(service, artifact, manifest):
    assert httpx.get(service.url + "/healthz").status_code == 200
    info = httpx.get(service.url + "/v1/info").json()
    bundle = json.loads((artifact[1] / "secret" / "bundle.json").read_text())
    assert info["public_manifest_sha256"] == bundle["public_manifest_sha256"]
    assert info["protocol"] == "split"
    assert set(info) == {"protocol", "architecture", "model_type", "public_manifest_sha256", "tensors",
                         "secret_parameters", "data_planes", "instance", "max_step_tokens", "max_body_bytes", "licences"}
    assert info["licences"] is False  # no licences file: the loopback service of before
    assert info["data_planes"] == ["http", "shm"]
    # a service process's instance id is in every data-plane reply: a restart is seen in the next one
    tid = {t["name"]: t["id"] for t in manifest["tensors"]}["model.layers.1.self_attn.o_proj.weight"]
    r = post(service, frame(wire.KIND_LINEAR, (tid,), torch.randn(3, 128)))
    assert r.status_code == 200 and wire.reply_instance(r.content) == info["instance"] != 0


def test_fused_linear_matches_golden_reference(service, artifact, manifest):
    by_name = {t["name"]: t for t in manifest["tensors"]}
    names = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    ids = tuple(by_name[n]["id"] for n in names)
    x = torch.randn(9, 128)
    r = post(service, frame(wire.KIND_LINEAR, ids, x))
    assert r.status_code == 200, r.text
    got = wire.decode_reply(r.content).double()
    want = torch.cat([x.double() @ secret_of(artifact, n).T for n in names], 1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_embedding_and_lm_head(service, artifact, manifest):
    by_name = {t["name"]: t for t in manifest["tensors"]}
    emb = by_name["model.embed_tokens.weight"]["id"]
    ids = torch.tensor([0, 5, 77, 5])
    r = post(service, frame(wire.KIND_EMBED, (emb,), ids))
    assert r.status_code == 200, r.text
    want = secret_of(artifact, "model.embed_tokens.weight")[ids]
    assert torch.allclose(wire.decode_reply(r.content).double(), want, rtol=1e-4, atol=1e-5)
    head = by_name["lm_head.weight"]["id"]
    x = torch.randn(3, 128)
    r = post(service, frame(wire.KIND_LINEAR, (head,), x))
    want = x.double() @ secret_of(artifact, "lm_head.weight").T
    assert torch.allclose(wire.decode_reply(r.content).double(), want, rtol=1e-4, atol=1e-5)


def test_bad_inputs_get_clear_4xx(service, manifest):
    n = len(manifest["tensors"])
    q = manifest["tensors"][1]["id"]
    emb = manifest["tensors"][0]["id"]
    nan = torch.ones(2, 128)
    nan[1, 3] = float("nan")
    inf = torch.ones(2, 128)
    inf[0, 0] = float("inf")
    cases = {
        "not a frame": (b"hello", 400),
        "wrong width": (frame(wire.KIND_LINEAR, (q,), torch.ones(2, 64)), 422),
        "nan": (frame(wire.KIND_LINEAR, (q,), nan), 422),
        "inf": (frame(wire.KIND_LINEAR, (q,), inf), 422),
        "unknown tensor": (frame(wire.KIND_LINEAR, (n + 5,), torch.ones(2, 128)), 404),
        "token id out of range": (frame(wire.KIND_EMBED, (emb,), torch.tensor([0, 10**6])), 422),
        "embed on a projection": (frame(wire.KIND_EMBED, (q,), torch.tensor([1])), 422),
        "mixed input widths": (frame(wire.KIND_LINEAR, (q, manifest["tensors"][-2]["id"]), torch.ones(1, 128)), 422),
    }
    for label, (body, status) in cases.items():
        r = post(service, body)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert "error" in r.json(), label
    # Replays and reordering within a session.
    body = wire.encode_request(wire.KIND_LINEAR, (q,), torch.ones(1, 128), session=999, seq=10)
    assert post(service, body).status_code == 200
    assert post(service, body).status_code == 409
    older = wire.encode_request(wire.KIND_LINEAR, (q,), torch.ones(1, 128), session=999, seq=5)
    assert post(service, older).status_code == 409
    # Oversized body: refused from its declared length, before it is read.
    assert raw_status(service.port, b"POST /v1/split/apply HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1000000000000\r\n\r\n" + b"\0" * 1024) == 413
    # A body that really is too long, sent without declaring its length (chunked).
    too_big = (b"\0" * (1 << 20) for _ in range(300))
    r = httpx.post(service.url + "/v1/split/apply", content=too_big, timeout=30)
    assert r.status_code == 413


def test_fuzz_hundreds_of_malformed_requests_then_still_correct(service, manifest):
    rng = random.Random(1234)
    q = manifest["tensors"][1]["id"]
    good = frame(wire.KIND_LINEAR, (q,), torch.randn(4, 128))
    assert post(service, good).status_code == 200  # later copies of it are replays
    statuses = []
    for i in range(400):
        choice = rng.randrange(5)
        if choice == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        elif choice == 1:  # corrupt the header fields that describe the payload
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(0, 16)
                mutated[pos] = (mutated[pos] + rng.randrange(1, 256)) % 256
            body = bytes(mutated)
        elif choice == 2:  # truncate or extend
            body = good[: rng.randrange(len(good))] if rng.random() < 0.5 else good + b"\x01" * rng.randrange(1, 9)
        elif choice == 3:  # replay an old sequence number
            body = good
        else:  # random ids and shapes in a well-formed frame
            rows, cols = rng.randrange(1, 5), rng.choice([1, 64, 127, 129, 256])
            ids = tuple(rng.randrange(0, 40) for _ in range(rng.randrange(1, 4)))
            body = wire.encode_request(wire.KIND_LINEAR, ids, torch.randn(rows, cols), session=5, seq=0)
        r = post(service, body)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (i, choice, r.status_code, r.text[:200])
    assert len(set(statuses)) >= 3
    assert httpx.get(service.url + "/healthz").status_code == 200
    stats = httpx.get(service.url + "/v1/stats").json()
    assert stats["rejected"] >= 400
    x = torch.randn(2, 128)
    r = post(service, frame(wire.KIND_LINEAR, (q,), x))
    assert r.status_code == 200
    assert wire.decode_reply(r.content).shape == (2, 128)


def test_token_is_required_when_configured(artifact, log_dir):
    server = secure_service(artifact[1] / "secret", log_dir, name="service-token",
                            SLIP_SERVICE_TOKEN="s3cret-token").start().wait_ready(60)
    try:
        body = frame(wire.KIND_LINEAR, (1,), torch.ones(1, 128))
        assert post(server, body).status_code == 401
        assert post(server, body, authorization="Bearer wrong").status_code == 401
        assert post(server, frame(wire.KIND_LINEAR, (1,), torch.ones(1, 128)),
                    authorization="Bearer s3cret-token").status_code == 200
    finally:
        server.stop()


def test_damaged_bundle_stops_the_service_at_start(artifact, tmp_path):
    import shutil

    bundle = tmp_path / "secret"
    shutil.copytree(artifact[1] / "secret", bundle)
    with open(bundle / "factors.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x7f" * 8)
    proc = subprocess.run([sys.executable, "-m", "slip_vllm.cli", "secure-service", "--bundle", str(bundle),
                           "--port", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "does not match its recorded hash" in proc.stderr


def test_service_never_imports_vllm():
    code = "import sys, secure_service.app, secure_service.bundle, secure_service.split_executor; " \
           "print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_split_traffic_reveals_the_secret_to_an_observing_host(service, artifact, manifest):
    """Why `split` is not safe against a host that watches traffic: it sees x and W_C x for every
    token, so n independent token rows give W_C exactly by least squares (brief §2)."""
    entry = next(t for t in manifest["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight")
    m, n = entry["shape"]
    x = torch.randn(n + 8, n)
    r = post(service, frame(wire.KIND_LINEAR, (entry["id"],), x))
    observed = wire.decode_reply(r.content).double()
    recovered = torch.linalg.lstsq(x.double(), observed).solution.T  # [m, n]
    truth = secret_of(artifact, entry["name"])
    assert (torch.linalg.norm(recovered - truth) / torch.linalg.norm(truth)).item() < 1e-5
