"""Binding and caps of shielded step metadata (``secure_service.step_checks``), the KV slot records
of ``PagedKVCache``, the step lifecycle of ``ShieldedService`` and the service's size limits.

The service object runs in-process on a tiny shielded Llama (``slip protect --protocol shielded``
API, rank 8); the reference is a second executor built from the same bundle (bit-identical to the
service's), driven by the exact in-process host of ``test_executor``.  Every refusal is checked to
come before any KV write or mask use (cache, slot records and pending masks unchanged) and to leave
the service answering the next valid steps bit for bit.
"""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from secure_service.shielded_api import ShieldedService
from secure_service.shielded_executor import ShieldedExecutor
from secure_service.step_checks import StepRejected
from slip_vllm.core import wire
from slip_vllm.protect.artifact import ProtectConfig, protect
from slip_vllm.protect.tiny_models import make_tiny_model
from test_executor import BLOCK_SIZE, NUM_BLOCKS, POLICY, _Host, _run, _scenario

MAX_STEP_TOKENS = 32
MAX_MODEL_LEN = 512  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("step-checks")
    model = make_tiny_model("llama", root / "llama", hidden=128, layers=2, heads=4, kv_heads=2, seed=3)
    protect(model, root / "out", ProtectConfig(protocol="shielded", default_rank=POLICY, seed=11), progress=False)
    return root / "out" / "secret"


@pytest.fixture(scope="module")
def scenario(secret):
    """(steps, reference logits rows per step) of the executor tests' 6-step scheduler simulation."""
    ref = ShieldedExecutor.from_bundle(secret, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    _, steps = _scenario(ref.vocab, seed=5)
    rows = [_run(ref, [st], _Host(ref)) for st in steps]
    ref.close()
    return steps, rows


def _svc(secret, **kw):
    opts = {"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "pool_rows": 0, "max_step_tokens": MAX_STEP_TOKENS,
            **kw}
    return ShieldedService(secret, **opts)


class Driver:
    """Drives a ShieldedService as one engine: the first frame claims it (KV epoch 0), the later
    ones name its instance and epoch (where the service has them)."""

    def __init__(self, svc, session=0x51):
        self.svc, self.session, self.seq, self.claimed = svc, session, 0, False
        self.host = _Host(svc.executor)

    def frame(self, defer=False, **b):
        self.seq += 1
        b = {k: v for k, v in b.items() if k != "rows"}
        if not defer and "logits_indices" not in b:
            b["logits_indices"] = torch.arange(int(torch.as_tensor(b["input_ids"]).shape[0]))
        ident = self.ident() if self.claimed else {}
        body = wire.encode_shielded_step(self.session, self.seq, **b, defer_logits=defer, **ident)
        return wire.decode_shielded_step(body)

    def start(self, defer=False, **b):
        reply = wire.decode_shielded_message(self.svc.start_step(self.frame(defer, **b)))
        self.claimed = True
        return reply

    def ident(self):
        """The service's instance and KV epoch for the frames' headers (none before a claim)."""
        epoch = getattr(self.svc, "epoch", 0)
        return {"instance": self.svc.instance, "epoch": epoch} if epoch else {}

    def answer(self, msg):
        y = self.host(msg.key, msg.payload)
        body = wire.encode_shielded_message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y, **self.ident())
        return wire.decode_shielded_message(self.svc.answer(wire.decode_shielded_message(body)))

    def finish(self, msg):
        while msg.kind == wire.MSG_ASK:
            msg = self.answer(msg)
        return msg

    def step(self, st):
        msg = self.finish(self.start(**st))
        assert msg.kind == wire.MSG_LOGITS, msg.kind
        return [(sid, j, msg.payload[r]) for r, (sid, j) in enumerate(st["rows"])]

    def rows(self, step, call, rows):
        body = wire.encode_shielded_message(wire.MSG_ROWS, step, call, "", torch.as_tensor(rows).reshape(1, -1),
                                            **self.ident())
        return self.svc.logits(wire.decode_shielded_message(body))


