"""UNTRUSTED side: the vLLM model that serves a ``shielded`` artifact.

What this module owns
---------------------
``SlipShieldedForCausalLM``, the architecture named by the config.json of a shielded OUT/public
(``slip protect --protocol shielded``) and registered by the plugin.  vLLM schedules, batches,
pages and samples exactly as for any decoder; the model itself only does what the host may do in
SLIP-SEC: the masked public GEMMs y~ = W_q x~ mod p of every projection (qkv, o, gate_up, down, LM
head), for the whole mixed prefill/decode batch of a step, one service round trip per GEMM.  The
embedding, norms, RoPE, attention, activations, secret low-rank terms and the KV cache contents live
in the secure service's executor.

Protocol of one engine step (the host side of ``secure_service.shielded_api``)
-----------------------------------------------------------------------------
1. ``forward``: read vLLM's attention metadata of this step (slot mapping, block table, query start
   locations, sequence lengths) from the forward context of the one attention layer this model
   declares; send it with the token ids and positions as a deferred step frame (``ShieldedHost.begin``);
2. answer every MSG_ASK of the service with W_q[key] x~ mod p (``field.field_matmul``) until MSG_READY;
3. return "row handles" instead of hidden states: a float64 [N, 2] tensor (token row, step tag).
   The service keeps the real final hidden states (secret); vLLM's runner only indexes rows of what
   forward returned, so the handles tell ``compute_logits`` which rows it was given;
4. ``compute_logits(handles)``: ask the service for those rows' logits (MSG_ROWS -> one masked LM-head
   GEMM -> MSG_LOGITS).  The runner calls it for the sampling rows and again for prompt-logprob rows.

Why one vLLM ``Attention`` layer that never runs: it makes vLLM's KV-cache manager allocate, share
(prefix caching), preempt and free blocks, and build the per-step metadata, exactly as for a real
model; the service mirrors that block geometry in its own cache (same block size, at least as many
blocks: the plugin pins ``block_size`` and ``num_gpu_blocks_override`` from the SLIP_SHIELDED_*
settings, and the loader checks the service agrees).  Its own host-side cache is 1 KV head of
width 32 per slot and is never written.

Failures: the forward never raises (an exception kills vLLM's engine).  A refused or failed step,
or a ``compute_logits`` call inside a step whose row handles are not the live step's, is recorded
for the running engine step (``host.failure``): the step's output carries the failure, its
requests end with an error, vLLM drops its prefix cache and preempts every running request; the
logits returned meanwhile are zeros that are never served.  Nothing is retried: a retried step
frame would start the step over.  After any failure the host claims the service afresh on the next
step (KV epoch 0: the service empties its KV mirror), which matches vLLM's reset; a service that
restarted, or that another engine took over, answers a stale view with 410 and is claimed the same
way, so no step ever reads KV that the service does not hold for this engine.

Dummy runs: vLLM's profiling and warm-up forwards have no attention metadata; they get tag 0
handles and zero logits without contacting the service.

On a GPU host (vLLM's device is CUDA): ``bind`` moves the host driver's public weights to that
device, where every masked GEMM runs the Triton field kernel (``ShieldedHost.use_device``, which
checks it against big integers first).  vLLM keeps the step metadata on the device; ``_begin``
slices it there and the step frame takes it across in one download (``wire.encode_shielded_step``);
the block table's width comes from the metadata's ``max_seq_len`` (a host-side int), so no device
value is read for it.  ``compute_logits`` reads the row handles in one download and uploads the
logits once.  On the CPU every step does what it did before.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

import torch
from torch import nn

from slip_vllm.core.manifest import SHIELDED_ARCHITECTURE
from slip_vllm.host.failure import in_step, record_failure

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it

ARCHITECTURE = SHIELDED_ARCHITECTURE
ANCHOR_HEAD_SIZE = 32  # smallest head size the CPU attention backend accepts
_DUMMY_TAG, _FAILED_TAG = 0.0, -1.0


class SlipShieldedForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        from slip_vllm.host.plugin import SHIELDED_TP_REFUSAL

        tp = int(vllm_config.parallel_config.tensor_parallel_size)
        if tp > 1:  # also refused with the engine arguments; this catches a config built another way
            raise ValueError(SHIELDED_TP_REFUSAL.format(tp=tp))
        config = vllm_config.model_config.hf_config
        self.vocab_size = int(config.vocab_size)
        self.cache_block_size = int(vllm_config.cache_config.block_size)
        self.cache_blocks = vllm_config.cache_config.num_gpu_blocks_override
        device_config = getattr(vllm_config, "device_config", None)
        self.device = torch.device(getattr(device_config, "device", None) or "cpu")  # where vLLM runs the model
        # vLLM wants one layer index in an attention layer's name
        self.anchor_name = (prefix + "." if prefix else "") + "slip_kv_anchor.0.attn"
        self.slip_kv_anchor = nn.ModuleList([nn.Module()])
        self.slip_kv_anchor[0].attn = Attention(num_heads=1, head_size=ANCHOR_HEAD_SIZE, scale=1.0, num_kv_heads=1,
                                             cache_config=vllm_config.cache_config, prefix=self.anchor_name)
        self.host = None          # ShieldedHost, bound by the slip loader
        self._tag = 0.0
        self._live_tag = _DUMMY_TAG

    # -- set-up by the loader ------------------------------------------------------------------

    def bind(self, host) -> None:
        if self.device.type != "cpu":
            host.use_device(self.device)  # public weights and the field GEMM on vLLM's device
        self.host = host

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # vLLM's interface asks for it; the embedding table is secret and lives in the service.
        raise NotImplementedError("the token embedding of a shielded SLIP model is held by the secure service")

    def load_weights(self, weights: Iterable) -> set:
        raise RuntimeError("a shielded SLIP artifact is loaded by the slip loader: serve it with "
                           "`--load-format slip`")

    # -- the step ------------------------------------------------------------------------------

    def _metadata(self):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            return None
        if isinstance(metadata, list):  # micro-batching hands a list; SLIP runs one batch per step
            raise RuntimeError("SLIP shielded serving does not support micro-batching")
        return metadata[self.anchor_name]

    def _begin(self, input_ids, positions, md) -> None:
        n = int(md.num_actual_tokens)
        s = int(md.seq_lens.shape[0])
        longest = getattr(md, "max_seq_len", None)
        if md.seq_lens.device.type == "cpu" or not isinstance(longest, int):
            longest = int(md.seq_lens.max())  # on a device: one read (the metadata carries no host-side int)
        max_blocks = -(-longest // self.cache_block_size)
        args = (input_ids[:n], positions[:n], md.slot_mapping[:n], md.query_start_loc[: s + 1], md.seq_lens[:s],
                md.block_table[:s, :max_blocks])
        self.host.begin(*args)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None:
            raise NotImplementedError("SLIP shielded serving takes token ids, not input embeddings")
        n = int(input_ids.shape[0])
        md = self._metadata()
        if md is None:
            self._live_tag = _DUMMY_TAG
            if in_step():
                record_failure("a shielded engine step without attention metadata")
        else:
            if self.host is None:
                raise RuntimeError("the shielded model was not bound to the secure service: serve the "
                                   "artifact with `--load-format slip`")
            self._tag += 1.0
            try:
                self._begin(input_ids, positions, md)
                self._live_tag = self._tag
            except Exception as exc:  # never raise inside vLLM's forward: fail the step's requests
                record_failure(f"shielded step: {exc}")
                self._live_tag = _FAILED_TAG
        rows = torch.arange(n, dtype=torch.float64, device=input_ids.device)
        return torch.stack([rows, torch.full_like(rows, self._live_tag)], dim=1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r = int(hidden_states.shape[0])
        zeros = torch.zeros(r, self.vocab_size, dtype=torch.float32, device=hidden_states.device)
        tag = self._live_tag
        handles = hidden_states.detach().to("cpu") if tag > 0 else None  # one download of the handles
        ours = (r > 0 and tag > 0 and handles.shape[-1] == 2 and bool((handles[:, 1] == tag).all()))
        if not ours:
            if in_step() and tag != _FAILED_TAG:
                # inside a real step, logits asked for rows that are not the live step's handles:
                # the secret logits cannot be computed, so the step must not be served
                record_failure(f"shielded logits asked for {r} row(s) that are not handles of the live step")
            return zeros  # outside a step: vLLM's dummy sampler run on random rows
        try:
            return self.host.logits(handles[:, 0].long()).to(hidden_states.device)
        except Exception as exc:
            record_failure(f"shielded logits: {exc}")
            self._live_tag = _FAILED_TAG
            return zeros
