"""The trusted service runs without vLLM (the `service` image and the `service` extra carry no vLLM).

A subprocess puts an import blocker first on ``sys.meta_path`` that refuses ``vllm`` and the
plugin's host package ``slip_vllm.host`` (anything that tries to import them raises ImportError),
then runs ``slip secure-service`` through the CLI's own ``main``.  The service must come up on a
split and on a shielded bundle, answer ``/healthz`` and ``/v1/info``, and a real split data-plane
call; every blocked import the process attempts is printed (none may be), and the blocker
proves itself first by refusing ``import vllm`` (installed in the test environment).
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import torch

from helpers import free_port
from slip_vllm.core import wire

BLOCKED_RUNNER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("vllm", "slip_vllm.host")
    armed = False

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                if armed:
                    print("BLOCKED-IMPORT:", name, flush=True)  # printed even if the error is caught
                raise ImportError(f"{name} is blocked: the secure service must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import vllm  # the blocker must refuse it (vllm is installed in this environment)
    except ImportError as exc:
        assert "is blocked" in str(exc), exc
        print("BLOCKER-ACTIVE", flush=True)
    else:
        sys.exit("the import blocker let vllm through")
    armed = True
    from slip_vllm.cli import main
    main(["secure-service", "--bundle", sys.argv[1], "--port", sys.argv[2]])
""")


@pytest.fixture(scope="module")
def shielded_artifact(tmp_path_factory):
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect
    from slip_vllm.protect.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("novllm-shielded")
    model = make_tiny_model("llama", root / "original", hidden=64, layers=1, heads=2, kv_heads=1)
    protect(model, root / "out", ProtectConfig(protocol="shielded", default_rank=RankPolicy(absolute=4), seed=7),
            progress=False)
    return root / "out"


@pytest.mark.parametrize("protocol", ["split", "shielded"])
def test_service_starts_with_vllm_unimportable(protocol, model_factory, shielded_artifact, tmp_path):
    out = model_factory("llama")[1] if protocol == "split" else shielded_artifact
    port = free_port()
    log = tmp_path / "service.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", BLOCKED_RUNNER, str(out / "secret"), str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, SLIP_SERVICE_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        info = httpx.get(url + "/v1/info").json()
        assert info["protocol"] == protocol
        if protocol == "split":  # one real data-plane call: the first linear tensor of the manifest
            manifest = json.loads((out / "public" / "slip_manifest.json").read_text())
            entry = next(t for t in manifest["tensors"] if t["kind"] == "linear")
            x = torch.randn(3, entry["shape"][1])
            r = httpx.post(url + "/v1/split/apply", content=wire.encode_request(wire.KIND_LINEAR, (entry["id"],), x, 1, 1))
            assert r.status_code == 200, r.text
            assert tuple(wire.decode_reply(r.content).shape) == (3, entry["shape"][0])
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "BLOCKER-ACTIVE" in text and "BLOCKED-IMPORT" not in text, text[-3000:]