def _same(rows, ref):
    return len(rows) == len(ref) and all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(rows, ref))


def _snapshot(svc):
    c = svc.executor.cache
    return [t.clone() for t in (c.k, c.v, c.written_pos, c.tag, c.prev)]


def _unchanged(svc, snap):
    return all(torch.equal(a, b) for a, b in zip(_snapshot(svc), snap)) and all(
        lin.pending == 0 for lin in svc.executor._shielded.values())


def _blocks(st, s):
    """The blocks sequence s of step st uses (its table row, cut to ceil(seq_len / block size))."""
    need = -(-int(st["seq_lens"][s]) // BLOCK_SIZE)
    return st["block_tables"][s, :need].tolist()


def _bind(st):
    """st with slot_mapping recomputed from its (possibly changed) block table and positions."""
    st = dict(st)
    q = st["query_start_loc"].diff()
    seq = torch.repeat_interleave(torch.arange(len(q)), q)
    pos = st["positions"]
    st["slot_mapping"] = st["block_tables"][seq, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    return st


def _mutations(steps):
    """(name, changed copy of steps[1], status, message pattern): one violation each."""
    st = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in steps[1].items()}
    used = {b for s in steps for i in range(len(s["seq_lens"])) for b in _blocks(s, i)}
    fresh = next(b for b in range(NUM_BLOCKS) if b not in used)
    out = []

    def add(name, status, pattern, **changes):
        out.append((name, {**st, **changes}, status, pattern))

    n = int(st["input_ids"].shape[0])
    big = 40  # > MAX_STEP_TOKENS, <= the 64 KV slots
    add("too many tokens", 413, "at most 32 tokens", input_ids=torch.ones(big, dtype=torch.long),
        positions=torch.arange(big), slot_mapping=torch.arange(big), query_start_loc=torch.tensor([0, big]),
        seq_lens=torch.tensor([big]), block_tables=torch.arange(10)[None], logits_indices=torch.arange(big))
    add("more tokens than KV slots", 422, "KV cache", input_ids=torch.ones(70, dtype=torch.long),
        positions=torch.arange(70), slot_mapping=torch.arange(70) % 64, query_start_loc=torch.tensor([0, 70]),
        seq_lens=torch.tensor([70]), block_tables=torch.zeros(1, 18, dtype=torch.long),
        logits_indices=torch.arange(70))
    wide = torch.cat([st["block_tables"], torch.zeros(3, 129 - st["block_tables"].shape[1], dtype=torch.long)], 1)
    add("huge block table", 413, r"ceil\(max_model_len / block_size\) = 128", block_tables=wide)
    add("query_start_loc not from 0", 422, "query_start_loc", query_start_loc=st["query_start_loc"] + 1)
    add("a sequence without a query token", 422, "every sequence has a query token",
        query_start_loc=torch.tensor([0, 1, 1, n]))
    add("negative query_start_loc", 422, "query_start_loc", query_start_loc=torch.tensor([0, -2**62, 2, n]))
    add("seq_len below its queries", 422, "shorter than its", seq_lens=torch.tensor([0, 10, 7]))
    add("negative seq_len", 422, "shorter than its", seq_lens=torch.tensor([-6, 10, 7]))
    add("huge seq_len", 422, "exceeds max_model_len 512", seq_lens=torch.tensor([6, 10**12, 7]))
    add("seq_len past the table", 422, "needs .* block-table columns", seq_lens=torch.tensor([6, 10, 300]))
    bt = st["block_tables"].clone()
    bt[0, 0] = NUM_BLOCKS
    add("foreign block id", 422, r"block_tables\[0, 0\] = 16 is not a block", block_tables=bt)
    bt = st["block_tables"].clone()
    bt[1, 0] = -1
    add("negative block id", 422, r"block_tables\[1, 0\] = -1", block_tables=bt)
    add("token id out of range", 422, "token ids", input_ids=st["input_ids"] - 10**6)
    add("positions shifted", 422, "positions", positions=st["positions"] + 1)
    add("slot of another block", 422, "not the block-table slot", slot_mapping=(st["slot_mapping"] + BLOCK_SIZE) % 64)
    add("negative slot", 422, "not the block-table slot", slot_mapping=-st["slot_mapping"] - 1)
    add("logits rows out of range", 422, "logits_indices", logits_indices=torch.tensor([0, n]))
    add("more logits rows than tokens", 422, "logits_indices", logits_indices=torch.zeros(n + 1, dtype=torch.long))
    # stateful: the table names slots that were never written, or written for another prefix
    bt = st["block_tables"].clone()
    bt[0, 0] = fresh                                # A's first block: never written
    out.append(("never-written block", _bind({**st, "block_tables": bt}), 422,
                r"never written \(or written for another position\)"))
    b_blocks = _blocks(st, 1)
    bt = st["block_tables"].clone()
    bt[0, 1] = b_blocks[1]                          # A's positions 4.. from B's second block
    out.append(("foreign block at the right positions", _bind({**st, "block_tables": bt}), 422,
                "written for another prefix"))
    # two sequences writing one fresh block for different prompts
    two = dict(input_ids=torch.tensor([5, 6, 7, 8]), positions=torch.tensor([0, 1, 0, 1]),
               query_start_loc=torch.tensor([0, 2, 4]), seq_lens=torch.tensor([2, 2]),
               block_tables=torch.tensor([[fresh], [fresh]]), logits_indices=torch.arange(4))
    out.append(("one slot written for two prefixes", _bind(two), 422, "different prefixes"))
    return out


def test_every_bad_step_is_refused_before_any_kv_write_and_the_next_steps_are_exact(secret, scenario):
    steps, ref = scenario
    svc = _svc(secret)
    d = Driver(svc)
    got = d.step(steps[0])
    snap = _snapshot(svc)
    statuses = set()
    cases = _mutations(steps)
    for name, st, status, pattern in cases:
        with pytest.raises(StepRejected) as err:
            d.start(**st)
        assert err.value.status == status, (name, err.value.status, str(err.value))
        assert re.search(pattern, str(err.value)), (name, str(err.value))
        assert _unchanged(svc, snap), name  # no KV write, no slot record, no mask drawn
        statuses.add(status)
    assert len(cases) == 21 and statuses == {413, 422}
    for st in steps[1:]:
        got += d.step(st)
    assert _same(got, [r for rs in ref for r in rs])
    svc.close()


def test_a_cache_reset_makes_every_earlier_slot_unreadable(secret, scenario):
    """A new KV epoch (``PagedKVCache.reset``): the next decode reads slots of the old epoch and is
    refused; a prefill from position 0 is served exactly as in a fresh service."""
    steps, ref = scenario
    svc = _svc(secret)
    d = Driver(svc)
    d.step(steps[0])
    svc.executor.cache.reset()
    assert int(svc.executor.cache.written_pos.max()) == -1
    with pytest.raises(StepRejected) as err:
        d.start(**steps[1])
    assert err.value.status == 422 and "never written" in str(err.value)
    assert _same(d.step(steps[0]), ref[0]) and _same(d.step(steps[1]), ref[1])
    svc.close()


def test_slot_records_follow_the_writes_and_roll_back_with_them(secret, scenario):
    """After a step every slot it wrote records its position; a step closed mid-way leaves no record
    (the slots read as before), and a prefix-cache hit (a new sequence whose table starts with
    another sequence's full block, same tokens) is allowed."""
    steps, ref = scenario
    svc = _svc(secret)
    d = Driver(svc)
    d.step(steps[0])
    c = svc.executor.cache
    st = steps[0]
    assert torch.equal(c.written_pos[st["slot_mapping"]], st["positions"])
    assert int((c.written_pos >= 0).sum()) == int(st["input_ids"].shape[0])
    snap = _snapshot(svc)
    msg = d.start(**steps[1])
    for _ in range(3):
        msg = d.answer(msg)
    assert torch.equal(c.written_pos[steps[1]["slot_mapping"]], steps[1]["positions"])
    d.start(**steps[0])  # aborts the step above: its writes and records are rolled back first
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(svc)[2:], snap[2:]))
    svc.close()
    # prefix caching: B's first block (positions 0..3, full) shared by a new sequence with B's tokens
    svc = _svc(secret)
    d = Driver(svc)
    d.step(steps[0])
    used = {b for s in steps for i in range(len(s["seq_lens"])) for b in _blocks(s, i)}
    fresh = next(b for b in range(NUM_BLOCKS) if b not in used)
    b0 = _blocks(steps[0], 1)[0]
    ids = steps[0]["input_ids"][5:9]  # B's first four tokens
    hit = _bind(dict(input_ids=torch.cat([ids[3:], ids[:1]]), positions=torch.tensor([3, 4]),
                     query_start_loc=torch.tensor([0, 2]), seq_lens=torch.tensor([5]),
                     block_tables=torch.tensor([[b0, fresh]]), logits_indices=torch.arange(2)))
    msg = d.finish(d.start(**hit))  # recomputes position 3 into the shared block, for the same prefix
    assert msg.kind == wire.MSG_LOGITS and msg.payload.shape[0] == 2
    # another token at position 3, rewritten into B's cached block: served (this step reads only
    # positions 0..2), but B's chain is broken there, so B's next read of the block is refused
    other = dict(hit, input_ids=torch.tensor([(int(ids[3]) + 1) % svc.executor.vocab, 7]))
    assert d.finish(d.start(**other)).kind == wire.MSG_LOGITS
    with pytest.raises(StepRejected) as err:
        d.start(**steps[1])
    assert err.value.status == 422 and "written for another prefix" in str(err.value)
    svc.close()


