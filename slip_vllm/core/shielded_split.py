"""The split of protocol ``shielded``: an original checkpoint -> one ``FusedSplit`` per public GEMM,
and the derived pieces both the model owner's protect tool and the secure service compute from it.

What this module owns
---------------------
* ``FusedSplit``: the data of one fused public GEMM after the split (W_C as ``LowRankFactors`` with
  one left block per fused part, the unquantized W_D when known, the bias, the parts' output sizes);
* ``fuse_splits``: split each part with ``decompose.split_matrix`` and fuse them (q, k, v; gate, up);
* ``split_checkpoint``: every projection of a Llama-family checkpoint, in a fixed order from one
  blinding stream (same seed, same split), plus the embedding and norm gains;
* ``layer_keys`` (the GEMMs of a model, in step order), ``quantize_splits`` (the public W_q of every
  GEMM: its lock applied to W_D, then per-channel quantization), ``draw_locks`` (one secret lock per
  GEMM) and ``draw_freivalds_vectors`` (the secret Freivalds vectors u of every GEMM).

Who uses it
-----------
``slip protect --protocol shielded`` (``slip_vllm.protect.shielded``) writes the artifact from these
functions; the secure service's executor (``secure_service.shielded_executor``) builds from the same
functions when it starts from a checkpoint (tests, evaluation) and from the bundle otherwise, so the
two paths cannot drift apart.  vLLM-free; it handles secrets (factors, locks, u) only while the
caller holds them and keeps no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from slip_vllm.core.decompose import BlindingRng, RankPolicy, split_matrix
from slip_vllm.core.csprng import csprng_field_elements, freivalds_vector_count
from slip_vllm.core.lock import GemmLock, LockSpec, make_locks, parse_lock
from slip_vllm.core.quantize import LowRankFactors, QuantizedWeight, quantize_weight

__all__ = ["SHIELDED_MODEL_TYPES", "FusedSplit", "fuse_splits", "load_state", "split_checkpoint", "layer_keys",
           "quantize_splits", "draw_locks", "draw_freivalds_vectors"]

SHIELDED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class FusedSplit:
    """W = W_C + public (+ bias) for one fused public GEMM, in [out, in] orientation.

    low_rank: W_C as ``LowRankFactors`` (float32; one left block [m_i, k_i] per fused part and the
    stacked right factors [K, n]); public: float32 [m, n] (W_D before quantization; None when built
    from a secret bundle, which holds only the quantized W_D); bias: float32 [m] or None; parts:
    the output sizes of the fused parts (q, k, v or gate, up; one entry for an unfused layer).
    """

    low_rank: LowRankFactors
    public: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    parts: Tuple[int, ...]

    @property
    def right(self) -> torch.Tensor:
        """The stacked right factors [K, n]."""
        return self.low_rank.right

    @property
    def left(self) -> torch.Tensor:
        """The dense block-diagonal left factor [m, K], built on demand (the bundle's on-disk form;
        the executor computes with the blocks)."""
        return self.low_rank.dense_left()


def fuse_splits(weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                policy: Union[RankPolicy, Sequence[RankPolicy]], generator: BlindingRng,
                blind: bool = True) -> FusedSplit:
    """Split each part with ``split_matrix`` and fuse: public rows stacked, right factors stacked,
    left factors one block per part.

    The blocks are cut from the dense block-diagonal left factor by
    ``LowRankFactors.block_diagonal``, the function the bundle loader applies to the same dense
    matrix on disk, so ``from_checkpoint`` and ``from_bundle`` hold bit-identical blocks.
    policy: one ``RankPolicy`` for every part, or one per part."""
    policies = [policy] * len(weights) if isinstance(policy, RankPolicy) else list(policy)
    splits = [split_matrix(w, pol, generator, blind=blind) for w, pol in zip(weights, policies)]
    m = sum(int(s.public.shape[0]) for s in splits)
    k = sum(s.rank for s in splits)
    left = torch.zeros(m, k, dtype=torch.float32)
    row = col = 0
    for s in splits:
        left[row:row + s.left.shape[0], col:col + s.rank] = s.left
        row += int(s.left.shape[0])
        col += s.rank
    right = torch.cat([s.right for s in splits], dim=0).contiguous()
    public = torch.cat([s.public for s in splits], dim=0).contiguous()
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.float() if b is not None else torch.zeros(w.shape[0]) for w, b in zip(weights, biases)])
    parts = tuple(int(w.shape[0]) for w in weights)
    return FusedSplit(low_rank=LowRankFactors.block_diagonal(left, right, parts), public=public, bias=bias,
                      parts=parts)


def load_state(model_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's ``*.safetensors`` files (refused if there are none)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def split_checkpoint(model_dir: Union[str, Path], policy, *, seed: int = 0, blind: bool = True):
    """Split an original HF checkpoint of the Llama family into the executor's parts.

    Returns (config, splits, embed, norms).  policy: a ``RankPolicy`` for every projection, or a
    callable (checkpoint weight name -> ``RankPolicy``).  The matrices are split in a fixed order
    (per layer: q, k, v, o, gate, up, down; then the LM head) from one blinding stream
    (``BlindingRng.from_seed(seed)``, a SHAKE-256 stream; ``slip protect`` passes a 256-bit seed
    from the OS CSPRNG), so the same seed gives the same split.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SHIELDED_MODEL_TYPES:  # refuse unsupported families before any work
        raise ValueError(f"model type {config.model_type!r} is not supported by protocol shielded "
                         f"(supported: {', '.join(SHIELDED_MODEL_TYPES)})")
    state = load_state(model_dir)
    gen = BlindingRng.from_seed(seed)
    policy_of: Callable[[str], RankPolicy] = (lambda name: policy) if isinstance(policy, RankPolicy) else policy

    def get(name: str) -> Optional[torch.Tensor]:
        t = state.get(name)
        return None if t is None else t.detach().float()

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise KeyError(f"checkpoint {model_dir} lacks {name}")
        return t

    splits: Dict[str, FusedSplit] = {}
    norms: Dict[str, torch.Tensor] = {}
    for i in range(int(config.num_hidden_layers)):
        pre = f"model.layers.{i}."
        att, mlp = pre + "self_attn.", pre + "mlp."
        qkv = [att + f"{x}_proj" for x in "qkv"]
        splits[f"layers.{i}.qkv"] = fuse_splits([need(n + ".weight") for n in qkv],
                                                [get(n + ".bias") for n in qkv],
                                                [policy_of(n + ".weight") for n in qkv], gen, blind)
        splits[f"layers.{i}.o"] = fuse_splits([need(att + "o_proj.weight")], [get(att + "o_proj.bias")],
                                              [policy_of(att + "o_proj.weight")], gen, blind)
        gu = [mlp + "gate_proj", mlp + "up_proj"]
        splits[f"layers.{i}.gate_up"] = fuse_splits([need(n + ".weight") for n in gu],
                                                    [get(n + ".bias") for n in gu],
                                                    [policy_of(n + ".weight") for n in gu], gen, blind)
        splits[f"layers.{i}.down"] = fuse_splits([need(mlp + "down_proj.weight")], [get(mlp + "down_proj.bias")],
                                                 [policy_of(mlp + "down_proj.weight")], gen, blind)
        norms[f"layers.{i}.input_norm"] = need(pre + "input_layernorm.weight")
        norms[f"layers.{i}.post_norm"] = need(pre + "post_attention_layernorm.weight")
        for which in ("q_norm", "k_norm"):
            t = get(att + which + ".weight")
            if t is not None:
                norms[f"layers.{i}.{which}"] = t
    norms["norm"] = need("model.norm.weight")
    embed = need("model.embed_tokens.weight")
    head = get("lm_head.weight")
    if bool(getattr(config, "tie_word_embeddings", False)) or head is None:
        head = embed
    head_name = "model.embed_tokens.weight" if head is embed else "lm_head.weight"
    splits["lm_head"] = fuse_splits([head], [get("lm_head.bias")], [policy_of(head_name)], gen, blind)
    return config, splits, embed, norms


