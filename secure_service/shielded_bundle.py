"""TRUSTED side: the split parameters of protocol ``shielded`` and reading its secret bundle (OUT/secret).

What this module owns
---------------------
* (``FusedSplit``, the data of one fused public GEMM after the split, is defined in the core,
  ``slip_vllm.core.shielded_split``, and re-exported here.)  ``shielded_executor`` imports this
  module to build from a bundle; this module never imports the executor;
* ``load_shielded_bundle``: everything the secure service needs to rebuild the ``ShieldedExecutor``
  that ``slip protect --protocol shielded`` split, validated before a single call is answered
  (from the directory, or from the ``Bundle`` the service already loaded: read and hashed once).  The
  bundle writer is ``slip_vllm.protect.shielded``; the file layout is defined there.  The
  bundle stores each layer's left factor as one dense block-diagonal [m, K] matrix
  (``FusedSplit.left``); the loader cuts it into the per-part blocks
  (``LowRankFactors.block_diagonal``), the same function ``shielded_split.fuse_splits`` uses, so
  a bundle rebuilds bit-identical factors.

Where it runs and what it holds
-------------------------------
Inside the secure service only (never imports vLLM).  It reads secrets: the factors of W_C, the
per-channel weight scales, biases, norm gains, the embedding table and the Freivalds vectors u.
It also reads a copy of the public int8/int16 weights W_q (the service needs them for the mask images
W_q r and the Freivalds images u^T W_q) and checks each against the public manifest's hash, so a
bundle cannot be paired with another artifact's public half.

Checks, in order: the generic bundle checks of ``bundle.load_bundle`` (bundle.json, the manifest
hash it pairs with, the factor file's hash and shapes); protocol ``shielded``; the hash of
``shielded.safetensors``; the lock named by bundle.json (``"lock"``: ``none`` | ``perm`` |
``block:b``; absent means ``none``, the layout before locks existed); every layer key of the
manifest present with W_q of the manifest's shape and hash, a finite positive scale per output
channel, u in [0, p), a left factor that is block diagonal over the layer's fused parts, and the
tensors of its lock (``<key>.lock.*``, checked by ``GemmLock.from_tensors``: permutations,
orthogonal blocks of the named size); no tensor the bundle does not define (a lock's tensors in a
bundle that names none are refused); p prime and above the exactness bound of every layer
(``quantize.check_prime``, done by the executor).  The lock is a secret of the service: it is
written to OUT/secret only, and the public manifest does not name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

from secure_service.bundle import Bundle, BundleError, load_bundle
from slip_vllm.core.lock import GemmLock, parse_lock
from slip_vllm.core.manifest import sha256_bytes, sha256_file
from slip_vllm.core.quantize import LowRankFactors, QuantizedWeight
from slip_vllm.core.shielded_split import FusedSplit

__all__ = ["SHIELDED_FILE", "FusedSplit", "ShieldedBundle", "load_shielded_bundle"]

SHIELDED_FILE = "shielded.safetensors"


@dataclass
class ShieldedBundle:
    bundle: Bundle
    config: object                      # the model's transformers config
    splits: Dict[str, FusedSplit]       # layer key -> FusedSplit (public=None)
    quantized: Dict[str, QuantizedWeight]
    embed: torch.Tensor
    norms: Dict[str, torch.Tensor]
    freivalds: Dict[str, torch.Tensor]  # layer key -> u int64 [t, m]
    p: int
    weight_bits: int
    act_bits: int
    layer_keys: List[str]
    locks: Optional[Dict[str, GemmLock]] = None  # layer key -> its lock (None: an unlocked bundle)
    lock: str = "none"                            # the bundle's lock kind, as written by ``slip protect``


def load_shielded_bundle(source: Union[str, Path, Bundle]) -> ShieldedBundle:
    """source: the bundle directory, or the ``Bundle`` the service loaded (and hashed) already:
    then the generic files are not read or hashed again.  The factors end up held once: each
    secret tensor's ``right`` becomes the executor's own (aligned) copy, its ``left`` too for an
    unfused layer, and for a fused one the dense block-diagonal ``left`` is dropped (None) once its
    per-part blocks are cut (nothing in a shielded service reads it: the split plane is closed)."""
    from transformers import AutoConfig

    bundle = source if isinstance(source, Bundle) else load_bundle(Path(source))
    path = bundle.path
    if bundle.protocol != "shielded":
        raise BundleError(f"{path} is a {bundle.protocol!r} bundle, not a shielded one")
    meta = json.loads((path / "bundle.json").read_text())
    extra = bundle.manifest.extra
    try:
        p = int(extra["p"])
        weight_bits, act_bits = int(extra["weight_bits"]), int(extra["act_bits"])
        layer_keys = [str(k) for k in extra["layer_keys"]]
        parts = {str(k): tuple(int(x) for x in v) for k, v in extra["parts"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the shielded manifest lacks {exc}") from None
    if weight_bits not in (8, 16):
        raise BundleError(f"weight_bits {weight_bits}: public weights are int8 or int16 (8 or 16 bits)")
    w_dtype = torch.int8 if weight_bits == 8 else torch.int16
    if int(meta.get("p", -1)) != p:
        raise BundleError("bundle.json and the manifest disagree on p")
    try:
        lock_spec = parse_lock(meta.get("lock", "none"))
    except ValueError as exc:
        raise BundleError(f"bundle.json: {exc}") from None
    shielded_path = path / SHIELDED_FILE
    if not shielded_path.is_file() or sha256_file(shielded_path) != meta.get("shielded_sha256"):
        raise BundleError(f"{SHIELDED_FILE} is missing or does not match its recorded hash")
    data = load_file(str(shielded_path))
    entries = {e.name: e for e in bundle.manifest.tensors}
    secret = {t.entry.name: t for t in bundle.tensors}
    if sorted(entries) != sorted(layer_keys):
        raise BundleError("the manifest's tensors are not its layer keys")

    def take(name: str, optional: bool = False) -> Optional[torch.Tensor]:
        t = data.pop(name, None)
        if t is None and not optional:
            raise BundleError(f"{SHIELDED_FILE} lacks {name}")
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BundleError(f"{name} holds NaN/Inf")
        return t

    splits, quantized, freivalds, locks = {}, {}, {}, {}
    for key in layer_keys:
        entry = entries[key]
        m, n = entry.shape
        w_q = take(f"{key}.w_q")
        if w_q.dtype != w_dtype or tuple(w_q.shape) != (m, n):
            raise BundleError(f"{key}: W_q must be int{weight_bits} {(m, n)}")
        if sha256_bytes(w_q.contiguous().numpy().tobytes()) != entry.public_sha256:
            raise BundleError(f"{key}: W_q does not match the public manifest's hash")
        scale = take(f"{key}.scale")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (m,) or bool((scale <= 0).any()):
            raise BundleError(f"{key}: scale must be positive float32 [{m}]")
        bias = take(f"{key}.bias", optional=True)
        if bias is not None and tuple(bias.shape) != (m,):
            raise BundleError(f"{key}: bias must be [{m}]")
        u = take(f"{key}.freivalds_u")
        if u.dtype != torch.int64 or u.dim() != 2 or u.shape[1] != m or int(u.min()) < 0 or int(u.max()) >= p:
            raise BundleError(f"{key}: Freivalds vectors must be int64 [t, {m}] in [0, p)")
        if sum(parts.get(key, ())) != m:
            raise BundleError(f"{key}: fused part sizes do not add up to {m}")
        st = secret[key]
        try:
            low_rank = LowRankFactors.block_diagonal(st.left, st.right, parts[key])
        except ValueError as exc:
            raise BundleError(f"{key}: {exc}") from None
        splits[key] = FusedSplit(low_rank=low_rank, public=None, bias=None if bias is None else bias.float(),
                                 parts=parts[key])
        st.right = low_rank.right  # one copy of each factor (see the docstring)
        st.left = low_rank.lefts[0] if len(low_rank.lefts) == 1 else None
        quantized[key] = QuantizedWeight(w_q=w_q.contiguous(), scale=scale.contiguous(), bits=weight_bits)
        freivalds[key] = u.contiguous()
        lock_tensors = {name: take(name) for name in GemmLock.tensor_names(key, lock_spec.kind)}
        try:
            locks[key] = GemmLock.from_tensors(lock_tensors, key, m, n, lock_spec.kind, lock_spec.block)
        except ValueError as exc:
            raise BundleError(f"{key}: lock: {exc}") from None
    embed = take("embed")
    norms = {name[len("norm."):]: t.float() for name, t in list(data.items()) if name.startswith("norm.")}
    for name in list(data):
        if name.startswith("norm."):
            data.pop(name)
    if data:
        raise BundleError(f"{SHIELDED_FILE} holds tensors the bundle does not define: {sorted(data)[:5]}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != bundle.manifest.model_type:
        raise BundleError("config.json and the manifest disagree on the model type")
    return ShieldedBundle(bundle=bundle, config=config, splits=splits, quantized=quantized, embed=embed.float(),
                          norms=norms, freivalds=freivalds, p=p, weight_bits=weight_bits, act_bits=act_bits,
                          layer_keys=layer_keys, locks=None if lock_spec.kind == "none" else locks,
                          lock=str(lock_spec))
