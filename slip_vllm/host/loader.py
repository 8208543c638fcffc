"""The ``slip`` load format: loads the public residual and binds every protected layer to its
secret counterpart in the secure service.

Steps (``vllm serve OUT/public --load-format slip``), protocol ``split``:
  1. read and verify the public manifest (its hash must match config.json's quantization_config);
  2. contact the secure service (``SLIP_SERVICE_URL`` or ``--model-loader-extra-config
     '{"service_url": ...}'``) and check it holds the bundle paired with this manifest; for an
     ``shm://`` address attach this worker's shared-memory channel now; fail start-up with
     instructions otherwise;
  3. let vLLM load the public safetensors as usual, while recording which checkpoint tensor each
     layer's weight loader received (matched by tensor address) and with which shard id: this is
     how fused QKV / gate_up rows map to manifest tensors, for any architecture, without per-model
     name tables;
     Before each real load the same (original) loader runs on index-encoding tensors into a
     float32 scratch copy of the parameter (``probe_load``), which shows which checkpoint rows
     and columns this rank holds (``core.sharding``): under tensor parallelism each layer then
     asks the service for exactly its block (its output rows, or its input columns' partial sum);
  4. validate strictly: every protected tensor must land in a SLIP layer with the manifest's shape,
     every fused layer must be covered entirely by whole rows from offset 0, and then each layer's
     plan is marked ready.
Protocol ``shielded`` (the model is ``host.shielded_model.SlipShieldedForCausalLM``): steps 1-2, the
service must also agree on the KV-cache geometry and the prime; then the public int8 weights are
read and checked against the manifest's hashes (``bind_shielded``); vLLM's own weight loading is
not used.
"""

from __future__ import annotations

import copy
import logging
import time

import httpx
import torch
from vllm.model_executor.model_loader import DefaultModelLoader

from slip_vllm.core import sharding
from slip_vllm.core.channel import parse_service_url
from slip_vllm.core.manifest import ManifestError, read_public_manifest
from slip_vllm.host import client as client_mod
from slip_vllm.host import ops
from slip_vllm.settings import settings

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
EXTRA_KEYS = {"service_url"}
SHARD_ORDER = {"q": 0, "k": 1, "v": 2}


class SlipLoadError(RuntimeError):
    pass


def install_failure_path() -> None:
    """Install the worker's step-failure hook and check that the classes this vLLM really runs
    carry both ends of the failure path (``host.failure``); refuse to start otherwise."""
    from vllm.config import get_current_vllm_config
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from slip_vllm.host.failure import hooks_active, install_scheduler_hook, install_worker_hook

    vllm_config = get_current_vllm_config()
    if vllm_config.scheduler_config.async_scheduling:
        raise SlipLoadError("SLIP artifacts need synchronous scheduling (a failed step must be known before the "
                            "next is scheduled): drop --async-scheduling")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise SlipLoadError("SLIP serving does not support pipeline parallelism (--pipeline-parallel-size > 1)")
    install_worker_hook()
    install_scheduler_hook()
    worker_cls = vllm_config.parallel_config.worker_cls
    if isinstance(worker_cls, str):
        worker_cls = resolve_obj_by_qualname(worker_cls)
    missing = [name for name, on in hooks_active(vllm_config.scheduler_config.get_scheduler_cls(), worker_cls).items()
               if not on]
    if missing:
        raise SlipLoadError(f"this vLLM bypasses SLIP's step-failure hooks ({', '.join(missing)}); refusing to serve "
                            f"a SLIP artifact without them")


def check_service(url: str, manifest_sha256: str, wait_s: float, protocol: str = "split") -> dict:
    """Wait for the service and check it holds the bundle paired with this artifact."""
    try:
        address = parse_service_url(url)
    except ValueError as exc:
        raise SlipLoadError(f"{exc}. Set SLIP_SERVICE_URL (or the loader's service_url) to http://HOST:PORT, "
                            f"or shm://HOST:PORT for a service on this machine") from None
    deadline = time.monotonic() + wait_s
    last = None
    while True:
        try:
            with httpx.Client(base_url=address.control_url, timeout=5.0) as http:
                info = http.get("/v1/info").json()
            break
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
            if time.monotonic() >= deadline:
                raise SlipLoadError(
                    f"the SLIP secure service at {address.control_url} is not reachable ({last}). Start it first with "
                    f"`slip secure-service --bundle OUT_DIR/secret`, or point vLLM at it with "
                    f"SLIP_SERVICE_URL=... or --model-loader-extra-config '{{\"service_url\": \"...\"}}'."
                ) from None
            time.sleep(0.5)
    if info.get("public_manifest_sha256") != manifest_sha256:
        raise SlipLoadError(
            f"the secure service at {url} holds a bundle for another artifact (manifest "
            f"{str(info.get('public_manifest_sha256'))[:16]}..., this model needs {manifest_sha256[:16]}...). "
            f"Start the service with the OUT_DIR/secret written by the same `slip protect` run."
        )
    if info.get("protocol") != protocol:
        raise SlipLoadError(f"the service runs protocol {info.get('protocol')!r}; this artifact needs {protocol!r}")
    _check_step_size(info)
    if address.colocated and "shm" not in info.get("data_planes", []):
        raise SlipLoadError(f"the secure service at {address.control_url} offers no shared-memory channel "
                            f"(started with SLIP_CHANNEL=0?); use SLIP_SERVICE_URL={address.control_url}")
    return info