def layer_keys(num_layers: int) -> List[str]:
    """The public GEMMs of a model in step order: per layer qkv, o, gate_up, down; then the LM head."""
    keys: List[str] = []
    for i in range(int(num_layers)):
        keys += [f"layers.{i}.qkv", f"layers.{i}.o", f"layers.{i}.gate_up", f"layers.{i}.down"]
    return keys + ["lm_head"]


def draw_locks(splits: Dict[str, FusedSplit], lock: Union[str, LockSpec], key: bytes) -> Dict[str, GemmLock]:
    """One lock per fused GEMM of ``splits`` (``core.lock.make_locks``, per-GEMM keys derived from
    ``key``, e.g. 32 bytes of ``os.urandom``); lock: ``none`` | ``perm`` | ``block[:b]``."""
    spec = parse_lock(lock) if isinstance(lock, str) else lock
    return make_locks({k: (int(sum(s.parts)), int(s.low_rank.n)) for k, s in splits.items()}, spec, key)


def quantize_splits(splits: Dict[str, FusedSplit], weight_bits: int,
                    locks: Optional[Dict[str, GemmLock]] = None) -> Dict[str, QuantizedWeight]:
    """The public W_q (and its secret per-channel scales) of every GEMM: W_D, locked first when
    ``locks`` is given (``GemmLock.lock_weight`` in float64), quantized per output channel to
    ``weight_bits`` (8 or 16) bits."""
    out: Dict[str, QuantizedWeight] = {}
    for key, s in splits.items():
        if s.public is None:
            raise ValueError(f"{key}: the split holds no unquantized W_D (built from a bundle?)")
        w = s.public if locks is None else locks[key].lock_weight(s.public.to(torch.float64))
        out[key] = quantize_weight(w, weight_bits)
    return out


def draw_freivalds_vectors(quantized: Dict[str, QuantizedWeight], p: int,
                           security_bits: int = 64) -> Dict[str, torch.Tensor]:
    """The secret Freivalds vectors of every GEMM: int64 [t, m] uniform in [0, p) from the OS
    CSPRNG, t = ``freivalds_vector_count(p, security_bits)`` (t * log2(p) >= security_bits)."""
    t = freivalds_vector_count(int(p), security_bits)
    return {key: csprng_field_elements((t, int(q.w_q.shape[0])), int(p)) for key, q in quantized.items()}