def test_logits_requests_ask_at_most_the_ready_steps_rows(secret, scenario):
    steps, ref = scenario
    svc = _svc(secret)
    d = Driver(svc)
    st = {k: v for k, v in steps[0].items() if k != "logits_indices"}
    ready = d.finish(d.start(defer=True, **st))
    assert ready.kind == wire.MSG_READY
    n = int(ready.payload[0, 0])
    for rows, status in ((torch.zeros(n + 1, dtype=torch.long), 413), (torch.tensor([0, n]), 422),
                         (torch.tensor([-1]), 422), (torch.zeros(10**5, dtype=torch.long), 413)):
        with pytest.raises(StepRejected) as err:
            d.rows(ready.step, ready.call, rows)
        assert err.value.status == status, (rows.shape, str(err.value))
    msg = d.finish(wire.decode_shielded_message(d.rows(ready.step, ready.call, torch.arange(n))))
    assert msg.kind == wire.MSG_LOGITS
    assert max((msg.payload[r] - ref[0][r][2]).abs().max().item() for r in range(n)) <= 1e-5
    svc.close()


def test_a_step_superseded_mid_way_cannot_touch_the_new_steps_writes(secret, scenario):
    """The old step has written both layers' K/V when a new frame comes: it is rolled back inside
    the new frame's call, before the new step runs, so no late roll-back exists.  The cache after
    the new step equals that of a service that never saw the old one, bit for bit, and so do all
    later logits; a late answer of the old step is refused (409)."""
    steps, ref = scenario
    a, b = _svc(secret), _svc(secret)
    da, db = Driver(a), Driver(b)
    da.step(steps[0])
    db.step(steps[0])
    # steps[1] in flight with both layers' K/V written, superseded by a fresh frame of steps[1]
    msg = da.start(**steps[1])
    for _ in range(5):
        msg = da.answer(msg)
    old = msg
    got = da.step(steps[1])
    db.step(steps[1])
    # K, V and positions written (the prefix tags use each service's own secret tables)
    assert all(torch.equal(x, y) for x, y in zip(_snapshot(a)[:3], _snapshot(b)[:3]))
    with pytest.raises(StepRejected) as late:
        da.answer(old)
    assert late.value.status == 409
    for st in steps[2:]:
        got += da.step(st)
    assert _same(got, [r for rs in ref[1:] for r in rs])
    assert a.stats()["steps_aborted"] == 1
    a.close()
    b.close()


