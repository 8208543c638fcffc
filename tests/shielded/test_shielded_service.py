"""Protocol ``shielded`` end to end, without vLLM: ``slip protect --protocol shielded``, the secure
service as a real uvicorn process on a loopback socket, and the host driver
(``slip_vllm.host.shielded_client``) doing the masked GEMMs over HTTP.

Models and steps are those of ``test_executor.py`` (tiny random Llama and Qwen2 with tied
embeddings, rank 8, seed 11, a scheduler simulation of 6 mixed prefill/decode steps with shuffled
blocks, logits for every token row), so the service's logits can be compared bit for bit with the
executor built in-process from the original checkpoint, and with transformers under the executor
tests' int8 thresholds.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from helpers import secure_service
from secure_service.shielded_api import StepRejected
from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.core import wire
from slip_vllm.core.field import is_prime
from slip_vllm.core.lock import DEFAULT_LOCK, seed_lock_key
from slip_vllm.core.manifest import read_public_manifest
from slip_vllm.host.shielded_client import ShieldedHost, ShieldedServiceError
from slip_vllm.protect.artifact import ProtectConfig, protect
from slip_vllm.protect.tiny_models import make_tiny_model
from test_executor import (ABS_TOL, AGREE_INT8, BLOCK_SIZE, NUM_BLOCKS, POLICY, REL_TOL, _errors, _hf_logits,
                           _Host, _run, _scenario)

SEED = 11
SERVICE_ENV = {"SLIP_SHIELDED_KV_BLOCKS": str(NUM_BLOCKS), "SLIP_SHIELDED_BLOCK_SIZE": str(BLOCK_SIZE),
               "SLIP_MASK_POOL_ROWS": "16", "SLIP_MASK_PRECOMPUTE_CHUNK": "16",
               "SLIP_SHIELDED_OWNER_LEASE_S": "0",
               # these tests compare every logit with the in-process executor: the whole row must come back
               "SLIP_SHIELDED_LOGITS_POLICY": "full"}  # hosts of the tests take turns: no engine holds the service
PUBLIC_ALLOWED = {"config.json", "slip_manifest.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "generation_config.json", "chat_template.jinja"}
SECRET_WORDS = ("scale", "norm", "bias", "embed", "factor", "left", "right", "freivalds", "secret", "bundle")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """name -> (original dir, protected dir): Llama through the CLI, Qwen2 (tied) through the API.

    One torch thread everywhere: LAPACK's SVD may pick other (equally exact) singular bases with
    another thread count, and the comparisons below are bit for bit with a split made in-process.
    int8 public weights (``--weight-bits 8``, not the default 16): the comparisons are with the
    in-process executor at its int8 default and test_executor's int8 error budget; 16-bit
    artifacts are covered by test_shielded_precision.py and the serving tests."""
    import os

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shielded-artifacts")
    llama = make_tiny_model("llama", root / "llama", hidden=128, layers=2, heads=4, kv_heads=2, seed=3)
    r = subprocess.run([sys.executable, "-m", "slip_vllm.cli", "protect", "--model", str(llama), "--out",
                        str(root / "llama-out"), "--protocol", "shielded", "--rank", "8", "--seed", str(SEED),
                        "--weight-bits", "8"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "protocol shielded" in r.stdout
    qwen = make_tiny_model("qwen2", root / "qwen2", hidden=128, layers=2, heads=4, kv_heads=2, tie=True, seed=3)
    protect(qwen, root / "qwen2-out", ProtectConfig(protocol="shielded", default_rank=POLICY, seed=SEED,
                                                    weight_bits=8), progress=False)
    return {"llama": (Path(llama), root / "llama-out"), "qwen2": (Path(qwen), root / "qwen2-out")}


@pytest.fixture(scope="module")
def services(artifacts, log_dir):
    started = {}

    def get(name):
        if name not in started:
            started[name] = secure_service(artifacts[name][1] / "secret", log_dir, name=f"shielded-{name}",
                                           **SERVICE_ENV).start().wait_ready(60)
        return started[name]

    yield get
    for server in started.values():
        server.stop()


def _reference_executor(model_dir):
    """The in-process executor of the artifacts: same split and, as ``slip protect --seed`` draws
    it, the same default lock."""
    return ShieldedExecutor.from_checkpoint(model_dir, POLICY, seed=SEED, lock=DEFAULT_LOCK,
                                            lock_key=seed_lock_key(SEED), num_blocks=NUM_BLOCKS,
                                            block_size=BLOCK_SIZE, pool_rows=0)


@pytest.fixture(scope="module")
def reference(artifacts):
    """name -> (steps, in-process executor logits rows [(sid, pos, logits)]) for the scenario."""
    cache = {}

    def get(name):
        if name not in cache:
            ex = _reference_executor(artifacts[name][0])
            _, steps = _scenario(ex.vocab, seed=len(name))
            cache[name] = (steps, _run(ex, steps, _Host(ex)))
            ex.close()
        return cache[name]

    return get


def _batch(st):
    b = {k: v for k, v in st.items() if k != "rows"}
    b["logits_indices"] = torch.arange(int(b["input_ids"].shape[0]))
    return b


def _serve(host, steps):
    out = []
    for st in steps:
        logits = host.step(**_batch(st))
        out += [(sid, j, logits[r]) for r, (sid, j) in enumerate(st["rows"])]
    return out


def _stats(service):
    return httpx.get(service.url + "/v1/stats", timeout=10).json()


# ---------------------------------------------------------------------------------------------
# the artifact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_public_dir_holds_only_int8_weights_manifest_config_tokenizer(artifacts, name):
    _, out = artifacts[name]
    public, secret = out / "public", out / "secret"
    files = {p.name for p in public.iterdir()}
    assert files <= PUBLIC_ALLOWED and {"config.json", "slip_manifest.json", "model.safetensors"} <= files
    assert not any(w in f for f in files for w in SECRET_WORDS)
    manifest, digest = read_public_manifest(public)
    keys = manifest.extra["layer_keys"]
    assert manifest.protocol == "shielded"
    assert keys == [f"layers.{i}.{k}" for i in range(2) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
    p = manifest.extra["p"]
    assert is_prime(p) and manifest.extra["weight_bits"] == 8 and manifest.extra["act_bits"] == 16
    with safe_open(str(public / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert names == {f"{k}.w_q" for k in keys}
    assert all(t.dtype == torch.int8 for t in tensors.values())  # no float tensor at all
    assert not any(w in n for n in names for w in SECRET_WORDS)
    shapes = {e.name: e.shape for e in manifest.tensors}
    assert all(tuple(tensors[f"{k}.w_q"].shape) == shapes[k] for k in keys)
    assert shapes["layers.0.qkv"] == (128 + 2 * 64, 128) and shapes["lm_head"][1] == 128
    config = json.loads((public / "config.json").read_text())
    assert config["quantization_config"]["protocol"] == "shielded"
    bundle = json.loads((secret / "bundle.json").read_text())
    assert bundle["public_manifest_sha256"] == digest and bundle["p"] == p
    assert {"factors.safetensors", "shielded.safetensors", "bundle.json", "config.json"} <= {x.name for x in secret.iterdir()}
    assert secret.stat().st_mode & 0o077 == 0


def test_bundle_rebuilds_the_checkpoint_executor_bit_for_bit(artifacts):
    """from_bundle == from_checkpoint (same rank policy and seed); Freivalds keys and p are stored."""
    model_dir, out = artifacts["qwen2"]
    a = _reference_executor(model_dir)
    b = ShieldedExecutor.from_bundle(out / "secret", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    c = ShieldedExecutor.from_bundle(out / "secret", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    assert a.p == b.p == read_public_manifest(out / "public")[0].extra["p"]
    for key in a.layer_keys():
        qa, qb = a.quantized_weights()[key], b.quantized_weights()[key]
        assert torch.equal(qa.w_q, qb.w_q) and torch.equal(qa.scale, qb.scale)
        assert torch.equal(a.splits[key].left, b.splits[key].left)
        # the bundle's dense block-diagonal left is cut into one block per fused part, as on the
        # checkpoint path
        fa, fb = a.splits[key].low_rank, b.splits[key].low_rank
        assert len(fb.lefts) == len(a.splits[key].parts) == {"qkv": 3, "gate_up": 2}.get(key.split(".")[-1], 1)
        assert fa.cols == fb.cols and all(torch.equal(x, y) for x, y in zip(fa.lefts, fb.lefts))
        assert torch.equal(b.freivalds_vectors()[key], c.freivalds_vectors()[key])  # persisted, not redrawn
    _, steps = _scenario(a.vocab, seed=4)
    ra, rb = _run(a, steps[:3], _Host(a)), _run(b, steps[:3], _Host(b))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(ra, rb))
    for ex in (a, b, c):
        ex.close()


def test_a_bundle_whose_left_factor_is_not_block_diagonal_is_refused(artifacts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from secure_service.bundle import BundleError
    from slip_vllm.core.manifest import sha256_file

    _, out = artifacts["llama"]
    secret = tmp_path / "secret"
    shutil.copytree(out / "secret", secret)
    meta = json.loads((secret / "bundle.json").read_text())
    factors = load_file(str(secret / meta["factors_file"]))
    left = factors["t0.left"].clone()  # layers.0.qkv: q rows 0:128, q rank 8
    left[0, 8] = 0.25                   # a q row reaching into k's columns
    factors["t0.left"] = left
    save_file(factors, str(secret / meta["factors_file"]))
    meta["factors_sha256"] = sha256_file(secret / meta["factors_file"])
    (secret / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="layers.0.qkv.*not block diagonal"):
        ShieldedExecutor.from_bundle(secret, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)


# ---------------------------------------------------------------------------------------------
# serving steps through the real service
# ---------------------------------------------------------------------------------------------


def _url(service, transport: str) -> str:
    """The service's address for the host driver: its shared-memory channel or HTTP."""
    return service.url.replace("http://", "shm://") if transport == "shm" else service.url


