"""The manifest: what a protected artifact contains and how its two halves pair.

``OUT/public/slip_manifest.json`` lists every protected tensor (id, checkpoint name, kind, shape,
orientation, rank, hash of its public residual). ``config.json`` carries a ``quantization_config``
block naming the ``slip`` method and the manifest's SHA-256, and the secret bundle records the same
hash: vLLM's loader and the secure service refuse to pair halves whose hashes differ. The manifest
is public: it holds no secret values, only shapes, ranks and hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_FILE = "slip_manifest.json"
QUANT_METHOD = "slip"
SHIELDED_ARCHITECTURE = "SlipShieldedForCausalLM"  # the vLLM architecture of a shielded OUT/public
PROTOCOLS = ("split", "shielded")

KIND_LINEAR = "linear"
KIND_EMBEDDING = "embedding"  # token embedding (also the LM head when tied)
KIND_LM_HEAD = "lm_head"      # an untied output embedding

ORIENT_OUT_IN = "out_in"      # torch.nn.Linear / nn.Embedding storage
ORIENT_IN_OUT = "in_out"      # transformers' Conv1D (GPT-2) storage


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    id: int
    name: str                  # checkpoint name, e.g. "model.layers.0.self_attn.q_proj.weight"
    kind: str
    shape: tuple[int, int]     # [out, in] after orientation is applied
    orientation: str
    rank: int
    public_sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> "TensorEntry":
        try:
            entry = cls(id=int(d["id"]), name=str(d["name"]), kind=str(d["kind"]),
                        shape=(int(d["shape"][0]), int(d["shape"][1])), orientation=str(d["orientation"]),
                        rank=int(d["rank"]), public_sha256=str(d["public_sha256"]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ManifestError(f"malformed tensor entry {d!r}: {exc}") from None
        if entry.kind not in (KIND_LINEAR, KIND_EMBEDDING, KIND_LM_HEAD):
            raise ManifestError(f"unknown tensor kind {entry.kind!r}")
        if entry.orientation not in (ORIENT_OUT_IN, ORIENT_IN_OUT):
            raise ManifestError(f"unknown orientation {entry.orientation!r}")
        if not 1 <= entry.rank < min(entry.shape):
            raise ManifestError(f"{entry.name}: rank {entry.rank} out of range for shape {entry.shape}")
        return entry


@dataclass
class Manifest:
    protocol: str
    architecture: str
    model_type: str
    tied_embeddings: bool
    tensors: list[TensorEntry]
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ManifestError(f"unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        ids = [t.id for t in self.tensors]
        if ids != list(range(len(ids))):
            raise ManifestError("tensor ids must be 0..N-1 in order")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ManifestError("duplicate tensor names in manifest")

    def to_json(self) -> str:
        data = {
            "format": "slip-manifest",
            "format_version": self.format_version,
            "protocol": self.protocol,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "tied_embeddings": self.tied_embeddings,
            "extra": self.extra,
            "tensors": [dict(asdict(t), shape=list(t.shape)) for t in self.tensors],
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from None
        if data.get("format") != "slip-manifest":
            raise ManifestError("not a SLIP manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"manifest format {data.get('format_version')} is not supported "
                                f"(this build reads {FORMAT_VERSION})")
        return cls(protocol=data["protocol"], architecture=data["architecture"],
                   model_type=data["model_type"], tied_embeddings=bool(data["tied_embeddings"]),
                   tensors=[TensorEntry.from_dict(t) for t in data["tensors"]],
                   extra=dict(data.get("extra", {})))

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_public_manifest(model_dir: str | Path) -> tuple[Manifest, str]:
    """Read and verify the manifest of a public artifact; returns (manifest, its sha256).

    Checks that config.json's ``quantization_config`` names the ``slip`` method and the same hash.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{model_dir} has no {MANIFEST_FILE}: it is not a SLIP public artifact "
                            f"(make one with `slip protect`)")
    raw = path.read_bytes()
    digest = sha256_bytes(raw)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        qc = json.loads(config_path.read_text()).get("quantization_config") or {}
        if qc.get("quant_method") != QUANT_METHOD:
            raise ManifestError(f"{config_path} does not select the '{QUANT_METHOD}' quantization method")
        if qc.get("manifest_sha256") != digest:
            raise ManifestError(f"{MANIFEST_FILE} does not match the hash recorded in config.json "
                                f"(the artifact was edited or mixed with another one)")
    return Manifest.from_json(raw.decode()), digest
