"""Seeded fuzzing of every data-plane endpoint of real service processes, over HTTP and over the
shared-memory channel: more than 10 000 malformed requests, among them adversarial shielded step
metadata (slots off the block table, foreign and never-written blocks, huge seq_len, huge row
counts, huge block tables, negative values).

For each: the answer is a 4xx with a JSON error (never 2xx, never 5xx), the service process stays
alive and /healthz answers 200; afterwards the services answer exactly (split: bit for bit what the
same service answered before the fuzzing, and within float32 rounding of the split executor run
in-process; shielded: the whole 6-step scheduler scenario bit for bit equal to the executor built
in-process from the same bundle, over HTTP and over the channel), and the services' resident
memory (VmRSS) grew by less than ``RSS_BOUND`` during the fuzzing.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from helpers import secure_service
from slip_vllm.core import wire
from slip_vllm.host.transport import ShmTransport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shielded"))

from test_channel import RawChannel  # noqa: E402
from test_executor import BLOCK_SIZE, POLICY, _Host, _run, _scenario  # noqa: E402

SEED = 20261201
RSS_BOUND = 48 << 20          # bytes of VmRSS growth allowed per service during the fuzzing
KV_BLOCKS, MAX_STEP_TOKENS = 32, 64
SHIELDED_ENV = {"SLIP_SHIELDED_KV_BLOCKS": str(KV_BLOCKS), "SLIP_SHIELDED_BLOCK_SIZE": str(BLOCK_SIZE),
                "SLIP_MASK_POOL_ROWS": "16", "SLIP_MASK_PRECOMPUTE_CHUNK": "16",
                "SLIP_MAX_STEP_TOKENS": str(MAX_STEP_TOKENS), "SLIP_SHIELDED_OWNER_LEASE_S": "0.3",
                "SLIP_SERVICE_TOKEN": "tok",
                "SLIP_SHIELDED_LOGITS_POLICY": "full"}  # the exactness check compares every logit
AUTH = {"authorization": "Bearer tok", "content-type": "application/octet-stream"}
_PATH = {wire.EP_SPLIT_APPLY: "/v1/split/apply", wire.EP_SHIELDED_STEP: "/v1/shielded/step",
         wire.EP_SHIELDED_GEMM: "/v1/shielded/gemm", wire.EP_SHIELDED_LOGITS: "/v1/shielded/logits"}

def rss(server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Tally:
    """Every malformed request's answer: must be a 4xx with a JSON error."""

    def __init__(self):
        self.count, self.statuses, self.where = 0, {}, {}

    def check(self, where: str, status: int, body: bytes, what: str) -> None:
        self.count += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.where[where] = self.where.get(where, 0) + 1
        assert 400 <= status < 500, (where, what, status, body[:300])
        assert json.loads(body).get("error"), (where, what, body[:300])


class Http:
    def __init__(self, server):
        self.server = server
        self.client = httpx.Client(timeout=30, headers=AUTH)

    def post(self, endpoint: int, body: bytes):
        r = self.client.post(self.server.url + _PATH[endpoint], content=body)
        return r.status_code, r.content

    def close(self):
        self.client.close()


class Shm:
    def __init__(self, server, digest):
        self.transport = ShmTransport(server.url, digest, token="tok")
        self.raw = RawChannel(self.transport)
        self.session = self.transport.session

    def post(self, endpoint: int, body: bytes):
        return self.raw.post(endpoint, body, offset=0)

    def close(self):
        self.transport.close()


def _digest(out: Path) -> str:
    return json.loads((out / "secret" / "bundle.json").read_text())["public_manifest_sha256"]


def _noise(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 96)))


# bytes of each frame's header whose change always breaks the frame (magic, kinds, dtypes, counts,
# the step's call and id); the session and sequence words after them are left alone, since a new
# value there can make another valid frame
SAFE_HEAD = {"split": 16, "step": 20, "message": 28}