@pytest.mark.parametrize(("name", "transport"), [("llama", "shm"), ("qwen2", "http")])
def test_served_steps_equal_the_executor_and_track_transformers(artifacts, services, reference, name, transport):
    model_dir, out = artifacts[name]
    service = services(name)
    steps, ref_rows = reference(name)
    before = _stats(service)["shielded"]
    with ShieldedHost(out / "public", _url(service, transport), record=True) as host:
        rows, calls = [], []
        for st in steps:
            rows += _serve(host, [st])
            calls.append(list(host.calls))
        keys = host.layer_keys
        # bit-identical to the executor built in-process from the original checkpoint
        assert len(rows) == len(ref_rows) == 44
        assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))
        # 4 masked GEMMs per decoder layer + the LM head, one call each for the whole batch
        assert all(c == keys for c in calls) and len(keys) == 9
        # what crossed the boundary towards the host: only x~ in [0, p), of the layers' widths
        assert len(host.received) == 9 * len(steps)
        for key, x in host.received:
            assert x.dtype == torch.int64 and x.shape[1] == host.weights[key].n
            assert int(x.min()) >= 0 and int(x.max()) < host.p
        crossed = sum(int(x.shape[0]) for _, x in host.received)
    after = _stats(service)["shielded"]
    assert after["host_calls"] - before["host_calls"] == 9 * len(steps)
    assert after["masked_rows"] - before["masked_rows"] == crossed
    assert after["steps_completed"] - before["steps_completed"] == len(steps)
    # against transformers on the original weights: the executor tests' int8 thresholds
    seqs, _ = _scenario(host.weights["lm_head"].m, seed=len(name))
    hf, _ = _hf_logits(model_dir, seqs)
    rel, abs_err, agree = _errors(rows, hf)
    print(f"{name}: served rows={len(rows)} rel max={rel:.4f} max|d|={abs_err:.4f} greedy={agree:.4f} "
          f"host calls/step={len(keys)}")
    assert rel <= REL_TOL and abs_err <= ABS_TOL and agree >= AGREE_INT8


