"""Secret randomness of protocol ``shielded``: exactly uniform elements of Z_p from the OS CSPRNG.

What this module owns
---------------------
* ``csprng_field_elements``: i.i.d. exactly uniform elements of [0, p) from ``os.urandom``
  (getrandom(2), ChaCha20 in the kernel) by rejection sampling; the secure service draws its
  one-time masks r with it (``secure_service.masks``, which says why not ``torch.randint``), and
  both the service and ``slip protect`` draw Freivalds vectors u with it;
* ``freivalds_vector_count``: how many Freivalds vectors a key needs for a soundness target.

Where it runs and what it holds
-------------------------------
On the trusted side only (the model owner's protect tool, the secure service); the host never
calls it.  vLLM-free and stateless: what it returns is secret, but it keeps nothing.
"""

from __future__ import annotations

import math
import os
from typing import Tuple, Union

import numpy as np
import torch

__all__ = ["csprng_field_elements", "freivalds_vector_count"]


def _random_candidates(count: int, bits: int) -> np.ndarray:
    """uint64 [count]: each ``bits`` uniform random bits (1 <= bits <= 62) from ``os.urandom``.

    Candidate i is made of its own nb = ceil(bits/8) bytes, raw[i*nb : (i+1)*nb]: the 8 bytes from
    i*nb are read as one little-endian word (a strided view, no copy; 8 - nb padding bytes at the
    end keep the last read in bounds) and masked to its low ``bits`` bits, which lie inside its own
    nb bytes, so bytes of the next candidate never enter.  Every kept bit is one random bit: each
    candidate is uniform on [0, 2^bits) and the candidates are independent.
    """
    nbytes = (bits + 7) // 8
    raw = os.urandom(count * nbytes + (8 - nbytes))
    words = np.ndarray((count,), dtype="<u8", buffer=raw, offset=0, strides=(nbytes,))
    return np.bitwise_and(words, np.uint64((1 << bits) - 1)).astype(np.uint64, copy=False)


def csprng_field_elements(shape: Union[int, Tuple[int, ...]], p: int) -> torch.Tensor:
    """int64 tensor of the given shape, i.i.d. exactly uniform on [0, p), from ``os.urandom``.

    Rejection sampling per element: every element gets a candidate of b = bits(p-1) random bits
    (uniform on [0, 2^b), made from ceil(b/8) bytes); the elements whose candidate is >= p get a
    fresh candidate, again and again until each has one below p.  So each element is the first
    accepted draw of its own i.i.d. sequence, which is uniform on [0, p), and the elements are
    independent (which positions are redrawn tells nothing about the accepted values, and redraws
    use fresh bytes).  A candidate is accepted with probability p / 2^b > 1/2, so the expected
    number of redraw rounds is O(log(elements)) and the expected extra bytes are below 100 %.
    """
    if isinstance(p, bool) or not isinstance(p, int) or not 2 <= p < (1 << 62):
        raise ValueError(f"p must be an int in [2, 2^62), got {p!r}")
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    need = int(np.prod(shape, dtype=np.int64)) if shape else 1
    bits = (p - 1).bit_length()
    pp = np.uint64(p)
    out = _random_candidates(need, bits)
    bad = np.flatnonzero(out >= pp)
    while bad.size:
        redo = _random_candidates(int(bad.size), bits)
        out[bad] = redo
        bad = bad[redo >= pp]
        redo.fill(0)
    return torch.from_numpy(out.view(np.int64)).reshape(shape)


def freivalds_vector_count(p: int, security_bits: int = 64) -> int:
    """The smallest t with p^-t <= 2^-security_bits."""
    return max(1, math.ceil(security_bits / math.log2(p)))
