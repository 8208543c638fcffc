"""A deterministic text corpus every machine has: the running interpreter's standard-library sources.

No model hub or data set is reachable, so the reference model is trained on the ``.py`` files of the
Python standard library that ships with the interpreter running this code (``sysconfig``'s ``stdlib``
path). Everything about the corpus is a pure function of those files:

* **File list.** All ``*.py`` files under the stdlib directory, as POSIX relative paths, sorted.
  Excluded: third-party code (``site-packages``/``dist-packages``), test suites (any ``test``/``tests``
  directory), ``idlelib`` and ``lib2to3`` (applications and their fixtures rather than library code),
  ``encodings`` (mostly generated codec tables), ``pydoc_data`` (one 750 kB string of documentation),
  the build-specific ``_sysconfigdata_*`` module and the ``config-*`` build directory. The last two
  differ between builds of the same Python version; the others would skew the corpus.
* **Train / validation split**, by file: a file is in validation when the first 32 bits of
  ``sha256("split:" + relpath)`` fall in the lowest ``val_percent`` percent. Not random order, not
  file position: adding or removing one file never moves another between splits.
* **Base / fine-tune parts** (for the public-prior scenario: a public base model and a private model
  fine-tuned from it): a file belongs to the ``finetune`` part when its top-level package is one of
  :data:`FINETUNE_PACKAGES` (networking, protocols, data formats, concurrency), else to ``base``.
  Both splits are taken within each part, so each part has its own validation files.
* **Size cap** (optional, to bound training time): each (part, split) group keeps the same share of
  the capped total as it has of the uncapped one; within a group, files are taken in the order of
  ``sha256("cap:" + relpath)`` while they fit (every group keeps at least its smallest file).

The digest (:attr:`Corpus.digest`) covers the interpreter version, the selection parameters and every
selected file's path, split, part and content hash, so two runs can check they used the same data. The
stdlib differs between Python versions, so cache keys built on it must include the version (the
digest already does, and :func:`python_tag` names it for humans).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                           "encodings", "pydoc_data", "__pycache__"})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
EXCLUDED_DIR_PREFIXES = ("config-",)

# Top-level stdlib packages/modules whose files form the "fine-tune" part; everything else is "base".
FINETUNE_PACKAGES = frozenset({
    "asyncio", "concurrent", "email", "ftplib", "html", "http", "imaplib", "json", "mailbox",
    "multiprocessing", "nntplib", "poplib", "smtplib", "socket", "socketserver", "ssl", "urllib",
    "wsgiref", "xml", "xmlrpc",
})

SPLITS = ("train", "val")
PARTS = ("base", "finetune")


def python_tag() -> str:
    """E.g. ``cpython-3.11.7``: names the interpreter whose stdlib is the corpus."""
    return f"{sys.implementation.name}-{platform.python_version()}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _h32(tag: str, relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{tag}:{relpath}".encode()).digest()[:4], "big")


def _excluded(relpath: str) -> bool:
    parts = relpath.split("/")
    if any(p in EXCLUDED_DIRS or p.startswith(EXCLUDED_DIR_PREFIXES) for p in parts[:-1]):
        return True
    return parts[-1].startswith(EXCLUDED_FILE_PREFIXES)


def _part_of(relpath: str) -> str:
    top = relpath.split("/", 1)[0]
    if top.endswith(".py"):
        top = top[:-3]
    return "finetune" if top in FINETUNE_PACKAGES else "base"


@dataclass(frozen=True)
class CorpusSpec:
    """What to select. ``max_bytes=None`` keeps every eligible file."""

    max_bytes: int | None = None
    val_percent: int = 10

    def __post_init__(self):
        if not 0 < self.val_percent < 100:
            raise ValueError("val_percent must be in (0, 100)")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")


@dataclass(frozen=True)
class CorpusFile:
    relpath: str
    size: int
    sha256: str
    split: str  # "train" | "val"
    part: str  # "base" | "finetune"


@dataclass
class Corpus:
    root: Path
    python: str
    spec: CorpusSpec
    files: tuple[CorpusFile, ...]
    uncapped_bytes: int
    _texts: dict[str, str] = field(default_factory=dict, repr=False)

    def select(self, split: str | None = None, part: str | None = None) -> list[CorpusFile]:
        """Files of one split and/or part, in sorted relative-path order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if part is not None and part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}")
        return [f for f in self.files if (split is None or f.split == split) and (part is None or f.part == part)]

    def relpaths(self, split: str | None = None, part: str | None = None) -> list[str]:
        return [f.relpath for f in self.select(split, part)]

    def texts(self, split: str | None = None, part: str | None = None) -> list[str]:
        """File contents (UTF-8, undecodable bytes replaced), in sorted relative-path order.

        Raises if a file changed on disk since the corpus was listed.
        """
        out = []
        for f in self.select(split, part):
            if f.relpath not in self._texts:
                data = (self.root / f.relpath).read_bytes()
                if hashlib.sha256(data).hexdigest() != f.sha256:
                    raise RuntimeError(f"stdlib file changed while in use: {f.relpath}")
                self._texts[f.relpath] = data.decode("utf-8", errors="replace")
            out.append(self._texts[f.relpath])
        return out

    def n_bytes(self, split: str | None = None, part: str | None = None) -> int:
        return sum(f.size for f in self.select(split, part))

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"python": self.python, "spec": asdict(self.spec)}, sort_keys=True).encode())
        for f in self.files:
            h.update(f"\n{f.relpath}\t{f.split}\t{f.part}\t{f.size}\t{f.sha256}".encode())
        return h.hexdigest()

    def manifest(self) -> dict:
        """JSON-able record of exactly which data was used (stored next to trained models)."""
        summary = {f"{s}/{p}": {"files": len(self.select(s, p)), "bytes": self.n_bytes(s, p)}
                   for s in SPLITS for p in PARTS}
        return {
            "python": self.python,
            "root": str(self.root),
            "spec": asdict(self.spec),
            "digest": self.digest,
            "uncapped_bytes": self.uncapped_bytes,
            "total_bytes": self.n_bytes(),
            "summary": summary,
            "files": [asdict(f) for f in self.files],
        }