def test_tampering_host_gets_an_integrity_error_and_the_next_step_succeeds(artifacts, services, reference):
    _, out = artifacts["llama"]
    service = services("llama")
    steps, ref_rows = reference("llama")

    class Tampering(ShieldedHost):
        target = "layers.1.down"

        def compute(self, key, x_masked):
            y = super().compute(key, x_masked)
            if key == self.target:
                y = y.clone()
                y[0, 0] = (y[0, 0] + 1) % self.p
            return y

    alarms = _stats(service)["shielded"]["integrity_alarms"]
    url = _url(service, "shm")  # the cheating host's answers travel over the shared-memory channel
    with ShieldedHost(out / "public", url) as honest, Tampering(out / "public", url) as bad:
        _serve(honest, steps[:2])
        # the same engine turns to cheating: its channel, session, sequence and view of the service
        bad.transport.close()
        bad.transport, bad.seq, bad.instance, bad.epoch = honest.transport, honest.seq, honest.instance, honest.epoch
        with pytest.raises(ShieldedServiceError) as err:
            bad.step(**_batch(steps[2]))
        honest.seq = bad.seq
        assert err.value.status == 422 and "integrity" in err.value.message
        assert "lm_head" not in bad.calls  # refused at once
        stats = _stats(service)["shielded"]
        assert stats["integrity_alarms"] == alarms + 1
        assert stats["alarms_per_layer"].get("layers.1.down", 0) >= 1
        # the step was rolled back: retrying it honestly gives the reference logits, and so on
        rows = _serve(honest, steps[2:])
    n_before = sum(len(st["rows"]) for st in steps[:2])
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows[n_before:]))
    assert httpx.get(service.url + "/healthz").status_code == 200


