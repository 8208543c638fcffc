"""Test-side re-exports of the process helpers (real servers on real loopback sockets)."""

from pathlib import Path

from slip_vllm.launch import Server, base_env, free_port, secure_service, vllm_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