def _corrupt(rng: random.Random, good: bytes, head: int) -> tuple[str, bytes]:
    """A damaged copy of a valid frame: truncated, extended, one of its first ``head`` bytes
    changed, or random bytes."""
    k = rng.randrange(4)
    if k == 0:
        return "truncated", good[:rng.randrange(len(good))]
    if k == 1:
        return "extended", good + bytes(rng.randrange(1, 24))
    if k == 2:
        b = bytearray(good)
        pos = rng.randrange(head)
        b[pos] = (b[pos] + rng.randrange(1, 256)) % 256
        return f"header byte {pos}", bytes(b)
    return "random bytes", _noise(rng)


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_service(model_factory, log_dir):
    original, out = model_factory("llama", tie=False)
    server = secure_service(out / "secret", log_dir, name="fuzz-split", SLIP_SERVICE_TOKEN="tok").start()
    server.wait_ready(60)
    yield server, out
    server.stop()


def _split_fuzz(rng, conn, tally, where, session, ids, widths, next_seq, vocab):
    """One malformed split request (the frame is built fresh, with a new sequence number, so that
    only the damage decides the answer)."""
    q = ids["q"]
    k = rng.randrange(11)
    x = torch.randn(rng.randrange(1, 9), widths["in"])
    if k == 0:
        what, body = _corrupt(rng, wire.encode_request(wire.KIND_LINEAR, q, x, session, next_seq()), SAFE_HEAD["split"])
    elif k == 1:
        what, body = "unknown tensor", wire.encode_request(wire.KIND_LINEAR, (rng.randrange(500, 10**6),), x,
                                                           session, next_seq())
    elif k == 2:
        what, body = "wrong width", wire.encode_request(wire.KIND_LINEAR, q, torch.randn(2, widths["in"] + rng.choice([-1, 1, 64])),
                                                        session, next_seq())
    elif k == 3:
        bad = x.clone()
        bad[rng.randrange(bad.shape[0]), rng.randrange(bad.shape[1])] = rng.choice([float("nan"), float("inf"), -float("inf")])
        what, body = "nan/inf", wire.encode_request(wire.KIND_LINEAR, q, bad, session, next_seq())
    elif k == 4:
        toks = torch.tensor([[rng.choice([-1, -2**31, vocab, vocab + 7, 2**31 - 1])]], dtype=torch.int32)
        what, body = "token id out of range", wire.encode_request(wire.KIND_EMBED, ids["embed"], toks, session, next_seq())
    elif k == 5:
        what, body = "replayed sequence number", wire.encode_request(wire.KIND_LINEAR, q, x, session, 1)
    elif k == 6:  # a header that declares a huge row count with a short body
        good = bytearray(wire.encode_request(wire.KIND_LINEAR, q, x, session, next_seq()))
        good[8:12] = rng.choice([2**32 - 1, 10**9, 65536]).to_bytes(4, "little")
        what, body = "huge declared rows", bytes(good)
    elif k == 7:
        what, body = "mixed widths", wire.encode_request(wire.KIND_LINEAR, ids["q"] + ids["down"], x, session, next_seq())
    elif k == 8:
        what, body = "embedding fused with a linear", wire.encode_request(
            wire.KIND_EMBED, ids["embed"] + q, torch.tensor([[3]], dtype=torch.int32), session, next_seq())
    elif k == 9:  # a shielded endpoint on a split service, with a valid-looking body
        code, reply = conn.post(rng.choice([wire.EP_SHIELDED_STEP, wire.EP_SHIELDED_GEMM, wire.EP_SHIELDED_LOGITS]),
                                wire.encode_request(wire.KIND_LINEAR, q, x, session, next_seq()))
        tally.check(where, code, reply, "shielded endpoint on split")
        return
    else:
        what, body = "embedding on a linear tensor", wire.encode_request(
            wire.KIND_EMBED, q, torch.tensor([[3]], dtype=torch.int32), session, next_seq())
    code, reply = conn.post(wire.EP_SPLIT_APPLY, body)
    tally.check(where, code, reply, what)