def _raw_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_fuzz_malformed_shielded_requests_get_4xx_and_the_service_stays_correct(artifacts, services, reference):
    _, out = artifacts["llama"]
    service = services("llama")
    steps, ref_rows = reference("llama")
    manifest, _ = read_public_manifest(out / "public")
    p, keys = manifest.extra["p"], manifest.extra["layer_keys"]
    widths = {e.name: e.shape for e in manifest.tensors}
    rng = random.Random(2024)
    client = httpx.Client(timeout=30, headers={"content-type": "application/octet-stream"})
    session, seq = 0x5EED, [0]

    def step_frame(**changes):
        seq[0] += 1
        b = {**_batch(steps[0]), **changes}
        return wire.encode_shielded_step(session, seq[0], **b)

    def post(path, body):
        return client.post(service.url + path, content=body)

    live = [None]  # the ask of the step in flight, for answer fuzzing

    def ask():
        if live[0] is None:
            r = post("/v1/shielded/step", step_frame())
            assert r.status_code == 200, r.text
            live[0] = wire.decode_shielded_message(r.content)
        return live[0]

    def answer(msg, **changes):
        y = changes.pop("y", None)
        if y is None:
            y = torch.zeros(msg.payload.shape[0], widths[msg.key][0], dtype=torch.int64)
        f = dict(kind=wire.MSG_ANSWER, step=msg.step, call=msg.call, key=msg.key, payload=y)
        f.update(changes)
        return wire.encode_shielded_message(f["kind"], f["step"], f["call"], f["key"], f["payload"])

    good = step_frame()
    r = post("/v1/shielded/step", good)  # later copies of it are replays
    assert r.status_code == 200, r.text
    live[0] = wire.decode_shielded_message(r.content)
    alarms = _stats(service)["shielded"]["integrity_alarms"]
    rejected = _stats(service)["rejected"]
    statuses, too_big = [], 0
    for i in range(240):
        choice = rng.randrange(9)
        path = "/v1/shielded/step"
        if choice == 0:  # random bytes to either endpoint
            path = rng.choice(["/v1/shielded/step", "/v1/shielded/gemm"])
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        elif choice == 1:  # one corrupted byte in the magic or the counts of a step frame
            body = bytearray(good)
            pos = rng.randrange(0, 20)
            body[pos] = (body[pos] + rng.randrange(1, 256)) % 256
            body = bytes(body)
        elif choice == 2:  # truncated or extended step frame
            body = good[: rng.randrange(len(good))] if rng.random() < 0.5 else good + b"\x00" * rng.randrange(1, 16)
        elif choice == 3:  # replayed step (old sequence number of the session)
            body = good
        elif choice == 4:  # a well-formed step whose metadata is wrong
            st = _batch(steps[0])
            bad = rng.choice([
                {"input_ids": st["input_ids"] + 10**6}, {"slot_mapping": st["slot_mapping"] + NUM_BLOCKS * BLOCK_SIZE},
                {"positions": st["positions"] + 1}, {"seq_lens": st["seq_lens"] - 1},
                {"block_tables": st["block_tables"] + NUM_BLOCKS}, {"logits_indices": st["logits_indices"] + 1000},
                {"input_ids": -st["input_ids"] - 1}])
            body = step_frame(**bad)
        else:  # answers to the step in flight: wrong step, call, key, shape, kind, values >= p
            path = "/v1/shielded/gemm"
            msg = ask()
            kind = rng.randrange(7)
            if kind == 0:
                body = answer(msg, step=msg.step ^ 0x1234)
            elif kind == 1:
                body = answer(msg, call=msg.call + rng.choice([1, 5]))
            elif kind == 2:
                body = answer(msg, key="layers.9.qkv")
            elif kind == 3:
                other = rng.choice([k for k in keys if k != msg.key and widths[k][0] == widths[msg.key][0]]
                                   or [k for k in keys if k != msg.key])
                body = answer(msg, key=other, payload=torch.zeros(msg.payload.shape[0], widths[other][0],
                                                                  dtype=torch.int64))
            elif kind == 4:
                body = answer(msg, payload=torch.zeros(msg.payload.shape[0], widths[msg.key][0] + 1, dtype=torch.int64))
            elif kind == 5:
                raw = bytearray(answer(msg))
                raw[4] = wire.MSG_LOGITS  # an answer that claims another kind / dtype
                body = bytes(raw)
            else:
                y = torch.full((msg.payload.shape[0], widths[msg.key][0]), p, dtype=torch.int64)
                body = answer(msg, y=y)
                live[0] = None  # values >= p: integrity failure, the step is aborted
        r = post(path, body)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (i, choice, r.status_code, r.text[:200])
        assert "error" in r.json()
        if choice == 4 and live[0] is not None:
            live[0] = None  # a new step (even a refused one) replaces the one in flight
    # oversized bodies, declared and undeclared
    for path in (b"/v1/shielded/step", b"/v1/shielded/gemm"):
        status = _raw_status(service.port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 1000000000000\r\n\r\n" + b"\0" * 1024)
        statuses.append(status)
        too_big += status == 413
    assert too_big == 2
    assert len(statuses) >= 200 and len(set(statuses)) >= 4, sorted(set(statuses))
    client.close()
    assert httpx.get(service.url + "/healthz").status_code == 200
    stats = _stats(service)
    assert stats["rejected"] - rejected >= 200
    assert stats["shielded"]["integrity_alarms"] > alarms  # values >= p count as integrity failures
    # the service still answers correctly: the whole scenario again, bit for bit
    with ShieldedHost(out / "public", service.url) as host:
        rows = _serve(host, steps)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))


