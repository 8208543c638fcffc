"""Licences, budgets, metering, the usage log, /metrics and safe bind defaults of a real secure
service process (split protocol, frames over real HTTP with a real client; the CLI as a subprocess)."""

import dataclasses
import json
import subprocess
import time

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, secure_service
from slip_vllm.core import wire
from slip_vllm.launch import BIN, base_env

_seq = iter(range(1, 10**9))


def slip(*args: str, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "slip"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or base_env())


def issue(licences, bundle, *flags) -> tuple[str, str]:
    out = slip("license", "issue", "--file", str(licences), "--bundle", str(bundle), *flags)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0], out.stdout.strip().rsplit(" ", 1)[-1]


@pytest.fixture(scope="module")
def artifact(model_factory):
    return model_factory("llama", tie=False)


@pytest.fixture(scope="module")
def ids(artifact):
    manifest = json.loads((artifact[1] / "public" / "slip_manifest.json").read_text())
    by_kind = {t["kind"]: t for t in manifest["tensors"]}
    return {"embed": by_kind["embedding"]["id"], "head": by_kind["lm_head"]["id"],
            "hidden": by_kind["lm_head"]["shape"][1], "vocab": by_kind["lm_head"]["shape"][0],
            "manifest": manifest}


def start(artifact, log_dir, licences, name, **env):
    env = {"SLIP_LICENCES_POLL_S": "0.1", "SLIP_USAGE_FLUSH_S": "0.2", **env}
    return secure_service(artifact[1] / "secret", log_dir, name=name, SLIP_LICENCES_FILE=str(licences),
                          **env).start().wait_ready(60)


def call(service, key, kind, tensor, payload, session=5):
    body = wire.encode_request(kind, (tensor,), payload, session=session, seq=next(_seq))
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service.url + "/v1/split/apply", content=body, headers=headers, timeout=10)


def head(service, key, ids, rows, session=5):
    return call(service, key, wire.KIND_LINEAR, ids["head"], torch.randn(rows, ids["hidden"]), session)


def embed(service, key, ids, rows, session=5):
    return call(service, key, wire.KIND_EMBED, ids["embed"], torch.arange(rows, dtype=torch.int32) % ids["vocab"],
                session)


