"""TRUSTED side: the secure service's executor of protocol ``shielded`` for the Llama family.

What this module owns
---------------------
``ShieldedExecutor`` runs a whole decoder-only model of the Llama family (Llama, Mistral, Qwen2 with
q/k/v biases, Qwen3 with q/k norms; grouped-query attention; tied embeddings) for one forward step
of a batch, while every large matrix product is delegated to the untrusted host through masked
public GEMMs.  It owns:

* the residual stream, the embedding lookup (token ids are not secret), the RMSNorms (the model
  library's own modules with the checkpoint's gains), RoPE (the model library's own rotary module,
  so every rope-scaling variant of the config is honoured), attention and its paged KV cache, the
  activation function (the library's ``ACT2FN[config.hidden_act]``), the biases and the secret
  low-rank terms W_C = left @ right of every projection;
* one ``ShieldedLinear`` per fused public GEMM of each layer (qkv, o, gate_up, down) and one for
  the LM head, with the model's prime p, mask provider, Freivalds keys and alarm counter;
* the GEMMs' locks (``slip_vllm.core.lock``, ``locks=``): when given, the public weight of GEMM
  ``key`` is quant(M_out W_D M_in) and its ``ShieldedLinear`` (or, in ``fixed_point`` mode, the
  reference) transforms the input before quantization and undoes the output after
  dequantization.  One lock spans a fused GEMM's whole output (q, k and v rows, or gate and up
  rows, mixed together: the host cannot tell the parts apart); the service unlocks before it cuts
  the output into its parts.

It does not own transport, scheduling (block tables, slot mapping and sequence lengths come from
the host's scheduler, as in vLLM's runner) or sampling (float logits are returned for the host's
sampler).  The host is reached in one of two equivalent forms:
* generators (``step_gen``, ``forward_layers_gen``, ``head_gen``): they ``yield (layer_key, x~)``
  at every masked GEMM and are resumed with ``send(y~)``; the result comes back as the generator's
  return value.  The caller advances the step in its own thread (``shielded_api`` does, one HTTP
  call per ask); ``close()`` (or ``throw``) at an ask aborts the step, and the step's KV writes are
  rolled back before ``close`` returns;
* synchronous drivers over them (``step``, ``forward_layers``, ``head``, with a callback
  ``host_gemm(layer_key, x_masked) -> y_masked``; ``drive``).
The float and fixed-point modes (below) never yield.

Where it runs and what it holds
-------------------------------
Inside the secure service only; it must never import vLLM.  It holds secrets: the low-rank factors,
the quantization scales, the locks, norm gains, biases, the embedding table, the KV cache and every
plaintext activation.  Only masked activations x~ (uniform in Z_p) are handed to ``host_gemm``; the host holds
the public int8 weights W_q (``public_weights()``) and p.

Build (``from_checkpoint``)
---------------------------
From an original Hugging Face checkpoint directory: the config through ``AutoConfig``; every
projection W (q, k, v, o, gate, up, down, LM head; the LM head is the embedding when tied) is split
by ``decompose.split_matrix`` (with blinding and a ``RankPolicy``) into W_C (factors) + W_D; W_D is
locked (``core.lock``) and quantized per output channel to 8 or 16 bits.  Fused layers concatenate the
public rows ([W_q; W_k; W_v], [W_gate; W_up]) and their biases, stack their right factors and keep
one left factor per part (``quantize.LowRankFactors``).  One prime p for the whole model from
``quantize.select_prime``.  The split, the locks and the quantization are the core functions of
``slip_vllm.core.shielded_split`` (``split_checkpoint``, ``draw_locks``, ``quantize_splits``), the
same ones ``slip protect --protocol shielded`` writes the artifact with.

Build (``from_bundle``)
-----------------------
From the secret bundle written by ``slip protect --protocol shielded`` (read by ``shielded_bundle``;
this module imports it, never the reverse): the stored factors, W_q
and scales, biases, norms, embedding, p and Freivalds vectors; bit-identical to ``from_checkpoint``
with the same rank policy and seed (and the same torch thread count, which can change LAPACK's
choice among equally exact singular bases).  Fused layers hold W_C as ``LowRankFactors``: the
stacked right factors and one left block per part, cut by the same function from the same dense
block-diagonal matrix on both paths.

Data flow of one ``step`` (flattened mixed prefill/decode batch of N tokens, S sequences)
-----------------------------------------------------------------------------------------
0. service: the batch is checked (shapes, ranges, positions, seq_len <= max_model_len) and so are
   the KV slots it reads: each context slot must hold a write of this KV epoch for that position
   and for the same token prefix (``step_checks.check_kv_reads``); the step's slots are saved for
   the roll-back and their records set.  h = E[input_ids] (float32 [N, d]); (cos, sin) =
   rotary(positions) once per step.
For every decoder layer l:
1. service: x = input_norm(h); masked GEMM "layers.l.qkv" (mask, one host call for the whole
   batch, Freivalds check, unmask, + W_C x + b) -> [q; k; v].
2. service: Qwen3 only: q = q_norm(q), k = k_norm(k) per head; RoPE on q and k at ``positions``;
   write k, v into the paged cache at ``slot_mapping`` (slot = block * block_size + offset).
3. service: attention.  Sequence s has query rows query_start_loc[s]:query_start_loc[s+1] (q_len
   rows, the last q_len of its seq_lens[s] tokens, as in vLLM) and as keys/values the first
   seq_lens[s] cached tokens gathered through block_tables[s]; key j is visible to query i iff
   j <= seq_len - q_len + i (causal) and j > seq_len - q_len + i - window (where the config has a
   sliding window).  Vectorized over sequences: once per step the sequences are put in at most two
   groups (the decodes, q_len = 1, and the others), each padded to its longest q_len and seq_len
   with a boolean mask for causality, window and padding (``_AttentionGroup``); per layer and group
   one gather of K/V, one batched product, one float32 softmax, one product with V; the query heads
   of a group share their K/V head (no per-head repeat of K/V).  Separating the decodes keeps a long prefill from padding every
   decode row of the step to its length.
4. service -> host -> service: masked GEMM "layers.l.o"; h = h + o.
5. service: x = post_attention_norm(h); masked GEMM "layers.l.gate_up" -> [gate; up];
   a = act(gate) * up.
6. service -> host -> service: masked GEMM "layers.l.down"; h = h + down.
Then h = norm(h) (``forward_layers`` ends here; the normed rows stay in the service) and, for the
rows the host's runner asks for (``head``; vLLM knows them only after the forward: the sampling
rows, then any prompt-logprob rows), masked GEMM "lm_head" -> float logits for the host's sampler.
So each step makes exactly 4 host calls per layer + 1 per logits request, whatever the batch holds.

Failure: if any host answer fails its check (``IntegrityError``, alarm raised by ``ShieldedLinear``)
or anything else raises, or the caller closes the step's generator, the step is refused as a
whole: the KV-cache slots the step wrote (K/V and their records) are restored to their previous
contents, synchronously, so the executor stays consistent and usable for the next step (fail closed).

Modes (``mode=``), the same glue and the same split in all three:
* ``"shielded"`` (the protocol): masked host GEMMs as above;
* ``"fixed_point"``: no masks, no host; every projection is ``quantize.shielded_linear_reference``
  with the GEMM's lock (the bit-exact specification of ``ShieldedLinear``), so its logits must equal ``"shielded"``'s
  bit for bit: any difference is a protocol or glue bug, not quantization;
* ``"float"``: no quantization, no host, no lock; W_D x + W_C x + b in float64 with the unquantized W_D
  (W_C x in float32 as in every mode, ``quantize.low_rank_term``): must match the original model
  up to float rounding, which separates the quantization error of ``shielded`` from logic errors
  of the glue.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Generator, List, Optional, Sequence, Tuple, TypeVar, Union

import torch

from secure_service.integrity import AlarmCounter, FreivaldsKey
from secure_service.masks import MaskAuditRecorder, MaskProvider, PooledMaskProvider
from secure_service.shielded_bundle import ShieldedBundle, load_shielded_bundle
from secure_service.shielded_linear import ShieldedLinear
from secure_service.step_checks import PrefixTags, check_kv_reads, model_max_len
from slip_vllm.core.decompose import RankPolicy
from slip_vllm.core.lock import GemmLock, LockSpec
from slip_vllm.core.shielded_split import (
    SHIELDED_MODEL_TYPES,
    FusedSplit,
    draw_locks,
    fuse_splits,
    layer_keys,
    quantize_splits,
    split_checkpoint,
)
from slip_vllm.core.quantize import (
    DEFAULT_ACT_BITS,
    LowRankFactors,
    PublicWeight,
    QuantizedWeight,
    check_prime,
    low_rank_term,
    select_prime,
    shielded_linear_reference,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "MODES", "HostGemm", "HostAsk", "StepGen", "drive", "FusedSplit",
           "PagedKVCache", "ShieldedExecutor"]

SUPPORTED_MODEL_TYPES = SHIELDED_MODEL_TYPES
MODES = ("shielded", "fixed_point", "float")

HostGemm = Callable[[str, torch.Tensor], torch.Tensor]  # (layer key, x~ int64 [T, n]) -> y~ int64 [T, m]
HostAsk = Tuple[str, torch.Tensor]                      # what a step generator yields: (layer key, x~)
_R = TypeVar("_R")
StepGen = Generator[HostAsk, torch.Tensor, _R]          # yields asks, is sent y~, returns its result


def drive(gen: StepGen, host_gemm: HostGemm):
    """Run a step generator to its end, answering every ask with ``host_gemm``; returns its result.

    If ``host_gemm`` raises, the exception is thrown into the generator at its ask, so the
    generator's clean-up (ticket discarded, KV writes rolled back) runs before it propagates.
    """
    try:
        ask = next(gen)
        while True:
            try:
                y = host_gemm(*ask)
            except BaseException as exc:
                ask = gen.throw(exc)
            else:
                ask = gen.send(y)
    except StopIteration as stop:
        return stop.value


# ---------------------------------------------------------------------------------------------
# the paged KV cache
# ---------------------------------------------------------------------------------------------


class PagedKVCache:
    """K and V of every layer in vLLM's paged layout: [layers, num_blocks, block_size, kv_heads, head_dim].

    A token's slot s = block * block_size + offset (``slot_mapping``); a sequence's j-th token is in
    block ``block_tables[s, j // block_size]`` at offset ``j % block_size``.

    Per slot it also records, for the current KV epoch, what was written there (``step_checks``,
    "Which slots a step may read"): ``written_pos`` (the position, -1: never written), ``tag`` (the
    prefix tag of the token) and ``prev`` (the prefix tag of its predecessor).  ``save``/``restore``
    cover them with the K/V, so a rolled-back step leaves no record; ``reset`` starts a new epoch
    (every slot unwritten).
    """

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        slots = self.num_blocks * self.block_size
        self.written_pos = torch.full((slots,), -1, dtype=torch.int64)
        self.tag = torch.zeros(slots, dtype=torch.int64)
        self.prev = torch.zeros(slots, dtype=torch.int64)

    def reset(self) -> None:
        """A new KV epoch: every slot unwritten (reads of them are refused until a step writes
        them again).  The K/V values stay in trusted memory and are overwritten on reuse."""
        self.written_pos.fill_(-1)
        self.tag.zero_()
        self.prev.zero_()

    def mark_written(self, slots: torch.Tensor, positions: torch.Tensor, tag: torch.Tensor,
                     prev: torch.Tensor) -> None:
        """Record a step's writes (the values of slots listed twice agree: ``check_kv_reads``)."""
        self.written_pos[slots] = positions
        self.tag[slots] = tag
        self.prev[slots] = prev

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def flat(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views [num_slots, kv_heads, head_dim] of one layer's K and V."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def save(self, slots: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Copies of every layer's K/V and of the slot records at ``slots`` (to restore a refused step)."""
        k = self.k.view(self.k.shape[0], -1, *self.k.shape[3:])
        v = self.v.view(self.v.shape[0], -1, *self.v.shape[3:])
        return (k[:, slots].clone(), v[:, slots].clone(), self.written_pos[slots].clone(), self.tag[slots].clone(),
                self.prev[slots].clone())

    def restore(self, slots: torch.Tensor, saved: Tuple[torch.Tensor, ...]) -> None:
        k = self.k.view(self.k.shape[0], -1, *self.k.shape[3:])
        v = self.v.view(self.v.shape[0], -1, *self.v.shape[3:])
        # every saved copy of a slot listed twice holds the same pre-step contents
        k[:, slots] = saved[0]
        v[:, slots] = saved[1]
        self.written_pos[slots] = saved[2]
        self.tag[slots] = saved[3]
        self.prev[slots] = saved[4]


# ---------------------------------------------------------------------------------------------
# checkpoint and model-library pieces
# ---------------------------------------------------------------------------------------------


def _family_module(config):
    """The model library's modeling module and class-name prefix for this config."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not supported by the shielded executor "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    archs = getattr(config, "architectures", None) or []
    prefix = None
    for arch in archs:
        if arch.endswith("ForCausalLM") and hasattr(module, arch[:-len("ForCausalLM")] + "RMSNorm"):
            prefix = arch[:-len("ForCausalLM")]
    if prefix is None:
        candidates = [n[:-len("RMSNorm")] for n in dir(module) if n.endswith("RMSNorm")]
        if len(candidates) != 1:
            raise ValueError(f"cannot find the RMSNorm class of model type {config.model_type!r}")
        prefix = candidates[0]
    return module, prefix


def _norm(cls, weight: torch.Tensor, eps: float) -> torch.nn.Module:
    mod = cls(int(weight.shape[0]), eps=eps)
    with torch.no_grad():
        mod.weight.copy_(weight.float())
    return mod.float().eval()


@dataclass
class _Layer:
    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_norm: Optional[torch.nn.Module]
    k_norm: Optional[torch.nn.Module]
    sliding_window: Optional[int]


# ---------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------


class ShieldedExecutor:
    """Trusted-side forward of a Llama-family model whose projections run as masked host GEMMs.

    Build it with ``from_checkpoint`` or ``from_bundle``.  ``step`` runs one batch with a host
    callback, ``step_gen`` the same as a generator driven by its caller (see the module
    docstring); ``public_weights()`` is what the host gets; ``host_calls`` lists the layer keys of
    the last step's host calls, in order.
    """

    def __init__(self, config, splits: Dict[str, FusedSplit], embed: torch.Tensor, norms: Dict[str, torch.Tensor],
                 *, num_blocks: int, block_size: int, mode: str = "shielded", weight_bits: int = 8,
                 act_bits: int = DEFAULT_ACT_BITS, masks: Optional[MaskProvider] = None,
                 pool_rows: Optional[int] = None, alarms: Optional[AlarmCounter] = None,
                 quantized: Optional[Dict[str, QuantizedWeight]] = None, p: Optional[int] = None,
                 freivalds: Optional[Dict[str, torch.Tensor]] = None,
                 mask_recorder: Optional[MaskAuditRecorder] = None, max_model_len: int = 0,
                 locks: Optional[Dict[str, GemmLock]] = None):
        """quantized / p / freivalds (a secret bundle's stored W_q and scales, prime, Freivalds
        vectors u per layer key): use them instead of quantizing ``splits[key].public``, choosing
        p and drawing fresh keys; p is checked against the bound of every layer.  max_model_len:
        the longest sequence a step may hold (0: the config's max_position_embeddings).  locks:
        layer key -> ``GemmLock`` for every layer (None: unlocked); without ``quantized`` the
        locked weights quant(lock_weight(W_D)) are quantized here (in float64); with it, the
        stored W_q must already be the locked ones (a bundle's)."""
        module, prefix = _family_module(config)
        self.config = config
        self.model_type = config.model_type
        self.hidden = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.num_heads)
        self.scaling = self.head_dim ** -0.5
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.act_bits = act_bits

        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]
        rms_cls = getattr(module, prefix + "RMSNorm")
        self.rotary = getattr(module, prefix + "RotaryEmbedding")(config=config).float().eval()
        self.apply_rotary = module.apply_rotary_pos_emb
        eps = float(config.rms_norm_eps)
        layer_types = getattr(config, "layer_types", None)
        self.layers: List[_Layer] = []
        for i in range(self.num_layers):
            window = None
            if layer_types is not None and layer_types[i] == "sliding_attention":
                window = getattr(config, "sliding_window", None)
            elif layer_types is None and getattr(config, "sliding_window", None):
                window = config.sliding_window  # Mistral: one window for every layer
            qn = norms.get(f"layers.{i}.q_norm")
            kn = norms.get(f"layers.{i}.k_norm")
            self.layers.append(_Layer(
                input_norm=_norm(rms_cls, norms[f"layers.{i}.input_norm"], eps),
                post_norm=_norm(rms_cls, norms[f"layers.{i}.post_norm"], eps),
                q_norm=_norm(rms_cls, qn, eps) if qn is not None else None,
                k_norm=_norm(rms_cls, kn, eps) if kn is not None else None,
                sliding_window=int(window) if window else None))
        self.final_norm = _norm(rms_cls, norms["norm"], eps)
        self.embed = embed.float().contiguous()
        self.vocab = int(self.embed.shape[0])
        self.cache = PagedKVCache(self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.max_model_len = model_max_len(config, int(max_model_len))
        self.kv_tags = PrefixTags(self.vocab, self.max_model_len)  # secret: which slots a step may read
        self.splits = splits
        self.host_calls: List[str] = []
        self.alarms = alarms if alarms is not None else AlarmCounter()
        if locks is not None:
            if set(locks) != set(splits):
                raise ValueError("locks and splits name different layers")
            for key, lk in locks.items():
                shape = (int(sum(splits[key].parts)), int(splits[key].low_rank.n))
                if not isinstance(lk, GemmLock) or (lk.m, lk.n) != shape:
                    raise ValueError(f"{key}: the lock must be a GemmLock of {shape}")
        self.locks: Optional[Dict[str, GemmLock]] = None if locks is None else dict(locks)

        self._shielded: Dict[str, ShieldedLinear] = {}
        self._public: Dict[str, PublicWeight] = {}
        self.p: Optional[int] = None
        self.masks: Optional[MaskProvider] = None
        if mode == "float":
            if any(s.public is None for s in splits.values()):
                raise ValueError("the float mode needs the unquantized W_D (build from the checkpoint)")
            return
        if quantized is not None:
            if set(quantized) != set(splits):
                raise ValueError("quantized weights and splits name different layers")
            self._quantized = dict(quantized)
        else:
            self._quantized = quantize_splits(splits, weight_bits, self.locks)
        if p is None:
            self.p = select_prime({key: q.w_q for key, q in self._quantized.items()}, act_bits=act_bits)
        else:
            check_prime(int(p), {key: q.w_q for key, q in self._quantized.items()}, act_bits)
            self.p = int(p)
        if mode == "fixed_point":
            return
        quantized = self._quantized
        self._public = {key: PublicWeight(q.w_q, self.p) for key, q in quantized.items()}
        if masks is None:
            masks = PooledMaskProvider(self._public, self.p, pool_rows=pool_rows, recorder=mask_recorder)
        self.masks = masks
        for key, s in splits.items():
            fkey = None
            if freivalds is not None:
                fkey = FreivaldsKey(self._public[key], u=freivalds[key], layer_id=key)
            self._shielded[key] = ShieldedLinear(key, self._public[key], quantized[key].scale, masks,
                                                 key=fkey, alarms=self.alarms, low_rank=s.low_rank, bias=s.bias,
                                                 act_bits=act_bits, out_dtype=torch.float32, lock=self._lock(key))

    # -- construction -------------------------------------------------------------------------

    def _lock(self, key: str) -> Optional[GemmLock]:
        return None if self.locks is None else self.locks[key]

    @staticmethod
    def draw_locks(splits: Dict[str, FusedSplit], lock: Union[str, LockSpec], key: bytes) -> Dict[str, GemmLock]:
        """One lock per fused GEMM of ``splits`` (``core.lock.make_locks``, per-GEMM keys derived
        from ``key``, e.g. 32 bytes of ``os.urandom``); lock: ``none`` | ``perm`` | ``block[:b]``."""
        return draw_locks(splits, lock, key)

    @classmethod
    def from_checkpoint(cls, model_dir: Union[str, Path], policy: RankPolicy, *, seed: int = 0, blind: bool = True,
                        lock: Union[str, LockSpec, None] = None, lock_key: Optional[bytes] = None,
                        **kwargs) -> "ShieldedExecutor":
        """Split an original HF checkpoint (see the module docstring) and build the executor.

        kwargs go to the constructor (num_blocks, block_size, mode, weight_bits, act_bits,
        masks, pool_rows, alarms).  ``seed`` seeds the blinding generator (same seed, same split).
        lock / lock_key: lock every GEMM (``draw_locks``; lock_key None: fresh from the OS CSPRNG).
        """
        config, splits, embed, norms = split_checkpoint(model_dir, policy, seed=seed, blind=blind)
        if lock is not None:
            kwargs["locks"] = cls.draw_locks(splits, lock, lock_key if lock_key is not None else os.urandom(32))
        return cls(config, splits, embed, norms, **kwargs)

    @classmethod
    def from_bundle(cls, secret_dir, **kwargs) -> "ShieldedExecutor":
        """Build from a ``slip protect --protocol shielded`` secret bundle (OUT/secret): its factors,
        scales, biases, norms, embedding, W_q, p and Freivalds keys.  The result is bit-identical
        to ``from_checkpoint`` with the same rank policy and seed (see ``shielded_bundle``).
        secret_dir: the directory, a loaded ``bundle.Bundle`` (not read or hashed again) or a
        ``ShieldedBundle``."""
        b = secret_dir if isinstance(secret_dir, ShieldedBundle) else load_shielded_bundle(secret_dir)
        return cls(b.config, b.splits, b.embed, b.norms, quantized=b.quantized, p=b.p, freivalds=b.freivalds,
                   weight_bits=b.weight_bits, act_bits=b.act_bits, locks=b.locks, **kwargs)

    # -- what the host gets -------------------------------------------------------------------

    def freivalds_vectors(self) -> Dict[str, torch.Tensor]:
        """Layer key -> the secret Freivalds vectors u [t, m] (for the bundle writer; never sent)."""
        return {key: lin.key.u for key, lin in self._shielded.items()}

    def quantized_weights(self) -> Dict[str, QuantizedWeight]:
        """Layer key -> W_q and its per-channel scales (the scales are secret)."""
        if self.mode == "float":
            raise RuntimeError("the float executor has no quantized weights")
        return dict(self._quantized)


    def public_weights(self) -> Dict[str, torch.Tensor]:
        """Layer key -> public int8 W_q [m, n] (the host's weights; p is ``self.p``)."""
        if self.mode != "shielded":
            raise RuntimeError(f"the {self.mode!r} executor has no host and no public weights")
        return {key: pw.w_q for key, pw in self._public.items()}

    def layer_keys(self) -> List[str]:
        """The public GEMMs in step order (``shielded_split.layer_keys``)."""
        return layer_keys(self.num_layers)

    # -- one projection -----------------------------------------------------------------------

    def _linear(self, key: str, x: torch.Tensor) -> StepGen[torch.Tensor]:
        """One projection; in shielded mode it yields (key, x~) once and is sent y~.  The float and
        fixed-point modes return without yielding."""
        if self.mode == "float":
            s = self.splits[key]
            y = x.double() @ s.public.double().t() + low_rank_term(x, s.low_rank).double()
            if s.bias is not None:
                y = y + s.bias.double()[None, :]
            return y.float()
        if self.mode == "fixed_point":
            s, q = self.splits[key], self._quantized[key]
            return shielded_linear_reference(x, q.w_q, q.scale, self.p, act_bits=self.act_bits,
                                             low_rank=s.low_rank, bias=s.bias, out_dtype=torch.float32,
                                             lock=self._lock(key))
        lin = self._shielded[key]
        x_masked, ticket = lin.mask(x)
        try:
            self.host_calls.append(key)
            y_masked = yield key, x_masked
        except BaseException:  # the host failed, or the step was closed / thrown into at this ask
            lin.discard(ticket)
            raise
        return lin.unmask(ticket, y_masked)

    # -- attention ----------------------------------------------------------------------------

    def _attention_plan(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor) -> List["_AttentionGroup"]:
        """The step's sequences in at most two groups (decodes, q_len = 1; the rest), each padded
        to its own longest query and key length; built once per step, used by every layer."""
        q_lens = query_start_loc.diff()
        groups = []
        for member in (q_lens == 1, q_lens > 1):
            seqs = torch.nonzero(member).flatten()
            if seqs.numel():
                groups.append(_AttentionGroup.build(query_start_loc[seqs], q_lens[seqs], seq_lens[seqs],
                                                    block_tables[seqs], self.cache.block_size))
        return groups

    def _attention(self, layer: int, q: torch.Tensor, plan: List["_AttentionGroup"]) -> torch.Tensor:
        """q [N, H, D] -> [N, H*D]: causal attention of each sequence over its cached tokens, one
        batched product and softmax per group (see step 3 of the module docstring)."""
        k_flat, v_flat = self.cache.flat(layer)
        kvh, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        window = self.layers[layer].sliding_window
        out = torch.empty(q.shape[0], self.num_heads * d, dtype=torch.float32)
        for grp in plan:
            s, ql = grp.q_index.shape
            length = grp.slots.shape[1]
            flat = grp.slots.reshape(-1)
            # [S, KVH, L, D], D contiguous (the product takes K transposed without a copy)
            k = k_flat.index_select(0, flat).view(s, length, kvh, d).transpose(1, 2).contiguous()
            v = v_flat.index_select(0, flat).view(s, length, kvh, d).transpose(1, 2).contiguous()
            # query head h = kv_head * g + j (the head order of repeat_interleave over K/V)
            qs = q[grp.q_index].view(s, ql, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(s, kvh, g * ql, d)
            scores = (qs @ k.transpose(-1, -2) * self.scaling).view(s, kvh, g, ql, length)
            scores = scores.masked_fill(grp.blocked(window)[:, None, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).view(s, kvh, g * ql, length)
            o = (probs @ v).view(s, kvh, g, ql, d).permute(0, 3, 1, 2, 4).reshape(s, ql, self.num_heads * d)
            out[grp.q_index[grp.valid]] = o[grp.valid]
        return out

    # -- one step -----------------------------------------------------------------------------

    def _check_batch(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables):
        n = int(input_ids.shape[0])
        if input_ids.dim() != 1 or positions.shape != (n,) or slot_mapping.shape != (n,):
            raise ValueError("input_ids, positions and slot_mapping must be 1-D of the same length")
        s = int(seq_lens.shape[0])
        if query_start_loc.shape != (s + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != s:
            raise ValueError("query_start_loc must be [S+1] and block_tables [S, max_blocks] for S = len(seq_lens)")
        if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != n or bool((query_start_loc.diff() < 0).any()):
            raise ValueError("query_start_loc must rise from 0 to the number of tokens")
        if bool(((input_ids < 0) | (input_ids >= self.vocab)).any()):
            raise ValueError("token id out of range")
        if n and bool(((slot_mapping < 0) | (slot_mapping >= self.cache.num_slots)).any()):
            raise ValueError("slot out of range")
        q_lens = query_start_loc.diff()
        if bool((seq_lens < q_lens).any()) or bool((seq_lens > block_tables.shape[1] * self.cache.block_size).any()):
            raise ValueError("seq_lens must cover the query tokens and fit the block tables")
        # a sequence's query tokens are its last q_len tokens: positions seq_len - q_len, ..., seq_len - 1
        start = torch.repeat_interleave(seq_lens - q_lens - query_start_loc[:-1], q_lens)
        if not torch.equal(positions, start + torch.arange(n)):
            raise ValueError("positions do not match seq_lens and query_start_loc")
        if bool((block_tables < 0).any()) or bool((block_tables >= self.cache.num_blocks).any()):
            raise ValueError("block table entry out of range")
        if s and int(seq_lens.max()) > self.max_model_len:
            raise ValueError(f"seq_len {int(seq_lens.max())} exceeds max_model_len {self.max_model_len}")

    def _prepare(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables):
        """Cast the batch metadata to int64 and check it (once per step), including which KV slots
        it may read (``step_checks.check_kv_reads``); resets ``host_calls``.  Returns the batch and
        the slot records its writes will leave (for ``_begin_writes``)."""
        batch = tuple(t.long() for t in (input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables))
        self._check_batch(*batch)
        marks = check_kv_reads(self.cache, self.kv_tags, *batch)
        self.host_calls = []
        return batch, marks

    def _begin_writes(self, batch, marks):
        """Save what the step's slots hold (for the roll-back) and record the step's writes."""
        saved = self.cache.save(batch[2])
        self.cache.mark_written(batch[2], batch[1], *marks)
        return saved

    def _needs_host(self, host_gemm: Optional[HostGemm]) -> None:
        if host_gemm is None and self.mode == "shielded":
            raise ValueError("the shielded executor needs a host_gemm callback")

    @torch.no_grad()
    def step_gen(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                 logits_indices: Optional[torch.Tensor] = None) -> StepGen[torch.Tensor]:
        """Generator form of ``step``: yields (layer key, x~) per masked GEMM, is sent y~, returns the
        logits.  Nothing runs before the first ``next``; closing it (``close()``) or throwing into
        it at an ask rolls the step's KV writes back before ``close``/``throw`` returns."""
        batch, marks = self._prepare(input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables)
        logits_indices = batch[3][1:] - 1 if logits_indices is None else logits_indices.long()
        saved = self._begin_writes(batch, marks)  # one roll-back for the layers and the LM head
        try:
            hidden = self.final_norm((yield from self._layers(*batch)))
            return (yield from self._linear("lm_head", hidden[logits_indices]))
        except BaseException:
            self.cache.restore(batch[2], saved)
            raise

    @torch.no_grad()
    def forward_layers_gen(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor) -> StepGen[torch.Tensor]:
        """Generator form of ``forward_layers`` (asks as ``step_gen``; returns the final-normed
        hidden rows; closed or failed: KV writes rolled back)."""
        batch, marks = self._prepare(input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables)
        saved = self._begin_writes(batch, marks)
        try:
            h = yield from self._layers(*batch)
        except BaseException:
            self.cache.restore(batch[2], saved)
            raise
        return self.final_norm(h)

    @torch.no_grad()
    def head_gen(self, hidden_rows: torch.Tensor) -> StepGen[torch.Tensor]:
        """Generator form of ``head``: one ask ("lm_head"), returns the logits."""
        return (yield from self._linear("lm_head", hidden_rows))

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
             query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
             host_gemm: Optional[HostGemm] = None, logits_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward step of a flattened mixed prefill/decode batch; float logits [R, vocab].

        logits_indices: the token rows to produce logits for (default: the last token of every
        sequence, ``query_start_loc[1:] - 1``).  Raises ``IntegrityError`` if the host cheated; the
        step is then refused as a whole and the cache left as it was.  (``step_gen`` driven by
        ``host_gemm``.)
        """
        self._needs_host(host_gemm)
        return drive(self.step_gen(input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables,
                                   logits_indices), host_gemm)

    def forward_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                       host_gemm: Optional[HostGemm] = None) -> torch.Tensor:
        """Steps 0-6 of the module docstring for every token row: the final-normed hidden states
        [N, d] (secret; they stay in the service).  ``head`` turns chosen rows into logits; vLLM
        asks for its rows only after the forward (sampling rows, prompt-logprob rows), which is
        why the two are separate calls.  On any failure the KV writes are rolled back."""
        self._needs_host(host_gemm)
        return drive(self.forward_layers_gen(input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                                             block_tables), host_gemm)

    def head(self, hidden_rows: torch.Tensor, host_gemm: Optional[HostGemm] = None) -> torch.Tensor:
        """The masked LM head on final-normed hidden rows [R, d]: float logits [R, vocab]."""
        self._needs_host(host_gemm)
        return drive(self.head_gen(hidden_rows), host_gemm)

    def _layers(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables) -> StepGen[torch.Tensor]:
        n = int(input_ids.shape[0])
        h = self.embed[input_ids]                                     # [N, d] float32
        cos, sin = self.rotary(h, positions[None, :])
        cos, sin = cos[0], sin[0]                                     # [N, D]
        plan = self._attention_plan(query_start_loc, seq_lens, block_tables)
        qd = self.num_heads * self.head_dim
        kd = self.num_kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            # 1-2: qkv, q/k norms, RoPE, cache write
            qkv = yield from self._linear(f"layers.{i}.qkv", layer.input_norm(h))
            q = qkv[:, :qd].reshape(n, self.num_heads, self.head_dim)
            k = qkv[:, qd:qd + kd].reshape(n, self.num_kv_heads, self.head_dim)
            v = qkv[:, qd + kd:].reshape(n, self.num_kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            q, k = self.apply_rotary(q, k, cos, sin, unsqueeze_dim=1)
            k_flat, v_flat = self.cache.flat(i)
            k_flat[slot_mapping] = k
            v_flat[slot_mapping] = v
            # 3-4: attention, o, residual
            attn = self._attention(i, q, plan)
            h = h + (yield from self._linear(f"layers.{i}.o", attn))
            # 5-6: MLP
            gu = yield from self._linear(f"layers.{i}.gate_up", layer.post_norm(h))
            inter = gu.shape[1] // 2
            a = self.act(gu[:, :inter]) * gu[:, inter:]
            h = h + (yield from self._linear(f"layers.{i}.down", a))
        return h

    def close(self) -> None:
        """Stop the mask provider's background thread (if any) and overwrite its pool."""
        if self.masks is not None:
            self.masks.close()


@dataclass
class _AttentionGroup:
    """Sequences of one step attended together: S sequences padded to Q query and L key rows.

    q_index [S, Q]: the token row of query i of sequence s (0 for padding); valid [S, Q]: real
    query rows; slots [S, L]: the cache slot of key j (through the block table; padding keys point
    at whatever slot the table gives, always in range, and are masked); q_pos [S, Q]: the position
    of each query; ``blocked(window)`` [S, Q, L]: True where key j is hidden from query i (after
    it, outside the window, or padding).  A padding query row sees key 0 only, so its softmax is
    finite; it is dropped.
    """

    q_index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor
    q_pos: torch.Tensor
    _blocked: Dict[Optional[int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, q_start, q_lens, seq_lens, block_tables, block_size: int) -> "_AttentionGroup":
        ql, length = int(q_lens.max()), int(seq_lens.max())
        i, j = torch.arange(ql), torch.arange(length)
        valid = i[None, :] < q_lens[:, None]
        q_index = torch.where(valid, q_start[:, None] + i[None, :], torch.zeros((), dtype=torch.long))
        slots = block_tables[:, j // block_size] * block_size + j % block_size
        q_pos = (seq_lens - q_lens)[:, None] + i[None, :]
        return cls(q_index=q_index, valid=valid, slots=slots, q_pos=q_pos)

    def blocked(self, window: Optional[int]) -> torch.Tensor:
        if window not in self._blocked:
            j = torch.arange(self.slots.shape[1])[None, None, :]
            pos = self.q_pos[:, :, None]
            allowed = j <= pos  # for a real query, pos < seq_len: padding keys are hidden too
            if window is not None:
                allowed &= j > pos - window
            allowed = torch.where(self.valid[:, :, None], allowed, j == 0)
            self._blocked[window] = ~allowed
        return self._blocked[window]
