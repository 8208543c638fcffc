"""``slip protect``: turn a Hugging Face checkpoint into a public artifact and a secret bundle.

Steps (gpt-fast style offline transform; the runtime swap happens in the vLLM plugin):
  1. read config.json, refuse architectures the plugin cannot serve;
  2. build the model skeleton on the meta device to learn which tensors are projections
     (nn.Linear, GPT-2's Conv1D) and which are the token embedding / LM head (tied or not);
  3. split each of them with ``core.decompose.split_matrix`` (SVD + blinding), chunk by chunk with a
     progress bar, checking exactness of every matrix;
  (protocol ``shielded``, Llama family only: steps 2-4 are ``shielded.write_shielded``)
  4. write OUT/public (normal HF directory: config with a ``slip`` quantization_config, tokenizer,
     public tensors, manifest) and OUT/secret (factors + bundle.json naming the manifest hash),
     into a staging directory first so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from slip_vllm.core.decompose import BlindingRng, RankPolicy, split_matrix
from slip_vllm.core.manifest import (
    KIND_EMBEDDING, KIND_LINEAR, KIND_LM_HEAD, MANIFEST_FILE, ORIENT_IN_OUT, ORIENT_OUT_IN, QUANT_METHOD,
    Manifest, TensorEntry, sha256_bytes,
)

from slip_vllm.protect.shielded import SHIELDED_MODEL_TYPES, write_shielded
from slip_vllm.protect.staging import move_into_place

log = logging.getLogger("slip.protect")

# model_type -> note. The plugin routes every LinearBase projection and vocab embedding through the
# service; these families are the ones whose vLLM models are built that way and that the tests cover.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2 (q/k/v biases stay public)",
    "qwen3": "Qwen3", "gpt2": "GPT-2 (Conv1D projections)", "bert": "BERT encoders (embeddings endpoint)",
}

# What of the input directory is NOT carried into the public artifact: weights (the protected ones
# are rewritten; any other copy, e.g. pytorch_model.bin next to safetensors or Llama-3's original/,
# would give the model away), their shard indexes and training state.  Every other file is carried,
# subdirectories included: tokenizer files, generation_config.json, chat templates, and the
# sentence-transformers files vLLM reads for pooling (modules.json, 1_Pooling/config.json,
# sentence_bert_config.json, config_sentence_transformers.json).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz",
                   ".npy", ".pkl", ".pickle", ".tflite", ".ot", ".mlmodel", ".tar", ".zip")
TRAINING_STATE_FILES = {"trainer_state.json", "optimizer.pt", "scheduler.pt"}

SECRET_FACTORS_FILE = "factors.safetensors"
BUNDLE_FILE = "bundle.json"


class ProtectError(RuntimeError):
    """A problem with the inputs of ``slip protect``, worded for the person running it."""


def _is_weight_file(name: str) -> bool:
    lowered = name.lower()
    return (lowered.endswith(WEIGHT_SUFFIXES) or lowered.endswith((".safetensors.index.json", ".bin.index.json"))
            or name in TRAINING_STATE_FILES)


def public_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` (relative paths) that OUT/public carries: everything but weights,
    their indexes, training state, hidden files and config.json (rewritten).  Weights inside a
    sentence-transformers module that modules.json lists (e.g. a ``2_Dense`` projection) are refused:
    SLIP does not protect them, and serving without them would change the embeddings."""
    model_dir = Path(model_dir)
    modules = set()
    if (model_dir / "modules.json").is_file():
        try:
            modules = {str(m.get("path", "")).strip("/") for m in json.loads((model_dir / "modules.json").read_text())}
        except (ValueError, AttributeError, TypeError):
            raise ProtectError(f"{model_dir / 'modules.json'} is not a sentence-transformers module list") from None
    carried = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or rel == Path("config.json"):
            continue
        if _is_weight_file(path.name):
            if len(rel.parts) > 1 and rel.parts[0] in modules:
                raise ProtectError(f"{rel}: the sentence-transformers module {rel.parts[0]!r} holds weights that SLIP "
                                   f"does not protect (only the transformer's matrices are); publishing them would give "
                                   f"them away and serving without them changes the embeddings. Remove the module "
                                   f"from modules.json or fold it into the model")
            continue
        carried.append(rel)
    return carried


def copy_public_files(model_dir: Path, public_dir: Path) -> list[Path]:
    """Copy ``public_files(model_dir)`` into ``public_dir``, keeping subdirectories."""
    carried = public_files(model_dir)
    for rel in carried:
        (public_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / rel, public_dir / rel)
    log.info("carried %d non-weight files into the public artifact: %s", len(carried),
             ", ".join(str(r) for r in carried) or "none")
    return carried


