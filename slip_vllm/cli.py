"""The ``slip`` console script: ``slip protect``, ``slip secure-service``, ``slip license``, ``slip settings``.

``slip license issue|renew|list|show|revoke|usage`` manages the vendor's licences file (see
``secure_service.licences``) and verifies the usage log (``secure_service.metering``); a running
service picks changes up within SLIP_LICENCES_POLL_S.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _protect(args: argparse.Namespace) -> int:
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, ProtectError, protect

    try:
        config = ProtectConfig.from_yaml(args.config) if args.config else ProtectConfig()
        if args.protocol:
            config.protocol = args.protocol
        if args.rank is not None:
            config.default_rank = RankPolicy(absolute=args.rank)
        if args.seed is not None:
            config.seed = args.seed
        if args.lock is not None:
            config.lock = args.lock
        if args.weight_bits is not None:
            config.weight_bits = args.weight_bits
        if args.unsafe_no_blinding:
            config.blinding = False
        manifest = protect(args.model, args.out, config, force=args.force)
    except (ProtectError, ValueError, OSError) as exc:
        print(f"slip protect: error: {exc}", file=sys.stderr)
        return 2
    secret = sum(t.rank * (t.shape[0] + t.shape[1]) for t in manifest.tensors)
    total = sum(t.shape[0] * t.shape[1] for t in manifest.tensors)
    print(f"protected {len(manifest.tensors)} matrices ({manifest.architecture}, protocol {manifest.protocol}); "
          f"secret factors hold {secret:,} of {total:,} protected parameters ({100 * secret / total:.1f} %)")
    if manifest.protocol == "shielded":
        bits = manifest.extra.get("weight_bits", 8)
        print(f"  public artifact: {args.out}/public   (int{bits} W_q of the masked GEMMs, p = "
              f"{manifest.extra['p']}; serve: vllm serve {args.out}/public --load-format slip)")
    else:
        print(f"  public artifact: {args.out}/public   (serve: vllm serve {args.out}/public --load-format slip)")
    print(f"  secret bundle:   {args.out}/secret   (serve: slip secure-service --bundle {args.out}/secret)")
    return 0


def _secure_service(args: argparse.Namespace) -> int:
    from secure_service.app import UnsafeBind, serve
    from secure_service.bundle import BundleError
    from secure_service.licences import LicenceError
    from secure_service.metering import UsageLogError
    from slip_vllm.settings import settings

    try:
        # every setting from the environment over the YAML file (configs/service.yaml)
        cfg = settings(refresh=True, yaml_file=args.config) if args.config else settings()
        overrides = {"licences_file": args.licences, "ssl_certfile": args.ssl_certfile,
                     "ssl_keyfile": args.ssl_keyfile, "ssl_ca_certs": args.ssl_ca_certs}
        overrides = {k: v for k, v in overrides.items() if v}
        if args.insecure:
            overrides["insecure"] = True
        if overrides:  # flags over everything; create_app reads settings() too
            import dataclasses

            import slip_vllm.settings as settings_module

            cfg = settings_module._cached = dataclasses.replace(cfg, **overrides)
        serve(args.bundle, host=args.host or cfg.service_host, port=args.port or cfg.service_port,
              token=cfg.service_token, max_body_bytes=cfg.max_body_bytes, threads=cfg.service_threads,
              log_level=cfg.log_level, insecure=cfg.insecure, ssl_certfile=cfg.ssl_certfile,
              ssl_keyfile=cfg.ssl_keyfile, ssl_ca_certs=cfg.ssl_ca_certs)
    except (BundleError, LicenceError, UsageLogError, UnsafeBind, ValueError, OSError) as exc:
        print(f"slip secure-service: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _licence_budget(args: argparse.Namespace, prefix: str = "") -> dict:
    return {k: getattr(args, prefix + k) for k in ("generated_tokens", "input_tokens", "steps")
            if getattr(args, prefix + k) is not None}


def _manifest_of(bundle: str) -> str:
    """The public manifest hash a secret bundle pairs with (checked against its manifest copy)."""
    import json
    from pathlib import Path

    from slip_vllm.core.manifest import MANIFEST_FILE, sha256_bytes

    path = Path(bundle)
    try:
        recorded = json.loads((path / "bundle.json").read_text())["public_manifest_sha256"]
        actual = sha256_bytes((path / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{bundle} is not a SLIP secret bundle: {exc}") from None
    if recorded != actual:
        raise ValueError(f"{bundle}: the manifest copy does not match bundle.json")
    return actual


def _license(args: argparse.Namespace) -> int:
    import json
    import time

    from secure_service.licences import LicenceError, LicenceFile, describe

    lf = LicenceFile(args.file)
    try:
        if args.action in ("issue", "renew"):
            expires = None
            if args.expires_in_days is not None:
                expires = time.time() + 86400.0 * args.expires_in_days
            common = dict(expires_at=expires, max_sessions=args.max_sessions, budget=_licence_budget(args),
                          period_s=args.period_s, period_budget=_licence_budget(args, "period_"))
            if args.action == "issue":
                if not (args.bundle or args.manifest_sha256):
                    raise LicenceError("issue needs --bundle OUT/secret or --manifest-sha256")
                manifest = args.manifest_sha256 or _manifest_of(args.bundle)
                lic, key = lf.issue(manifest, holder=args.holder, **common)
            else:
                old = lf.find(args.id)
                lic, key = lf.issue(old.manifest_sha256, holder=args.holder or old.holder, key_sha256=old.key_sha256,
                                    **common)
            print(describe(lic))
            if key:
                print(f"licence key (shown once; the engine sends it as SLIP_SERVICE_TOKEN): {key}")
            else:
                print(f"renews the key of {args.id}: engines holding it are served by {lic.id} from now on")
        elif args.action == "list":
            for lic in lf.load_or_empty():
                print(describe(lic))
        elif args.action == "show":
            print(json.dumps(lf.find(args.id).to_json(), indent=1))
        elif args.action == "revoke":
            lic = lf.revoke(args.id, args.reason)
            print(describe(lic))
        elif args.action == "usage":
            from secure_service.metering import UsageLogError, load_key, verify_usage_log

            log_path = args.log or args.file + ".usage.jsonl"
            key_path = args.key_file or args.file + ".key"
            try:
                summary = verify_usage_log(log_path, load_key(key_path))
            except UsageLogError as exc:
                print(f"slip license usage: the log FAILS verification: {exc}", file=sys.stderr)
                return 3
            print(json.dumps({"log": log_path, "records": summary["records"], "torn_bytes": summary["torn_bytes"],
                              "service_starts": summary["starts"], "totals": summary["totals"],
                              "lockouts": summary["lockouts"]}, indent=1))
    except (LicenceError, OSError, ValueError) as exc:
        print(f"slip license: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _settings(args: argparse.Namespace) -> int:
    from slip_vllm.settings import settings

    for env, value, meaning in settings().describe():
        print(f"{env:30} {value:28} {meaning}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slip", description="SLIP weight protection for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="split a Hugging Face checkpoint into public and secret halves")
    p.add_argument("--model", required=True, help="input Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (gets public/ and secret/)")
    p.add_argument("--protocol", choices=["split", "shielded"], default=None)
    p.add_argument("--rank", type=int, default=None, help="absolute secret rank for every matrix")
    p.add_argument("--config", default=None, help="YAML protect config (see configs/protect.yaml)")
    p.add_argument("--seed", type=int, default=None, help="fixed blinding seed (tests only)")
    p.add_argument("--lock", default=None, metavar="none|perm|block[:B]",
                   help="shielded only: secret per-GEMM transforms of the public weights, undone in the "
                        "service (default block:32; see docs/SECURITY.md)")
    p.add_argument("--weight-bits", type=int, choices=[8, 16], default=None,
                   help="shielded only: width of the public integer weights W_q (default 16: measured "
                        "greedy agreement with the float model 100 %% at 16 bits vs 33-52 %% at 8 bits on "
                        "random-init llama/mistral/qwen2/qwen3; it costs the host's field GEMM 2.2-2.8x "
                        "int8's time at decode and 3.4-3.6x in prefill on an H200; 8 is for models "
                        "measured to tolerate it; docs/BENCHMARKS.md)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--unsafe-no-blinding", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_protect)

    s = sub.add_parser("secure-service", help="run the secure service on a secret bundle")
    s.add_argument("--bundle", required=True, help="OUT_DIR/secret written by slip protect")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8400)")
    s.add_argument("--config", default=None, help="YAML service config (see configs/service.yaml)")
    s.add_argument("--licences", default=None, help="licences file (SLIP_LICENCES_FILE; see slip license)")
    s.add_argument("--ssl-certfile", default=None, help="TLS certificate, PEM (SLIP_SSL_CERTFILE)")
    s.add_argument("--ssl-keyfile", default=None, help="TLS private key, PEM (SLIP_SSL_KEYFILE)")
    s.add_argument("--ssl-ca-certs", default=None, help="require client certificates signed by this CA")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without credentials or TLS (trusted networks only)")
    s.set_defaults(func=_secure_service)

    lp = sub.add_parser("license", aliases=["licence"], help="issue, renew, list, show or revoke licences; "
                                                            "verify the usage log")
    lsub = lp.add_subparsers(dest="action", required=True)

    def licence_file(parser):
        parser.add_argument("--file", required=True, help="the licences file the service watches (SLIP_LICENCES_FILE)")

    def budget_flags(parser):
        for prefix, scope in (("", "in total"), ("period-", "per --period-s")):
            parser.add_argument(f"--{prefix}generated-tokens", type=int, default=None, help=f"generated tokens {scope}")
            parser.add_argument(f"--{prefix}input-tokens", type=int, default=None,
                                help=f"input tokens (prompt + fed-back generated tokens) {scope}")
            parser.add_argument(f"--{prefix}steps", type=int, default=None, help=f"engine steps {scope}")
        parser.add_argument("--period-s", type=int, default=None, help="length of a budget period, seconds")
        parser.add_argument("--expires-in-days", type=float, default=None, help="expiry (default: never)")
        parser.add_argument("--max-sessions", type=int, default=0,
                            help="concurrent engine sessions (one per vLLM worker process; 0: no cap)")
        parser.add_argument("--holder", default="", help="who the licence is issued to")

    li = lsub.add_parser("issue", help="a new licence and its key (printed once)")
    licence_file(li)
    li.add_argument("--bundle", default=None, help="the secret bundle it licenses (OUT/secret)")
    li.add_argument("--manifest-sha256", default=None, help="or the bundle's manifest hash (/v1/info)")
    budget_flags(li)
    lr = lsub.add_parser("renew", help="a new licence for the key of an existing one (fresh budgets)")
    licence_file(lr)
    lr.add_argument("id")
    budget_flags(lr)
    ll = lsub.add_parser("list", help="one line per licence")
    licence_file(ll)
    ls = lsub.add_parser("show", help="one licence as JSON (the key's hash, never the key)")
    licence_file(ls)
    ls.add_argument("id")
    lv = lsub.add_parser("revoke", help="revoke a licence (a running service refuses it within seconds)")
    licence_file(lv)
    lv.add_argument("id")
    lv.add_argument("--reason", default="", help="shown in the refusals")
    lu = lsub.add_parser("usage", help="verify the usage log (HMAC chain) and print every licence's totals")
    licence_file(lu)
    lu.add_argument("--log", default=None, help="usage log (default: FILE.usage.jsonl)")
    lu.add_argument("--key-file", default=None, help="the vendor's HMAC key (default: FILE.key)")
    lp.set_defaults(func=_license)

    t = sub.add_parser("settings", help="print every SLIP_* environment variable and its value")
    t.set_defaults(func=_settings)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
