"""TRUSTED side: the vendor's licences, as the secure service enforces them.

What this module owns
---------------------
* The licences file (JSON, ``{"version": 1, "licences": [...]}``), written only by
  ``slip license issue|renew|revoke`` (``LicenceFile``: atomic replace, mode 0600).  A licence:

  ``id``               public name (``lic_`` + 12 hex), used in logs, metrics and the usage log
  ``key_sha256``       SHA-256 of the licence key; the key itself (``slip-`` + 43 url-safe
                       characters, 256 random bits) is printed once by ``issue`` and never stored
  ``manifest_sha256``  the public manifest hash of the bundle it licenses (``/v1/info``)
  ``holder``           free text (who it was issued to)
  ``issued_at``, ``expires_at`` (unix seconds; null: never), ``revoked_at`` (null: valid),
  ``revoke_reason``
  ``max_sessions``     cap on concurrent engine sessions (one per vLLM worker process; 0: none)
  ``budget``           totals over the licence's life: ``generated_tokens``, ``input_tokens``,
                       ``steps`` (null or absent: unlimited)
  ``period_s``, ``period_budget``: the same keys per period of ``period_s`` seconds (periods are
                       aligned to multiples of period_s since the unix epoch, UTC)

* ``LicenceStore``: the service's view of the file, re-read by a watcher thread whenever its
  (inode, size, mtime) changes (every ``SLIP_LICENCES_POLL_S``), so a new, renewed or revoked
  licence takes effect within that time without a restart.  A file that cannot be read or parsed
  later on refuses every licence until it is fixed (fail closed; logged); at start it stops the
  service.

How a key finds its licence: the engine sends the key as its bearer credential
(``SLIP_SERVICE_TOKEN`` on the vLLM side).  Several licences may carry the same key hash
(``renew`` issues a new licence for the key an engine already holds); the newest one (by
``issued_at``) is the key's licence, whatever its state, so renewing restores service without
touching the engine and revoking the newest one refuses the key.

Keys are 256-bit random strings, so one SHA-256 is enough to store them (no password KDF: there is
nothing to guess); lookups compare hashes.  Budgets, usage and lock-outs are kept by
``secure_service.metering``; this module only says what a licence allows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

log = logging.getLogger("slip.service")

BUDGET_KEYS = ("generated_tokens", "input_tokens", "steps")
FILE_VERSION = 1


class LicenceError(RuntimeError):
    """The licences file is missing, unreadable or malformed."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "slip-" + secrets.token_urlsafe(32)


def _budget(raw, where: str) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - set(BUDGET_KEYS):
        raise LicenceError(f"{where}: a budget is an object with keys among {list(BUDGET_KEYS)}")
    out = {}
    for k, v in raw.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LicenceError(f"{where}: budget {k} must be a non-negative integer")
        out[k] = v
    return out


@dataclass
class Licence:
    id: str
    key_sha256: str
    manifest_sha256: str
    holder: str = ""
    issued_at: float = 0.0
    expires_at: Optional[float] = None
    revoked_at: Optional[float] = None
    revoke_reason: str = ""
    max_sessions: int = 0
    budget: dict = field(default_factory=dict)
    period_s: Optional[int] = None
    period_budget: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict) -> "Licence":
        if not isinstance(raw, dict):
            raise LicenceError("a licence must be a JSON object")
        where = f"licence {raw.get('id')!r}"
        try:
            lic = cls(**raw)
        except TypeError as exc:
            raise LicenceError(f"{where}: {exc}") from None
        for name in ("id", "key_sha256", "manifest_sha256"):
            if not isinstance(getattr(lic, name), str) or not getattr(lic, name):
                raise LicenceError(f"{where}: {name} must be a non-empty string")
        if len(lic.key_sha256) != 64:
            raise LicenceError(f"{where}: key_sha256 must be 64 hex characters")
        if isinstance(lic.max_sessions, bool) or not isinstance(lic.max_sessions, int) or lic.max_sessions < 0:
            raise LicenceError(f"{where}: max_sessions must be a non-negative integer")
        lic.budget = _budget(lic.budget, where)
        lic.period_budget = _budget(lic.period_budget, where)
        if lic.period_budget and (not isinstance(lic.period_s, int) or lic.period_s <= 0):
            raise LicenceError(f"{where}: a period budget needs period_s > 0")
        return lic

    def to_json(self) -> dict:
        return asdict(self)

    def state(self, now: Optional[float] = None) -> str:
        """"revoked", "expired" or "valid" (budgets are the meter's business)."""
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "valid"