def test_restarted_service_gives_identical_results(artifacts, services, reference, log_dir):
    """A second service process built from the same bundle: same p, same W_q, same stored keys."""
    _, out = artifacts["qwen2"]
    steps, ref_rows = reference("qwen2")
    first = services("qwen2")
    process_facts = ("instance", "kv_epoch", "engine_attached")  # of this process, not of the bundle
    info = {k: v for k, v in httpx.get(first.url + "/v1/info").json().items() if k not in process_facts}
    first.stop()
    again = secure_service(out / "secret", log_dir, name="shielded-qwen2-restart", **SERVICE_ENV).start().wait_ready(60)
    try:
        info_again = httpx.get(again.url + "/v1/info").json()
        assert (info_again["kv_epoch"], info_again["engine_attached"]) == (0, False)
        assert {k: v for k, v in info_again.items() if k not in process_facts} == info
        with ShieldedHost(out / "public", again.url) as host:
            rows = _serve(host, steps)
        assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))
    finally:
        again.stop()


def test_info_reveals_no_secrets_and_the_split_plane_is_closed(artifacts, services):
    _, out = artifacts["llama"]
    service = services("llama")
    info = httpx.get(service.url + "/v1/info").json()
    manifest, digest = read_public_manifest(out / "public")
    assert info["protocol"] == "shielded" and info["public_manifest_sha256"] == digest
    assert info["p"] == manifest.extra["p"]  # public: the host holds p
    assert set(info) == {"protocol", "architecture", "model_type", "public_manifest_sha256", "tensors",
                         "secret_parameters", "p", "masked_gemms_per_step", "kv_blocks", "block_size",
                         "steps_in_flight_max", "data_planes", "max_model_len", "step_timeout_s",
                         "step_timeout_per_row_s", "max_step_tokens", "max_body_bytes", "instance", "kv_epoch",
                         "engine_attached", "owner_lease_s", "licences", "logits_policy"}
    assert info["logits_policy"] == "full"  # the module's services run with SLIP_SHIELDED_LOGITS_POLICY=full
    r = httpx.post(service.url + "/v1/split/apply", content=b"x" * 64)
    assert r.status_code == 403


def test_split_bundle_closes_the_shielded_plane(model_factory):
    from starlette.testclient import TestClient

    from secure_service.app import create_app
    from secure_service.bundle import load_bundle

    _, protected = model_factory("llama", tie=False)
    with TestClient(create_app(load_bundle(protected / "secret"))) as client:
        for path in ("/v1/shielded/step", "/v1/shielded/gemm"):
            assert client.post(path, content=b"\0" * 40).status_code == 403


def test_one_step_in_flight_a_new_step_supersedes_the_old_one(artifacts, services, reference):
    """The executor holds one KV cache: a new step aborts (and rolls back) the one in flight, whose
    answers are then refused with 409; the new step completes exactly."""
    _, out = artifacts["llama"]
    service = services("llama")
    steps, ref_rows = reference("llama")
    with ShieldedHost(out / "public", service.url) as host:
        first = httpx.post(service.url + "/v1/shielded/step", timeout=30,
                           content=wire.encode_shielded_step(0xABC, 1, **_batch(steps[0])))
        assert first.status_code == 200
        old = wire.decode_shielded_message(first.content)
        rows = _serve(host, steps[:1])  # supersedes the step above
        y = host.compute(old.key, old.payload)
        late = httpx.post(service.url + "/v1/shielded/gemm", timeout=30,
                          content=wire.encode_shielded_message(wire.MSG_ANSWER, old.step, old.call, old.key, y))
        assert late.status_code == 409 and "no step" in late.json()["error"]
        rows += _serve(host, steps[1:2])
    n = sum(len(st["rows"]) for st in steps[:2])
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows[:n]))