def test_fuzz_the_split_plane_over_http_and_the_channel(split_service, model_factory):
    from secure_service.bundle import load_bundle
    from secure_service.split_executor import SplitExecutor

    server, out = split_service
    manifest = json.loads((out / "public" / "slip_manifest.json").read_text())
    by_name = {t["name"]: t["id"] for t in manifest["tensors"]}
    pre = "model.layers.1."
    ids = {"q": (by_name[pre + "self_attn.q_proj.weight"],), "down": (by_name[pre + "mlp.down_proj.weight"],),
           "embed": (by_name["model.embed_tokens.weight"],),
           "qkv": tuple(by_name[pre + f"self_attn.{p}_proj.weight"] for p in "qkv")}
    vocab = next(t["shape"][0] for t in manifest["tensors"] if t["name"] == "model.embed_tokens.weight")
    widths = {"in": 128}
    g = torch.Generator().manual_seed(SEED)
    probes = [(wire.KIND_LINEAR, ids["qkv"], torch.randn(5, 128, generator=g)),
              (wire.KIND_LINEAR, ids["down"], torch.randn(3, _in_width(manifest, ids["down"]), generator=g)),
              (wire.KIND_EMBED, ids["embed"], torch.tensor([[0], [5], [vocab - 1]], dtype=torch.int32))]
    executor = SplitExecutor(load_bundle(out / "secret"))
    rng = random.Random(SEED)
    tally = Tally()
    http = Http(server)
    shm = Shm(server, _digest(out))
    seqs = {"http": iter(range(2, 10**9)), "shm": iter(range(2, 10**9))}
    sessions = {"http": 0x5117, "shm": shm.session}

    def answers(conn, name):
        got = []
        for kind, tid, payload in probes:
            code, body = conn.post(wire.EP_SPLIT_APPLY, wire.encode_request(kind, tid, payload, sessions[name],
                                                                            next(seqs[name])))
            assert code == 200, body[:200]
            got.append(wire.decode_reply(body))
        return got

    before = {name: answers(conn, name) for name, conn in (("http", http), ("shm", shm))}
    for (kind, tid, payload), a in zip(probes, before["http"]):
        req = wire.decode_request(wire.encode_request(kind, tid, payload, 1, 1))
        assert torch.allclose(a, executor.run(req), rtol=1e-5, atol=1e-5)
    rss0 = rss(server)
    started = time.monotonic()
    for i in range(8000):
        name, conn = ("http", http) if i % 2 == 0 else ("shm", shm)
        _split_fuzz(rng, conn, tally, "split/" + name, sessions[name], ids, widths, seqs[name].__next__, vocab)
        if i % 500 == 0:
            assert server.alive()
    # a frame of another session on the channel, and oversized bodies on HTTP
    for _ in range(50):
        code, body = shm.post(wire.EP_SPLIT_APPLY, wire.encode_request(wire.KIND_LINEAR, ids["q"], torch.randn(1, 128),
                                                                       shm.session ^ 0x77, next(seqs["shm"])))
        tally.check("split/shm", code, body, "foreign session")
    r = http.client.post(server.url + "/v1/split/apply", content=b"\0" * (server_info(server)["max_body_bytes"] + 1))
    tally.check("split/http", r.status_code, r.content, "oversized body")
    elapsed = time.monotonic() - started
    assert server.alive() and httpx.get(server.url + "/healthz").status_code == 200
    grown = rss(server) - rss0
    after = {name: answers(conn, name) for name, conn in (("http", http), ("shm", shm))}
    # the same answers as before the fuzzing, and as the executor in-process: the single tensor and
    # the embedding bit for bit; the fused qkv to float32 rounding (measured 7.7e-7: its per-part
    # products depend on where the transport's buffers lie in memory, as noted in quantize.py)
    for name in after:
        assert torch.equal(before[name][1], after[name][1]) and torch.equal(before[name][2], after[name][2]), name
        assert torch.allclose(before[name][0], after[name][0], rtol=1e-5, atol=1e-5), name
        for (kind, tid, payload), a in zip(probes, after[name]):
            req = wire.decode_request(wire.encode_request(kind, tid, payload, 1, 1))
            assert torch.allclose(a, executor.run(req), rtol=1e-5, atol=1e-5), name
    http.close()
    shm.close()
    print(f"split fuzz: {tally.count} malformed requests in {elapsed:.1f} s, statuses {sorted(tally.statuses.items())}, "
          f"per transport {tally.where}, VmRSS growth {grown / 2**20:.1f} MiB")
    assert tally.count >= 8000 and set(tally.statuses) >= {400, 403, 404, 409, 413, 422}
    assert grown < RSS_BOUND, grown


def server_info(server) -> dict:
    return httpx.get(server.url + "/v1/info", timeout=10).json()


def _in_width(manifest, tid) -> int:
    return next(t["shape"][1] for t in manifest["tensors"] if t["id"] == tid[0])