@dataclass
class ProtectConfig:
    protocol: str = "split"
    default_rank: RankPolicy = field(default_factory=lambda: RankPolicy(fraction=0.125))
    # (glob pattern on the checkpoint name, policy); first match wins.
    overrides: list[tuple[str, RankPolicy]] = field(default_factory=list)
    # shielded: width of the public integer weights W_q, 8 | 16 (configs/protect.yaml says why 16)
    weight_bits: int = 16
    blinding: bool = True
    seed: int | None = None  # None: fresh CSPRNG seed (required for real use, see below)
    lock: str | None = None  # shielded only: none | perm | block[:b] (None: core.lock.DEFAULT_LOCK)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ProtectConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ProtectError(f"cannot read config {path}: {exc}") from None
        known = {"protocol", "rank", "blinding", "seed", "lock", "weight_bits"}
        unknown = set(data) - known
        if unknown:
            raise ProtectError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        cfg = cls()
        cfg.protocol = data.get("protocol", cfg.protocol)
        rank = data.get("rank", {}) or {}
        try:
            if "default" in rank:
                cfg.default_rank = RankPolicy.from_dict(rank["default"])
            for item in rank.get("overrides", []) or []:
                item = dict(item)
                pattern = item.pop("match")
                cfg.overrides.append((pattern, RankPolicy.from_dict(item)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtectError(f"{path}: bad rank section: {exc}") from None
        cfg.weight_bits = data.get("weight_bits", cfg.weight_bits)
        if isinstance(cfg.weight_bits, bool) or cfg.weight_bits not in (8, 16):
            raise ProtectError(f"{path}: weight_bits must be 8 or 16, got {cfg.weight_bits!r}")
        cfg.blinding = bool(data.get("blinding", True))
        cfg.seed = data.get("seed")
        cfg.lock = None if data.get("lock") is None else str(data["lock"])
        return cfg

    def policy_for(self, name: str) -> RankPolicy:
        from fnmatch import fnmatch

        for pattern, policy in self.overrides:
            if fnmatch(name, pattern):
                return policy
        return self.default_rank


@dataclass(frozen=True)
class ProtectedTensor:
    name: str
    kind: str
    orientation: str


def _load_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ProtectError(f"{model_dir} holds no *.safetensors or pytorch_model*.bin weights")


def find_protected_tensors(config) -> tuple[list[ProtectedTensor], bool, str]:
    """Which checkpoint tensors carry the model's IP, from the model's own module types.

    Returns (tensors, tied_embeddings, architecture).
    """
    import transformers
    from transformers.pytorch_utils import Conv1D

    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ProtectError("config.json names no architecture")
    arch = archs[0]
    model_cls = getattr(transformers, arch, None)
    if model_cls is None:
        raise ProtectError(f"transformers has no class {arch}")
    with torch.device("meta"):
        model = model_cls._from_config(config)
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(config, "tie_word_embeddings", False)) and output_emb is not None
    found: list[ProtectedTensor] = []
    for mod_name, module in model.named_modules():
        weight_name = f"{mod_name}.weight"
        if module is input_emb:
            found.append(ProtectedTensor(weight_name, KIND_EMBEDDING, ORIENT_OUT_IN))
        elif output_emb is not None and module is output_emb:
            if not tied:
                found.append(ProtectedTensor(weight_name, KIND_LM_HEAD, ORIENT_OUT_IN))
        elif isinstance(module, torch.nn.Linear):
            found.append(ProtectedTensor(weight_name, KIND_LINEAR, ORIENT_OUT_IN))
        elif isinstance(module, Conv1D):
            found.append(ProtectedTensor(weight_name, KIND_LINEAR, ORIENT_IN_OUT))
    if not any(t.kind == KIND_LINEAR for t in found):
        raise ProtectError(f"{arch} has no linear projections to protect")
    return found, tied, arch


def _resolve_checkpoint_name(name: str, state: dict[str, torch.Tensor]) -> str | None:
    """Checkpoint key of a module weight: exact, else the one key that differs only by a leading
    model prefix (base models such as BertModel are saved with or without ``bert.``)."""
    if name in state:
        return name
    candidates = [k for k in state if k.endswith("." + name) or name.endswith("." + k)]
    return candidates[0] if len(candidates) == 1 else None


def protect(model_dir: str | Path, out_dir: str | Path, config: ProtectConfig | None = None,
            force: bool = False, progress: bool = True) -> Manifest:
    """Run the whole offline transform; returns the manifest written to OUT/public."""
    from tqdm import tqdm
    from transformers import AutoConfig

    config = config or ProtectConfig()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if config.protocol not in ("split", "shielded"):
        raise ProtectError(f"unknown protocol {config.protocol!r} (choose split or shielded)")
    if config.lock is not None:
        from slip_vllm.core.lock import parse_lock

        try:
            lock = parse_lock(config.lock)
        except ValueError as exc:
            raise ProtectError(str(exc)) from None
        if config.protocol != "shielded" and lock.kind != "none":
            raise ProtectError(f"--lock {config.lock} needs --protocol shielded (a split host sees plaintext "
                               "activations, so a lock would hide nothing)")
    if not (model_dir / "config.json").is_file():
        raise ProtectError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ProtectError(f"{out_dir} exists and is not empty; pass --force to replace it")
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise ProtectError("the output directory must not be inside the input model directory")

    hf_config = AutoConfig.from_pretrained(model_dir)
    if config.protocol == "shielded" and hf_config.model_type not in SHIELDED_MODEL_TYPES:
        raise ProtectError(f"protocol 'shielded' supports the Llama family only ({', '.join(SHIELDED_MODEL_TYPES)}); "
                           f"model type {hf_config.model_type!r} is not supported (use --protocol split)")
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ProtectError(f"model type {hf_config.model_type!r} is not supported; supported: "
                           + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items()))
    if getattr(hf_config, "quantization_config", None):
        raise ProtectError("the input checkpoint is already quantized/protected; start from full weights")
    # 256 bits from the OS CSPRNG key the blinding stream (core.decompose.BlindingRng, SHAKE-256)
    seed = config.seed if config.seed is not None else secrets.randbits(256)
    if config.seed is not None:
        log.warning("fixed blinding seed given: fine for tests, never for a real artifact "
                    "(whoever knows the seed can recompute the blinding spectrum)")
    if not config.blinding:
        log.warning("blinding disabled: the public residual leaks the secret subspaces "
                    "(evaluation use only)")
    if config.protocol == "shielded":
        if not any(model_dir.glob("*.safetensors")):
            raise ProtectError(f"{model_dir} holds no *.safetensors weights (protocol 'shielded' reads safetensors)")
        public_files(model_dir)  # refuse unprotectable modules before any work
        return write_shielded(model_dir, out_dir, config, hf_config, seed, copy_public_files)
    targets, tied, arch = find_protected_tensors(hf_config)
    public_files(model_dir)  # refuse unprotectable modules before any work
    state = _load_checkpoint(model_dir)

    public_state = dict(state)
    if tied:
        # vLLM ties the LM head to the embedding and ignores this tensor; dropping it keeps the
        # public directory from holding a second, possibly unprotected, copy.
        for key in ("lm_head.weight",):
            public_state.pop(key, None)
    entries: list[TensorEntry] = []
    factors: dict[str, torch.Tensor] = {}
    generator = BlindingRng.from_seed(seed)
    bar = tqdm(targets, desc="slip protect", unit="matrix", disable=not progress, mininterval=1.0)
    for target in bar:
        key = _resolve_checkpoint_name(target.name, state)
        if key is None:
            raise ProtectError(f"checkpoint has no tensor for {target.name}")
        bar.set_postfix_str(key[-40:])
        original = state[key]
        weight = original.to(torch.float32)
        if target.orientation == ORIENT_IN_OUT:
            weight = weight.T
        split = split_matrix(weight, config.policy_for(key), generator, blind=config.blinding)
        public = split.public.T.contiguous() if target.orientation == ORIENT_IN_OUT else split.public
        public_state[key] = public
        tensor_id = len(entries)
        entries.append(TensorEntry(id=tensor_id, name=key, kind=target.kind, shape=tuple(weight.shape),
                                   orientation=target.orientation, rank=split.rank,
                                   public_sha256=sha256_bytes(public.numpy().tobytes())))
        factors[f"t{tensor_id}.left"] = split.left
        factors[f"t{tensor_id}.right"] = split.right

    manifest = Manifest(protocol=config.protocol, architecture=arch, model_type=hf_config.model_type,
                        tied_embeddings=tied, tensors=entries,
                        extra={"rank_policy": config.default_rank.describe(), "blinding": config.blinding})
    manifest_text = manifest.to_json()
    manifest_sha = sha256_bytes(manifest_text.encode())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".slip-protect-", dir=out_dir.parent))
    try:
        public_dir = staging / "public"
        secret_dir = staging / "secret"
        public_dir.mkdir()
        secret_dir.mkdir(mode=0o700)
        save_file({k: v.contiguous() for k, v in public_state.items()}, str(public_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        raw_config = json.loads((model_dir / "config.json").read_text())
        raw_config["quantization_config"] = {"quant_method": QUANT_METHOD, "protocol": config.protocol,
                                             "manifest": MANIFEST_FILE, "manifest_sha256": manifest_sha}
        (public_dir / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        (public_dir / MANIFEST_FILE).write_text(manifest_text)
        copy_public_files(model_dir, public_dir)

        save_file(factors, str(secret_dir / SECRET_FACTORS_FILE))
        bundle = {
            "format": "slip-bundle", "format_version": 1, "protocol": config.protocol,
            "public_manifest_sha256": manifest_sha, "factors_file": SECRET_FACTORS_FILE,
            "factors_sha256": _sha256_path(secret_dir / SECRET_FACTORS_FILE),
            "architecture": arch, "model_type": hf_config.model_type,
        }
        (secret_dir / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1) + "\n")
        (secret_dir / MANIFEST_FILE).write_text(manifest_text)
        (secret_dir / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        move_into_place(public_dir, secret_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("protected %d matrices of %s into %s", len(entries), arch, out_dir)
    return manifest


def _sha256_path(path: Path) -> str:
    from slip_vllm.core.manifest import sha256_file

    return sha256_file(path)
