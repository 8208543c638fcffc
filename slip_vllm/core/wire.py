"""Binary wire codec between the vLLM host and the secure service (both sides; pure code).

Tensors travel as raw little-endian bytes behind a fixed header, never as JSON numbers. One request
carries the whole batch of token rows of one protected layer for one engine step. Protocol
``split`` uses the request/reply frames below; protocol ``shielded`` the step and message frames
defined at the end of this module.

Request frame (all integers little-endian)::

    magic   4s   b"SLQ1"
    kind    u8   KIND_LINEAR (float rows x) | KIND_EMBED (int32 token ids)
    dtype   u8   payload dtype code (DTYPE_*)
    n_ids   u16  number of protected tensors whose secret terms are concatenated (fused layers)
    rows    u32  token rows T
    cols    u32  row width (input features; 1 for token ids)
    session u64  random id of the calling worker process
    seq     u64  strictly increasing per session (replays and reordering are refused)
    ids     n_ids x u32  tensor ids from the manifest, in fused-row order
    payload rows*cols*itemsize bytes

Sliced request frame (tensor parallelism: a vLLM rank holds a block of each weight), the same with
magic ``b"SLQ2"`` and one range record per tensor id between the ids and the payload::

    ranges  n_ids x (row0 u32, row1 u32, col0 u32, col1 u32)

Segment i asks for ``L_i[row0:row1] (R_i[:, col0:col1] x)``: the rows of W_C,i that the rank holds
(column-parallel layers, vocab shards of the LM head; for an embedding the vocab rows, the ids then
counting from row0) times the input columns it holds (row-parallel layers: the rank's partial
sum).  A tensor id may appear in several segments (a fused checkpoint tensor split per rank into
non-adjacent runs).  Every segment reads the same input columns count (``cols``).  Frames without
ranges keep the ``SLQ1`` layout, so a TP-1 engine sends exactly what it sent before.

Reply frame::

    magic    4s   b"SLR2"
    dtype    u8
    pad      3x
    rows     u32
    cols     u32
    instance u64  the answering service process's instance id (``/v1/info``: a service restart is
                  visible in the next reply)
    payload  rows*cols*itemsize bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

# data-plane endpoints: the HTTP path of each, and its number on the shared-memory channel
EP_SPLIT_APPLY = 1
EP_SHIELDED_STEP = 2
EP_SHIELDED_GEMM = 3
EP_SHIELDED_LOGITS = 4
ENDPOINT_PATHS = {
    EP_SPLIT_APPLY: "/v1/split/apply",
    EP_SHIELDED_STEP: "/v1/shielded/step",
    EP_SHIELDED_GEMM: "/v1/shielded/gemm",
    EP_SHIELDED_LOGITS: "/v1/shielded/logits",
}

REQUEST_MAGIC = b"SLQ1"
SLICED_REQUEST_MAGIC = b"SLQ2"
REPLY_MAGIC = b"SLR2"
KIND_LINEAR = 1
KIND_EMBED = 2
MAX_IDS = 16

_REQ_HEAD = struct.Struct("<4sBBHIIQQ")
_RANGE = struct.Struct("<IIII")
_REPLY_HEAD = struct.Struct("<4sB3xIIQ")
_U64 = 2**64 - 1

DTYPE_FLOAT32 = 0
DTYPE_BFLOAT16 = 1
DTYPE_FLOAT16 = 2
DTYPE_INT32 = 3

_CODE_TO_DTYPE = {
    DTYPE_FLOAT32: torch.float32,
    DTYPE_BFLOAT16: torch.bfloat16,
    DTYPE_FLOAT16: torch.float16,
    DTYPE_INT32: torch.int32,
}
_DTYPE_TO_CODE = {v: k for k, v in _CODE_TO_DTYPE.items()}
# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern.
_CARRIER = {
    torch.float32: torch.float32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.float16,
    torch.int32: torch.int32,
}


class WireError(ValueError):
    """A frame that does not follow this codec; the service answers it with HTTP 400."""


@dataclass(frozen=True)
class Request:
    kind: int
    tensor_ids: tuple[int, ...]
    session: int
    seq: int
    payload: torch.Tensor  # [rows, cols] float for KIND_LINEAR, [rows] int32 for KIND_EMBED
    # one (row0, row1, col0, col1) per tensor id in a sliced (SLQ2) frame; None: whole tensors
    ranges: tuple[tuple[int, int, int, int], ...] | None = None


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(_CARRIER[t.dtype]).numpy().tobytes()


def _tensor_from(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...], copy: bool = True) -> torch.Tensor:
    """A tensor over ``buf``: a private copy, or (copy=False, writable buffers such as a channel
    area) a view that is valid only while the buffer holds this frame."""
    if not copy and not buf.readonly:
        count = 1
        for s in shape:
            count *= s
        return torch.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
    carrier = _CARRIER[dtype]
    arr = np.frombuffer(buf, dtype=torch.empty(0, dtype=carrier).numpy().dtype)
    # frombuffer over a bytes object is read-only; torch wants writable memory.
    t = torch.from_numpy(arr.copy()).view(dtype)
    return t.reshape(shape)


def tensor_bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a CPU tensor as a flat uint8 tensor (no copy when ``t`` is contiguous)."""
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach().view(-1).view(torch.uint8)


