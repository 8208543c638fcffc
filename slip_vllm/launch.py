"""Start and stop the project's servers as subprocesses on loopback (demo, benchmark, tests).

Each server is a real process (``slip secure-service`` or ``vllm serve``) with its output in a log
file; readiness is polled on its health endpoint, and stopping sends SIGINT to its process group,
then SIGKILL if it does not exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Server:
    """A subprocess serving HTTP on 127.0.0.1:port, its output in a log file."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, health: str,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name, self.argv, self.port, self.health = name, argv, port, health
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = env or base_env()
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 300.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready "
                                   f"(log: {self.log_path}):\n" + self.tail())
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout}s (log: {self.log_path}):\n" + self.tail())

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            # The leader is gone, but children it spawned (vLLM's engine and workers) may linger
            # in its process group after a failed start.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (no clean-up: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP the process group: it keeps its sockets but answers nothing (a hung server)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def secure_service(bundle: Path, log_dir: Path, port: int | None = None, name: str = "service",
                   **env: str) -> Server:
    port = port or free_port()
    argv = [str(BIN / "slip"), "secure-service", "--bundle", str(bundle), "--port", str(port)]
    return Server(name, argv, port, log_dir, "/healthz", base_env(SLIP_SERVICE_THREADS="1", **env))


def vllm_server(model: Path, log_dir: Path, name: str, *, slip: bool, service_url: str = "",
                extra_args: list[str] | None = None, dtype: str = "float32", transport: str = "shm",
                **env: str) -> Server:
    """transport: "shm" (the colocated shared-memory data plane: an http:// service_url is given to
    vLLM as shm://) or "http" (the URL as given)."""
    if transport not in ("shm", "http"):
        raise ValueError("transport must be 'shm' or 'http'")
    if service_url and transport == "shm" and service_url.startswith("http://"):
        service_url = "shm://" + service_url[len("http://"):]
    port = free_port()
    argv = [str(BIN / "vllm"), "serve", str(model), "--port", str(port), "--host", "127.0.0.1",
            "--dtype", dtype, "--max-model-len", "512", "--served-model-name", "m",
            "--max-num-seqs", "32", *(extra_args or [])]
    if slip:
        argv += ["--load-format", "slip"]
    env_vars = base_env(**env)
    if service_url:
        env_vars["SLIP_SERVICE_URL"] = service_url
    return Server(name, argv, port, log_dir, "/health", env_vars)
