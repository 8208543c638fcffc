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


# --------------------------------------------------------------------------------------------------
# the code corpus of the second (GPU) scale
#
# Built on THIS machine (the GPU machine has neither this virtual environment nor, necessarily, the
# same stdlib) and carried there as one xz file. Byte-level tokens, so no tokenizer is trained:
#
# * Sources: every ``*.py`` file under the interpreter's stdlib directory (its own ``site-packages``
#   excluded) and under the project's virtual environment's ``site-packages`` (``sysconfig``'s
#   ``purelib``), named ``stdlib/<relpath>`` and ``site-packages/<relpath>``.
# * Files above ``CODE_MAX_FILE_BYTES`` (generated tables) and byte-identical duplicates (vendored
#   copies; the first name in sorted order keeps the content) are dropped; NUL bytes are removed,
#   since byte 0 separates documents.
# * Cap: files are taken in the order of ``sha256("code-cap:" + name)`` while the total stays within
#   ``max_bytes`` (a spread over all packages, not a prefix of the alphabet).
# * Validation: a file is in validation when ``sha256("code-val:" + name)`` falls in the lowest
#   ``val_per_mille`` per mille. Each split is the concatenation of its files in sorted name order,
#   each followed by byte 0.
# The digest covers the selection parameters and every selected file's name, split and content hash.

CODE_MAX_FILE_BYTES = 512 * 1024
CODE_CORPUS_FILE = "code_corpus.bin.xz"
CODE_MANIFEST_FILE = "code_corpus.json"


def _code_sources(roots: list[tuple[str, Path]] | None = None) -> list[tuple[str, Path]]:
    if roots is None:
        roots = [("stdlib", stdlib_root()), ("site-packages", Path(sysconfig.get_paths()["purelib"]).resolve())]
    out = []
    for tag, root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if tag == "stdlib" and ("site-packages" in rel.split("/") or "dist-packages" in rel.split("/")):
                continue
            out.append((f"{tag}/{rel}", path))
    out.sort(key=lambda t: t[0])
    return out


def build_code_corpus(out_dir: str | Path, *, max_bytes: int = 72_000_000, val_per_mille: int = 20,
                      xz_preset: int = 6, roots: list[tuple[str, Path]] | None = None) -> dict:
    """Select, split and write the code corpus (``out_dir/code_corpus.bin.xz`` + manifest); returns the manifest.

    The xz file holds ``uint8`` bytes: the training stream, then the validation stream; the manifest
    gives their lengths, the digest and every file. ``roots`` ((tag, directory) pairs) replaces the two
    default sources (tests use a small one). When no file hashes into validation, the file with the
    smallest validation hash is moved there, so both streams are never empty.
    """
    import lzma

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = _code_sources(roots)
    order = sorted(sources, key=lambda t: (hashlib.sha256(f"code-cap:{t[0]}".encode()).digest(), t[0]))
    chosen, seen, total = [], {}, 0
    for name, path in order:
        if total >= max_bytes:
            break
        try:
            if not path.is_file() or path.stat().st_size > CODE_MAX_FILE_BYTES:
                continue
            data = path.read_bytes().replace(b"\x00", b"")
        except OSError:
            continue
        if not data.strip() or total + len(data) > max_bytes:
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            if name < seen[sha][0]:  # keep the first name in sorted order for this content
                old = seen[sha]
                chosen.remove(old)
                seen[sha] = (name, sha, data)
                chosen.append(seen[sha])
            continue
        seen[sha] = (name, sha, data)
        chosen.append(seen[sha])
        total += len(data)
    chosen.sort(key=lambda t: t[0])
    vhash = {n: int.from_bytes(hashlib.sha256(f"code-val:{n}".encode()).digest()[:4], "big") for n, _, _ in chosen}
    split_of = {n: ("val" if vhash[n] % 1000 < val_per_mille else "train") for n in vhash}
    if len(chosen) >= 2 and "val" not in split_of.values():
        split_of[min(vhash, key=lambda n: (vhash[n] % 1000, n))] = "val"
    streams = {s: b"".join(d + b"\x00" for n, _, d in chosen if split_of[n] == s) for s in SPLITS}
    h = hashlib.sha256(json.dumps({"kind": "code-corpus-v1", "max_bytes": max_bytes, "val_per_mille": val_per_mille,
                                   "max_file_bytes": CODE_MAX_FILE_BYTES}, sort_keys=True).encode())
    for n, sha, d in chosen:
        h.update(f"\n{n}\t{split_of[n]}\t{len(d)}\t{sha}".encode())
    blob = streams["train"] + streams["val"]
    with lzma.open(out_dir / CODE_CORPUS_FILE, "wb", preset=xz_preset) as f:
        f.write(blob)
    manifest = {
        "digest": h.hexdigest(), "python": python_tag(), "max_bytes": max_bytes, "val_per_mille": val_per_mille,
        "max_file_bytes": CODE_MAX_FILE_BYTES, "files": len(chosen),
        "files_per_split": {s: sum(1 for n in split_of if split_of[n] == s) for s in SPLITS},
        "train_bytes": len(streams["train"]), "val_bytes": len(streams["val"]),
        "stream_sha256": hashlib.sha256(blob).hexdigest(),
        "xz_bytes": (out_dir / CODE_CORPUS_FILE).stat().st_size,
        "sources": "stdlib/*.py (its site-packages excluded) + the venv's site-packages/*.py",
        "file_list": [[n, split_of[n], len(d), sha] for n, sha, d in chosen],
    }
    (out_dir / CODE_MANIFEST_FILE).write_text(json.dumps(manifest, indent=0))
    return manifest


def load_code_corpus(corpus_dir: str | Path) -> tuple[bytes, bytes, dict]:
    """(train bytes, val bytes, manifest) of a corpus written by :func:`build_code_corpus`; checks its hash."""
    import lzma

    corpus_dir = Path(corpus_dir)
    manifest = json.loads((corpus_dir / CODE_MANIFEST_FILE).read_text())
    with lzma.open(corpus_dir / CODE_CORPUS_FILE, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != manifest["stream_sha256"]:
        raise RuntimeError(f"code corpus in {corpus_dir} does not match its manifest")
    n = manifest["train_bytes"]
    return blob[:n], blob[n:], manifest


def main_code_corpus(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.corpus",
                                 description="Build the byte-level code corpus of the GPU-scale evaluation.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-bytes", type=int, default=72_000_000)
    args = ap.parse_args(argv)
    m = build_code_corpus(args.out, max_bytes=args.max_bytes)
    print(json.dumps({k: v for k, v in m.items() if k != "file_list"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_code_corpus())