def _check_ranges(ranges, n_ids: int) -> tuple[tuple[int, int, int, int], ...]:
    out = tuple(tuple(int(v) for v in r) for r in ranges)
    if len(out) != n_ids or any(len(r) != 4 for r in out):
        raise WireError(f"a sliced request has one (row0, row1, col0, col1) range per tensor id ({n_ids})")
    for r0, r1, c0, c1 in out:
        if not (0 <= r0 < r1 <= 0xFFFFFFFF and 0 <= c0 < c1 <= 0xFFFFFFFF):
            raise WireError(f"empty or inverted range rows [{r0}, {r1}) cols [{c0}, {c1})")
    return out


def request_header(kind: int, tensor_ids: tuple[int, ...] | list[int], payload: torch.Tensor,
                   session: int, seq: int, *, ranges=None) -> tuple[bytes, torch.Tensor]:
    """(header + tensor ids [+ ranges], payload as it travels) of a request frame; the frame is the
    two concatenated (``encode_request``); a transport may write them separately, without joining.
    ranges: one (row0, row1, col0, col1) per tensor id makes a sliced (SLQ2) frame."""
    ids = tuple(int(i) for i in tensor_ids)
    if not 1 <= len(ids) <= MAX_IDS:
        raise WireError(f"a request names 1..{MAX_IDS} tensors, got {len(ids)}")
    if ranges is not None:
        ranges = _check_ranges(ranges, len(ids))
    if kind == KIND_LINEAR:
        if payload.dim() != 2:
            raise WireError("linear payload must be [rows, cols]")
        rows, cols = payload.shape
    elif kind == KIND_EMBED:
        payload = payload.to(torch.int32).reshape(-1)
        rows, cols = payload.shape[0], 1
    else:
        raise WireError(f"unknown request kind {kind}")
    magic = REQUEST_MAGIC if ranges is None else SLICED_REQUEST_MAGIC
    head = _REQ_HEAD.pack(magic, kind, dtype_code(payload.dtype), len(ids), rows, cols,
                          session & (2**64 - 1), seq)
    head += struct.pack(f"<{len(ids)}I", *ids)
    if ranges is not None:
        head += b"".join(_RANGE.pack(*r) for r in ranges)
    return head, payload


def encode_request(kind: int, tensor_ids: tuple[int, ...] | list[int], payload: torch.Tensor,
                   session: int, seq: int, *, ranges=None) -> bytes:
    head, payload = request_header(kind, tensor_ids, payload, session, seq, ranges=ranges)
    return head + _tensor_bytes(payload)


