"""The colocated shared-memory data plane against a real service process: the same answers as HTTP,
attach refused without the right credentials, and >= 1 000 malformed channel messages each answered
with a clear error while the service stays healthy and correct."""

import json
import random
import socket

import httpx
import pytest
import torch

from helpers import secure_service
from slip_vllm.core import wire
from slip_vllm.core.channel import (
    W_REP_LEN, W_REP_OFF, W_REP_SEQ, W_REP_STATUS, W_REQ_EP, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, parse_service_url,
)
from slip_vllm.host.transport import HttpTransport, ServiceRefused, ShmTransport, TransportError, open_transport


@pytest.fixture(scope="module")
def artifact(model_factory):
    return model_factory("llama", tie=False)


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact[1] / "public" / "slip_manifest.json").read_text())


@pytest.fixture(scope="module")
def digest(artifact):
    return json.loads((artifact[1] / "secret" / "bundle.json").read_text())["public_manifest_sha256"]


@pytest.fixture(scope="module")
def service(artifact, log_dir):
    server = secure_service(artifact[1] / "secret", log_dir, name="service-channel",
                            SLIP_SERVICE_TOKEN="tok", SLIP_MAX_BODY_BYTES=str(1 << 20)).start().wait_ready(60)
    yield server
    server.stop()


def shm_url(service) -> str:
    return service.url.replace("http://", "shm://")


def ids_of(manifest, *names):
    by_name = {t["name"]: t["id"] for t in manifest["tensors"]}
    return tuple(by_name[n] for n in names)


def apply(transport, kind, ids, payload, seq):
    header, payload = wire.request_header(kind, ids, payload, transport.session, seq)
    return wire.decode_reply(transport.call(wire.EP_SPLIT_APPLY, header, payload))


def test_address_forms():
    assert parse_service_url("shm://127.0.0.1:8400").control_url == "http://127.0.0.1:8400"
    assert parse_service_url("shm://127.0.0.1:8400").colocated
    assert not parse_service_url("http://10.0.0.2:8400/").colocated
    for bad in ("127.0.0.1:8400", "unix:///tmp/x", "shm://host:1/path", "shm://"):
        with pytest.raises(ValueError):
            parse_service_url(bad)
    assert isinstance(open_transport("http://127.0.0.1:1", "x"), HttpTransport)
    assert isinstance(open_transport("shm://127.0.0.1:1", "x"), ShmTransport)


