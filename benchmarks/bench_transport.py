#!/usr/bin/env python
"""Round trip of one data-plane call, every transport, against the real secure service process.

What is timed: the host side of one protocol-``split`` call as the plugin makes it
(``host.transport``: build the frame header, write/send header + payload, wake the service, wait,
decode the reply into a tensor), through the real service (``slip secure-service``: its framing,
session/sequence checks, NaN/Inf check, the bundle's ids and shapes, the secret term, the
counters).  Two payloads, the issue's: 1 x 512 and 32 x 1024 float32, on a random Llama-style
model (hidden 512, intermediate 1024) protected at rank 1 (so the service-side operation is
trivial and the figure is the transport's) and at the default rank 1/8 (what a real layer adds).

Transports:
  * ``http``: keep-alive HTTP/1.1, httpx -> uvicorn/FastAPI on TCP loopback (the non-colocated path);
  * ``shm``: the colocated shared-memory channel (``SLIP_SERVICE_URL=shm://...``);
  * ``shm-echo``: the same channel with an echo process instead of the service (no framing, no
    checks, no compute): the floor of the channel mechanism itself in Python.

Then, with a channel attached and no traffic for ``--idle-s`` seconds, the CPU time of the service
process (utime + stime from /proc) as a share of one core.

    .venv/bin/python benchmarks/bench_transport.py [--calls 2000] [--idle-s 5] [--profile]

Prints the command line, the machine's core count and load average before and after, and one table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slip_vllm.core import wire  # noqa: E402
from slip_vllm.core.channel import (  # noqa: E402
    W_REP_LEN, W_REP_OFF, W_REP_SEQ, W_REP_STATUS, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, Channel, ChannelClosed,
)
from slip_vllm.host.transport import HttpTransport, ShmTransport  # noqa: E402
from slip_vllm.launch import secure_service  # noqa: E402

SHAPES = [(1, 512), (32, 1024)]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def make_artifact(work: Path, rank: int | None) -> Path:
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect
    from slip_vllm.protect.tiny_models import make_tiny_model

    tag = f"rank{rank}" if rank else "rank-default"
    out = work / tag
    if not (out / "secret" / "bundle.json").is_file():
        original = make_tiny_model("llama", work / "original", hidden=512, layers=1, heads=8, kv_heads=4)
        policy = RankPolicy(absolute=rank) if rank else RankPolicy(fraction=0.125)
        protect(original, out, ProtectConfig(default_rank=policy, seed=7), force=True, progress=False)
    return out


def tensor_for(manifest: dict, width: int) -> int:
    for t in manifest["tensors"]:
        if t["shape"][1] == width and "proj" in t["name"]:
            return t["id"]
    raise LookupError(width)


def time_calls(transport, tid: int, x: torch.Tensor, calls: int) -> list[float]:
    times = []
    first = getattr(transport, "_bench_seq", 0) + 1
    transport._bench_seq = first + calls - 1  # frame sequence numbers rise per session
    for seq in range(first, first + calls):
        t0 = time.perf_counter()
        header, payload = wire.request_header(wire.KIND_LINEAR, (tid,), x, transport.session, seq)
        transport.send(wire.EP_SPLIT_APPLY, header, payload)
        y = wire.decode_reply(transport.receive(), copy=False)
        times.append(time.perf_counter() - t0)
        del y
    return times[calls // 10:]  # drop the warm-up tenth


def echo_channel(capacity: int, spin_s: float):
    """A host end here and an echo on the other end of a real channel, in a forked process (a
    thread would share this process's GIL with the spinning host); no service logic."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = Channel.create_segment(capacity, 1)
    pid = os.fork()
    if pid == 0:  # the echo
        a.close()
        peer = Channel(fd, b, "service", spin_s=spin_s)
        last = 0
        try:
            while True:
                seq = peer.wait(W_REQ_SEQ, last, None)
                n, off = peer.word(W_REQ_LEN), peer.word(W_REQ_OFF)
                peer.reply_area[:n] = peer.request_area[off:off + n]
                peer.set_word(W_REP_STATUS, 200)
                peer.set_word(W_REP_LEN, n)
                peer.set_word(W_REP_OFF, 0)
                peer.set_word(W_REP_SEQ, seq)
                peer.ring()
                last = seq
        except (ChannelClosed, ValueError):
            pass
        os._exit(0)
    b.close()
    return Channel(fd, a, "host", spin_s=spin_s), pid


def time_echo(host: Channel, x: torch.Tensor, calls: int) -> list[float]:
    area = torch.frombuffer(host.request_area, dtype=torch.uint8)
    nbytes = x.numel() * 4
    times = []
    for seq in range(1, calls + 1):
        t0 = time.perf_counter()
        area[:nbytes].copy_(x.reshape(-1).view(torch.uint8))
        host.set_word(W_REQ_LEN, nbytes)
        host.set_word(W_REQ_OFF, 0)
        host.set_word(W_REQ_SEQ, seq)
        host.ring()
        host.wait(W_REP_SEQ, seq - 1, 10.0)
        y = torch.frombuffer(host.reply_area, dtype=torch.float32, count=x.numel()).view(x.shape)
        times.append(time.perf_counter() - t0)
        del y
    del area
    return times[calls // 10:]


def profile_service(out: Path, calls: int = 2000) -> None:
    """Where a call's time goes inside the service: ``DataPlane.handle`` in this process on one
    32 x 1024 request written into a buffer the way the channel does, under cProfile."""
    import cProfile
    import pstats

    from secure_service.bundle import load_bundle
    from secure_service.data_plane import DataPlane

    plane = DataPlane(load_bundle(out / "secret"))
    manifest = json.loads((out / "public" / "slip_manifest.json").read_text())
    tid = tensor_for(manifest, 1024)
    x = torch.randn(32, 1024)
    request, reply = bytearray(1 << 20), bytearray(1 << 20)
    req_view, rep_view = memoryview(request), memoryview(reply)
    req_bytes = torch.frombuffer(request, dtype=torch.uint8)

    def once(seq: int) -> None:
        header, payload = wire.request_header(wire.KIND_LINEAR, (tid,), x, 5, seq)
        off = 28  # the payload of a one-tensor frame on a 64-byte boundary, as the channel places it
        n = len(header) + payload.numel() * 4
        req_view[off:off + len(header)] = header
        req_bytes[off + len(header):off + n].copy_(payload.reshape(-1).view(torch.uint8))
        plane.handle(wire.EP_SPLIT_APPLY, req_view[off:off + n], lambda k: rep_view[:k], in_place=True)

    for seq in range(1, 201):
        once(seq)
    t0 = time.perf_counter()
    for seq in range(1000, 1000 + calls):
        once(seq)
    print(f"\nservice side in process: {(time.perf_counter() - t0) / calls * 1e6:.1f} us per 32 x 1024 call "
          f"(frame written + DataPlane.handle); cProfile, by own time:")
    prof = cProfile.Profile()
    prof.enable()
    for seq in range(10**6, 10**6 + calls):
        once(seq)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench-transport"))
    ap.add_argument("--spin-us", type=float, default=None, help="SLIP_CHANNEL_SPIN_US for both ends (default: the setting)")
    ap.add_argument("--profile", action="store_true", help="also profile the service side of a call in process")
    args = ap.parse_args()
    from slip_vllm.settings import settings

    spin_us = settings().channel_spin_us if args.spin_us is None else args.spin_us
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()}; torch threads 1 (host), "
          f"service SLIP_SERVICE_THREADS=1; channel spin {spin_us:g} us")
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    for rank in (1, None):
        out = make_artifact(work, rank)
        manifest = json.loads((out / "public" / "slip_manifest.json").read_text())
        digest = json.loads((out / "secret" / "bundle.json").read_text())["public_manifest_sha256"]
        env = {"SLIP_CHANNEL_SPIN_US": str(spin_us)}
        with secure_service(out / "secret", logs, name=f"service-{rank}", **env).start().wait_ready(60) as service:
            label = "rank 1" if rank else "rank 1/8"
            for name, make in (("http", lambda: HttpTransport(service.url)),
                               ("shm", lambda: ShmTransport(service.url, digest, spin_s=spin_us * 1e-6))):
                with make() as transport:
                    for shape in SHAPES:
                        x = torch.randn(*shape)
                        tid = tensor_for(manifest, shape[1])
                        times = time_calls(transport, tid, x, args.calls if name == "shm" else max(200, args.calls // 10))
                        rows.append((name, label, shape, percentile(times, 50), percentile(times, 99)))
                    if name == "shm" and rank == 1:
                        time.sleep(0.5)
                        c0, t0 = cpu_seconds(service.proc.pid), time.monotonic()
                        time.sleep(args.idle_s)
                        idle = (cpu_seconds(service.proc.pid) - c0) / (time.monotonic() - t0)
    host, echo_pid = echo_channel(1 << 20, spin_us * 1e-6)
    for shape in SHAPES:
        times = time_echo(host, torch.randn(*shape), args.calls)
        rows.append(("shm-echo", "no service (echo process)", shape, percentile(times, 50), percentile(times, 99)))
    host.close()
    os.waitpid(echo_pid, 0)
    print(f"machine: load average after {os.getloadavg()}")
    print()
    print("| transport | service-side operation | payload | p50 round trip | p99 round trip |")
    print("|---|---|---|---|---|")
    for name, label, shape, p50, p99 in rows:
        print(f"| {name} | {label} | {shape[0]} x {shape[1]} fp32 | {p50 * 1e6:.1f} us | {p99 * 1e6:.1f} us |")
    print()
    print(f"idle service with one channel attached, {args.idle_s:g} s without traffic: "
          f"{idle * 100:.2f} % of one core")
    target = next(r for r in rows if r[0] == "shm" and r[1] == "rank 1" and r[2] == (32, 1024))
    print(f"target: colocated round trip of 32 x 1024 fp32 p50 <= 20 us: {target[3] * 1e6:.1f} us -> "
          f"{'met' if target[3] <= 20e-6 else 'not met'}; idle < 2 % of a core: "
          f"{'met' if idle < 0.02 else 'not met'}")
    if args.profile:
        profile_service(make_artifact(work, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