@functools.lru_cache(maxsize=4)
def _listing(root: Path) -> tuple[tuple[str, int, str], ...]:
    """(relpath, size, sha256) of every eligible non-empty file, sorted; read once per process.

    :meth:`Corpus.texts` re-checks each hash when it reads a file, so a stale listing cannot go unnoticed.
    """
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if _excluded(rel) or not path.is_file():
            continue
        data = path.read_bytes()
        if not data.strip():
            continue  # empty __init__.py files carry nothing
        out.append((rel, len(data), hashlib.sha256(data).hexdigest()))
    return tuple(out)


def build_corpus(spec: CorpusSpec | None = None, root: str | Path | None = None) -> Corpus:
    """List, split and (optionally) cap the stdlib corpus. Deterministic for a given interpreter."""
    spec = spec or CorpusSpec()
    root = Path(root).resolve() if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")

    candidates = [CorpusFile(rel, size, sha, "val" if _h32("split", rel) % 100 < spec.val_percent else "train",
                             _part_of(rel)) for rel, size, sha in _listing(root)]
    if not candidates:
        raise RuntimeError(f"no eligible .py files under {root}")
    total = sum(f.size for f in candidates)

    if spec.max_bytes is None or spec.max_bytes >= total:
        chosen = candidates
    else:
        chosen = []
        for s in SPLITS:
            for p in PARTS:
                group = [f for f in candidates if f.split == s and f.part == p]
                if not group:
                    continue
                budget = spec.max_bytes * sum(f.size for f in group) / total
                taken, used = [], 0
                for f in sorted(group, key=lambda f: (_h32("cap", f.relpath), f.relpath)):
                    if used + f.size <= budget:
                        taken.append(f)
                        used += f.size
                if not taken:
                    taken = [min(group, key=lambda f: (f.size, f.relpath))]
                chosen.extend(taken)
        chosen.sort(key=lambda f: f.relpath)

    corpus = Corpus(root=root, python=python_tag(), spec=spec, files=tuple(chosen), uncapped_bytes=total)
    for s in SPLITS:
        if not corpus.select(s):
            raise RuntimeError(f"corpus has no {s} files; raise max_bytes or change val_percent")
    return corpus
