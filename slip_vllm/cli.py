"""The ``slip`` console script: ``slip protect``, ``slip secure-service``, ``slip settings``."""

from __future__ import annotations

import argparse
import logging
import sys


def _protect(args: argparse.Namespace) -> int:
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.vendor.protect import ProtectConfig, ProtectError, protect

    try:
        config = ProtectConfig.from_yaml(args.config) if args.config else ProtectConfig()
        if args.protocol:
            config.protocol = args.protocol
        if args.rank is not None:
            config.default_rank = RankPolicy(absolute=args.rank)
        if args.seed is not None:
            config.seed = args.seed
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
        print(f"  public artifact: {args.out}/public   (int8 W_q of the masked GEMMs; vLLM serving of protocol "
              f"shielded is not available yet: slip_vllm.host.shielded_client drives steps)")
    else:
        print(f"  public artifact: {args.out}/public   (serve: vllm serve {args.out}/public --load-format slip)")
    print(f"  secret bundle:   {args.out}/secret   (serve: slip secure-service --bundle {args.out}/secret)")
    return 0


def _secure_service(args: argparse.Namespace) -> int:
    import yaml

    from secure_service.app import serve
    from secure_service.bundle import BundleError
    from slip_vllm.settings import settings

    cfg = settings()
    file_cfg = {}
    if args.config:
        file_cfg = yaml.safe_load(open(args.config)) or {}
        unknown = set(file_cfg) - {"host", "port", "threads", "max_body_bytes", "log_level"}
        if unknown:
            print(f"slip secure-service: error: unknown config keys {sorted(unknown)}", file=sys.stderr)
            return 2
    host = args.host or file_cfg.get("host", "127.0.0.1")
    port = args.port or int(file_cfg.get("port", 8400))
    try:
        serve(args.bundle, host=host, port=port, token=cfg.service_token,
              max_body_bytes=int(file_cfg.get("max_body_bytes", cfg.max_body_bytes)),
              threads=int(file_cfg.get("threads", cfg.service_threads)),
              log_level=str(file_cfg.get("log_level", cfg.log_level)))
    except BundleError as exc:
        print(f"slip secure-service: error: {exc}", file=sys.stderr)
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
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--unsafe-no-blinding", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_protect)

    s = sub.add_parser("secure-service", help="run the secure service on a secret bundle")
    s.add_argument("--bundle", required=True, help="OUT_DIR/secret written by slip protect")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8400)")
    s.add_argument("--config", default=None, help="YAML service config (see configs/service.yaml)")
    s.set_defaults(func=_secure_service)

    t = sub.add_parser("settings", help="print every SLIP_* environment variable and its value")
    t.set_defaults(func=_settings)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