def test_two_threads_never_run_two_steps_at_once(secret, scenario):
    """Two threads drive steps against one service as fast as they can, each new frame aborting the
    other's step: at no time are two step generators inside the executor, every refusal is a 409,
    and afterwards (new epoch) the scenario is served exactly."""
    steps, ref = scenario
    svc = _svc(secret)
    ex = svc.executor
    active, peak, lock = [0], [0], threading.Lock()
    layers = ex._layers

    def counted(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return (yield from layers(*a, **k))
        finally:
            with lock:
                active[0] -= 1

    ex._layers = counted
    d = Driver(svc)
    d.step(steps[0])
    outcomes, errors = [], []
    seq_lock = threading.Lock()

    def worker():
        for _ in range(6):
            try:
                with seq_lock:
                    frame = d.frame(**steps[1])
                msg = wire.decode_shielded_message(svc.start_step(frame))
                while msg.kind == wire.MSG_ASK:
                    msg = d.answer(msg)
                outcomes.append("done")
            except StepRejected as exc:
                (outcomes if exc.status == 409 else errors).append(exc.status)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(outcomes) == 12 and "done" in outcomes
    assert peak[0] == 1 and active[0] == 0
    ex._layers = layers
    ex.cache.reset()
    got = []
    for st in steps:
        got += d.step(st)
    assert _same(got, [r for rs in ref for r in rs])
    svc.close()


def test_the_idle_abort_timeout_grows_with_the_rows_asked(secret, scenario):
    """timeout_s + timeout_per_row_s x rows: a 17-row prefill ask survives an idle time that aborts
    a 4-row decode ask."""
    steps, ref = scenario
    svc = _svc(secret, timeout_s=0.2, timeout_per_row_s=0.05)
    assert svc.step_timeout(17) == pytest.approx(1.05) and svc.info()["step_timeout_per_row_s"] == 0.05
    d = Driver(svc)
    msg = d.start(**steps[0])
    assert msg.payload.shape[0] == 17
    time.sleep(0.6)  # > 0.2 + 4 x 0.05, < 0.2 + 17 x 0.05
    logits = d.finish(d.answer(msg)).payload
    got = [(sid, j, logits[r]) for r, (sid, j) in enumerate(steps[0]["rows"])]
    assert _same(got, ref[0])
    d.step(steps[1])
    d.step(steps[2])
    msg = d.start(**steps[3])  # decodes: 4 rows
    assert msg.payload.shape[0] == 4
    time.sleep(0.6)
    with pytest.raises(StepRejected) as late:
        d.answer(msg)
    assert late.value.status == 409 and "aborted" in str(late.value) and "0.4 s" in str(late.value)
    svc.close()


# ---------------------------------------------------------------------------------------------
# the bundle loaded once; body caps from the model's shapes
# ---------------------------------------------------------------------------------------------


def test_the_service_loads_and_hashes_the_bundle_once_and_holds_each_factor_once(secret, monkeypatch):
    from starlette.testclient import TestClient

    import secure_service.bundle as bundle_mod
    import secure_service.shielded_bundle as shielded_mod
    from secure_service.app import create_app

    hashed, loads = [], []
    real_hash, real_load = bundle_mod.sha256_file, bundle_mod.load_bundle
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(p.name) or real_hash(p))
    monkeypatch.setattr(shielded_mod, "sha256_file", lambda p: hashed.append(p.name) or real_hash(p))
    monkeypatch.setattr(shielded_mod, "load_bundle", lambda p: loads.append(p) or real_load(p))
    bundle = bundle_mod.load_bundle(secret)
    app = create_app(bundle, shielded_options={"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "pool_rows": 0})
    assert loads == [] and sorted(hashed) == ["factors.safetensors", "shielded.safetensors"]
    ex = app.state.shielded.executor
    by_name = {t.entry.name: t for t in bundle.tensors}
    for key, split in ex.splits.items():
        st, lr = by_name[key], split.low_rank
        assert st.right.data_ptr() == lr.right.data_ptr()  # one copy, shared
        if len(lr.lefts) == 1:
            assert st.left.data_ptr() == lr.lefts[0].data_ptr()
        else:
            assert st.left is None  # the dense block-diagonal copy is not kept next to the blocks
    with TestClient(app) as client:
        info = client.get("/v1/info").json()
    assert info["secret_parameters"] == sum(e.rank * (e.shape[0] + e.shape[1]) for e in bundle.manifest.tensors)
    app.state.shielded.close()


def _fake_bundle(protocol, shapes):
    """A Bundle-shaped object with only the names, shapes and kinds the body caps read."""
    from slip_vllm.core.manifest import KIND_EMBEDDING

    entries = [SimpleNamespace(name=n, shape=s, rank=8, kind=KIND_EMBEDDING if "embed" in n else "linear")
               for n, s in shapes.items()]
    return SimpleNamespace(protocol=protocol, tensors=[SimpleNamespace(entry=e) for e in entries],
                           manifest=SimpleNamespace(tensors=entries))


def test_body_caps_come_from_the_model_shapes():
    """Llama-3-8B shapes: the widest shielded row is the LM head's masked answer (128 256 int64
    field elements; its float32 logits are half that), so the cap holds a full step of it and, a
    fortiori, the 2 048-token gate_up answer that the former fixed 256 MiB cap refused; the split
    cap holds the fused gate_up reply.  A tiny model gets a tiny cap."""
    from secure_service.body_limits import HEADER_BYTES, body_limits

    shielded = _fake_bundle("shielded", {"layers.0.qkv": (6144, 4096), "layers.0.o": (4096, 4096),
                                         "layers.0.gate_up": (28672, 4096), "layers.0.down": (4096, 14336),
                                         "lm_head": (128256, 4096)})
    lim = body_limits(shielded, 8192, max_blocks_per_seq=8192 // 32)
    assert lim["row_bytes"] == {"masked_gemm": 8 * 128256, "logits": 4 * 128256, "step_frame": 8 * (6 + 256),
                                "logits_rows": 8}
    assert lim["max_body_bytes"] == 8192 * 8 * 128256 + HEADER_BYTES
    assert lim["max_body_bytes"] > 2048 * 28672 * 8 > 256 << 20
    pre = "model.layers.0."
    split = _fake_bundle("split", {pre + "self_attn.q_proj.weight": (4096, 4096), pre + "self_attn.k_proj.weight": (1024, 4096),
                                   pre + "self_attn.v_proj.weight": (1024, 4096), pre + "self_attn.o_proj.weight": (4096, 4096),
                                   pre + "mlp.gate_proj.weight": (14336, 4096), pre + "mlp.up_proj.weight": (14336, 4096),
                                   pre + "mlp.down_proj.weight": (4096, 14336),
                                   "model.embed_tokens.weight": (128256, 4096)})
    lim = body_limits(split, 2048)
    assert lim["row_bytes"] == {"input": 4 * 14336, "output": 4 * 28672}
    assert lim["max_body_bytes"] == 2048 * 4 * 28672 + HEADER_BYTES
    tiny = _fake_bundle("shielded", {"layers.0.qkv": (256, 128), "lm_head": (512, 128)})
    assert body_limits(tiny, 64, max_blocks_per_seq=128)["max_body_bytes"] == 64 * 8 * 512 + HEADER_BYTES
    with pytest.raises(ValueError):
        body_limits(tiny, 0, max_blocks_per_seq=128)
