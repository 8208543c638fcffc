"""TRUSTED side: admission, budgets, metering and the usage log of the secure service.

What this module owns
---------------------
``Metering``: every data-plane call (``secure_service.data_plane``) goes through it, on HTTP and on
the shared-memory channel alike:

1. ``resolve(key_sha256, session)`` before anything is computed: the caller's licence (the newest
   licence of its key, ``secure_service.licences``) must be readable, known, not revoked, not
   expired, for this bundle, not locked out by the alarm policy, not exhausted, and the session
   must fit its ``max_sessions``.  Refusals raise ``Refused`` (401 unknown key, 402 exhausted,
   403 revoked / expired / other bundle / locked / too many sessions), with the reason.
   Without a licences file every caller is the anonymous account and nothing is refused here.
2. ``reserve(account, units)`` once the frame is decoded: the call's budget units (below) must fit
   what is left of every total and per-period budget, counting calls in flight; else 402.
3. ``commit`` after the reply is built (``release`` if the call failed): the units, rows, bytes
   and the call are added to the account.

How the service counts (what it sees, not what the host says it did):

* ``input_tokens``: token rows the service embedded (split: rows of a ``KIND_EMBED`` call;
  shielded: the tokens of a step frame).  Every token of a prompt and every generated token fed
  back is one input token: a request with P prompt tokens and G generated tokens costs P + G - 1.
* ``generated_tokens``: rows of logits the service produced (split: rows of an LM-head call, the
  embedding's tensor when tied; shielded: the logits rows of a step or of a MSG_ROWS request).
  One per sampled token; prompt-logprob rows count too (they are logits the host gets).
* ``steps``: engine steps (split: embedding calls; shielded: step frames).
* ``prompt_tokens`` is reported as input_tokens - generated_tokens (P - 1 per request).
* With tensor parallelism only the first shard's embedding and LM-head calls count (each rank
  sends its own shard of the same rows).

The usage log (``UsageLog``): append-only JSON lines, one ``O_APPEND`` write per record, each
record authenticated with HMAC-SHA256 under the vendor's key and chained to the previous record
(``prev``), so records cannot be altered, reordered or removed from the middle unnoticed
(``verify_usage_log``; the vendor should collect the log regularly, since its tail could be cut).
Records: ``start`` (service instance, bundle), ``usage`` (per licence: the delta since its previous
record, the licence's running totals, its period usage), ``lockout`` (alarm policy, with context),
``stop``.  What is written when:

* a call that returns logits (split LM-head call; shielded step with logits or MSG_ROWS) writes its
  licence's record BEFORE its reply leaves the service: once a token has been sampled from those
  logits, its usage is in the log;
* every ``SLIP_USAGE_FLUSH_S`` (1 s) a thread writes a record for every licence whose usage changed
  since its last record (input tokens, layer calls, refusals, alarms) and fsyncs the file;
* a clean shutdown writes the rest and a ``stop`` record.

A write has reached the kernel when ``os.write`` returns, so a SIGKILL of the service loses
nothing already written: after a SIGKILL the log accounts for every generated token whose logits
were returned, hence for every completed request, and may miss at most the last flush interval of
calls that returned no logits.  A power loss may lose what was written since the last fsync (at
most one flush interval).  On start the service verifies the whole log (a record that fails its
HMAC stops it), drops a torn last line (power loss), and restores every licence's totals, period
usage and lock-outs from it, so a restart neither resets a budget nor lifts a lock-out.

Integrity-alarm policy: ``SLIP_ALARM_LIMIT`` alarms (a Freivalds or range failure of a shielded
answer) of one licence within ``SLIP_ALARM_WINDOW_S`` lock it out for ``SLIP_ALARM_LOCKOUT_S``
(403), logged with the session and the alarms' reasons (service log and usage log).  Without
licences alarms are counted, not acted on.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from typing import Optional

from secure_service.licences import BUDGET_KEYS, Licence, LicenceStore

log = logging.getLogger("slip.service")

COUNTERS = ("generated_tokens", "input_tokens", "steps", "calls", "rows", "bytes_in", "bytes_out", "refused",
            "integrity_alarms")
ANONYMOUS = "-"  # the account of every caller when no licences file is configured
LOG_VERSION = 1


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _zero() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


class Account:
    """The usage of one licence (or the anonymous account).  All fields under ``Metering.lock``."""

    def __init__(self, licence_id: str):
        self.id = licence_id
        self.total = _zero()                      # since the licence was issued (restored from the log)
        self.logged = _zero()                     # the totals as of its last log record
        self.period_index: Optional[int] = None
        self.period = dict.fromkeys(BUDGET_KEYS, 0)
        self.pending = dict.fromkeys(BUDGET_KEYS, 0)  # reserved by calls in flight
        self.sessions: dict[int, float] = {}      # session -> last seen (monotonic)
        self.pinned: collections.Counter = collections.Counter()  # sessions with an attached channel
        self.alarms: collections.deque = collections.deque()     # (time, session, reason)
        self.locked_until = 0.0                   # unix time
        self.lock_reason = ""


# ---------------------------------------------------------------------------------------------
# the usage log
# ---------------------------------------------------------------------------------------------

def load_key(path: str, create: bool = False) -> bytes:
    """The vendor's HMAC key: a file holding 64 hex characters (or raw bytes).  ``create`` makes
    one (32 random bytes, mode 0600) if it does not exist."""
    if create and not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        log.info("usage-log HMAC key created at %s (the vendor needs it to verify the log)", path)
    raw = open(path, "rb").read().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii")) if len(raw) == 64 else raw
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise ValueError(f"usage-log key {path} is shorter than 16 bytes")
    return key


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, record: dict) -> str:
    return hmac.new(key, _canonical({k: v for k, v in record.items() if k != "mac"}), hashlib.sha256).hexdigest()


class UsageLogError(RuntimeError):
    pass


def read_usage_log(path: str, key: bytes, *, tolerate_torn_tail: bool = True) -> dict:
    """Verify every record (HMAC, chain, sequence) and summarize: ``records``, ``last_mac``,
    ``last_seq``, ``totals`` (licence -> its latest running totals), ``periods`` (licence ->
    (period_s, index, used)), ``lockouts`` (licence -> (until, reason)), ``torn_bytes`` (a torn
    last line, not verified).  Raises ``UsageLogError`` naming the first bad line."""
    out = {"records": 0, "last_mac": "", "last_seq": 0, "totals": {}, "periods": {}, "lockouts": {},
           "torn_bytes": 0, "starts": 0}
    if not os.path.exists(path):
        return out
    data = open(path, "rb").read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not tolerate_torn_tail:
            raise UsageLogError(f"{path}: the last line is torn")
        out["torn_bytes"] = len(data) - cut
        data = data[:cut]
    prev = ""
    for n, line in enumerate(data.splitlines(), 1):
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and hmac.compare_digest(str(rec.get("mac", "")), _mac(key, rec))
        except ValueError:
            ok = False
        if not ok:
            raise UsageLogError(f"{path} line {n}: the record fails authentication (altered, or another key)")
        if rec.get("prev") != prev or rec.get("seq") != out["last_seq"] + 1:
            raise UsageLogError(f"{path} line {n}: the chain is broken (a record was removed, reordered or inserted)")
        prev = rec["mac"]
        out["last_seq"] = rec["seq"]
        out["records"] += 1
        kind = rec.get("type")
        if kind == "usage":
            out["totals"][rec["licence"]] = dict(rec["total"])
            if rec.get("period"):
                p = rec["period"]
                out["periods"][rec["licence"]] = (p["period_s"], p["index"], dict(p["used"]))
        elif kind == "lockout":
            out["lockouts"][rec["licence"]] = (rec["until"], rec["reason"])
        elif kind == "start":
            out["starts"] += 1
    out["last_mac"] = prev
    return out


def verify_usage_log(path: str, key: bytes) -> dict:
    """For the vendor (``slip license usage``): ``read_usage_log`` with no torn tail allowed...
    except that a torn tail is reported rather than raised (it was never acknowledged)."""
    return read_usage_log(path, key, tolerate_torn_tail=True)


class UsageLog:
    """Appends authenticated records (see the module docstring).  Callers hold no lock of ours:
    ``append`` serializes."""

    def __init__(self, path: str, key: bytes):
        self.path = path
        self.key = key
        self.state = read_usage_log(path, key)
        if self.state["torn_bytes"]:
            size = os.path.getsize(path)
            log.warning("usage log %s: dropping a torn last line of %d bytes (never acknowledged)", path,
                        self.state["torn_bytes"])
            os.truncate(path, size - self.state["torn_bytes"])
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._prev = self.state["last_mac"]
        self._seq = self.state["last_seq"]
        self.dirty = False
        self.records_written = 0

    def append(self, record: dict) -> None:
        with self._lock:
            rec = {"v": LOG_VERSION, "seq": self._seq + 1, "time": round(time.time(), 6), "prev": self._prev, **record}
            rec["mac"] = _mac(self.key, rec)
            os.write(self._fd, _canonical(rec) + b"\n")  # in the kernel once this returns: survives SIGKILL
            self._seq, self._prev = rec["seq"], rec["mac"]
            self.dirty = True
            self.records_written += 1

    def sync(self) -> None:
        with self._lock:
            if self.dirty:
                os.fsync(self._fd)
                self.dirty = False

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


# ---------------------------------------------------------------------------------------------
# admission and metering
# ---------------------------------------------------------------------------------------------

class Metering:
    """See the module docstring.  store: the live licences (None: no licences, one anonymous
    account); usage_log: where records go (None: metering in memory only)."""

    def __init__(self, *, manifest_sha256: str, store: Optional[LicenceStore] = None,
                 usage_log: Optional[UsageLog] = None, flush_s: float = 1.0, session_idle_s: float = 60.0,
                 alarm_limit: int = 3, alarm_window_s: float = 60.0, alarm_lockout_s: float = 3600.0,
                 instance: int = 0):
        self.manifest_sha256 = manifest_sha256
        self.store = store
        self.log = usage_log
        self.flush_s = max(0.05, float(flush_s))
        self.session_idle_s = float(session_idle_s)
        self.alarm_limit = int(alarm_limit) if store is not None else 0
        self.alarm_window_s = float(alarm_window_s)
        self.alarm_lockout_s = float(alarm_lockout_s)
        self.lock = threading.Lock()
        self.accounts: dict[str, Account] = {}
        self.lockouts_total = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if usage_log is not None:
            self._restore(usage_log.state)
            usage_log.append({"type": "start", "instance": f"{instance:x}", "manifest_sha256": manifest_sha256,
                              "licences": len(store.all()) if store is not None else None})
            usage_log.sync()

    @property
    def licensed(self) -> bool:
        return self.store is not None

    def _restore(self, state: dict) -> None:
        for lid, total in state["totals"].items():
            acc = self.accounts[lid] = Account(lid)
            for k in COUNTERS:
                acc.total[k] = acc.logged[k] = int(total.get(k, 0))
        now = time.time()
        for lid, (period_s, index, used) in state["periods"].items():
            acc = self.accounts.setdefault(lid, Account(lid))
            if period_s and int(now // period_s) == index:
                acc.period_index = index
                acc.period.update({k: int(used.get(k, 0)) for k in BUDGET_KEYS})
        for lid, (until, reason) in state["lockouts"].items():
            acc = self.accounts.setdefault(lid, Account(lid))
            acc.locked_until, acc.lock_reason = float(until), reason

    def _account(self, lid: str) -> Account:
        acc = self.accounts.get(lid)
        if acc is None:
            acc = self.accounts[lid] = Account(lid)
        return acc

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.log is None:
            return

        def loop():
            while not self._stop.wait(self.flush_s):
                try:
                    self.flush()
                except Exception:  # a full disk must not kill the thread silently
                    log.exception("usage log: flush failed")

        self._thread = threading.Thread(target=loop, name="slip-usage-flush", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self.log is not None:
            self.flush()
            self.log.append({"type": "stop"})
            self.log.close()
            self.log = None

    # -- 1. who is calling ---------------------------------------------------------------------

    def licence_of(self, key_sha256: Optional[str]) -> Licence:
        """The licence a key stands for, or ``Refused`` (401 / 403 when the file is unreadable)."""
        store = self.store
        if store.error is not None:
            raise Refused(403, f"licence check failed: the service's licences file is unreadable ({store.error})")
        lic = store.for_key(key_sha256) if key_sha256 else None
        if lic is None:
            raise Refused(401, "missing or unknown licence key (the engine's SLIP_SERVICE_TOKEN)")
        return lic

    def resolve(self, key_sha256: Optional[str], session: Optional[int] = None, *, pin: bool = False) -> Account:
        """Step 1 of the module docstring.  pin: an attached channel holds the session (it counts
        against max_sessions until ``unpin``)."""
        if self.store is None:
            with self.lock:
                return self._account(ANONYMOUS)
        lic = self.licence_of(key_sha256)
        now = time.time()
        state = lic.state(now)
        if state == "revoked":
            why = f" ({lic.revoke_reason})" if lic.revoke_reason else ""
            raise Refused(403, f"licence revoked: licence {lic.id} was revoked{why}")
        if state == "expired":
            raise Refused(403, f"licence expired: licence {lic.id} expired at "
                               f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(lic.expires_at))}")
        if not hmac.compare_digest(lic.manifest_sha256, self.manifest_sha256):
            raise Refused(403, f"licence {lic.id} is for another bundle (manifest {lic.manifest_sha256[:16]}...), "
                               f"this service holds {self.manifest_sha256[:16]}...")
        with self.lock:
            acc = self._account(lic.id)
            if acc.locked_until > now:
                raise Refused(403, f"licence locked: licence {lic.id} is locked out until "
                                   f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(acc.locked_until))} "
                                   f"({acc.lock_reason})")
            self._roll_period(acc, lic, now)
            for k in BUDGET_KEYS:
                if k in lic.budget and acc.total[k] >= lic.budget[k]:
                    raise Refused(402, self._exhausted(lic, k, acc.total[k], lic.budget[k], "total"))
                if k in lic.period_budget and acc.period[k] >= lic.period_budget[k]:
                    raise Refused(402, self._exhausted(lic, k, acc.period[k], lic.period_budget[k],
                                                       f"per {lic.period_s} s"))
            if session is not None:
                mono = time.monotonic()
                if session not in acc.sessions:
                    live = {s for s, seen in acc.sessions.items() if mono - seen < self.session_idle_s}
                    live |= {s for s, n in acc.pinned.items() if n > 0}
                    if lic.max_sessions and len(live) >= lic.max_sessions:
                        raise Refused(403, f"licence {lic.id} allows {lic.max_sessions} concurrent engine "
                                           f"session(s) and {len(live)} are active")
                    for s in [s for s, seen in acc.sessions.items() if mono - seen >= self.session_idle_s]:
                        del acc.sessions[s]
                acc.sessions[session] = mono
                if pin:
                    acc.pinned[session] += 1
            return acc

    def unpin(self, acc: Account, session: int) -> None:
        with self.lock:
            acc.pinned[session] -= 1
            if acc.pinned[session] <= 0:
                del acc.pinned[session]
            acc.sessions[session] = time.monotonic()

    @staticmethod
    def _exhausted(lic: Licence, k: str, used: int, limit: int, scope: str) -> str:
        return (f"licence exhausted: licence {lic.id} has used {used} of its {limit} {k.replace('_', ' ')} "
                f"({scope} budget); renew it (slip license renew {lic.id}) or issue another")

    @staticmethod
    def _roll_period(acc: Account, lic: Licence, now: float) -> None:
        if lic.period_s:
            index = int(now // lic.period_s)
            if acc.period_index != index:
                acc.period_index = index
                acc.period = dict.fromkeys(BUDGET_KEYS, 0)

    # -- 2. / 3. budgets -----------------------------------------------------------------------

    def reserve(self, acc: Account, units: dict[str, int]) -> dict[str, int]:
        if self.store is None or not any(units.values()):
            return units
        lic = self.store.by_id(acc.id)
        with self.lock:
            if lic is not None:
                self._roll_period(acc, lic, time.time())
                for k, n in units.items():
                    if not n:
                        continue
                    if k in lic.budget and acc.total[k] + acc.pending[k] + n > lic.budget[k]:
                        left = max(0, lic.budget[k] - acc.total[k] - acc.pending[k])
                        raise Refused(402, f"licence exhausted: licence {lic.id}: this call needs {n} "
                                           f"{k.replace('_', ' ')}, {left} of its {lic.budget[k]} are left (total "
                                           f"budget); renew it (slip license renew {lic.id}) or issue another")
                    if k in lic.period_budget and acc.period[k] + acc.pending[k] + n > lic.period_budget[k]:
                        left = max(0, lic.period_budget[k] - acc.period[k] - acc.pending[k])
                        raise Refused(402, f"licence exhausted: licence {lic.id}: this call needs {n} "
                                           f"{k.replace('_', ' ')}, {left} of its {lic.period_budget[k]} per "
                                           f"{lic.period_s} s are left")
            for k, n in units.items():
                acc.pending[k] += n
        return units

    def release(self, acc: Account, reserved: dict[str, int]) -> None:
        if self.store is None or not any(reserved.values()):
            return
        with self.lock:
            for k, n in reserved.items():
                acc.pending[k] -= n

    def commit(self, acc: Account, reserved: dict[str, int], *, rows: int, bytes_in: int, bytes_out: int) -> None:
        """The call succeeded.  A call that produced logits is written to the usage log now,
        before its reply leaves (see the module docstring)."""
        with self.lock:
            t = acc.total
            for k, n in reserved.items():
                if n:
                    t[k] += n
                    if self.store is not None:
                        acc.pending[k] -= n
                        acc.period[k] += n
            t["calls"] += 1
            t["rows"] += rows
            t["bytes_in"] += bytes_in
            t["bytes_out"] += bytes_out
        if reserved.get("generated_tokens") and self.log is not None:
            self._write(acc)

    def count_refused(self, acc: Optional[Account]) -> None:
        if acc is None:
            return
        with self.lock:
            acc.total["refused"] += 1

    # -- integrity alarms ----------------------------------------------------------------------

    def alarm(self, acc: Optional[Account], session: Optional[int], reason: str) -> None:
        if acc is None:
            return
        now = time.time()
        locked = None
        with self.lock:
            acc.total["integrity_alarms"] += 1
            acc.alarms.append((now, session, reason[:300]))
            while acc.alarms and acc.alarms[0][0] < now - self.alarm_window_s:
                acc.alarms.popleft()
            if self.alarm_limit and len(acc.alarms) >= self.alarm_limit and acc.locked_until <= now:
                acc.locked_until = now + self.alarm_lockout_s
                acc.lock_reason = (f"{len(acc.alarms)} integrity alarms within {self.alarm_window_s:g} s "
                                   f"(limit {self.alarm_limit})")
                locked = [{"time": round(t, 3), "session": None if s is None else f"{s:x}", "reason": r}
                          for t, s, r in acc.alarms]
                self.lockouts_total += 1
        log.warning("integrity alarm: licence %s, session %s: %s", acc.id,
                    "-" if session is None else f"{session:#x}", reason[:300])
        if locked is not None:
            log.error("licence %s LOCKED OUT until %s: %s; alarms: %s", acc.id,
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(acc.locked_until)), acc.lock_reason, locked)
            if self.log is not None:
                self._write(acc)
                self.log.append({"type": "lockout", "licence": acc.id, "until": acc.locked_until,
                                 "reason": acc.lock_reason,
                                 "session": None if session is None else f"{session:x}", "alarms": locked})

    # -- the log -------------------------------------------------------------------------------

    def _write(self, acc: Account) -> None:
        with self.lock:
            total = dict(acc.total)
            delta = {k: total[k] - acc.logged[k] for k in COUNTERS if total[k] != acc.logged[k]}
            if not delta:
                return
            acc.logged = total
            lic = self.store.by_id(acc.id) if self.store is not None else None
            period = ({"period_s": lic.period_s, "index": acc.period_index, "used": dict(acc.period)}
                      if lic is not None and lic.period_s and acc.period_index is not None else None)
            record = {"type": "usage", "licence": acc.id, "delta": delta, "total": total}
            if period:
                record["period"] = period
            # appended under our lock: records of one licence keep the order of their totals
            self.log.append(record)

    def flush(self) -> None:
        if self.log is None:
            return
        for acc in list(self.accounts.values()):
            self._write(acc)
        self.log.sync()

    # -- reporting -----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """licence id -> its counters (and prompt_tokens = input - generated, state, lock)."""
        now = time.time()
        out = {}
        with self.lock:
            for lid, acc in self.accounts.items():
                d = dict(acc.total)
                d["prompt_tokens"] = max(0, d["input_tokens"] - d["generated_tokens"])
                d["locked"] = acc.locked_until > now
                out[lid] = d
        if self.store is not None:
            for lic in self.store.all():
                entry = out.setdefault(lic.id, {**_zero(), "prompt_tokens": 0, "locked": False})
                entry["state"] = lic.state(now)
        return out