def _check_step_size(info: dict) -> None:
    """The service sizes its bodies and channels for steps of at most ``max_step_tokens`` tokens."""
    cap = info.get("max_step_tokens")
    if cap is None:
        return
    from vllm.config import get_current_vllm_config

    tokens = int(get_current_vllm_config().scheduler_config.max_num_batched_tokens)
    if tokens > int(cap):
        raise SlipLoadError(f"vLLM may schedule {tokens} tokens per step (--max-num-batched-tokens) but the secure "
                            f"service takes at most {cap} (SLIP_MAX_STEP_TOKENS): raise the service's limit or "
                            f"lower vLLM's")


def bind_shielded(model, public_dir, url: str, manifest_sha256: str) -> None:
    """Shielded artifacts: check the service (bundle, protocol, KV geometry) and give the model its
    public int8 weights (validated against the manifest) and a host driver."""
    from slip_vllm.host.shielded_client import ShieldedHost, load_public_weights

    cfg = settings()
    info = check_service(url, manifest_sha256, cfg.startup_wait_s, protocol="shielded")
    if info.get("max_model_len") is not None:
        from vllm.config import get_current_vllm_config

        vllm_len = int(get_current_vllm_config().model_config.max_model_len)
        if vllm_len > int(info["max_model_len"]):
            raise SlipLoadError(f"vLLM may hold sequences of {vllm_len} tokens (--max-model-len) but the shielded "
                                f"secure service refuses steps beyond {info['max_model_len']}: lower --max-model-len "
                                f"or raise SLIP_SHIELDED_MAX_MODEL_LEN on the service")
    if info.get("engine_attached"):
        raise SlipLoadError(f"another vLLM engine holds the shielded secure service at {url} (its KV cache mirrors "
                            f"one engine): start one secure service per engine, or stop the other engine (the "
                            f"service frees itself after {info.get('owner_lease_s')} s without steps)")
    if int(info.get("block_size", -1)) != model.cache_block_size:
        raise SlipLoadError(f"the secure service pages its KV cache in blocks of {info.get('block_size')} tokens, "
                            f"vLLM in blocks of {model.cache_block_size}: set the same SLIP_SHIELDED_BLOCK_SIZE "
                            f"for both")
    if model.cache_blocks is None or int(info.get("kv_blocks", -1)) < int(model.cache_blocks):
        raise SlipLoadError(f"the secure service holds {info.get('kv_blocks')} KV blocks but vLLM may use "
                            f"{model.cache_blocks}: set the same SLIP_SHIELDED_KV_BLOCKS for both")
    try:
        public = load_public_weights(public_dir)
    except ManifestError as exc:
        raise SlipLoadError(str(exc)) from None
    if public.p != int(info.get("p", -1)):
        raise SlipLoadError(f"the service's prime {info.get('p')} is not the artifact's {public.p}")
    host = ShieldedHost(public, url, token=cfg.service_token, timeout=cfg.service_timeout_s,
                        timeout_per_row_s=cfg.service_timeout_per_row_ms * 1e-3, spin_s=cfg.channel_spin_us * 1e-6)
    connect(host.transport, url)
    model.bind(host)


def connect(transport, url: str) -> None:
    """Attach the worker's channel at load time (a no-op over HTTP)."""
    from slip_vllm.host.transport import ServiceRefused, TransportError

    try:
        transport.connect()
    except (ServiceRefused, TransportError) as exc:
        raise SlipLoadError(f"cannot attach the shared-memory channel of the secure service at {url}: {exc}. "
                            f"Check SLIP_SERVICE_TOKEN, and that the service runs on this machine (otherwise use "
                            f"an http:// address)") from None


def _row_order(shard_id) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        if shard_id not in SHARD_ORDER:
            raise SlipLoadError(f"unexpected shard id {shard_id!r}")
        return SHARD_ORDER[shard_id]
    if isinstance(shard_id, int):
        return shard_id
    raise SlipLoadError(f"unsupported shard id {shard_id!r} (tuple shard ids are not supported)")


