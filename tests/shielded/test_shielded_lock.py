"""The lock of protocol ``shielded`` in the protocol, the executor and the artifact.

* one linear: the locked masked protocol equals the fixed-point specification with the lock
  (``shielded_linear_reference(..., lock=...)``) bit for bit; a ``perm`` lock gives exactly the
  integers and floats of the unlocked layer; Freivalds still catches a tampered element;
* the executor: with ``perm`` the logits of every row are bit-identical to the unlocked executor's
  (same split); with ``block:32`` shielded == fixed point bit for bit and the logits track
  transformers within the int8 thresholds of ``test_executor`` (measured on these tiny models in
  the report; the trained reference model's figures are in docs/BENCHMARKS.md "Lock");
* the artifact: ``slip protect --lock`` writes the lock to OUT/secret only, the bundle rebuilds
  the checkpoint executor with the same lock bit for bit, and bad lock tensors or a lock kind that
  does not match them are refused.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from secure_service.bundle import BundleError
from secure_service.integrity import IntegrityError
from secure_service.masks import PooledMaskProvider
from secure_service.shielded_executor import ShieldedExecutor
from secure_service.shielded_linear import ShieldedLinear
from slip_vllm.core.field import field_matmul
from slip_vllm.core.lock import make_lock, seed_lock_key
from slip_vllm.core.manifest import sha256_file
from slip_vllm.core.quantize import LowRankFactors, PublicWeight, quantize_weight, select_prime, shielded_linear_reference
from slip_vllm.protect.artifact import ProtectConfig, ProtectError, protect
from slip_vllm.protect.tiny_models import make_tiny_model
from test_executor import (ABS_TOL, AGREE_INT8, BLOCK_SIZE, NUM_BLOCKS, POLICY, REL_TOL, _build, _errors, _hf_logits,
                           _Host, _run, _scenario, models)  # noqa: F401  (models: the fixture)

KEY = b"lock-test-key-0123456789abcdef"


def _linear(m, n, lock_kind, block, seed):
    g = torch.Generator().manual_seed(seed)
    w_d = torch.randn(m, n, generator=g, dtype=torch.float64) / n ** 0.5
    lock = make_lock(m, n, lock_kind, block, KEY + bytes([seed % 256]))
    q = quantize_weight(lock.lock_weight(w_d))
    p = select_prime([q.w_q])
    pw = PublicWeight(q.w_q, p)
    k = max(1, min(m, n) // 8)
    lr = LowRankFactors([torch.randn(m - m // 2, k, generator=g), torch.randn(m // 2, k, generator=g)],
                        torch.randn(2 * k, n, generator=g) / n ** 0.5)  # a fused layer's two parts
    bias = torch.randn(m, generator=g)
    prov = PooledMaskProvider({"L": pw}, p, pool_rows=8, chunk_rows=8, start=False)
    lin = ShieldedLinear("L", pw, q.scale, prov, low_rank=lr, bias=bias, lock=lock)
    return lin, q, w_d, lr, bias, lock, g


@pytest.mark.parametrize("kind,block", [("perm", 1), ("block", 8), ("block", 32)])
@pytest.mark.parametrize("m,n", [(96, 64), (130, 40)])
def test_locked_linear_equals_the_locked_reference_bit_for_bit(kind, block, m, n):
    lin, q, w_d, lr, bias, lock, g = _linear(m, n, kind, block, seed=m + n)
    x = torch.cat([torch.randn(9, n, generator=g), torch.zeros(1, n), torch.randn(2, n, generator=g) * 1e3])
    x_masked, ticket = lin.mask(x)
    y = lin.unmask(ticket, field_matmul(x_masked, q.w_q, lin.p))
    ref = shielded_linear_reference(x, q.w_q, q.scale, lin.p, low_rank=lr, bias=bias, lock=lock)
    assert torch.equal(y, ref)
    # the locked product is the layer's product (to the int8 / 16-bit quantization error)
    want = (x.double() @ (w_d + lr.dense_left().double() @ lr.right.double()).t() + bias.double()).float()
    rel = ((y - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30))[:9].max().item()
    assert rel < 0.02, rel
    # Freivalds keeps working on the locked weight
    x_masked, ticket = lin.mask(x)
    bad = field_matmul(x_masked, q.w_q, lin.p).clone()
    bad[3, 5] = (bad[3, 5] + 1) % lin.p
    with pytest.raises(IntegrityError):
        lin.unmask(ticket, bad)


def test_perm_locked_linear_computes_the_unlocked_integers_and_floats():
    m, n = 120, 72
    lin, q, w_d, lr, bias, lock, _ = _linear(m, n, "perm", 1, seed=5)
    q0 = quantize_weight(w_d)  # the unlocked layer's public weight and scales
    # the public weight is the unlocked one with rows and columns relabelled, scales alike
    assert not torch.equal(q.w_q, q0.w_q)
    assert torch.equal(q.w_q, lock.lock_weight(q0.w_q)) and q.w_q.dtype == torch.int8
    assert torch.equal(q.scale, lock.lock_output(q0.scale[None])[0])
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(1))
    plain = shielded_linear_reference(x, q0.w_q, q0.scale, lin.p, low_rank=lr, bias=bias)
    x_masked, ticket = lin.mask(x)
    assert torch.equal(lin.unmask(ticket, field_matmul(x_masked, q.w_q, lin.p)), plain)


def test_perm_lock_gives_the_unlocked_logits_bit_for_bit(models):
    model_dir = models("llama-llama3rope")
    plain = _build(model_dir, "shielded")
    locked = _build(model_dir, "shielded", lock="perm", lock_key=KEY)
    _, steps = _scenario(plain.vocab, seed=2)
    for key in plain.layer_keys():
        assert not torch.equal(plain.public_weights()[key], locked.public_weights()[key])
    ra, rb = _run(plain, steps, _Host(plain)), _run(locked, steps, _Host(locked))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(ra, rb))
    plain.close()
    locked.close()


@pytest.mark.parametrize("name", ["qwen2-tied", "llama-llama3rope"])
def test_block_lock_protocol_equals_spec_and_tracks_transformers(models, name):
    model_dir = models(name)
    sh = _build(model_dir, "shielded", lock="block:32", lock_key=KEY)
    fx = _build(model_dir, "fixed_point", lock="block:32", lock_key=KEY)
    seqs, steps = _scenario(sh.vocab, seed=len(name))
    ref, _ = _hf_logits(model_dir, seqs)
    host = _Host(sh)
    rows = _run(sh, steps, host)
    assert len(host.calls) == len(steps) * (4 * sh.num_layers + 1)  # the lock adds no host call
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, _run(fx, steps)))
    rel, abs_err, agree = _errors(rows, ref)
    print(f"{name}: block:32 shielded rel max={rel:.4f} max|d|={abs_err:.4f} greedy={agree:.4f}")
    assert rel <= REL_TOL and abs_err <= ABS_TOL and agree >= AGREE_INT8
    # a tampered host answer is still caught, the step refused
    a = _build(model_dir, "shielded", lock="block:32", lock_key=KEY)
    with pytest.raises(IntegrityError):
        _run(a, steps[:1], _Host(a, tamper_key="layers.0.gate_up"))
    for ex in (sh, a):
        ex.close()


# ---------------------------------------------------------------------------------------------
# the artifact
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("locked-artifact")
    model = make_tiny_model("llama", root / "llama", hidden=64, layers=1, heads=4, kv_heads=2, seed=3)
    out = root / "out"
    # int8 weights, as the in-process executor it is compared with (slip protect defaults to 16 bits)
    protect(model, out, ProtectConfig(protocol="shielded", default_rank=POLICY, seed=11, lock="block:16",
                                      weight_bits=8), progress=False)
    return model, out


def test_locked_bundle_rebuilds_the_checkpoint_executor_and_keeps_the_lock_secret(locked_artifact):
    model, out = locked_artifact
    with safe_open(str(out / "public" / "model.safetensors"), "pt") as f:
        assert all(k.endswith(".w_q") for k in f.keys())
    for name in ("slip_manifest.json", "config.json"):  # the public manifest and config do not name it
        text = (out / "public" / name).read_text()
        assert '"lock' not in text and "block:" not in text and "perm" not in text
    bundle = json.loads((out / "secret" / "bundle.json").read_text())
    assert bundle["lock"] == "block:16"
    secret = load_file(str(out / "secret" / "shielded.safetensors"))
    assert {k for k in secret if ".lock." in k} == {f"{key}.lock.{side}.{t}" for key in
                                                    ["layers.0.qkv", "layers.0.o", "layers.0.gate_up",
                                                     "layers.0.down", "lm_head"]
                                                    for side in ("out", "in") for t in ("perm_in", "blocks",
                                                                                        "perm_out")}
    a = ShieldedExecutor.from_checkpoint(model, POLICY, seed=11, lock="block:16", lock_key=seed_lock_key(11),
                                         num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    b = ShieldedExecutor.from_bundle(out / "secret", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    for key in a.layer_keys():
        assert torch.equal(a.public_weights()[key], b.public_weights()[key])
    _, steps = _scenario(a.vocab, seed=4)
    ra, rb = _run(a, steps[:3], _Host(a)), _run(b, steps[:3], _Host(b))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(ra, rb))
    for ex in (a, b):
        ex.close()


def _rewrite(out, tmp_path, mutate_tensors=None, mutate_meta=None):
    secret = tmp_path / "secret"
    shutil.copytree(out / "secret", secret)
    meta = json.loads((secret / "bundle.json").read_text())
    if mutate_tensors is not None:
        data = load_file(str(secret / meta["shielded_file"]))
        mutate_tensors(data)
        save_file(data, str(secret / meta["shielded_file"]))
        meta["shielded_sha256"] = sha256_file(secret / meta["shielded_file"])
    if mutate_meta is not None:
        mutate_meta(meta)
    (secret / "bundle.json").write_text(json.dumps(meta))
    return secret


@pytest.mark.parametrize("case,err", [
    ("not_a_permutation", "layers.0.o: lock: .*not a permutation"),
    ("not_orthogonal", "lm_head: lock: .*not orthogonal"),
    ("missing", "lacks layers.0.down.lock.in.blocks"),
    ("kind_none", "does not define"),
    ("kind_perm", "does not define"),
    ("block_size", "wide"),
    ("unknown_kind", "bundle.json: unknown lock"),
])
def test_bad_lock_in_a_bundle_is_refused(locked_artifact, tmp_path, case, err):
    _, out = locked_artifact
    tensors = {
        "not_a_permutation": lambda d: d["layers.0.o.lock.out.perm_in"].zero_(),
        "not_orthogonal": lambda d: d["lm_head.lock.in.blocks"][0].mul_(1.001),
        "missing": lambda d: d.pop("layers.0.down.lock.in.blocks"),
    }.get(case)
    meta = {
        "kind_none": lambda m: m.__setitem__("lock", "none"),
        "kind_perm": lambda m: m.__setitem__("lock", "perm"),
        "block_size": lambda m: m.__setitem__("lock", "block:8"),
        "unknown_kind": lambda m: m.__setitem__("lock", "rotate"),
    }.get(case)
    secret = _rewrite(out, tmp_path, tensors, meta)
    with pytest.raises(BundleError, match=err):
        ShieldedExecutor.from_bundle(secret, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)


def test_cli_lock_option(tmp_path, capsys):
    """``slip protect --lock`` (the CLI's own entry point, in-process: no interpreter start-up)."""
    from slip_vllm.cli import main

    model = make_tiny_model("llama", tmp_path / "m", hidden=64, layers=1, heads=4, kv_heads=2, seed=3)

    def slip(*args):
        code = main(["protect", "--model", str(model), *args])
        return code, capsys.readouterr().err

    code, err = slip("--out", str(tmp_path / "o1"), "--protocol", "shielded", "--lock", "block:1")
    assert code == 2 and "block size must be >= 2" in err
    code, err = slip("--out", str(tmp_path / "o2"), "--protocol", "shielded", "--lock", "twist")
    assert code == 2 and "unknown lock" in err
    code, err = slip("--out", str(tmp_path / "o3"), "--lock", "perm")  # protocol split
    assert code == 2 and "needs --protocol shielded" in err
    code, err = slip("--out", str(tmp_path / "o4"), "--protocol", "shielded", "--lock", "perm", "--rank", "4")
    assert code == 0, err
    assert json.loads((tmp_path / "o4" / "secret" / "bundle.json").read_text())["lock"] == "perm"
    with pytest.raises(ProtectError, match="unknown lock"):
        protect(model, tmp_path / "o5", ProtectConfig(protocol="shielded", lock="blocks:4"), progress=False)
