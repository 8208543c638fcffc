"""Precision of the split secret term in 16-bit serving dtypes (``secure_service.split_executor``).

A bfloat16 / float16 model sends its rows in that dtype; the service computes S(x) = L (R x) in
float32 and rounds once to the dtype.  Checked here on the real executor of a real protected
bundle, against float64:

* every element of the reply is within one rounding of the exact value: |S - S64| <= u |S64|
  (u = 2^-8 for bfloat16, 2^-11 for float16; plus float32 noise, 1e-5 of the largest element).
  A product done in the 16-bit dtype (rounded factors and intermediate) breaks this bound;
* a protected layer (public GEMM in the dtype, plus the reply, added in the dtype as the plugin
  does) stays within the rounding of stock's GEMM in the dtype on the original W.  Stock rounds
  twice (the weight, the output); the protected layer four times (the weight W_D, the public
  output, the secret term, the sum), each of at most the same size, so with independent rounding
  errors its mean error is at most sqrt(2) x stock's.  Asserted: <= 1.35 x on every linear of
  the model.  Measured here 1.17-1.26 x; the same product done in the 16-bit dtype gives
  1.41-1.66 x (bfloat16 and float16 alike), so the bound tells the two apart.
"""

import pytest
import torch
from safetensors.torch import load_file

from secure_service.bundle import load_bundle
from secure_service.split_executor import SplitExecutor
from slip_vllm.core import wire

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture(scope="module")
def protected(model_factory):
    original, protected = model_factory("llama")
    bundle = load_bundle(protected / "secret")
    return (bundle, SplitExecutor(bundle), load_file(str(original / "model.safetensors")),
            load_file(str(protected / "public" / "model.safetensors")))


def _linear(bundle, name):
    (t,) = [t for t in bundle.tensors if t.entry.name == name]
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("names", [("model.layers.0.mlp.down_proj.weight",),
                                   tuple(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")],
                         ids=["down", "fused-qkv"])
def test_secret_term_is_float32_rounded_once(protected, dtype, names, one_torch_thread):
    bundle, ex, _, _ = protected
    parts = [_linear(bundle, n) for n in names]
    x = torch.randn(33, parts[0].entry.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    req = wire.decode_request(wire.encode_request(wire.KIND_LINEAR, tuple(int(p.entry.id) for p in parts), x, 1, 1))
    got = ex.run(req)
    assert got.dtype == dtype
    exact = torch.cat([x.double() @ (p.left.double() @ p.right.double()).T for p in parts], 1)
    err = (got.double() - exact).abs()
    assert bool((err <= UNIT_ROUNDOFF[dtype] * exact.abs() + 1e-5 * exact.abs().max()).all()), float(err.max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_protected_layer_as_close_to_exact_as_stock(protected, dtype, one_torch_thread):
    bundle, ex, original, public = protected
    g = torch.Generator().manual_seed(5)
    ratios = []
    for t in bundle.tensors:
        if t.entry.kind != "linear":
            continue
        name = t.entry.name
        x = torch.randn(64, t.entry.shape[1], generator=g).to(dtype)
        exact = x.double() @ original[name].double().T
        stock = x @ original[name].to(dtype).T
        req = wire.decode_request(wire.encode_request(wire.KIND_LINEAR, (int(t.entry.id),), x, 1, 1))
        slip = x @ public[name].to(dtype).T
        slip.add_(ex.run(req))
        ratios.append(float((slip.double() - exact).abs().mean() / (stock.double() - exact).abs().mean()))
    assert len(ratios) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert max(ratios) <= 1.35, ratios