def probe_load(original, param, loaded_weight, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run vLLM's own loader for ``param`` on the row and the column index probes of
    ``loaded_weight``'s shape, into a zeroed float32 scratch parameter, and read back which
    checkpoint rows and columns land where on this rank (``core.sharding.read_probe``).  The
    scratch lives only for the call (one layer's local block at a time); ``param`` is untouched."""
    if loaded_weight.dim() != 2:
        raise SlipLoadError(f"a protected weight must be a matrix, got shape {tuple(loaded_weight.shape)}")
    while hasattr(original, "slip_original"):  # a tied LM head shares (and re-wraps) the embedding's param
        original = original.slip_original
    saved = param.data
    filled = []
    try:
        for dim in (0, 1):
            probe = sharding.index_probe(tuple(loaded_weight.shape), dim)
            for attempt in (probe, probe.contiguous()):  # a loader that wants real strides gets them
                param.data = torch.zeros(saved.shape, dtype=torch.float32, device=saved.device)
                try:
                    original(param, attempt, *args, **kwargs)
                    break
                except Exception as exc:  # noqa: BLE001 - retried once, then reported
                    error = exc
            else:
                raise SlipLoadError(f"vLLM's weight loader refused the index probe: {error}")
            filled.append(param.data.to("cpu"))
    finally:
        param.data = saved
    try:
        return sharding.read_probe(*filled)
    except sharding.ShardingError as exc:
        raise SlipLoadError(str(exc)) from None


def finalize_plans(model, manifest) -> int:
    """Turn the recorded (shard id, checkpoint name, probe maps) loads into tensor-id plans (with
    per-rank ranges under tensor parallelism); returns how many layers are protected."""
    by_name = manifest.by_name()
    shapes = {e.id: tuple(int(v) for v in e.shape) for e in manifest.tensors}
    bound: dict[str, str] = {}
    protected_layers = 0
    slip_modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "slip_plan")]
    seen: set[int] = set()
    for name, module in slip_modules:
        if id(module) in seen:
            continue  # GPT-2 uses one module as embedding and LM head
        seen.add(id(module))
        plan: ops.LayerPlan = module.slip_plan
        tied = getattr(module, "slip_tied_module", None)
        source = tied.slip_plan if tied is not None else plan
        orders = [_row_order(s) for s, _, _ in source.loaded]
        if len(set(orders)) != len(orders):
            raise SlipLoadError(f"layer {name} received the same shard twice: {[n for _, n, _ in source.loaded]}")
        segments, in_width, rows_held = [], 0, 0
        for shard_id, ckpt_name, (row_map, col_map) in source.loaded:
            entry = by_name[ckpt_name]
            bound[ckpt_name] = name
            try:
                segments += sharding.segments_for_load(entry.id, row_map, col_map)
            except sharding.ShardingError as exc:
                raise SlipLoadError(f"layer {name}: {exc}") from None
            in_width, rows_held = len(col_map), len(row_map)
        ids, ranges, covered = (), None, 0
        if segments:
            vocab = plan.kind == "embedding" or getattr(module, "slip_logits_plan", None) is not None
            out_width = rows_held if plan.kind == "embedding" else plan.local_width
            try:
                ids, ranges, covered = sharding.layer_segments(segments, out_width, in_width, shapes,
                                                               padding_ok=vocab)
            except sharding.ShardingError as exc:
                raise SlipLoadError(f"layer {name}: {exc}") from None
            if vocab and len(ids) != 1:
                raise SlipLoadError(f"layer {name}: a vocab shard must be one run of embedding rows")
        plan.tensor_ids, plan.ranges = ids, ranges
        plan.secret_width = covered
        if plan.kind == "embedding" and segments:
            plan.secret_width = in_width
        plan.ready = True
        logits_plan = getattr(module, "slip_logits_plan", None)
        if logits_plan is not None:
            logits_plan.tensor_ids, logits_plan.ranges = ids, ranges
            logits_plan.secret_width = covered
            logits_plan.ready = True
        protected_layers += bool(segments)
    missing = [t.name for t in manifest.tensors if t.name not in bound]
    if missing:
        # vLLM drops some checkpoint tensors it does not use (e.g. BERT's pooler for embeddings);
        # those cannot affect outputs. A protected tensor loaded anywhere SLIP cannot serve has
        # already failed the load in the weight-loader wrapper.
        log.warning("protected tensors not used by this vLLM model: %s", ", ".join(missing))
    return protected_layers