def test_deferred_steps_give_the_same_logits_for_rows_asked_after_the_layers(artifacts, services, reference):
    """The vLLM form of a step: layers first (MSG_READY), then any number of logits requests for
    chosen rows (sampling rows, prompt-logprob rows), bit-identical to the in-process executor
    asked for the same rows in the same requests, and equal to the one-shot step up to the float32
    rounding of the LM head's W_C x (a row's last bits may depend on how many rows share the
    product; measured 2.4e-7, asserted <= 1e-5); a stale, replayed or out-of-range request is
    refused and the service stays correct."""
    model_dir, out = artifacts["llama"]  # the qwen2 service is stopped by the restart test
    service = services("llama")
    steps, ref_rows = reference("llama")
    ex = _reference_executor(model_dir)
    before = _stats(service)["shielded"]
    with ShieldedHost(out / "public", service.url) as host:
        rows, same_requests = [], []
        for st in steps:
            b = _batch(st)
            del b["logits_indices"]
            n = host.begin(**b)
            assert n == int(st["input_ids"].shape[0]) and host.calls == host.layer_keys[:-1]
            hidden = ex.forward_layers(**b, host_gemm=_Host(ex))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
            first, second = order[: n // 2 + 1], order[n // 2 + 1:]
            logits = torch.empty(n, host.weights["lm_head"].m)
            ref = torch.empty_like(logits)
            logits[first] = host.logits(first)
            ref[first] = ex.head(hidden[first], _Host(ex))
            if len(second):
                logits[second] = host.logits(second)
                ref[second] = ex.head(hidden[second], _Host(ex))
            rows += [(sid, j, logits[r]) for r, (sid, j) in enumerate(st["rows"])]
            same_requests += [ref[r] for r in range(n)]
        assert all(torch.equal(a[2], b) for a, b in zip(rows, same_requests))
        regrouped = max((a[2] - b[2]).abs().max().item() for a, b in zip(rows, ref_rows))
        print(f"deferred logits vs the one-shot step: max |d| = {regrouped:.2e}")
        assert regrouped <= 1e-5
        # refusals: out-of-range rows, a replayed request, a superseded step
        ready, call = host.ready_step, host._next_call
        post = lambda path, body: httpx.post(service.url + path, content=body, timeout=30)  # noqa: E731
        bad = post("/v1/shielded/logits", wire.encode_shielded_message(
            wire.MSG_ROWS, ready, call, "", torch.tensor([[host.ready_rows]])))
        assert bad.status_code == 422
        replay = post("/v1/shielded/logits", wire.encode_shielded_message(
            wire.MSG_ROWS, ready, call - 2, "", torch.tensor([[0]])))
        assert replay.status_code == 409
        host.step(**_batch(steps[0]))  # a one-shot step supersedes the ready one
        stale = post("/v1/shielded/logits", wire.encode_shielded_message(
            wire.MSG_ROWS, ready, call, "", torch.tensor([[0]])))
        assert stale.status_code == 409 and "no ready step" in stale.json()["error"]
    after = _stats(service)["shielded"]
    assert after["logits_requests"] - before["logits_requests"] == sum(
        1 + (len(st["rows"]) > len(st["rows"]) // 2 + 1) for st in steps)
    ex.close()


def test_bearer_token_guards_the_shielded_plane(artifacts, reference):
    from starlette.testclient import TestClient

    from secure_service.app import create_app
    from secure_service.bundle import load_bundle

    _, out = artifacts["llama"]
    steps, _ = reference("llama")
    app = create_app(load_bundle(out / "secret"), token="s3cret",
                     shielded_options={"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "pool_rows": 0})
    body = wire.encode_shielded_step(1, 1, **_batch(steps[0]))
    with TestClient(app) as client:
        assert client.post("/v1/shielded/step", content=body).status_code == 401
        assert client.post("/v1/shielded/gemm", content=b"\0" * 40,
                           headers={"authorization": "Bearer wrong"}).status_code == 401
        r = client.post("/v1/shielded/step", content=body, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and wire.decode_shielded_message(r.content).kind == wire.MSG_ASK
        # more tokens than the KV cache has slots: refused before any work
        n = NUM_BLOCKS * BLOCK_SIZE + 6
        big = wire.encode_shielded_step(1, 2, torch.ones(n, dtype=torch.int64), torch.arange(n), torch.arange(n) % 64,
                                        torch.tensor([0, n]), torch.tensor([n]), torch.zeros(1, 32, dtype=torch.int64))
        r = client.post("/v1/shielded/step", content=big, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 422 and "KV cache" in r.json()["error"]
    app.state.shielded.close()


def test_a_step_the_host_abandons_is_aborted_after_the_timeout(artifacts, reference):
    import time

    from starlette.testclient import TestClient

    from secure_service.app import create_app
    from secure_service.bundle import load_bundle

    _, out = artifacts["llama"]
    steps, ref_rows = reference("llama")
    app = create_app(load_bundle(out / "secret"), shielded_options={
        "num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "pool_rows": 0, "timeout_s": 0.3})
    with TestClient(app) as client:
        r = client.post("/v1/shielded/step", content=wire.encode_shielded_step(1, 1, **_batch(steps[0])))
        msg = wire.decode_shielded_message(r.content)
        time.sleep(0.8)
        y = torch.zeros(msg.payload.shape[0], 128 + 2 * 64, dtype=torch.int64)
        late = client.post("/v1/shielded/gemm",
                           content=wire.encode_shielded_message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y))
        assert late.status_code == 409 and "aborted" in late.json()["error"]
        assert client.get("/v1/stats").json()["shielded"]["steps_aborted"] == 1
    app.state.shielded.close()


# ---------------------------------------------------------------------------------------------
# the service object in-process: steps advanced by their callers, roll-back on abort
# ---------------------------------------------------------------------------------------------


def _svc(artifacts, **kw):
    from secure_service.shielded_api import ShieldedService

    _, out = artifacts["llama"]
    return ShieldedService(out / "secret", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0, **kw)


def _answer_msg(msg, y):
    body = wire.encode_shielded_message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y)
    return wire.decode_shielded_message(body, expect_kind=wire.MSG_ANSWER)


def _start(svc, seq, st, defer=False):
    b = _batch(st)
    if defer:
        del b["logits_indices"]
    # the first frame claims the service (epoch 0), the later ones name its instance and KV epoch
    frame = wire.decode_shielded_step(wire.encode_shielded_step(0x77, seq, **b, defer_logits=defer,
                                                                instance=svc.instance, epoch=svc.epoch))
    return wire.decode_shielded_message(svc.start_step(frame))


def _finish(svc, msg, host, on_ask=None):
    """Answer asks until the service replies with something else; returns that message."""
    while msg.kind == wire.MSG_ASK:
        if on_ask is not None:
            on_ask(msg)
        msg = wire.decode_shielded_message(svc.answer(_answer_msg(msg, host(msg.key, msg.payload))))
    return msg


def _rows_of(st, logits):
    return [(sid, j, logits[r]) for r, (sid, j) in enumerate(st["rows"])]


def test_service_advances_each_step_in_the_calling_thread(artifacts, reference):
    """No worker thread: while the service waits for the host no thread of its own exists, and the
    logits are those of the in-process executor, bit for bit."""
    import threading

    steps, ref_rows = reference("llama")
    svc = _svc(artifacts)
    host = _Host(svc.executor)
    rows = _rows_of(steps[0], _finish(svc, _start(svc, 1, steps[0]), host).payload)  # warm-up
    baseline = set(threading.enumerate())
    seen = []

    def no_new_thread(msg):
        seen.append(set(threading.enumerate()) - baseline)

    for i, st in enumerate(steps[1:], start=2):
        msg = _finish(svc, _start(svc, i, st), host, on_ask=no_new_thread)
        assert msg.kind == wire.MSG_LOGITS
        rows += _rows_of(st, msg.payload)
    assert len(seen) == 9 * (len(steps) - 1) and not any(seen)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))
    stats = svc.stats()
    assert stats["steps_started"] == stats["steps_completed"] == len(steps) and stats["steps_aborted"] == 0
    svc.close()


def test_topk_logits_policy_sends_only_the_top_k_logits_and_keeps_the_argmax(artifacts, reference, monkeypatch):
    """The logits policy at the boundary: with ``topk:5`` every logits row the host receives holds
    the 5 largest logits of the full row (the same service with ``full``), bit for bit at their
    positions, and -inf elsewhere,
    so its argmax (vLLM's greedy choice) is the full row's; the app reads the policy from the
    settings (default topk:20) and reports it in /v1/info; a bad policy is refused at start."""
    from secure_service.app import create_app
    from secure_service.bundle import load_bundle
    from secure_service.logits_policy import LogitsPolicy
    from slip_vllm.settings import Settings, settings

    steps, _ = reference("llama")
    served = {}
    for policy in (LogitsPolicy("full"), LogitsPolicy("topk", 5)):
        svc = _svc(artifacts, logits_policy=policy)
        assert svc.info()["logits_policy"] == policy.describe()
        host = _Host(svc.executor)
        served[policy.name] = []
        for i, st in enumerate(steps, start=1):
            served[policy.name] += _rows_of(st, _finish(svc, _start(svc, i, st), host).payload)
        svc.close()
    rows, ref_rows = served["topk"], served["full"]
    assert len(rows) == len(ref_rows) == 44
    for (_, _, got), (_, _, full) in zip(rows, ref_rows):
        top = torch.topk(full, 5).indices
        finite = torch.isfinite(got)
        assert int(finite.sum()) == 5 and bool(finite[top].all())
        assert torch.equal(got[top], full[top]) and bool((got[~finite] == float("-inf")).all())
        assert int(got.argmax()) == int(full.argmax())
    assert Settings.from_env({}).shielded_logits_policy == "topk" and Settings.from_env({}).shielded_logits_topk == 20
    _, out = artifacts["llama"]
    with pytest.raises(ValueError, match="logits policy"):
        LogitsPolicy("sample")
    with pytest.raises(ValueError, match="top-K"):
        LogitsPolicy("topk", 0)
    monkeypatch.setenv("SLIP_SHIELDED_LOGITS_POLICY", "sample")  # not implemented: the service refuses to start
    settings(refresh=True)
    try:
        with pytest.raises(ValueError, match="logits policy"):
            create_app(load_bundle(out / "secret"))
    finally:
        monkeypatch.undo()
        settings(refresh=True)


def test_a_new_step_rolls_the_superseded_one_back_before_it_runs(artifacts, reference):
    """The step in flight has written both layers' K/V when a new frame arrives: by the time the
    new step's first ask comes back, the cache is what it was before the old step (so no late
    roll-back can overwrite the new step's writes), and every later step is exact."""
    steps, ref_rows = reference("llama")
    svc = _svc(artifacts)
    host = _Host(svc.executor)
    rows = _rows_of(steps[0], _finish(svc, _start(svc, 1, steps[0]), host).payload)
    k0, v0 = svc.executor.cache.k.clone(), svc.executor.cache.v.clone()
    msg = _start(svc, 2, steps[1])
    for _ in range(5):
        msg = wire.decode_shielded_message(svc.answer(_answer_msg(msg, host(msg.key, msg.payload))))
    assert msg.key == "layers.1.o" and not torch.equal(svc.executor.cache.k, k0)
    old = msg
    msg = _start(svc, 3, steps[1])  # supersedes it
    assert msg.key == "layers.0.qkv"
    assert torch.equal(svc.executor.cache.k, k0) and torch.equal(svc.executor.cache.v, v0)
    assert all(lin.pending == 1 if key == "layers.0.qkv" else lin.pending == 0
               for key, lin in svc.executor._shielded.items())
    with pytest.raises(StepRejected) as late:
        svc.answer(_answer_msg(old, host(old.key, old.payload)))
    assert late.value.status == 409 and "no step" in str(late.value)
    rows += _rows_of(steps[1], _finish(svc, msg, host).payload)
    for i, st in enumerate(steps[2:], start=4):
        rows += _rows_of(st, _finish(svc, _start(svc, i, st), host).payload)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))
    assert svc.stats()["steps_aborted"] == 1
    svc.close()


def test_an_idle_step_is_aborted_and_rolled_back_by_the_next_call_after_the_timeout(artifacts, reference):
    import time

    steps, ref_rows = reference("llama")
    svc = _svc(artifacts, timeout_s=0.3)
    host = _Host(svc.executor)
    rows = _rows_of(steps[0], _finish(svc, _start(svc, 1, steps[0]), host).payload)
    k0, v0 = svc.executor.cache.k.clone(), svc.executor.cache.v.clone()
    msg = _start(svc, 2, steps[1])
    for _ in range(5):
        time.sleep(0.1)  # slower than the timeout in total, but never idle for longer than it
        msg = wire.decode_shielded_message(svc.answer(_answer_msg(msg, host(msg.key, msg.payload))))
    time.sleep(0.5)
    with pytest.raises(StepRejected) as late:
        svc.answer(_answer_msg(msg, host(msg.key, msg.payload)))
    assert late.value.status == 409 and "aborted" in str(late.value)
    assert torch.equal(svc.executor.cache.k, k0) and torch.equal(svc.executor.cache.v, v0)
    assert all(lin.pending == 0 for lin in svc.executor._shielded.values())
    assert svc.stats()["steps_aborted"] == 1
    with pytest.raises(StepRejected) as again:
        svc.answer(_answer_msg(msg, host(msg.key, msg.payload)))
    assert again.value.status == 409 and "no step" in str(again.value)
    # the retried step and the rest are exact
    for i, st in enumerate(steps[1:], start=3):
        rows += _rows_of(st, _finish(svc, _start(svc, i, st), host).payload)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))
    # an LM-head request left idle: aborted, and the ready rows are dropped (fail closed)
    ready = _finish(svc, _start(svc, 99, steps[0], defer=True), host)
    assert ready.kind == wire.MSG_READY
    rows_msg = wire.decode_shielded_message(wire.encode_shielded_message(
        wire.MSG_ROWS, ready.step, ready.call, "", torch.tensor([[0, 1]])))
    ask = wire.decode_shielded_message(svc.logits(rows_msg))
    assert ask.kind == wire.MSG_ASK and ask.key == "lm_head"
    time.sleep(0.5)
    with pytest.raises(StepRejected) as late:
        svc.answer(_answer_msg(ask, host(ask.key, ask.payload)))
    assert late.value.status == 409 and "aborted" in str(late.value)
    with pytest.raises(StepRejected) as gone:
        svc.logits(rows_msg)
    assert gone.value.status == 409 and "no ready step" in str(gone.value)
    assert svc.stats()["steps_aborted"] == 2
    svc.close()
