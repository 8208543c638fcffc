"""The package boundaries are trust boundaries (README, "Architecture"); this test reads every module's
imports (function-local ones included) and fails on an import across a boundary that the rules forbid:

* ``slip_vllm/core`` (vLLM-free pure pieces) imports none of vLLM, the plugin, the service or the tools;
* ``slip_vllm/host`` (the untrusted plugin) never imports ``secure_service``;
* ``secure_service`` (trusted) never imports vLLM, the plugin or the offline tools;
* ``slip_vllm/protect`` (the model owner's offline tool) builds artifacts from core functions: it never
  imports the secure service's runtime, the plugin or vLLM.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = {
    "slip_vllm/core": ("vllm", "slip_vllm.host", "secure_service", "slip_vllm.protect", "slip_vllm.evaluation"),
    "slip_vllm/host": ("secure_service",),
    "secure_service": ("vllm", "slip_vllm.host", "slip_vllm.protect", "slip_vllm.evaluation"),
    "slip_vllm/protect": ("vllm", "slip_vllm.host", "secure_service"),
}


def imports_of(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_import_crosses_a_forbidden_boundary(package):
    forbidden = RULES[package]
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{f.relative_to(ROOT)}:{line}: {name}" for f in files for line, name in imports_of(f)
           if any(name == x or name.startswith(x + ".") for x in forbidden)]
    assert not bad, "imports across a trust boundary:\n" + "\n".join(bad)