class SlipModelLoader(DefaultModelLoader):
    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        ours = {k: extra.pop(k) for k in list(extra) if k in EXTRA_KEYS}
        inner = copy.copy(load_config)
        inner.model_loader_extra_config = extra
        inner.load_format = "safetensors"
        super().__init__(inner)
        self.service_url = ours.get("service_url") or settings().service_url
        self._name_by_address: dict[int, str] = {}

    def get_all_weights(self, model_config, model):
        # Some models consume this iterator lazily, others first turn it into a list (BERT), so
        # the tensor a weight loader receives is matched to its checkpoint name by address: views
        # and transposes that loaders make keep the address of the tensor's first element.
        for name, tensor in super().get_all_weights(model_config, model):
            if tensor.numel():
                self._name_by_address[tensor.data_ptr()] = name
            yield name, tensor

    @staticmethod
    def _adopt_unconfigured_layers(model) -> None:
        """Some vLLM models build a layer without passing the quantization config (BERT's
        embeddings); such layers get a SLIP method too, so their protected weights are served."""
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod, VocabParallelEmbedding,
        )

        from slip_vllm.host.quant import SlipEmbeddingMethod, SlipLinearMethod

        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if isinstance(module, LinearBase) and type(method) is UnquantizedLinearMethod:
                SlipLinearMethod.adopt(module, name)
            elif isinstance(module, VocabParallelEmbedding) and type(method) is UnquantizedEmbeddingMethod:
                SlipEmbeddingMethod.adopt(module, name)

    def _wrap_loaders(self, model, manifest) -> None:
        by_name = manifest.by_name()
        loader = self

        def recording(module_name, param_name, original, plan):
            def weight_loader(param, loaded_weight, *args, **kwargs):
                name = loader._name_by_address.get(loaded_weight.data_ptr()) if loaded_weight.numel() else None
                if name is None and plan is not None and param_name == "weight":
                    # A copy made by the model's loader hides which checkpoint tensor this is; refusing
                    # beats silently serving a layer without its secret part.
                    raise SlipLoadError(f"cannot tell which checkpoint tensor is loaded into {module_name}.weight "
                                        f"(the model's loader copied it); this architecture is not supported")
                if name in by_name:
                    if plan is None or param_name != "weight":
                        raise SlipLoadError(
                            f"protected tensor {name} is loaded into {module_name}.{param_name}, which "
                            f"SLIP cannot serve (not a linear or vocab-embedding weight)")
                    entry = by_name[name]
                    got = tuple(loaded_weight.shape)
                    want = entry.shape if entry.orientation == "out_in" else entry.shape[::-1]
                    if got not in (tuple(want), tuple(want[::-1])):
                        raise SlipLoadError(f"{name}: public tensor has shape {got}, manifest says {want}")
                    if got != tuple(entry.shape):
                        raise SlipLoadError(f"{name} reaches vLLM's loader as {got}, not as [out, in] = "
                                            f"{tuple(entry.shape)}; this architecture is not supported")
                    shard = args[0] if args else kwargs.get("loaded_shard_id", kwargs.get("shard_id"))
                    plan.loaded.append((shard, name, probe_load(original, param, loaded_weight, args, kwargs)))
                return original(param, loaded_weight, *args, **kwargs)

            weight_loader.slip_original = original
            return weight_loader

        for module_name, module in model.named_modules():
            plan = getattr(module, "slip_plan", None)
            for param_name, param in module.named_parameters(recurse=False):
                original = getattr(param, "weight_loader", None)
                if original is None:
                    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

                    original = default_weight_loader
                param.weight_loader = recording(module_name, param_name, original, plan)

    def load_weights(self, model, model_config) -> None:
        try:
            manifest, digest = read_public_manifest(model_config.model)
        except ManifestError as exc:
            raise SlipLoadError(str(exc)) from None
        cfg = settings()
        install_failure_path()
        if manifest.protocol == "shielded":
            bind_shielded(model, model_config.model, self.service_url, digest)
            log.info("SLIP shielded: %d masked GEMMs per step bound to the secure service at %s (manifest %s); "
                     "field GEMM backend %s (%s)", len(model.host.layer_keys), self.service_url, digest[:16],
                     model.host.backend, model.host.backend_reason)
            return
        check_service(self.service_url, digest, cfg.startup_wait_s)
        client_mod.configure(client_mod.ClientConfig(
            url=self.service_url, manifest_sha256=digest, token=cfg.service_token, timeout_s=cfg.service_timeout_s,
            timeout_per_row_s=cfg.service_timeout_per_row_ms * 1e-3,
            retries=cfg.service_retries, backoff_s=cfg.service_retry_backoff_s, spin_s=cfg.channel_spin_us * 1e-6))
        connect(client_mod.get_client().transport, self.service_url)
        self._adopt_unconfigured_layers(model)
        self._wrap_loaders(model, manifest)
        super().load_weights(model, model_config)
        self._name_by_address.clear()
        layers = finalize_plans(model, manifest)
        log.info("SLIP: %d protected layers bound to the secure service at %s (manifest %s)",
                 layers, self.service_url, digest[:16])