# ---------------------------------------------------------------------------------------------
# shielded
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shielded_service(tmp_path_factory, log_dir):
    from slip_vllm.protect.artifact import ProtectConfig, protect
    from slip_vllm.protect.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("fuzz-shielded")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_tiny_model("llama", root / "llama", hidden=128, layers=2, heads=4, kv_heads=2, seed=3)
    protect(model, root / "out", ProtectConfig(protocol="shielded", default_rank=POLICY, seed=11), progress=False)
    torch.set_num_threads(before)
    server = secure_service(root / "out" / "secret", log_dir, name="fuzz-shielded", **SHIELDED_ENV).start()
    server.wait_ready(60)
    yield server, root / "out"
    server.stop()


class Engine:
    """A hand-driven shielded host over one connection: claims the service, then sends frames
    naming its instance and epoch; answers asks with the exact field GEMM of the public weights."""

    def __init__(self, conn, session, weights, p):
        self.conn, self.session, self.weights, self.p = conn, session, weights, p
        self.seq, self.instance, self.epoch = 0, 0, 0

    def frame(self, claim=False, defer=False, **b):
        self.seq += 1
        b = {k: v for k, v in b.items() if k != "rows"}
        if not defer and "logits_indices" not in b:
            b["logits_indices"] = torch.arange(int(torch.as_tensor(b["input_ids"]).shape[0]))
        return wire.encode_shielded_step(self.session, self.seq, **b, defer_logits=defer,
                                         **({} if claim else self.ident()))

    def ident(self):
        """The instance and KV epoch of the service's last reply (none before a claim)."""
        return {"instance": self.instance, "epoch": self.epoch} if self.epoch else {}

    def _reply(self, code, body):
        assert code == 200, (code, body[:300])
        msg = wire.decode_shielded_message(body)
        self.instance, self.epoch = getattr(msg, "instance", 0), getattr(msg, "epoch", 0)
        return msg

    def start(self, claim=False, defer=False, **b):
        msg = self._reply(*self.conn.post(wire.EP_SHIELDED_STEP, self.frame(claim, defer, **b)))
        self.ok_seq = self.seq  # admitted: a later frame with this number is a replay
        return msg

    def y(self, msg):
        from slip_vllm.core.field import field_matmul

        return field_matmul(msg.payload, self.weights[msg.key], self.p)

    def message(self, kind, step, call, key, payload):
        return wire.encode_shielded_message(kind, step, call, key, payload, **self.ident())

    def answer(self, msg, y=None):
        body = self.message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, self.y(msg) if y is None else y)
        return self._reply(*self.conn.post(wire.EP_SHIELDED_GEMM, body))

    def finish(self, msg):
        while msg.kind == wire.MSG_ASK:
            msg = self.answer(msg)
        return msg

    def step(self, st, claim=False):
        msg = self.finish(self.start(claim, **st))
        assert msg.kind == wire.MSG_LOGITS
        return [(sid, j, msg.payload[r]) for r, (sid, j) in enumerate(st["rows"])]