def decode_request(body: bytes | memoryview, *, copy: bool = True) -> Request:
    """copy=False (a writable buffer): the payload is a view into ``body``."""
    view = memoryview(body)
    if len(view) < _REQ_HEAD.size:
        raise WireError(f"frame shorter than its {_REQ_HEAD.size}-byte header")
    magic, kind, code, n_ids, rows, cols, session, seq = _REQ_HEAD.unpack_from(view, 0)
    if magic not in (REQUEST_MAGIC, SLICED_REQUEST_MAGIC):
        raise WireError("bad magic: not a SLIP request frame")
    if kind not in (KIND_LINEAR, KIND_EMBED):
        raise WireError(f"unknown request kind {kind}")
    if code not in _CODE_TO_DTYPE:
        raise WireError(f"unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    if not 1 <= n_ids <= MAX_IDS:
        raise WireError(f"a request names 1..{MAX_IDS} tensors, got {n_ids}")
    if rows == 0 or cols == 0:
        raise WireError("empty payload")
    if kind == KIND_EMBED and (dtype != torch.int32 or cols != 1):
        raise WireError("embedding requests carry int32 token ids, one per row")
    if kind == KIND_LINEAR and dtype == torch.int32:
        raise WireError("linear requests carry floating-point rows")
    offset = _REQ_HEAD.size
    ids_end = offset + 4 * n_ids
    if len(view) < ids_end:
        raise WireError("frame truncated inside its tensor-id list")
    ids = struct.unpack_from(f"<{n_ids}I", view, offset)
    ranges = None
    if magic == SLICED_REQUEST_MAGIC:
        ranges_end = ids_end + _RANGE.size * n_ids
        if len(view) < ranges_end:
            raise WireError("frame truncated inside its range list")
        ranges = _check_ranges([_RANGE.unpack_from(view, ids_end + _RANGE.size * i) for i in range(n_ids)], n_ids)
        ids_end = ranges_end
    itemsize = dtype.itemsize
    expected = ids_end + rows * cols * itemsize
    if len(view) != expected:
        raise WireError(f"payload length {len(view) - ids_end} bytes does not match "
                        f"rows={rows} x cols={cols} x {itemsize}")
    shape = (rows,) if kind == KIND_EMBED else (rows, cols)
    payload = _tensor_from(view[ids_end:], dtype, shape, copy=copy)
    return Request(kind=kind, tensor_ids=tuple(ids), session=session, seq=seq, payload=payload, ranges=ranges)


REPLY_HEADER_BYTES = _REPLY_HEAD.size


def encode_reply(result: torch.Tensor, instance: int = 0) -> bytes:
    if result.dim() != 2:
        raise WireError("reply must be [rows, cols]")
    rows, cols = result.shape
    return (_REPLY_HEAD.pack(REPLY_MAGIC, dtype_code(result.dtype), rows, cols, instance & _U64)
            + _tensor_bytes(result))


def reply_into(buf: memoryview, dtype: torch.dtype, rows: int, cols: int, instance: int = 0) -> torch.Tensor:
    """Write a reply header into ``buf`` and return the [rows, cols] tensor over the rest of the
    frame, for the caller to compute the result into (no intermediate copy)."""
    itemsize = dtype.itemsize
    size = _REPLY_HEAD.size + rows * cols * itemsize
    if len(buf) < size:
        raise WireError(f"reply of {size} bytes does not fit a {len(buf)}-byte buffer")
    _REPLY_HEAD.pack_into(buf, 0, REPLY_MAGIC, dtype_code(dtype), rows, cols, instance & _U64)
    return torch.frombuffer(buf, dtype=dtype, count=rows * cols, offset=_REPLY_HEAD.size).view(rows, cols)


def reply_size(dtype: torch.dtype, rows: int, cols: int) -> int:
    return _REPLY_HEAD.size + rows * cols * dtype.itemsize


def reply_instance(body: bytes | memoryview) -> int:
    """The instance id in a reply frame's header (0 if the frame is too short to hold one)."""
    if len(body) < _REPLY_HEAD.size:
        return 0
    return _REPLY_HEAD.unpack_from(body, 0)[4]


def decode_reply(body: bytes | memoryview, expect_rows: int | None = None,
                 expect_cols: int | None = None, *, copy: bool = True) -> torch.Tensor:
    """copy=False (a writable buffer): the result is a view into ``body``."""
    view = memoryview(body)
    if len(view) < _REPLY_HEAD.size:
        raise WireError("reply shorter than its header")
    magic, code, rows, cols, _instance = _REPLY_HEAD.unpack_from(view, 0)
    if magic != REPLY_MAGIC:
        raise WireError("bad magic: not a SLIP reply frame")
    if code not in _CODE_TO_DTYPE:
        raise WireError(f"unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    itemsize = dtype.itemsize
    if len(view) != _REPLY_HEAD.size + rows * cols * itemsize:
        raise WireError("reply payload length does not match its header")
    if expect_rows is not None and rows != expect_rows:
        raise WireError(f"reply has {rows} rows, expected {expect_rows}")
    if expect_cols is not None and cols != expect_cols:
        raise WireError(f"reply has {cols} columns, expected {expect_cols}")
    return _tensor_from(view[_REPLY_HEAD.size:], dtype, (rows, cols), copy=copy)


# ---------------------------------------------------------------------------------------------
# protocol ``shielded``: step frames and message frames
# ---------------------------------------------------------------------------------------------
#
# Step frame (host -> service, POST /v1/shielded/step), the batch metadata of one engine step::
#
#     magic    4s   b"SLS2"
#     tokens   u32  N, the flattened tokens of the step (>= 1)
#     seqs     u32  S, the sequences of the step (>= 1)
#     blocks   u32  B, the width of the block table
#     logits   u32  R, the token rows to produce logits for (0: the last token of every sequence;
#                   DEFER_LOGITS: none now, the host asks later with MSG_ROWS frames)
#     session  u64  random id of the calling process
#     seq      u64  strictly increasing per session
#     instance u64  the service instance whose KV cache the host's view describes (0: none yet)
#     epoch    u64  the KV epoch of that view; 0 claims the service: it becomes this session's,
#                   its KV cache is emptied and a new epoch begins (see shielded_api)
#     then int64 arrays: input_ids[N], positions[N], slot_mapping[N], query_start_loc[S+1],
#                        seq_lens[S], block_tables[S*B] (row-major), logits_indices[R]
#
# Message frame (both directions, POST /v1/shielded/gemm and the replies)::
#
#     magic    4s   b"SLM2"
#     kind     u8   MSG_ASK (service -> host: multiply x~ by W_q[key]) | MSG_ANSWER (host -> service:
#                   y~ for the ask) | MSG_LOGITS (service -> host: float logits) | MSG_READY (service ->
#                   host: the layers of a deferred step are done; payload [[N]]) | MSG_ROWS (host ->
#                   service, POST /v1/shielded/logits: token rows [1, R] of the ready step to produce
#                   logits for; may be sent several times until the next step)
#     dtype    u8   DTYPE_INT64 for ASK/ANSWER/READY/ROWS, DTYPE_FLOAT32 for LOGITS
#     key_len  u16  length of the layer key (ASCII, <= MAX_KEY_LEN; 0 for LOGITS)
#     call     u32  index of the host call within the step (0, 1, ...)
#     step     u64  the step id the service gave out
#     rows     u32
#     cols     u32
#     instance u64  service -> host: the service's instance id; host -> service: the one it expects
#     epoch    u64  the same for the KV epoch
#     key      key_len bytes
#     payload  rows*cols*itemsize bytes

STEP_MAGIC = b"SLS2"
MSG_MAGIC = b"SLM2"
MSG_ASK = 1
MSG_ANSWER = 2
MSG_LOGITS = 3
MSG_READY = 4
MSG_ROWS = 5
DEFER_LOGITS = 0xFFFFFFFF  # the step frame's logits count that means "rows come later"
DTYPE_INT64 = 4
MAX_KEY_LEN = 64
_STEP_HEAD = struct.Struct("<4sIIIIQQQQ")
_MSG_HEAD = struct.Struct("<4sBBHIQIIQQ")
_MSG_DTYPES = {DTYPE_INT64: torch.int64, DTYPE_FLOAT32: torch.float32}
_MSG_KIND_DTYPE = {MSG_ASK: DTYPE_INT64, MSG_ANSWER: DTYPE_INT64, MSG_LOGITS: DTYPE_FLOAT32,
                   MSG_READY: DTYPE_INT64, MSG_ROWS: DTYPE_INT64}
_STEP_FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                "logits_indices")


@dataclass(frozen=True)
class ShieldedStep:
    session: int
    seq: int
    input_ids: torch.Tensor        # int64 [N]
    positions: torch.Tensor        # int64 [N]
    slot_mapping: torch.Tensor     # int64 [N]
    query_start_loc: torch.Tensor  # int64 [S+1]
    seq_lens: torch.Tensor         # int64 [S]
    block_tables: torch.Tensor     # int64 [S, B]
    logits_indices: torch.Tensor | None  # int64 [R], None: the last token of every sequence
    defer_logits: bool = False     # True: no logits now; the host sends MSG_ROWS after MSG_READY
    instance: int = 0              # the service instance the host's KV view belongs to (0: none)
    epoch: int = 0                 # its KV epoch (0: claim the service, start a new epoch)


@dataclass(frozen=True)
class ShieldedMessage:
    kind: int
    step: int
    call: int
    key: str
    payload: torch.Tensor  # int64 [rows, cols] (ASK/ANSWER) or float32 [rows, cols] (LOGITS)
    instance: int = 0      # service -> host: the service's instance; host -> service: the expected one
    epoch: int = 0         # the same for the KV epoch


def _host_int64(arrays: list) -> list:
    """The arrays as flat CPU int64 tensors.  Those on an accelerator (vLLM keeps its step metadata
    on the GPU) are concatenated there and copied to the host in one transfer: one pinned buffer,
    one non-blocking copy and one wait for it, instead of a synchronising copy per array."""
    on_dev = [i for i, a in enumerate(arrays) if a.device.type != "cpu"]
    out = [a.reshape(-1).to(torch.int64) if a.device.type == "cpu" else a for a in arrays]
    if not on_dev:
        return out
    devices = {arrays[i].device for i in on_dev}
    if len(devices) > 1:
        raise WireError(f"step metadata on several devices: {sorted(str(d) for d in devices)}")
    flat = torch.cat([arrays[i].reshape(-1).to(torch.int64) for i in on_dev])
    if flat.is_cuda:
        host = torch.empty(flat.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(flat.device))
        done.synchronize()
    else:
        host = flat.to("cpu")
    for i, part in zip(on_dev, host.split([arrays[i].numel() for i in on_dev])):
        out[i] = part
    return out


def encode_shielded_step(session: int, seq: int, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                         block_tables, logits_indices=None, *, defer_logits: bool = False, instance: int = 0,
                         epoch: int = 0) -> bytes:
    """The step frame; the arrays may be tensors on any one device (or lists), of any integer dtype."""
    bt = torch.as_tensor(block_tables)
    if bt.dim() != 2:
        raise WireError("block_tables must be [S, B]")
    if defer_logits and logits_indices is not None:
        raise WireError("a deferred step carries no logits_indices")
    li = torch.as_tensor(logits_indices) if logits_indices is not None else torch.empty(0, dtype=torch.int64)
    arrays = _host_int64([torch.as_tensor(input_ids), torch.as_tensor(positions), torch.as_tensor(slot_mapping),
                          torch.as_tensor(query_start_loc), torch.as_tensor(seq_lens), bt, li])
    n, s, r = arrays[0].numel(), arrays[4].numel(), arrays[6].numel()
    head = _STEP_HEAD.pack(STEP_MAGIC, n, s, int(bt.shape[1]), DEFER_LOGITS if defer_logits else r,
                           session & _U64, seq & _U64, instance & _U64, epoch & _U64)
    return head + b"".join(a.contiguous().numpy().astype("<i8").tobytes() for a in arrays)


def decode_shielded_step(body: bytes | memoryview) -> ShieldedStep:
    view = memoryview(body)
    if len(view) < _STEP_HEAD.size:
        raise WireError(f"step frame shorter than its {_STEP_HEAD.size}-byte header")
    magic, n, s, b, r, session, seq, instance, epoch = _STEP_HEAD.unpack_from(view, 0)
    if magic != STEP_MAGIC:
        raise WireError("bad magic: not a SLIP shielded step frame")
    if n == 0 or s == 0 or b == 0:
        raise WireError("a step needs at least one token, one sequence and one block-table column")
    defer = r == DEFER_LOGITS
    if defer:
        r = 0
    counts = (n, n, n, s + 1, s, s * b, r)
    expected = _STEP_HEAD.size + 8 * sum(counts)  # Python ints: no overflow
    if len(view) != expected:
        raise WireError(f"step frame is {len(view)} bytes, its header describes {expected}")
    out, offset = {}, _STEP_HEAD.size
    for name, count in zip(_STEP_FIELDS, counts):
        arr = np.frombuffer(view[offset:offset + 8 * count], dtype="<i8")
        out[name] = torch.from_numpy(arr.astype(np.int64))
        offset += 8 * count
    out["block_tables"] = out["block_tables"].reshape(s, b)
    if r == 0:
        out["logits_indices"] = None
    return ShieldedStep(session=session, seq=seq, defer_logits=defer, instance=instance, epoch=epoch, **out)


def shielded_message_header(kind: int, step: int, call: int, key: str, payload: torch.Tensor, *,
                            instance: int = 0, epoch: int = 0) -> tuple[bytes, torch.Tensor]:
    """(header + key, payload as it travels) of a message frame; the frame is the two concatenated
    (``encode_shielded_message``).  A transport may write them separately, without joining them
    (the host writes its y~ from the buffer its device copied it into).  ``payload`` must be a CPU
    tensor on a little-endian machine (its bytes are the wire's); elsewhere use
    ``encode_shielded_message``."""
    if kind not in _MSG_KIND_DTYPE:
        raise WireError(f"unknown message kind {kind}")
    dtype = _MSG_DTYPES[_MSG_KIND_DTYPE[kind]]
    if payload.dim() != 2 or payload.dtype != dtype:
        raise WireError(f"message payload must be {dtype} [rows, cols]")
    raw_key = key.encode("ascii")
    if len(raw_key) > MAX_KEY_LEN:
        raise WireError("layer key too long")
    rows, cols = payload.shape
    head = _MSG_HEAD.pack(MSG_MAGIC, kind, _MSG_KIND_DTYPE[kind], len(raw_key), call, step & _U64, rows, cols,
                          instance & _U64, epoch & _U64)
    return head + raw_key, payload


def encode_shielded_message(kind: int, step: int, call: int, key: str, payload: torch.Tensor, *,
                            instance: int = 0, epoch: int = 0) -> bytes:
    head, payload = shielded_message_header(kind, step, call, key, payload, instance=instance, epoch=epoch)
    data = payload.detach().cpu().contiguous().numpy()
    return head + data.astype(data.dtype.newbyteorder("<")).tobytes()


def decode_shielded_message(body: bytes | memoryview, expect_kind: int | None = None, *,
                            into=None) -> ShieldedMessage:
    """into: optional ``into(kind, rows, cols, dtype)`` giving the CPU tensor [rows, cols] to copy the
    payload into (the host gives pinned memory, from which its device reads without a staging copy),
    or None for a fresh tensor.  The frame is checked completely before ``into`` is called."""
    view = memoryview(body)
    if len(view) < _MSG_HEAD.size:
        raise WireError(f"message shorter than its {_MSG_HEAD.size}-byte header")
    magic, kind, code, key_len, call, step, rows, cols, instance, epoch = _MSG_HEAD.unpack_from(view, 0)
    if magic != MSG_MAGIC:
        raise WireError("bad magic: not a SLIP shielded message")
    if kind not in _MSG_KIND_DTYPE:
        raise WireError(f"unknown message kind {kind}")
    if expect_kind is not None and kind != expect_kind:
        raise WireError(f"message kind {kind} where {expect_kind} was expected")
    if code != _MSG_KIND_DTYPE[kind]:
        raise WireError(f"dtype code {code} is not allowed for message kind {kind}")
    if key_len > MAX_KEY_LEN:
        raise WireError(f"layer key longer than {MAX_KEY_LEN} bytes")
    if rows == 0 or cols == 0:
        raise WireError("empty payload")
    dtype = _MSG_DTYPES[code]
    itemsize = dtype.itemsize
    expected = _MSG_HEAD.size + key_len + rows * cols * itemsize
    if len(view) != expected:
        raise WireError(f"message is {len(view)} bytes, its header describes {expected}")
    try:
        key = bytes(view[_MSG_HEAD.size:_MSG_HEAD.size + key_len]).decode("ascii")
    except UnicodeDecodeError:
        raise WireError("layer key is not ASCII") from None
    np_dtype = "<i8" if dtype == torch.int64 else "<f4"
    arr = np.frombuffer(view[_MSG_HEAD.size + key_len:], dtype=np_dtype)
    payload = into(kind, rows, cols, dtype) if into is not None else None
    if payload is None:
        payload = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).reshape(rows, cols)
    else:
        if payload.shape != (rows, cols) or payload.dtype != dtype or payload.device.type != "cpu":
            raise WireError(f"the buffer for a {dtype} [{rows}, {cols}] payload is {payload.dtype} "
                            f"{tuple(payload.shape)} on {payload.device}")
        np.copyto(payload.numpy().reshape(-1), arr, casting="equiv")
    return ShieldedMessage(kind=kind, step=step, call=call, key=key, payload=payload, instance=instance, epoch=epoch)
