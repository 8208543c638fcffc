"""``slip protect --protocol shielded``: the offline transform of protocol ``shielded`` (vendor side).

What this module owns
---------------------
The artifact layout of protocol ``shielded`` for the Llama family (llama, mistral, qwen2, qwen3),
written by ``write_shielded``:

OUT/public (the untrusted host gets ONLY what it needs to run the masked GEMMs and the scheduler):
  * ``model.safetensors``: one int8 (``--weight-bits 8``) or int16 (``--weight-bits 16``) tensor
    ``<layer key>.w_q`` [m, n] per fused masked GEMM:
    ``layers.<i>.qkv``, ``layers.<i>.o``, ``layers.<i>.gate_up``, ``layers.<i>.down``, ``lm_head``;
  * ``slip_manifest.json`` (protocol ``shielded``): per layer key its shape, total secret rank and
    the SHA-256 of its W_q; in ``extra``: p, weight/activation bits, the ordered layer keys and the
    output sizes of the fused parts;
  * ``config.json`` (with the ``slip`` quantization_config naming the manifest hash) and the
    tokenizer files.
  No scales, norms, biases, embeddings or factors.
OUT/secret (mode 0700, the secure service's bundle):
  * ``factors.safetensors``: ``t<id>.left`` [m, K], ``t<id>.right`` [K, n] with W_C = left @ right
    per manifest entry (block diagonal over fused parts);
  * ``shielded.safetensors``: per layer key ``.w_q`` (a copy of the public weight), ``.scale``
    (per output channel), ``.bias`` (where the model has one), ``.freivalds_u`` (the secret
    Freivalds vectors, fixed at protect time so restarts keep them), ``.lock.{out,in}.*`` (the
    GEMM's lock, ``core.lock.GemmLock.to_tensors``; none for ``--lock none``); ``norm.<name>``
    gains and ``embed`` (token ids are looked up in the service);
  * ``bundle.json`` (hashes of both files, the public manifest hash it pairs with, p, the lock
    kind ``none`` | ``perm`` | ``block:b``: only here, the public manifest does not name it),
    ``slip_manifest.json``, ``config.json``.

Steps
-----
1. split every projection with ``core.shielded_split.split_checkpoint`` (SVD + blinding, exactness
   <= 1e-6 checked per matrix by ``decompose.split_matrix`` before any quantization), fused per
   masked GEMM, rank from the protect config (per checkpoint name);
2. draw one lock per masked GEMM (``shielded_split.draw_locks``: ``--lock``, default
   ``core.lock.DEFAULT_LOCK``; ``core.lock.make_locks`` from a 32-byte artifact key: ``os.urandom``,
   or derived from ``--seed`` when a fixed seed is given for tests); quantize the locked
   W_D' = M_out W_D M_in (float64, before any quantization) per output channel to int8 or int16
   (``--weight-bits``; ``shielded_split.quantize_splits``); choose p above the exactness bound of
   every layer (``quantize.select_prime``); draw the Freivalds vectors (of the locked W_q) from the
   OS CSPRNG (``shielded_split.draw_freivalds_vectors``).  These are core functions: the tool never
   builds the secure service's executor, and the executor builds from the same functions.  Fused
   GEMMs (qkv, gate_up) get one lock over their whole output: the output side mixes the rows of
   all parts (the host cannot tell q from k or v, gate from up), and the service unlocks the whole
   output before cutting it into parts; bias and W_C x are added after the unlock, in plain
   coordinates;
3. write both halves into a staging directory, then move them into place.
``ShieldedExecutor.from_bundle(OUT/secret)`` rebuilds the same executor: its results are
bit-identical to ``ShieldedExecutor.from_checkpoint`` with the same rank policy and seed.

Runs on the vendor's machine (trusted, offline); it holds the original weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from slip_vllm.core.lock import DEFAULT_LOCK, parse_lock, seed_lock_key
from slip_vllm.protect.staging import move_into_place
from slip_vllm.core.quantize import DEFAULT_ACT_BITS, select_prime
from slip_vllm.core.shielded_split import (
    draw_freivalds_vectors, draw_locks, layer_keys, quantize_splits, split_checkpoint,
)
from slip_vllm.core.manifest import (
    KIND_LINEAR, KIND_LM_HEAD, MANIFEST_FILE, ORIENT_OUT_IN, QUANT_METHOD, SHIELDED_ARCHITECTURE, Manifest,
    TensorEntry, sha256_bytes,
    sha256_file,
)

log = logging.getLogger("slip.protect")

SHIELDED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PUBLIC_WEIGHTS_FILE = "model.safetensors"
SHIELDED_FILE = "shielded.safetensors"
FACTORS_FILE = "factors.safetensors"


def write_shielded(model_dir: Path, out_dir: Path, config, hf_config, seed: int, copy_files) -> Manifest:
    """copy_files(model_dir, public_dir): carries the checkpoint's non-weight files into OUT/public."""
    """Steps 1-3 of the module docstring; ``config`` is the ``ProtectConfig``."""
    model_cfg, splits, embed, norms = split_checkpoint(model_dir, config.policy_for, seed=seed,
                                                       blind=config.blinding)
    lock_spec = parse_lock(getattr(config, "lock", None) or DEFAULT_LOCK)
    if getattr(config, "seed", None) is None:
        lock_key = os.urandom(32)
    else:  # a fixed seed (tests only, warned about by ``protect``) fixes the lock too
        lock_key = seed_lock_key(int(seed))
    locks = draw_locks(splits, lock_spec, lock_key)
    weight_bits = int(getattr(config, "weight_bits", 8))  # 8 | 16: width of the public W_q
    act_bits = DEFAULT_ACT_BITS
    quantized = quantize_splits(splits, weight_bits, locks)
    p = select_prime({key: q.w_q for key, q in quantized.items()}, act_bits=act_bits)
    vectors = draw_freivalds_vectors(quantized, p)
    keys = layer_keys(int(model_cfg.num_hidden_layers))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    entries, public, factors, secret = [], {}, {}, {}
    for i, key in enumerate(keys):
        s, q = splits[key], quantized[key]
        w_q = q.w_q.contiguous()
        m, n = w_q.shape
        entries.append(TensorEntry(id=i, name=key, kind=KIND_LM_HEAD if key == "lm_head" else KIND_LINEAR,
                                   shape=(int(m), int(n)), orientation=ORIENT_OUT_IN, rank=int(s.left.shape[1]),
                                   public_sha256=sha256_bytes(w_q.numpy().tobytes())))
        public[f"{key}.w_q"] = w_q
        factors[f"t{i}.left"] = s.left.contiguous()
        factors[f"t{i}.right"] = s.right.contiguous()
        secret[f"{key}.w_q"] = w_q.clone()
        secret[f"{key}.scale"] = q.scale.to(torch.float32).contiguous()
        if s.bias is not None:
            secret[f"{key}.bias"] = s.bias.to(torch.float32).contiguous()
        secret[f"{key}.freivalds_u"] = vectors[key].contiguous()
        secret.update(locks[key].to_tensors(key))
    for name, t in norms.items():
        secret[f"norm.{name}"] = t.to(torch.float32).contiguous()
    secret["embed"] = embed.to(torch.float32).contiguous()

    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    manifest = Manifest(protocol="shielded", architecture=arch, model_type=hf_config.model_type,
                        tied_embeddings=tied, tensors=entries,
                        extra={"rank_policy": config.default_rank.describe(), "blinding": config.blinding,
                               "p": p, "weight_bits": weight_bits, "act_bits": act_bits, "layer_keys": keys,
                               "parts": {k: list(splits[k].parts) for k in keys},
                               "public_weights_file": PUBLIC_WEIGHTS_FILE})
    manifest_text = manifest.to_json()
    manifest_sha = sha256_bytes(manifest_text.encode())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".slip-protect-", dir=out_dir.parent))
    try:
        public_dir, secret_dir = staging / "public", staging / "secret"
        public_dir.mkdir()
        secret_dir.mkdir(mode=0o700)
        save_file(public, str(public_dir / PUBLIC_WEIGHTS_FILE), metadata={"format": "pt"})
        raw_config = json.loads((model_dir / "config.json").read_text())
        raw_config["quantization_config"] = {"quant_method": QUANT_METHOD, "protocol": "shielded",
                                             "manifest": MANIFEST_FILE, "manifest_sha256": manifest_sha}
        # vLLM serves the public dir with the plugin's SlipShieldedForCausalLM (masked GEMMs only);
        # the secret copy keeps the original architecture for the service's executor.
        public_config = {**raw_config, "architectures": [SHIELDED_ARCHITECTURE]}
        (public_dir / "config.json").write_text(json.dumps(public_config, indent=2) + "\n")
        (public_dir / MANIFEST_FILE).write_text(manifest_text)
        copy_files(model_dir, public_dir)

        save_file(factors, str(secret_dir / FACTORS_FILE))
        save_file(secret, str(secret_dir / SHIELDED_FILE))
        bundle = {
            "format": "slip-bundle", "format_version": 1, "protocol": "shielded",
            "public_manifest_sha256": manifest_sha, "factors_file": FACTORS_FILE,
            "factors_sha256": sha256_file(secret_dir / FACTORS_FILE),
            "shielded_file": SHIELDED_FILE, "shielded_sha256": sha256_file(secret_dir / SHIELDED_FILE),
            "architecture": arch, "model_type": hf_config.model_type, "p": p, "lock": str(lock_spec),
        }
        (secret_dir / "bundle.json").write_text(json.dumps(bundle, indent=1) + "\n")
        (secret_dir / MANIFEST_FILE).write_text(manifest_text)
        (secret_dir / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        move_into_place(public_dir, secret_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("protected %d masked GEMMs of %s (protocol shielded, p=%d, lock %s) into %s", len(entries), arch, p,
             lock_spec, out_dir)
    return manifest