def _bad_metadata(rng, st, vocab, fresh, foreign):
    """A well-formed step frame (dict of fields) whose metadata violates one rule."""
    st = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items() if k != "rows"}
    n, s = int(st["input_ids"].shape[0]), int(st["seq_lens"].shape[0])
    k = rng.randrange(16)
    i = rng.randrange(n)
    if k == 0:
        st["slot_mapping"][i] = st["slot_mapping"][i] + rng.choice([1, -1, BLOCK_SIZE, 10**6, -2**62])
        return "slot off the block table", st
    if k == 1:
        bt = st["block_tables"].clone()
        bt[rng.randrange(s), rng.randrange(bt.shape[1])] = rng.choice([-1, -2**63, KV_BLOCKS, 2**62])
        return "block id out of range", {**st, "block_tables": bt}
    if k == 2:
        lens = st["seq_lens"].clone()
        lens[rng.randrange(s)] = rng.choice([10**6, 2**62, 513, 10**12])
        return "huge seq_len", {**st, "seq_lens": lens}
    if k == 3:
        big = rng.randrange(MAX_STEP_TOKENS + 1, 4 * KV_BLOCKS * BLOCK_SIZE)
        return "too many tokens", dict(input_ids=torch.ones(big, dtype=torch.long), positions=torch.arange(big),
                                       slot_mapping=torch.arange(big), query_start_loc=torch.tensor([0, big]),
                                       seq_lens=torch.tensor([big]), block_tables=torch.arange(big // BLOCK_SIZE + 1)[None] % KV_BLOCKS)
    if k == 4:
        wide = torch.zeros(s, rng.choice([129, 1000, 5000]), dtype=torch.long)
        wide[:, :st["block_tables"].shape[1]] = st["block_tables"]
        return "huge block table", {**st, "block_tables": wide}
    if k == 5:
        st["positions"] = st["positions"] + rng.choice([1, -1, 2**40])
        return "positions off", st
    if k == 6:
        st["input_ids"][i] = rng.choice([-1, vocab, 2**62, -2**63])
        return "token id out of range", st
    if k == 7:
        st["logits_indices"] = torch.tensor([rng.choice([-1, n, 2**31])])
        return "logits row out of range", st
    if k == 8:
        st["logits_indices"] = torch.zeros(rng.randrange(n + 1, 50 * n), dtype=torch.long)
        return "more logits rows than tokens", st
    if k == 9:
        qsl = st["query_start_loc"].clone()
        qsl[rng.randrange(1, s + 1) if rng.random() < 0.5 else 0] += rng.choice([1, -1, 2**62])
        return "query_start_loc off", {**st, "query_start_loc": qsl}
    if k == 10:
        lens = st["seq_lens"].clone()
        lens[rng.randrange(s)] = rng.choice([0, -1, -2**63])
        return "negative seq_len", {**st, "seq_lens": lens}
    if k == 11:  # a sequence whose context lies in a block nobody wrote
        return "never-written block", _rebind(st, 0, 0, fresh)
    if k == 12:  # a used block of another sequence, at the same positions
        return "foreign block", _rebind(st, 0, 1, foreign)
    if k == 13:  # a sequence with no query token
        qsl = st["query_start_loc"].clone()
        qsl[1] = 0
        return "empty sequence", {**st, "query_start_loc": qsl}
    if k == 14:  # the same rows of metadata, one sequence too many
        return "counts disagree", {**st, "seq_lens": torch.cat([st["seq_lens"], st["seq_lens"][:1]]),
                                   "query_start_loc": torch.cat([st["query_start_loc"], st["query_start_loc"][-1:]]),
                                   "block_tables": torch.cat([st["block_tables"], st["block_tables"][:1]])}
    # two sequences writing one fresh block for different tokens
    two = dict(input_ids=torch.tensor([5, 6, 7, 8]), positions=torch.tensor([0, 1, 0, 1]),
               query_start_loc=torch.tensor([0, 2, 4]), seq_lens=torch.tensor([2, 2]),
               block_tables=torch.tensor([[fresh], [fresh]]))
    return "one slot, two prefixes", _rebind(two, None, None, None)


def _rebind(st, seq, col, block):
    """st with block_tables[seq, col] = block (if given) and slot_mapping recomputed from it."""
    st = dict(st)
    bt = st["block_tables"].clone()
    if seq is not None:
        bt[seq, col] = block
    st["block_tables"] = bt
    q = st["query_start_loc"].diff()
    sq = torch.repeat_interleave(torch.arange(len(q)), q)
    pos = st["positions"]
    st["slot_mapping"] = bt[sq, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    st["logits_indices"] = torch.arange(int(st["input_ids"].shape[0]))
    return st


def _shielded_round(rng, eng, tally, where, steps, vocab, fresh, foreign, count, shapes):
    """``count`` malformed requests on one connection: step frames (damaged, replayed, stale, bad
    metadata), answers to a step in flight (wrong step, call, key, shape, values, declared rows)
    and logits requests to a ready step (too many rows, out of range, replayed, stale)."""
    conn = eng.conn
    done = 0
    in_flight = eng.start(**steps[1])  # steps[0] is in the cache: a step of decodes and a chunk
    ready = None
    burst, phase = 0, 0
    while done < count:
        if burst == 0:  # requests come in bursts of one kind (a step or a ready step serves many)
            burst, phase = rng.randrange(5, 40), rng.randrange(3)
        burst -= 1
        if phase == 0:  # step frames
            k = rng.randrange(5)
            if k == 0:
                what, body = _corrupt(rng, eng.frame(**steps[1]), SAFE_HEAD["step"])
            elif k == 1 or (k == 2 and not eng.epoch):  # the sequence number of an admitted frame
                what, body = "replayed step", wire.encode_shielded_step(
                    eng.session, eng.ok_seq, **{kk: v for kk, v in steps[1].items() if kk != "rows"}, **eng.ident())
            elif k == 2:
                what, body = "stale epoch", wire.encode_shielded_step(
                    eng.session, eng.seq + 1, **{kk: v for kk, v in steps[1].items() if kk != "rows"},
                    instance=eng.instance, epoch=eng.epoch + rng.choice([1, 7, 2**40]))
                eng.seq += 1
            else:
                what, st = _bad_metadata(rng, steps[1], vocab, fresh, foreign)
                body = eng.frame(**st)
                if what in ("never-written block", "foreign block", "one slot, two prefixes"):
                    in_flight = ready = None  # refused inside the new step: the old one was aborted first
            code, reply = conn.post(wire.EP_SHIELDED_STEP, body)
            tally.check(where + "/step", code, reply, what)
        elif phase == 1:  # answers to the step in flight
            if in_flight is None or in_flight.kind != wire.MSG_ASK:
                in_flight, ready = eng.start(**steps[1]), None
            msg = in_flight
            m = shapes[msg.key][0]
            k = rng.randrange(8)
            y = torch.zeros(msg.payload.shape[0], m, dtype=torch.int64)
            if k == 0:
                what, body = "wrong step", eng.message(wire.MSG_ANSWER, msg.step ^ rng.randrange(1, 2**62), msg.call, msg.key, y)
            elif k == 1:
                what, body = "wrong call", eng.message(wire.MSG_ANSWER, msg.step, msg.call + rng.choice([1, -1, 2**31]) & 0xFFFFFFFF, msg.key, y)
            elif k == 2:
                what, body = "unknown key", eng.message(wire.MSG_ANSWER, msg.step, msg.call, rng.choice(["layers.9.qkv", "x" * 60, ""]), y)
            elif k == 3:
                what, body = "wrong shape", eng.message(wire.MSG_ANSWER, msg.step, msg.call, msg.key,
                                                        torch.zeros(msg.payload.shape[0] + rng.choice([1, 7]), m, dtype=torch.int64))
            elif k == 4:  # a header declaring a huge row count over a short body
                raw = bytearray(eng.message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y))
                raw[20:24] = rng.choice([2**32 - 1, 10**8]).to_bytes(4, "little")
                what, body = "huge declared rows", bytes(raw)
            elif k == 5:
                what, body = _corrupt(rng, eng.message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, y),
                                      SAFE_HEAD["message"])
            elif k == 6:  # values >= p, or a wrong product: integrity, the step is aborted
                bad = eng.y(msg).clone()
                if rng.random() < 0.5:
                    bad[0, 0] = eng.p + rng.randrange(10)
                else:
                    bad[0, 0] = (bad[0, 0] + 1) % eng.p
                what, body = "integrity", eng.message(wire.MSG_ANSWER, msg.step, msg.call, msg.key, bad)
                in_flight = None
            elif eng.epoch:
                what, body = "stale epoch", wire.encode_shielded_message(
                    wire.MSG_ANSWER, msg.step ^ 1, msg.call, msg.key, y, instance=eng.instance, epoch=eng.epoch + 1)
            else:
                what, body = "wrong step", eng.message(wire.MSG_ANSWER, msg.step ^ 1, msg.call, msg.key, y)
            code, reply = conn.post(wire.EP_SHIELDED_GEMM, body)
            tally.check(where + "/gemm", code, reply, what)
        else:  # logits requests to a ready step
            if ready is None:
                st = {kk: v for kk, v in steps[1].items() if kk != "logits_indices"}
                ready = eng.finish(eng.start(defer=True, **st))
                assert ready.kind == wire.MSG_READY
                in_flight = None
            n = int(ready.payload[0, 0])
            k = rng.randrange(6)
            if k == 0:
                rows, what = torch.zeros(rng.randrange(n + 1, 100 * n), dtype=torch.long), "more rows than the step"
            elif k == 1:
                rows, what = torch.tensor([rng.choice([-1, n, 2**62])]), "row out of range"
            else:
                rows, what = torch.arange(n), None
            if k == 2:
                body, what = eng.message(wire.MSG_ROWS, ready.step, ready.call + rng.choice([-1, 1, 5]), "", rows[None]), "replayed call"
            elif k == 3:
                body, what = eng.message(wire.MSG_ROWS, ready.step ^ rng.randrange(1, 2**62), ready.call, "", rows[None]), "wrong step"
            elif k == 4:
                raw = bytearray(eng.message(wire.MSG_ROWS, ready.step, ready.call, "", rows[None]))
                raw[24:28] = rng.choice([2**32 - 1, 10**8]).to_bytes(4, "little")  # R
                body, what = bytes(raw), "huge declared row count"
            elif k == 5:
                what, body = _corrupt(rng, eng.message(wire.MSG_ROWS, ready.step, ready.call, "", rows[None]),
                                      SAFE_HEAD["message"])
            else:
                body = eng.message(wire.MSG_ROWS, ready.step, ready.call, "", rows[None])
            code, reply = conn.post(wire.EP_SHIELDED_LOGITS, body)
            tally.check(where + "/logits", code, reply, what)
        done += 1
    return done


def test_fuzz_the_shielded_plane_over_http_and_the_channel_then_serve_exactly(shielded_service):
    from safetensors.torch import load_file

    from secure_service.shielded_executor import ShieldedExecutor

    server, out = shielded_service
    info = server_info(server)
    assert info["max_step_tokens"] == MAX_STEP_TOKENS and info["max_model_len"] == 512
    weights = {k[:-len(".w_q")]: w for k, w in load_file(str(out / "public" / "model.safetensors")).items()}
    shapes = {k: tuple(w.shape) for k, w in weights.items()}
    p, vocab = info["p"], shapes["lm_head"][0]
    torch.set_num_threads(1)
    ref = ShieldedExecutor.from_bundle(out / "secret", num_blocks=KV_BLOCKS, block_size=BLOCK_SIZE, pool_rows=0)
    _, steps = _scenario(ref.vocab, seed=8)
    want = _run(ref, steps, _Host(ref))
    ref.close()
    used = {int(b) for st in steps for i in range(len(st["seq_lens"]))
            for b in st["block_tables"][i, :-(-int(st["seq_lens"][i]) // BLOCK_SIZE)]}
    fresh = next(b for b in range(KV_BLOCKS) if b not in used)
    foreign = int(steps[0]["block_tables"][1, 1])  # B's second block, written by steps[0]

    rng = random.Random(SEED + 1)
    tally = Tally()
    http, shm = Http(server), Shm(server, _digest(out))
    engines = {"http": Engine(http, 0xF022, weights, p), "shm": Engine(shm, shm.session, weights, p)}
    started = time.monotonic()
    rss0 = None
    for rnd in range(6):
        for name, eng in engines.items():
            time.sleep(0.35)  # the other engine's lease (0.3 s) runs out: this one claims the service
            eng.step(steps[0], claim=True)
            if rss0 is None:
                rss0 = rss(server)
            _shielded_round(rng, eng, tally, "shielded/" + name, steps, vocab, fresh, foreign, 1000, shapes)
            assert server.alive()
    elapsed = time.monotonic() - started
    assert httpx.get(server.url + "/healthz").status_code == 200
    grown = rss(server) - rss0
    # exact afterwards, on both transports: the whole scenario from a fresh claim
    for name, eng in engines.items():
        time.sleep(0.35)
        got = eng.step(steps[0], claim=True)
        for st in steps[1:]:
            got += eng.step(st)
        assert len(got) == len(want) and all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(got, want)), name
    stats = httpx.get(server.url + "/v1/stats").json()
    http.close()
    shm.close()
    print(f"shielded fuzz: {tally.count} malformed requests in {elapsed:.1f} s, statuses "
          f"{sorted(tally.statuses.items())}, per endpoint {tally.where}, VmRSS growth {grown / 2**20:.1f} MiB, "
          f"integrity alarms {stats['shielded']['integrity_alarms']}")
    assert tally.count >= 6000 and set(tally.statuses) >= {400, 409, 413, 422}
    assert all(tally.where.get(f"shielded/{t}/{e}", 0) >= 500 for t in ("http", "shm") for e in ("step", "gemm", "logits"))
    assert stats["shielded"]["integrity_alarms"] >= 100
    assert grown < RSS_BOUND, grown