def test_channel_answers_exactly_what_http_answers(service, manifest, digest):
    info = httpx.get(service.url + "/v1/info").json()
    assert info["data_planes"] == ["http", "shm"]
    qkv = ids_of(manifest, *[f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"])
    emb = ids_of(manifest, "model.embed_tokens.weight")
    x = torch.randn(7, 128)
    tokens = torch.tensor([3, 0, 77, 3])
    with ShmTransport(service.url, digest, token="tok") as shm, HttpTransport(service.url, token="tok") as http:
        for seq in (1, 2):
            got = apply(shm, wire.KIND_LINEAR, qkv, x, seq)
            want = apply(http, wire.KIND_LINEAR, qkv, x, seq)
            assert torch.equal(got, want) and got.shape == (7, 128 + 2 * 64)
        assert torch.equal(apply(shm, wire.KIND_EMBED, emb, tokens, 3), apply(http, wire.KIND_EMBED, emb, tokens, 3))
        assert shm.attaches == 1
    stats = httpx.get(service.url + "/v1/stats").json()
    assert stats["channels"]["attached_total"] >= 1


def test_attach_needs_the_token_the_bundle_and_a_fitting_capacity(service, digest):
    def attach(**kw):
        return ShmTransport(service.url, **kw)

    for kw, status in ((dict(manifest_sha256=digest), 401), (dict(manifest_sha256=digest, token="wrong"), 401),
                       (dict(manifest_sha256="0" * 64, token="tok"), 403),
                       (dict(manifest_sha256=digest, token="tok", capacity=1 << 30), 413)):
        with pytest.raises(ServiceRefused) as err:
            attach(**kw).session
        assert err.value.status == status, kw
    # a made-up ticket on the socket is refused; a granted one works once only
    grant = httpx.post(service.url + "/v1/channel/attach", json={"manifest_sha256": digest},
                       headers={"authorization": "Bearer tok"}).json()
    for ticket, ok in (("f" * 64, False), (grant["ticket"], True), (grant["ticket"], False)):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(grant["socket"])
            sock.sendall(ticket.encode())
            msg, fds, _, _ = socket.recv_fds(sock, 256, 1)
            for fd in fds:
                import os

                os.close(fd)
            assert (msg == b"OK") == ok, msg


class RawChannel:
    """Writes channel messages by hand, as a hostile host could."""

    def __init__(self, transport: ShmTransport):
        transport.session  # attach
        self.t = transport
        self.ch = transport._ch
        self.seq = 0

    def post(self, endpoint: int, body: bytes, *, seq=None, length=None, offset=28, timeout=10.0):
        """offset: the request-offset word (the body is written at 0 when it is out of range); 28
        puts the payload of a one-tensor split frame on a 64-byte boundary, as the transport does."""
        ch = self.ch
        at = offset if 0 <= offset < 64 else 0
        ch.request_area[at:at + len(body)] = body
        self.seq = self.seq + 1 if seq is None else seq
        before = ch.word(W_REP_SEQ)
        ch.set_word(W_REQ_EP, endpoint)
        ch.set_word(W_REQ_LEN, len(body) if length is None else length)
        ch.set_word(W_REQ_OFF, offset)
        ch.set_word(W_REQ_SEQ, self.seq)
        ch.ring()
        got = ch.wait(W_REP_SEQ, before, timeout)
        assert got == self.seq
        status, n, off = ch.word(W_REP_STATUS), ch.word(W_REP_LEN), ch.word(W_REP_OFF)
        return status, bytes(ch.reply_area[off:off + n])


def test_fuzz_a_thousand_malformed_channel_messages_then_still_correct(service, manifest, digest):
    rng = random.Random(99)
    q = ids_of(manifest, "model.layers.1.self_attn.q_proj.weight")
    x = torch.randn(3, 128)
    with ShmTransport(service.url, digest, token="tok") as transport:
        raw = RawChannel(transport)
        session = transport.session
        frame_seq = iter(range(1, 10**9))

        def good_frame(payload=x, ids=q, sess=None):
            return wire.encode_request(wire.KIND_LINEAR, ids, payload, session if sess is None else sess, next(frame_seq))

        status, body = raw.post(wire.EP_SPLIT_APPLY, good_frame())
        assert status == 200
        want = wire.decode_reply(body)
        statuses, kinds = [], set()
        for i in range(1200):
            choice = rng.randrange(9)
            kinds.add(choice)
            seq, length, offset, endpoint = None, None, 28, wire.EP_SPLIT_APPLY
            if choice == 0:  # random bytes
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
            elif choice == 1:  # truncated frame
                frame = good_frame()
                body = frame[: rng.randrange(1, len(frame))]
            elif choice == 2:  # a length beyond the capacity, or zero, or a frame offset out of range
                body, length = good_frame(), rng.choice([0, transport._ch.capacity + 1, 2**40])
                if rng.random() < 0.3:
                    body, length, offset = good_frame(), None, rng.choice([-1, 64, 2**40])
            elif choice == 3:  # wrong layer id / widths
                body = good_frame(ids=(rng.randrange(40, 1000),)) if rng.random() < 0.5 else good_frame(torch.randn(2, 64))
            elif choice == 4:  # a frame of another session (a stolen or forged one)
                body = good_frame(sess=session ^ 0x5A5A)
            elif choice == 5:  # a replayed frame sequence number
                body = wire.encode_request(wire.KIND_LINEAR, q, x, session, 1)
            elif choice == 6:  # an out-of-order channel sequence word (re-writing the same word posts nothing)
                body, seq = good_frame(), raw.seq + rng.choice([2, 5, -1, -3])
            elif choice == 7:  # an unknown endpoint, or a shielded endpoint on a split bundle
                body, endpoint = good_frame(), rng.choice([0, 9, 2**31, wire.EP_SHIELDED_STEP])
            else:  # NaN in the rows
                bad = x.clone()
                bad[0, rng.randrange(128)] = float("nan")
                body = good_frame(bad)
            status, reply = raw.post(endpoint, body, seq=seq, length=length, offset=offset)
            statuses.append(status)
            assert 400 <= status < 500, (i, choice, status, reply[:200])
            assert json.loads(reply)["error"], (i, choice)
            if seq is not None:
                raw.seq = seq  # the service follows the host's sequence word after refusing it
        assert len(kinds) == 9 and len(set(statuses)) >= 5
        assert set(statuses) <= {400, 403, 404, 409, 413, 422}
        # the channel itself still works, and so does a fresh one
        status, body = raw.post(wire.EP_SPLIT_APPLY, good_frame())
        assert status == 200 and torch.equal(wire.decode_reply(body), want)
    assert httpx.get(service.url + "/healthz").status_code == 200
    stats = httpx.get(service.url + "/v1/stats").json()
    assert stats["rejected"] >= 1200
    with ShmTransport(service.url, digest, token="tok") as again:
        assert torch.equal(apply(again, wire.KIND_LINEAR, q, x, 1), want)


def test_after_detach_and_after_a_service_restart_calls_fail_then_reattach(artifact, digest, manifest, log_dir):
    q = ids_of(manifest, "model.layers.1.self_attn.q_proj.weight")
    x = torch.randn(2, 128)
    server = secure_service(artifact[1] / "secret", log_dir, name="service-channel-restart").start().wait_ready(60)
    transport = ShmTransport(server.url, digest, timeout_s=5)
    try:
        want = apply(transport, wire.KIND_LINEAR, q, x, 1)
        server.stop()
        with pytest.raises(TransportError):
            apply(transport, wire.KIND_LINEAR, q, x, 2)
        with pytest.raises(TransportError):  # no service: attaching fails cleanly too
            apply(transport, wire.KIND_LINEAR, q, x, 3)
        server.start().wait_ready(60)
        assert torch.equal(apply(transport, wire.KIND_LINEAR, q, x, 4), want)
        assert transport.attaches == 2
    finally:
        transport.close()
        server.stop()
    with pytest.raises(TransportError):  # a closed transport's channel is gone
        transport.receive()
