"""UNTRUSTED side: the host's driver of protocol ``shielded``, without vLLM.

What this module owns
---------------------
``ShieldedHost``: everything the host does in protocol ``shielded`` for one engine step, over its
transport (``host.transport``: a shared-memory channel for shm://, HTTP for http://) to the
secure service (``secure_service.shielded_api``).  It holds only what the host is allowed to hold:
the public int16 or int8 weights W_q of every masked GEMM, p and the layer keys, read from OUT/public
(``slip protect --protocol shielded``).  Over the wire it sees only the masked activations x~
(uniform in Z_p), its own products y~ and the final float logits.  The vLLM model
(``host.shielded_model``) drives it from inside vLLM's runner.

Protocol of one step (``step``)
-------------------------------
1. send the batch metadata (token ids, positions, slot mapping, query start locations, sequence
   lengths, block tables, logits rows) as a step frame (endpoint /v1/shielded/step);
2. receive (layer key, x~); check the key is one of the artifact's and x~ has the right width with
   values in [0, p);
3. y~ = W_q[key] x~ mod p (``field.field_matmul``, exact); send (step, call, key, y~) (endpoint
   /v1/shielded/gemm);
4. repeat 2-3 until the reply carries the float logits [R, vocab] instead of a request.
Deferred form (``begin`` + ``logits``, what the vLLM model uses because vLLM's runner chooses its
logits rows after the forward): the step frame asks for no logits; steps 2-3 repeat until MSG_READY;
then each ``logits(rows)`` sends MSG_ROWS (endpoint /v1/shielded/logits) and runs steps 2-3 once more
for the LM head until MSG_LOGITS.
Where the GEMMs run (``device``, ``use_device``): on the CPU (the default) y~ is computed with the
exact CPU backend measured fastest on this machine (``field.select_cpu_backend``).  On a GPU the
public weights live on the device and every ask runs the Triton field GEMM
(``field_kernels_cuda``); x~ arrives as bytes anyway, so per ask the host copies it once into pinned
memory (while decoding the frame), uploads it with one non-blocking copy, multiplies, downloads y~
into pinned memory with one non-blocking copy and waits for that copy alone (an event), then writes
y~ from there onto the transport: one upload, one download and one wait per masked GEMM, which the
protocol needs anyway (the service must have y~ before it can send the next ask).  The step
metadata crosses in one download (``wire.encode_shielded_step``) and the logits in one upload.
The checks of step 2 run on the host copy of x~, so they cost no device round trip.
A refusal (4xx/5xx) raises ``ShieldedServiceError`` with the service's status and message; a
broken transport ``TransportError``.  Every wait for a reply has a timeout that grows with the
step's token rows (``timeout + rows * timeout_per_row_s``).

Service identity: every step frame carries the service instance and KV epoch the host believes its
KV view belongs to; epoch 0 claims the service (it becomes this host's, empties its KV mirror and
starts a new epoch, or answers 409 if another engine holds it).  Every reply carries the service's
(instance, epoch): the host adopts them after a claim and checks them otherwise.  A mismatch, a
410 "stale KV view" from the service, or any failed step resets the host's view to (0, 0), so the
next step claims again; the vLLM integration drops vLLM's prefix cache at the same time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from slip_vllm.core.field import (FieldWeight, default_backend, field_matmul, limb_count, reference_entries,
                                  select_cpu_backend)
from slip_vllm.core.manifest import ManifestError, read_public_manifest, sha256_bytes
from slip_vllm.core.wire import (
    EP_SHIELDED_GEMM, EP_SHIELDED_LOGITS, EP_SHIELDED_STEP, MSG_ANSWER, MSG_ASK, MSG_LOGITS, MSG_READY, MSG_ROWS,
    decode_shielded_message, encode_shielded_message, encode_shielded_step, shielded_message_header,
)
from slip_vllm.host.transport import ServiceRefused, TransportError, open_transport

__all__ = ["ShieldedServiceError", "TransportError", "PublicShieldedWeights", "load_public_weights", "ShieldedHost"]


ShieldedServiceError = ServiceRefused  # a refusal of the service: .status, .message


class PublicShieldedWeights:
    """What OUT/public of a shielded artifact gives the host: p, the layer keys and W_q per key."""

    def __init__(self, manifest, manifest_sha256: str, p: int, layer_keys: List[str],
                 weights: Dict[str, FieldWeight]):
        self.manifest, self.manifest_sha256 = manifest, manifest_sha256
        self.p, self.layer_keys, self.weights = p, layer_keys, weights


def load_public_weights(public_dir) -> PublicShieldedWeights:
    """Read OUT/public strictly: the manifest must be a shielded one, and every W_q must be int8
    (int16 for a manifest with ``weight_bits`` 16), of the manifest's shape and hash
    (``ManifestError`` otherwise).  ``FieldWeight`` multiplies either width exactly."""
    public_dir = Path(public_dir)
    manifest, digest = read_public_manifest(public_dir)
    if manifest.protocol != "shielded":
        raise ManifestError(f"{public_dir} is a {manifest.protocol!r} artifact, not a shielded one")
    p = int(manifest.extra["p"])
    layer_keys = list(manifest.extra["layer_keys"])
    tensors = load_file(str(public_dir / manifest.extra.get("public_weights_file", "model.safetensors")))
    bits = int(manifest.extra.get("weight_bits", 8))
    if bits not in (8, 16):
        raise ManifestError(f"weight_bits {bits}: public weights are int8 or int16")
    w_dtype = torch.int8 if bits == 8 else torch.int16
    weights: Dict[str, FieldWeight] = {}
    for entry in manifest.tensors:
        w = tensors.get(f"{entry.name}.w_q")
        if w is None or w.dtype != w_dtype or tuple(w.shape) != tuple(entry.shape):
            raise ManifestError(f"{entry.name}: public weight is missing or not int{bits} {entry.shape}")
        if sha256_bytes(w.contiguous().numpy().tobytes()) != entry.public_sha256:
            raise ManifestError(f"{entry.name}: public weight does not match the manifest's hash")
        weights[entry.name] = FieldWeight(w.contiguous(), p)
    if sorted(weights) != sorted(layer_keys):
        raise ManifestError("the manifest's layer keys and its tensors differ")
    return PublicShieldedWeights(manifest, digest, p, layer_keys, weights)


class ShieldedHost:
    """The host side of protocol ``shielded`` (see the module docstring).

    public_dir: OUT/public; service_url: the secure service; token: its bearer token, if any.
    record=True keeps every (layer key, x~) received in ``received`` (for audits and tests).
    ``calls`` lists the layer keys of the last step's calls, in order.  device: where the GEMMs run
    (default: the CPU; see "Where the GEMMs run" in the module docstring); ``use_device`` moves them.
    """

    def __init__(self, public, service_url: str, *, token: str = "", timeout: float = 30.0,
                 timeout_per_row_s: float = 0.0, record: bool = False, spin_s: float = 50e-6,
                 device=None):
        """public: OUT/public, or its already loaded ``PublicShieldedWeights``.  service_url:
        http://HOST:PORT or shm://HOST:PORT (``host.transport``)."""
        if not isinstance(public, PublicShieldedWeights):
            public = load_public_weights(public)
        self.manifest_sha256 = public.manifest_sha256
        self.p = public.p
        self.layer_keys: List[str] = public.layer_keys
        self.weights: Dict[str, FieldWeight] = public.weights
        self.device = torch.device("cpu")
        self._event = None  # CUDA: the event that the download of y~ is waited on
        # the exact CPU GEMM differs by up to 100x between machines: measured once per process
        self.backend, self.backend_reason = None, "default for the device"
        if all(w.w_q.device.type == "cpu" for w in self.weights.values()):
            self.backend, self.backend_reason = select_cpu_backend(
                limb_count(self.p), sum(8 * w.m * w.k for w in self.weights.values()))
        if device is not None and torch.device(device) != self.device:
            self.use_device(device)
        self.url = service_url.rstrip("/")
        self.transport = open_transport(self.url, self.manifest_sha256, token=token, timeout_s=timeout, spin_s=spin_s)
        self.seq = 0
        self.timeout_s, self.timeout_per_row_s = float(timeout), float(timeout_per_row_s)
        self._timeout = self.timeout_s
        self.instance = 0  # the service instance and KV epoch of this host's view (0, 0: claim next step)
        self.epoch = 0
        self.record = record
        self.received: List[Tuple[str, torch.Tensor]] = []
        self.calls: List[str] = []
        self.ready_step: Optional[int] = None  # the deferred step whose logits may be asked for
        self._next_call = 0
        self.ready_rows = 0

    def use_device(self, device) -> None:
        """Run the GEMMs on ``device``: the public weights are copied there (once; the CPU copies are
        dropped) and its default exact backend is used (CUDA: the Triton kernel).  Before any step it
        checks the device's backend against Python big integers (``check_device``): ``RuntimeError``
        if they disagree."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"shielded host GEMMs run on the CPU or a CUDA device, not {device}")
        self.weights = {k: FieldWeight(w.w_q.to(device), self.p) for k, w in self.weights.items()}
        self.device = device
        if device.type == "cpu":
            self._event = None
            self.backend, self.backend_reason = select_cpu_backend(  # float64 copies: 8 bytes a weight byte
                limb_count(self.p), sum(8 * w.w_q.numel() * w.w_q.element_size() for w in self.weights.values()))
        else:
            self._event = torch.cuda.Event()
            self.backend = default_backend(device)
            self.backend_reason = f"default for {device} ({torch.cuda.get_device_name(device)})"
        self.check_device()

    def check_device(self, rows=(1, 2, 16, 17, 64), entries: int = 4, seed: int = 0) -> None:
        """One product per distinct weight shape and row count (on CUDA this also compiles the
        kernel variants of decode and mid-size steps before the first step), each checked against
        Python big integers on ``entries`` sampled outputs; ``RuntimeError`` on any difference.
        The inputs are seeded test values, nothing of a step."""
        g = torch.Generator().manual_seed(seed)
        shapes = {}
        for key, w in self.weights.items():
            shapes.setdefault((w.m, w.n, w.w_q.dtype), (key, w))
        for (m, n, _), (key, w) in shapes.items():
            for t in rows:
                x = torch.randint(0, self.p, (t, n), generator=g, dtype=torch.int64)
                y = field_matmul(x.to(self.device), w, self.p, backend=self.backend).cpu()
                r = torch.randint(0, t, (entries,), generator=g).tolist()
                c = torch.randint(0, m, (entries,), generator=g).tolist()
                want = reference_entries(x, w.w_q, self.p, r, c)
                got = [int(y[i, j]) for i, j in zip(r, c)]
                if tuple(y.shape) != (t, m) or got != want:
                    raise RuntimeError(f"the {self.backend} field GEMM on {self.device} is not exact for {key} "
                                       f"({m} x {n}) at {t} rows: refusing to serve with it")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "ShieldedHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, endpoint: int, body: bytes, payload: Optional[torch.Tensor] = None) -> memoryview:
        """One exchange (the frame is ``body`` followed by ``payload``'s bytes); the reply is valid
        until the next one (``_drive`` decodes it, which copies its payload out, before it posts again)."""
        return self.transport.call(endpoint, body, payload, timeout=self._timeout)

    def _staging(self, kind: int, rows: int, cols: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Where a received payload is decoded into: pinned memory for x~ and logits on CUDA (the
        device reads it without a staging copy), a fresh tensor otherwise."""
        if self._event is None or kind not in (MSG_ASK, MSG_LOGITS):
            return None
        return torch.empty((rows, cols), dtype=dtype, pin_memory=True)

    def _decode(self, reply):
        return decode_shielded_message(reply, into=self._staging)

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the host's device (non-blocking from pinned memory on CUDA)."""
        if self.device.type == "cpu":
            return t
        return t.to(self.device, non_blocking=t.is_pinned())

    def _download(self, y: torch.Tensor) -> torch.Tensor:
        """y~ on the CPU: on CUDA one non-blocking copy into pinned memory and a wait for it alone."""
        if y.device.type == "cpu":
            return y
        out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        out.copy_(y, non_blocking=True)
        self._event.record(torch.cuda.current_stream(self.device))
        self._event.synchronize()
        return out

    def forget_service(self) -> None:
        """Drop the host's view of the service's KV (the next step claims the service afresh)."""
        self.instance = self.epoch = 0
        self.ready_step = None

    def _identity(self, msg) -> None:
        if self.epoch == 0:
            self.instance, self.epoch = msg.instance, msg.epoch  # the claim's answer
        elif (msg.instance, msg.epoch) != (self.instance, self.epoch):
            seen = (msg.instance, msg.epoch)
            self.forget_service()
            raise ShieldedServiceError(410, f"stale KV view: the service answered as instance {seen[0]:#x} epoch "
                                            f"{seen[1]}, this host's view is of another")

    def _start(self, body_of, rows: int, final_kind: int):
        self.seq += 1
        self.calls = []
        self.ready_step = None
        self._timeout = self.timeout_s + rows * self.timeout_per_row_s
        try:
            return self._drive(self._post(EP_SHIELDED_STEP, body_of()), final_kind)
        except BaseException:
            self.forget_service()
            raise

    def compute(self, key: str, x_masked: torch.Tensor) -> torch.Tensor:
        """Step 3: y~ = W_q[key] x~ mod p (x~ and y~ on the host's device)."""
        return field_matmul(x_masked, self.weights[key], self.p, backend=self.backend)

    def step(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables,
             logits_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run one step against the service (steps 1-4); float32 logits [R, vocab]."""
        return self._start(lambda: encode_shielded_step(
            self.transport.session, self.seq, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
            block_tables, logits_indices, instance=self.instance, epoch=self.epoch),
            len(input_ids), MSG_LOGITS).payload.to(self.device, non_blocking=self._event is not None)

    def begin(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables) -> int:
        """A deferred step: run every decoder layer (steps 1-3 until MSG_READY); returns the
        number of token rows whose logits ``logits`` may then ask for."""
        msg = self._start(lambda: encode_shielded_step(
            self.transport.session, self.seq, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
            block_tables, defer_logits=True, instance=self.instance, epoch=self.epoch), len(input_ids), MSG_READY)
        self.ready_step, self._next_call = msg.step, msg.call
        self.ready_rows = int(msg.payload[0, 0])
        return self.ready_rows

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [R, vocab] of token rows of the ready step (the masked LM head)."""
        if self.ready_step is None:
            raise RuntimeError("no ready step: call begin() first")
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(1, -1)
        body = encode_shielded_message(MSG_ROWS, self.ready_step, self._next_call, "", rows, instance=self.instance,
                                       epoch=self.epoch)
        try:
            msg = self._drive(self._post(EP_SHIELDED_LOGITS, body), MSG_LOGITS)
        except BaseException:
            self.forget_service()
            raise
        self._next_call = msg.call
        if tuple(msg.payload.shape) != (rows.shape[1], self.weights["lm_head"].m):
            raise ShieldedServiceError(502, f"logits of shape {tuple(msg.payload.shape)} for {rows.shape[1]} rows")
        return self._upload(msg.payload)

    def answer(self, msg) -> Tuple[bytes, Optional[torch.Tensor]]:
        """Steps 2-3 for one decoded MSG_ASK: check it, compute y~ on the host's device, and return
        the answer frame as (header, y~ on the CPU) for the transport (on a big-endian machine the
        whole frame in the header)."""
        x = msg.payload
        w = self.weights.get(msg.key)
        if w is None or x.shape[1] != w.n:
            raise ShieldedServiceError(502, f"service asked for unknown layer {msg.key!r} or wrong width")
        if int(x.min()) < 0 or int(x.max()) >= self.p:
            raise ShieldedServiceError(502, "service sent values outside [0, p)")
        if self.record:
            self.received.append((msg.key, x.clone()))
        self.calls.append(msg.key)
        y = self._download(self.compute(msg.key, self._upload(x)))
        if sys.byteorder != "little":
            return encode_shielded_message(MSG_ANSWER, msg.step, msg.call, msg.key, y, instance=self.instance,
                                           epoch=self.epoch), None
        return shielded_message_header(MSG_ANSWER, msg.step, msg.call, msg.key, y.contiguous(),
                                       instance=self.instance, epoch=self.epoch)

    def _drive(self, reply: bytes, final_kind: int):
        """Steps 2-3 until the service's reply is of ``final_kind``; returns that message."""
        while True:
            msg = self._decode(reply)
            self._identity(msg)
            if msg.kind == final_kind:
                return msg
            if msg.kind != MSG_ASK:
                raise ShieldedServiceError(502, f"unexpected message kind {msg.kind}")
            header, y = self.answer(msg)
            reply = self._post(EP_SHIELDED_GEMM, header, y)
