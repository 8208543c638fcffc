"""Service identity and the one-engine rule of a shielded service, end to end without vLLM: a real
service process, two host drivers (two "engines") over HTTP, a restart on the same port.

The service's KV cache mirrors ONE engine's paged cache.  Every step frame names the service
instance and KV epoch of the host's view (epoch 0 claims the service), every reply carries the
service's; a stale view is refused before it touches anything (docs/SECURITY.md)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from helpers import secure_service
from slip_vllm.host.shielded_client import ShieldedHost, ShieldedServiceError
from slip_vllm.protect.artifact import ProtectConfig, protect
from slip_vllm.protect.tiny_models import make_tiny_model

BS, BLOCKS, LEASE_S = 16, 8, 2.0
ENV = {"SLIP_SHIELDED_KV_BLOCKS": str(BLOCKS), "SLIP_SHIELDED_BLOCK_SIZE": str(BS), "SLIP_MASK_POOL_ROWS": "8",
       "SLIP_SHIELDED_OWNER_LEASE_S": str(LEASE_S)}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from slip_vllm.core.decompose import RankPolicy

    root = tmp_path_factory.mktemp("identity")
    model = make_tiny_model("llama", root / "llama", hidden=64, layers=1, heads=2, kv_heads=1, seed=4)
    protect(model, root / "out", ProtectConfig(protocol="shielded", default_rank=RankPolicy(absolute=4), seed=4),
            progress=False)
    return root / "out"


def prefill(host, n=5, block=0):
    slots = block * BS + torch.arange(n)
    return host.step(torch.arange(n) + 3, torch.arange(n), slots, torch.tensor([0, n]), torch.tensor([n]),
                     torch.tensor([[block]]))


def decode(host, n=5, block=0):
    return host.step(torch.tensor([7]), torch.tensor([n]), torch.tensor([block * BS + n]), torch.tensor([0, 1]),
                     torch.tensor([n + 1]), torch.tensor([[block]]))


def test_one_engine_holds_the_service_and_stale_views_are_refused(artifact, log_dir):
    service = secure_service(artifact / "secret", log_dir, name="shielded-identity", **ENV).start().wait_ready(60)
    a = ShieldedHost(artifact / "public", service.url)
    b = ShieldedHost(artifact / "public", service.url)
    try:
        info = httpx.get(service.url + "/v1/info").json()
        assert (info["kv_epoch"], info["engine_attached"]) == (0, False)
        logits_a = prefill(a)
        assert (a.instance, a.epoch) == (info["instance"], 1)  # A's first step claimed the service
        assert httpx.get(service.url + "/v1/info").json()["engine_attached"] is True

        with pytest.raises(ShieldedServiceError) as err:  # a second engine while A's lease runs
            prefill(b)
        assert err.value.status == 409 and "another engine holds" in err.value.message
        assert decode(a).shape[0] == 1  # A reads its own KV: unaffected

        time.sleep(LEASE_S + 0.3)  # A silent for a lease: B may take the service, which empties the KV
        assert torch.equal(prefill(b), logits_a)
        assert b.epoch == 2
        with pytest.raises(ShieldedServiceError) as err:  # A's view is of epoch 1
            decode(a)
        assert err.value.status == 410 and "stale KV view" in err.value.message
        assert (a.instance, a.epoch) == (0, 0)  # A forgot its view: its next step is a claim
        with pytest.raises(ShieldedServiceError) as err:
            prefill(a)
        assert err.value.status == 409

        old_instance = b.instance
        service.stop()
        service.start().wait_ready(60)  # a restarted service: new instance, empty KV
        with pytest.raises(ShieldedServiceError) as err:
            decode(b)
        assert err.value.status == 410
        assert torch.equal(prefill(b), logits_a)  # claimed again, exact
        assert b.instance not in (0, old_instance) and b.epoch == 1
        assert decode(b).shape[0] == 1
        stats = httpx.get(service.url + "/v1/stats").json()["shielded"]
        assert stats["claims"] == 1 and stats["steps_completed"] == 2
    finally:
        a.close()
        b.close()
        service.stop()
