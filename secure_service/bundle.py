"""Loading and validating the secret bundle written by ``slip protect`` (OUT/secret).

Every tensor is checked against the manifest (shape, rank, finiteness) and the factor file against
its recorded hash before the service answers a single call: a damaged or mismatched bundle stops
the service at start with a message, instead of serving wrong numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from slip_vllm.core.manifest import (
    KIND_EMBEDDING, MANIFEST_FILE, Manifest, ManifestError, TensorEntry, sha256_bytes, sha256_file,
)


class BundleError(RuntimeError):
    pass


@dataclass
class SecretTensor:
    entry: TensorEntry
    left: Optional[torch.Tensor]  # [m, k]; None in a shielded service for a fused layer, whose
                                  # executor holds the per-part blocks (``load_shielded_bundle``)
    right: torch.Tensor           # [k, n]


@dataclass
class Bundle:
    path: Path
    protocol: str
    manifest: Manifest
    manifest_sha256: str
    tensors: list[SecretTensor]

    def info(self) -> dict:
        """Public facts about the bundle (never secret values)."""
        return {
            "protocol": self.protocol,
            "architecture": self.manifest.architecture,
            "model_type": self.manifest.model_type,
            "public_manifest_sha256": self.manifest_sha256,
            "tensors": len(self.tensors),
            "secret_parameters": sum(t.entry.rank * (t.entry.shape[0] + t.entry.shape[1]) for t in self.tensors),
        }


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    bundle_file = path / "bundle.json"
    if not bundle_file.is_file():
        raise BundleError(f"{path} is not a SLIP secret bundle (no bundle.json); pass OUT_DIR/secret "
                          f"as written by `slip protect`")
    try:
        meta = json.loads(bundle_file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{bundle_file} is not JSON: {exc}") from None
    if meta.get("format") != "slip-bundle" or meta.get("format_version") != 1:
        raise BundleError(f"{bundle_file}: unsupported bundle format {meta.get('format')!r} "
                          f"v{meta.get('format_version')}")
    manifest_raw = (path / MANIFEST_FILE).read_bytes()
    manifest_sha = sha256_bytes(manifest_raw)
    if manifest_sha != meta.get("public_manifest_sha256"):
        raise BundleError("the bundle's manifest copy does not match the hash recorded in bundle.json")
    try:
        manifest = Manifest.from_json(manifest_raw.decode())
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    if manifest.protocol != meta.get("protocol"):
        raise BundleError("bundle.json and the manifest disagree on the protocol")
    factors_path = path / meta["factors_file"]
    if sha256_file(factors_path) != meta.get("factors_sha256"):
        raise BundleError(f"{factors_path.name} does not match its recorded hash (damaged or replaced)")
    factors = load_file(str(factors_path))
    tensors = []
    for entry in manifest.tensors:
        try:
            left = factors.pop(f"t{entry.id}.left").to(torch.float32).contiguous()
            right = factors.pop(f"t{entry.id}.right").to(torch.float32).contiguous()
        except KeyError:
            raise BundleError(f"factors for tensor {entry.id} ({entry.name}) are missing") from None
        m, n = entry.shape
        if tuple(left.shape) != (m, entry.rank) or tuple(right.shape) != (entry.rank, n):
            raise BundleError(f"{entry.name}: factor shapes {tuple(left.shape)}, {tuple(right.shape)} do not "
                              f"match shape {entry.shape} at rank {entry.rank}")
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise BundleError(f"{entry.name}: factors hold NaN/Inf")
        tensors.append(SecretTensor(entry=entry, left=left, right=right))
    if factors:
        raise BundleError(f"factor file holds tensors the manifest does not name: {sorted(factors)[:5]}")
    return Bundle(path=path, protocol=manifest.protocol, manifest=manifest, manifest_sha256=manifest_sha,
                  tensors=tensors)


def is_embedding(t: SecretTensor) -> bool:
    return t.entry.kind == KIND_EMBEDDING
