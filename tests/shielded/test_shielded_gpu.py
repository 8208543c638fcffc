"""Protocol ``shielded`` with the host's masked GEMMs on a GPU (every test skips without CUDA).

The real secure service (``slip secure-service`` under uvicorn, a loopback socket; the artifacts,
service and scenario of ``test_shielded_service.py``: tiny random Llama and tied Qwen2, six mixed
prefill/decode steps with shuffled blocks) against the vLLM-free host driver
(``slip_vllm.host.shielded_client.ShieldedHost``) with ``device="cuda"``: the public weights on the
device, the Triton field kernel for every masked GEMM, the step metadata handed over as device
tensors of vLLM's dtypes (int32 ids, query start locations, sequence lengths and block tables).

What is asserted:
* the served logits equal, bit for bit, the in-process executor built from the original checkpoint
  (the fixed-point specification) and the same driver on the CPU, over the shared-memory channel
  and over HTTP; every y~ the device returned equals the CPU backend, and Python big integers on
  sampled entries;
* the traffic between host memory and the device in the deferred form vLLM uses (``begin`` +
  ``logits``): per step exactly one download of the step metadata, one upload of x~ and one
  download of y~ per masked GEMM and one upload of the logits, all through pinned memory, with
  torch's synchronisation debug mode set to "error" (an implicit device synchronisation raises);
* the vLLM model's own step glue (``SlipShieldedForCausalLM._begin`` and ``compute_logits``, which
  need no vLLM to run) on device metadata shaped as vLLM's FlashAttention metadata, padded as vLLM
  pads it, gives the same logits.

Cost on a machine without CUDA: collection only (every test skips).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from slip_vllm.core.field import field_matmul, reference_entries
from slip_vllm.host.shielded_client import ShieldedHost, load_public_weights
from test_shielded_service import _batch, _serve, _url, artifacts, reference, services  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
# vLLM's dtypes of the step metadata on a GPU (gpu_model_runner / FlashAttentionMetadata)
VLLM_DTYPES = {"input_ids": torch.int32, "positions": torch.int64, "slot_mapping": torch.int64,
               "query_start_loc": torch.int32, "seq_lens": torch.int32, "block_tables": torch.int32}


def _on_device(batch: dict) -> dict:
    return {k: (v.to(DEVICE, VLLM_DTYPES[k]) if k in VLLM_DTYPES else v) for k, v in batch.items()}


class RecordingHost(ShieldedHost):
    """The driver, keeping every (key, x~, y~) it computed (y~ as the device returned it)."""

    def __init__(self, *a, **kw):
        self.products = []
        super().__init__(*a, **kw)

    def compute(self, key, x_masked):
        y = super().compute(key, x_masked)
        self.products.append((key, x_masked, y))
        return y


@pytest.mark.parametrize(("name", "transport"), [("llama", "shm"), ("qwen2", "http")])
def test_gpu_host_serves_steps_bit_for_bit_like_the_cpu_host_and_the_executor(artifacts, services, reference,
                                                                             name, transport):
    _, out = artifacts[name]
    service = services(name)
    steps, ref_rows = reference(name)
    url = _url(service, transport)
    t0 = time.perf_counter()
    gpu = RecordingHost(out / "public", url, device=DEVICE)
    load_s = time.perf_counter() - t0
    with gpu:
        assert gpu.device.type == "cuda" and gpu.backend == "triton"
        assert all(w.w_q.is_cuda and w.offset.is_cuda for w in gpu.weights.values())
        rows, step_s = [], []
        for st in steps:
            t1 = time.perf_counter()
            logits = gpu.step(**_on_device(_batch(st)))
            step_s.append(time.perf_counter() - t1)
            assert logits.is_cuda and logits.dtype == torch.float32
            rows += [(sid, j, logits[r].cpu()) for r, (sid, j) in enumerate(st["rows"])]
        keys = gpu.layer_keys
    with ShieldedHost(out / "public", url) as cpu:  # the CPU driver, same service, same steps
        assert cpu.device.type == "cpu" and all(not w.w_q.is_cuda for w in cpu.weights.values())
        cpu_rows = _serve(cpu, steps)
    print(f"{name}/{transport}: GPU host load + kernel check {load_s:.2f} s; steps (s): "
          + " ".join(f"{s:.3f}" for s in step_s))
    assert len(rows) == len(ref_rows) == len(cpu_rows) == 44
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, ref_rows))   # the fixed-point spec
    assert all(torch.equal(a[2], c[2]) for a, c in zip(rows, cpu_rows))   # the CPU host
    # every device product: the CPU backend entirely, Python big integers on sampled entries
    assert len(gpu.products) == len(keys) * len(steps)
    cpu_weights = load_public_weights(out / "public").weights
    g = torch.Generator().manual_seed(5)
    for key, x, y in gpu.products:
        assert x.is_cuda and y.is_cuda and y.dtype == torch.int64
        x, y = x.cpu(), y.cpu()
        assert torch.equal(y, field_matmul(x, cpu_weights[key], gpu.p))
        r = torch.randint(0, x.shape[0], (3,), generator=g).tolist()
        c = torch.randint(0, y.shape[1], (3,), generator=g).tolist()
        assert [int(y[i, j]) for i, j in zip(r, c)] == reference_entries(x, cpu_weights[key].w_q, gpu.p, r, c)


def _memcpys(prof) -> dict:
    """{"HtoD"/"DtoH": [(name, bytes?)...]} of the CUDA memcpy activities the profiler saw."""
    seen = {"HtoD": [], "DtoH": [], "other": []}
    kernels = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.startswith("Memcpy HtoD"):
            seen["HtoD"].append(ev.name)
        elif ev.name.startswith("Memcpy DtoH"):
            seen["DtoH"].append(ev.name)
        elif ev.name.startswith("Memcpy"):
            seen["other"].append(ev.name)
        else:
            kernels += 1
    seen["kernels"] = kernels
    return seen


def test_gpu_host_deferred_steps_cross_once_each_way_per_gemm_without_implicit_syncs(artifacts, services,
                                                                                    reference):
    """The deferred form vLLM drives (``begin`` + ``logits``), profiled."""
    from torch.profiler import ProfilerActivity, profile

    _, out = artifacts["llama"]
    service = services("llama")
    steps, ref_rows = reference("llama")
    with ShieldedHost(out / "public", _url(service, "shm"), device=DEVICE) as gpu:
        batches = [_on_device(_batch(st)) for st in steps]
        for b in batches:
            b.pop("logits_indices")
        rows_of = [torch.arange(int(b["input_ids"].shape[0])) for b in batches]
        torch.cuda.synchronize()
        got, calls = [], []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b, rows in zip(batches, rows_of):
                    assert gpu.begin(**b) == rows.numel()
                    got.append(gpu.logits(rows))
                    calls.append(len(gpu.calls))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    flat = [(sid, j, lg[r].cpu()) for st, lg in zip(steps, got) for r, (sid, j) in enumerate(st["rows"])]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(flat, ref_rows))
    # calls of a step: 8 decoder GEMMs before MSG_READY, then the LM head after MSG_ROWS
    assert calls == [9] * len(steps)
    seen = _memcpys(prof)
    print(f"profiled {len(steps)} deferred steps: {len(seen['HtoD'])} uploads, {len(seen['DtoH'])} downloads, "
          f"{seen['kernels']} kernels, other copies {seen['other']}")
    if seen["kernels"] == 0:
        pytest.skip("the profiler records no CUDA activity on this machine: traffic not counted")
    gemms = sum(calls)
    assert len(seen["HtoD"]) == gemms + len(steps)   # x~ per GEMM + the logits per step
    assert len(seen["DtoH"]) == gemms + len(steps)   # y~ per GEMM + the step metadata per step
    assert all("Pinned" in n for n in seen["HtoD"] + seen["DtoH"]), seen
    assert seen["other"] == []


def test_vllm_model_step_glue_on_device_metadata_gives_the_served_logits(artifacts, services, reference):
    """``SlipShieldedForCausalLM._begin`` / ``compute_logits`` (vLLM-free methods) on device tensors
    padded as vLLM pads them: token rows beyond the step, a block table of the engine's full width
    and rows for more requests than the step has."""
    from slip_vllm.host.shielded_model import SlipShieldedForCausalLM
    from test_executor import BLOCK_SIZE, NUM_BLOCKS

    _, out = artifacts["llama"]
    service = services("llama")
    steps, ref_rows = reference("llama")
    host = ShieldedHost(out / "public", _url(service, "shm"))
    # the model as vLLM's loader leaves it, without vLLM's constructor (which builds vLLM's Attention)
    model = SlipShieldedForCausalLM.__new__(SlipShieldedForCausalLM)
    torch.nn.Module.__init__(model)
    model.vocab_size = host.weights["lm_head"].m
    model.cache_block_size, model.cache_blocks = BLOCK_SIZE, NUM_BLOCKS
    model.device = torch.device(DEVICE)
    model.host, model._tag, model._live_tag = None, 0.0, 0.0
    model.bind(host)
    assert host.device.type == "cuda" and host.backend == "triton"
    pad_tokens, max_reqs, width = 8, 8, NUM_BLOCKS
    flat = []
    with host:
        for st in steps:
            b = _batch(st)
            n, s = int(b["input_ids"].shape[0]), int(b["seq_lens"].shape[0])
            bt = torch.zeros(max_reqs, width, dtype=torch.int32)
            bt[:s, :b["block_tables"].shape[1]] = b["block_tables"]
            qsl = torch.full((max_reqs + 1,), n, dtype=torch.int32)
            qsl[:s + 1] = b["query_start_loc"]
            lens = torch.zeros(max_reqs, dtype=torch.int32)
            lens[:s] = b["seq_lens"]
            md = SimpleNamespace(num_actual_tokens=n, max_query_len=int(b["query_start_loc"].diff().max()),
                                 max_seq_len=int(b["seq_lens"].max()),
                                 query_start_loc=qsl.to(DEVICE), seq_lens=lens[:s].to(DEVICE),
                                 block_table=bt[:s].to(DEVICE),
                                 slot_mapping=torch.cat([b["slot_mapping"], torch.full((pad_tokens,), -1)]).to(DEVICE))
            ids = torch.cat([b["input_ids"], torch.zeros(pad_tokens, dtype=torch.int64)]).to(DEVICE, torch.int32)
            pos = torch.cat([b["positions"], torch.zeros(pad_tokens, dtype=torch.int64)]).to(DEVICE)
            model._tag += 1.0
            model._begin(ids, pos, md)
            model._live_tag = model._tag
            handles = torch.stack([torch.arange(n + pad_tokens, dtype=torch.float64),
                                   torch.full((n + pad_tokens,), model._live_tag, dtype=torch.float64)], 1).to(DEVICE)
            logits = model.compute_logits(handles[:n])
            assert logits.is_cuda
            flat += [(sid, j, logits[r].cpu()) for r, (sid, j) in enumerate(st["rows"])]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(flat, ref_rows))
