"""Binary wire codec between the vLLM host and the secure service.

Tensors travel as raw little-endian bytes behind a fixed header, never as JSON numbers. One request
carries the whole batch of token rows of one protected layer for one engine step.

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

Reply frame::

    magic   4s   b"SLR1"
    dtype   u8
    pad     3x
    rows    u32
    cols    u32
    payload rows*cols*itemsize bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

REQUEST_MAGIC = b"SLQ1"
REPLY_MAGIC = b"SLR1"
KIND_LINEAR = 1
KIND_EMBED = 2
MAX_IDS = 16

_REQ_HEAD = struct.Struct("<4sBBHIIQQ")
_REPLY_HEAD = struct.Struct("<4sB3xII")

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


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(_CARRIER[t.dtype]).numpy().tobytes()


def _tensor_from(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    carrier = _CARRIER[dtype]
    arr = np.frombuffer(buf, dtype=torch.empty(0, dtype=carrier).numpy().dtype)
    # frombuffer over a bytes object is read-only; torch wants writable memory.
    t = torch.from_numpy(arr.copy()).view(dtype)
    return t.reshape(shape)


def encode_request(kind: int, tensor_ids: tuple[int, ...] | list[int], payload: torch.Tensor,
                   session: int, seq: int) -> bytes:
    ids = tuple(int(i) for i in tensor_ids)
    if not 1 <= len(ids) <= MAX_IDS:
        raise WireError(f"a request names 1..{MAX_IDS} tensors, got {len(ids)}")
    if kind == KIND_LINEAR:
        if payload.dim() != 2:
            raise WireError("linear payload must be [rows, cols]")
        rows, cols = payload.shape
    elif kind == KIND_EMBED:
        payload = payload.to(torch.int32).reshape(-1)
        rows, cols = payload.shape[0], 1
    else:
        raise WireError(f"unknown request kind {kind}")
    head = _REQ_HEAD.pack(REQUEST_MAGIC, kind, dtype_code(payload.dtype), len(ids), rows, cols,
                          session & (2**64 - 1), seq)
    return head + struct.pack(f"<{len(ids)}I", *ids) + _tensor_bytes(payload)


def decode_request(body: bytes | memoryview) -> Request:
    view = memoryview(body)
    if len(view) < _REQ_HEAD.size:
        raise WireError(f"frame shorter than its {_REQ_HEAD.size}-byte header")
    magic, kind, code, n_ids, rows, cols, session, seq = _REQ_HEAD.unpack_from(view, 0)
    if magic != REQUEST_MAGIC:
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
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected = ids_end + rows * cols * itemsize
    if len(view) != expected:
        raise WireError(f"payload length {len(view) - ids_end} bytes does not match "
                        f"rows={rows} x cols={cols} x {itemsize}")
    shape = (rows,) if kind == KIND_EMBED else (rows, cols)
    payload = _tensor_from(view[ids_end:], dtype, shape)
    return Request(kind=kind, tensor_ids=tuple(ids), session=session, seq=seq, payload=payload)


def encode_reply(result: torch.Tensor) -> bytes:
    if result.dim() != 2:
        raise WireError("reply must be [rows, cols]")
    rows, cols = result.shape
    return _REPLY_HEAD.pack(REPLY_MAGIC, dtype_code(result.dtype), rows, cols) + _tensor_bytes(result)


def decode_reply(body: bytes | memoryview, expect_rows: int | None = None,
                 expect_cols: int | None = None) -> torch.Tensor:
    view = memoryview(body)
    if len(view) < _REPLY_HEAD.size:
        raise WireError("reply shorter than its header")
    magic, code, rows, cols = _REPLY_HEAD.unpack_from(view, 0)
    if magic != REPLY_MAGIC:
        raise WireError("bad magic: not a SLIP reply frame")
    if code not in _CODE_TO_DTYPE:
        raise WireError(f"unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(view) != _REPLY_HEAD.size + rows * cols * itemsize:
        raise WireError("reply payload length does not match its header")
    if expect_rows is not None and rows != expect_rows:
        raise WireError(f"reply has {rows} rows, expected {expect_rows}")
    if expect_cols is not None and cols != expect_cols:
        raise WireError(f"reply has {cols} columns, expected {expect_cols}")
    return _tensor_from(view[_REPLY_HEAD.size:], dtype, (rows, cols))