def _utc(t: Optional[float]) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class LicenceFile:
    """The vendor's side: read, change and atomically rewrite the licences file."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> list[Licence]:
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            raise LicenceError(f"licences file {self.path} does not exist (create it with slip license issue)") from None
        except (OSError, ValueError) as exc:
            raise LicenceError(f"licences file {self.path} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("licences"), list):
            raise LicenceError(f"licences file {self.path}: expected {{\"version\": {FILE_VERSION}, \"licences\": [...]}}")
        out = [Licence.from_json(raw) for raw in data["licences"]]
        ids = [lic.id for lic in out]
        if len(set(ids)) != len(ids):
            raise LicenceError(f"licences file {self.path}: licence ids repeat")
        return out

    def load_or_empty(self) -> list[Licence]:
        return self.load() if os.path.exists(self.path) else []

    def save(self, licences: list[Licence]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".licences-", dir=directory)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": FILE_VERSION, "licences": [lic.to_json() for lic in licences]}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)  # readers see the old file or the new one, never a mix
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def issue(self, manifest_sha256: str, *, holder: str = "", expires_at: Optional[float] = None,
              max_sessions: int = 0, budget: Optional[dict] = None, period_s: Optional[int] = None,
              period_budget: Optional[dict] = None, key: Optional[str] = None,
              key_sha256: Optional[str] = None) -> tuple[Licence, Optional[str]]:
        """A new licence; returns it and its key (None when ``key_sha256`` reuses an existing key)."""
        licences = self.load_or_empty()
        if key_sha256 is None:
            key = key or new_key()
            key_sha256 = hash_key(key)
        else:
            key = None
        lic = Licence(id="lic_" + secrets.token_hex(6), key_sha256=key_sha256, manifest_sha256=manifest_sha256,
                      holder=holder, issued_at=time.time(), expires_at=expires_at, max_sessions=int(max_sessions),
                      budget=dict(budget or {}), period_s=period_s, period_budget=dict(period_budget or {}))
        lic = Licence.from_json(lic.to_json())  # the same checks as the service's
        self.save(licences + [lic])
        return lic, key

    def find(self, licence_id: str) -> Licence:
        for lic in self.load():
            if lic.id == licence_id:
                return lic
        raise LicenceError(f"no licence {licence_id!r} in {self.path}")

    def revoke(self, licence_id: str, reason: str = "") -> Licence:
        licences = self.load()
        for lic in licences:
            if lic.id == licence_id:
                if lic.revoked_at is None:
                    lic.revoked_at, lic.revoke_reason = time.time(), reason
                self.save(licences)
                return lic
        raise LicenceError(f"no licence {licence_id!r} in {self.path}")


def describe(lic: Licence, now: Optional[float] = None) -> str:
    """One line for ``slip license list``."""
    budget = ", ".join(f"{k} {v}" for k, v in lic.budget.items()) or "no total budget"
    period = (", per %ds: " % lic.period_s + ", ".join(f"{k} {v}" for k, v in lic.period_budget.items())
              if lic.period_budget else "")
    return (f"{lic.id}  {lic.state(now):8} holder={lic.holder or '-'}  bundle={lic.manifest_sha256[:12]}  "
            f"expires={_utc(lic.expires_at)}  sessions<={lic.max_sessions or 'any'}  {budget}{period}")


class LicenceStore:
    """The service's live view of the licences file (see the module docstring)."""

    def __init__(self, path: str, *, poll_s: float = 0.5):
        self.file = LicenceFile(path)
        self.path = path
        self.poll_s = max(0.05, float(poll_s))
        self._by_key: dict[str, Licence] = {}
        self._by_id: dict[str, Licence] = {}
        self.error: Optional[str] = None   # set while the file is unreadable: everything is refused
        self.reloads = 0
        self._stamp = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reload(initial=True)

    def _file_stamp(self):
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload(self, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            licences = self.file.load()
        except (OSError, LicenceError) as exc:
            if initial:
                raise LicenceError(str(exc)) from None
            if self.error is None:
                log.error("licences file %s is unreadable, every licence is refused until it is fixed: %s",
                          self.path, exc)
            self.error = str(exc)
            self._stamp = None
            return
        by_key: dict[str, Licence] = {}
        for lic in sorted(licences, key=lambda lic: lic.issued_at):
            by_key[lic.key_sha256] = lic  # the newest licence of a key wins
        self._by_key, self._by_id = by_key, {lic.id: lic for lic in licences}  # swapped, never mutated
        self._stamp, self.error = stamp, None
        self.reloads += 1
        if not initial:
            log.info("licences file %s reloaded: %d licence(s)", self.path, len(licences))

    def start(self) -> None:
        def watch():
            while not self._stop.wait(self.poll_s):
                try:
                    stamp = self._file_stamp()
                except OSError:
                    stamp = None
                if stamp != self._stamp or self.error is not None:
                    self._reload()

        self._thread = threading.Thread(target=watch, name="slip-licences-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def for_key(self, key_sha256: str) -> Optional[Licence]:
        return self._by_key.get(key_sha256)

    def by_id(self, licence_id: str) -> Optional[Licence]:
        return self._by_id.get(licence_id)

    def all(self) -> list[Licence]:
        return list(self._by_id.values())