def until(fn, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def scrape(service) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(service.url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_budget_refusal_renewal_revocation_and_credentials(artifact, log_dir, ids, tmp_path):
    licences = tmp_path / "licences.json"
    lid, key = issue(licences, artifact[1] / "secret", "--generated-tokens", "100", "--max-sessions", "1")
    service = start(artifact, log_dir, licences, "licence-budget")
    try:
        for _ in range(12):
            assert head(service, key, ids, 8).status_code == 200  # 96 generated tokens
        r = head(service, key, ids, 8)
        assert r.status_code == 402 and "licence exhausted" in r.json()["error"] and "4 of its 100" in r.json()["error"]
        assert head(service, key, ids, 4).status_code == 200  # exactly 100
        for r in (head(service, key, ids, 1), embed(service, key, ids, 3)):
            assert r.status_code == 402 and "has used 100 of its 100 generated tokens" in r.json()["error"]
        # credentials: none, unknown, a second session beyond max_sessions=1
        assert embed(service, "", ids, 2).status_code == 401
        assert embed(service, "slip-nope", ids, 2).status_code == 401
        # renewal: the same key, a fresh budget, no restart
        out = slip("license", "renew", "--file", str(licences), lid, "--generated-tokens", "50", "--max-sessions", "1")
        assert out.returncode == 0, out.stderr
        new_id = out.stdout.split()[0]
        assert until(lambda: head(service, key, ids, 10).status_code == 200)
        r = embed(service, key, ids, 2, session=6)
        assert r.status_code == 403 and "allows 1 concurrent engine session" in r.json()["error"]
        # revocation takes effect within the poll interval
        assert slip("license", "revoke", "--file", str(licences), new_id, "--reason", "unpaid").returncode == 0
        t0 = time.monotonic()
        r = until(lambda: (lambda r: r if r.status_code == 403 else None)(embed(service, key, ids, 2)))
        assert r is not None and time.monotonic() - t0 < 2.0
        assert "licence revoked" in r.json()["error"] and "unpaid" in r.json()["error"]
        # the licence's meters: what was answered, and the refusals
        stats = httpx.get(service.url + "/v1/stats").json()["licences"]
        assert stats[lid]["generated_tokens"] == 100 and stats[new_id]["generated_tokens"] == 10
        assert stats[new_id]["state"] == "revoked"
    finally:
        service.stop()


def test_expired_and_wrong_bundle_licences_are_refused(artifact, log_dir, ids, tmp_path):
    licences = tmp_path / "licences.json"
    _, expired = issue(licences, artifact[1] / "secret", "--expires-in-days", "-1")
    _, foreign = issue(licences, artifact[1] / "secret", "--manifest-sha256", "ab" * 32)
    service = start(artifact, log_dir, licences, "licence-states")
    try:
        r = embed(service, expired, ids, 2)
        assert r.status_code == 403 and "licence expired" in r.json()["error"]
        r = embed(service, foreign, ids, 2)
        assert r.status_code == 403 and "another bundle" in r.json()["error"]
        manifest = httpx.get(service.url + "/v1/info").json()["public_manifest_sha256"]
        r = httpx.post(service.url + "/v1/channel/attach", json={"manifest_sha256": manifest},
                       headers={"authorization": f"Bearer {expired}"})
        assert r.status_code == 403 and "licence expired" in r.json()["error"]
    finally:
        service.stop()


def test_metrics_and_stats_count_exactly_what_was_sent(artifact, log_dir, ids, tmp_path):
    licences = tmp_path / "licences.json"
    lid, key = issue(licences, artifact[1] / "secret")
    service = start(artifact, log_dir, licences, "licence-metrics")
    try:
        sent = {"calls": 0, "rows": 0, "bytes_in": 0, "gen": 0, "inp": 0, "steps": 0}
        for rows in (1, 3, 7, 2):
            for fn, kind in ((embed, "inp"), (head, "gen")):
                r = fn(service, key, ids, rows)
                assert r.status_code == 200
                sent["calls"] += 1
                sent["rows"] += rows
                sent[kind] += rows
                sent["steps"] += kind == "inp"
                sent["bytes_in"] += int(r.request.headers["content-length"])
        assert head(service, "slip-wrong", ids, 2).status_code == 401
        m = scrape(service)
        ep = (("endpoint", "split/apply"),)
        lic = (("licence", lid),)
        assert m[("slip_data_plane_calls_total", ep)] == sent["calls"]
        assert m[("slip_data_plane_rows_total", ep)] == sent["rows"]
        assert m[("slip_data_plane_bytes_in_total", ep)] == sent["bytes_in"]
        assert m[("slip_data_plane_call_seconds_count", ep)] == sent["calls"]
        assert m[("slip_data_plane_rejected_total", (("endpoint", "split/apply"), ("status", "401")))] == 1
        assert m[("slip_licence_generated_tokens_total", lic)] == sent["gen"]
        assert m[("slip_licence_input_tokens_total", lic)] == sent["inp"]
        assert m[("slip_licence_steps_total", lic)] == sent["steps"]
        assert m[("slip_licence_calls_total", lic)] == sent["calls"]
        assert m[("slip_licence_bytes_in_total", lic)] == sent["bytes_in"]
        assert m[("slip_licence_usable", lic)] == 1
        stats = httpx.get(service.url + "/v1/stats").json()
        assert (stats["calls"], stats["rows"], stats["bytes_in"], stats["rejected"]) == \
            (sent["calls"], sent["rows"], sent["bytes_in"], 1)
        assert stats["bytes_out"] == m[("slip_data_plane_bytes_out_total", ep)]
    finally:
        service.stop()


def test_usage_log_accounts_for_every_answered_logits_call_after_sigkill(artifact, log_dir, ids, tmp_path):
    licences = tmp_path / "licences.json"
    lid, key = issue(licences, artifact[1] / "secret", "--generated-tokens", "60")
    service = start(artifact, log_dir, licences, "licence-kill", SLIP_USAGE_FLUSH_S="30")
    generated = 0
    try:
        for rows in (5, 1, 9, 4, 11):
            assert embed(service, key, ids, rows + 2).status_code == 200
            assert head(service, key, ids, rows).status_code == 200
            generated += rows
    finally:
        service.kill()  # SIGKILL: no flush, no stop record
    out = slip("license", "usage", "--file", str(licences))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    # every answered logits call is in the log (written before its reply); the embedding calls
    # since the last flush (30 s here) may not be, as documented
    assert summary["totals"][lid]["generated_tokens"] == generated == 30
    # a restart restores the licence's usage from the log: 30 of 60 left
    service = start(artifact, log_dir, licences, "licence-kill-2")
    try:
        assert head(service, key, ids, 30).status_code == 200
        r = head(service, key, ids, 1)
        assert r.status_code == 402 and "60 of its 60" in r.json()["error"]
    finally:
        service.stop()  # clean: flushes and writes a stop record
    summary = json.loads(slip("license", "usage", "--file", str(licences)).stdout)
    assert summary["totals"][lid]["generated_tokens"] == 60 and summary["service_starts"] == 2
    # a record altered afterwards fails verification, and the service refuses to start on it
    log_path = tmp_path / "licences.json.usage.jsonl"
    lines = log_path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["time"] += 1
    lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    log_path.write_text("\n".join(lines) + "\n")
    bad = slip("license", "usage", "--file", str(licences))
    assert bad.returncode == 3 and "line 3" in bad.stderr
    env = base_env(SLIP_LICENCES_FILE=str(licences), SLIP_SERVICE_THREADS="1")
    refused = slip("secure-service", "--bundle", str(artifact[1] / "secret"), "--port", str(free_port()), env=env)
    assert refused.returncode == 2 and "fails authentication" in refused.stderr


def test_non_loopback_bind_without_credentials_or_tls_refuses_to_start(artifact, tmp_path):
    bundle = str(artifact[1] / "secret")
    port = str(free_port())
    out = slip("secure-service", "--bundle", bundle, "--host", "0.0.0.0", "--port", port, timeout=30)
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "SLIP_LICENCES_FILE" in out.stderr
    assert "--ssl-certfile" in out.stderr and "--insecure" in out.stderr
    # a token alone is not enough: TLS is still missing
    out = slip("secure-service", "--bundle", bundle, "--host", "0.0.0.0", "--port", port, timeout=30,
               env=base_env(SLIP_SERVICE_TOKEN="t0ken"))
    assert out.returncode == 2 and "TLS" in out.stderr and "credentials" not in out.stderr


def test_every_setting_can_come_from_the_yaml_file_and_the_environment_wins(tmp_path):
    from slip_vllm.settings import Settings

    changed = {}
    for f in dataclasses.fields(Settings):
        value = f.default
        changed[f.name] = (not value) if isinstance(value, bool) else \
            value + 3 if isinstance(value, (int, float)) else f"{value}x"
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(changed))
    got = Settings.from_env({}, str(path))
    assert dataclasses.asdict(got) == changed
    assert Settings.from_env({"SLIP_SHIELDED_KV_BLOCKS": "9"}, str(path)).shielded_kv_blocks == 9
    (tmp_path / "old.yaml").write_text("host: 10.0.0.1\nport: 9\nthreads: 2\n")
    old = Settings.from_env({}, str(tmp_path / "old.yaml"))
    assert (old.service_host, old.service_port, old.service_threads) == ("10.0.0.1", 9, 2)
    (tmp_path / "bad.yaml").write_text("no_such_setting: 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        Settings.from_env({}, str(tmp_path / "bad.yaml"))
    # the shipped config parses
    from helpers import REPO

    Settings.from_env({}, str(REPO / "configs" / "service.yaml"))


def test_integrity_alarm_policy_locks_the_licence_out_and_the_lockout_survives_a_restart(tmp_path):
    """The policy of secure_service.metering on its real store and log (the alarms themselves are
    raised by the shielded service's Freivalds checks, tests/shielded)."""
    from secure_service.licences import LicenceFile, LicenceStore, hash_key
    from secure_service.metering import Metering, Refused, UsageLog, load_key, verify_usage_log

    path = str(tmp_path / "licences.json")
    lic, key = LicenceFile(path).issue("m" * 64)
    key_file = str(tmp_path / "key")

    def metering():
        return Metering(manifest_sha256="m" * 64, store=LicenceStore(path),
                        usage_log=UsageLog(str(tmp_path / "usage.jsonl"), load_key(key_file, create=True)),
                        alarm_limit=3, alarm_window_s=60, alarm_lockout_s=600)

    m = metering()
    acc = m.resolve(hash_key(key), 9)
    m.alarm(acc, 9, "integrity: layer 0: Freivalds check failed")
    m.alarm(acc, 9, "integrity: layer 1: Freivalds check failed")
    assert m.resolve(hash_key(key), 9) is acc  # two alarms: still served
    m.alarm(acc, 9, "integrity: layer 2: value out of range")
    with pytest.raises(Refused, match="licence locked: .*3 integrity alarms within 60 s") as info:
        m.resolve(hash_key(key), 9)
    assert info.value.status == 403
    m.close()
    summary = verify_usage_log(str(tmp_path / "usage.jsonl"), load_key(key_file))
    assert summary["totals"][lic.id]["integrity_alarms"] == 3 and lic.id in summary["lockouts"]
    lines = [json.loads(x) for x in (tmp_path / "usage.jsonl").read_text().splitlines()]
    lock = next(r for r in lines if r["type"] == "lockout")
    assert [a["reason"] for a in lock["alarms"]][-1] == "integrity: layer 2: value out of range"
    assert lock["session"] == "9"
    with pytest.raises(Refused, match="licence locked"):
        metering().resolve(hash_key(key), 9)  # restored from the log
