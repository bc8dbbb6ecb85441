"""A site-owned, append-only, tamper-evident record of every DP training call.

The ledger is JSON Lines, one :class:`LedgerEntry` per line. Each entry carries the hash of the
entry before it (``prev_hash``) and its own hash over all its other fields, so an edited entry
breaks its own hash and a deleted or moved entry breaks the chain. A head file
``<ledger>.head`` (``{"count": N, "hash": <last hash>}``) catches deletion of the last entries,
which the chain alone cannot see.

This detects accidental or naive edits; it is not a defence against someone who recomputes all
hashes (there is no secret key). Epsilon is always the accountant's composition of the whole
history for a dataset, across rounds and runs, never a sum of per-call epsilons.

Crash safety: ``append`` writes the whole new ledger to a temp file, fsyncs it and
``os.replace``s it over the ledger, then does the same for the head. A kill leaves either the old
ledger or the new one. A kill between the two replaces leaves a ledger exactly one valid entry
ahead of its head; that entry was fully written, so :meth:`PrivacyLedger.entries` accepts it and
repairs the head. Any other disagreement between ledger and head is reported as tampering.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.io_utils import atomic_write_json, atomic_write_text

# Not imported from accounting: that pulls in Opacus/torch (seconds), which the ledger itself
# only needs in epsilon().
Mechanism = Literal["prv", "rdp"]

_SEALED = ("time", "prev_hash", "hash")  # fields append() computes, never the caller


class LedgerError(RuntimeError):
    """The ledger or its head was corrupted or tampered with."""


class RunPlan(BaseModel):
    """A run's plan as the site fixed it at the run's first round (recorded with that entry)."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(ge=1)
    steps_per_round: int = Field(ge=1)
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(ge=0)
    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)


class LedgerEntry(BaseModel):
    """One DP training call at this site."""

    model_config = ConfigDict(extra="forbid")

    # The site's name for its data (the lifetime cap follows it); in ledgers written before
    # names, the content hash (then ``fingerprint`` is absent).
    dataset: str
    run_id: str
    round: int
    steps: int = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: Mechanism
    # k when the site bounds each privacy unit to k rows (fedtune/data/units.py); absent: 1.
    rows_per_unit: Optional[int] = Field(None, ge=1)
    time: str  # ISO-8601 UTC
    prev_hash: str  # hash of the previous entry ("" for the first)
    hash: str  # sha256 of the canonical JSON of all other fields
    # Optional fields, absent (not null) when unset, so entries written before them still verify.
    fingerprint: Optional[str] = None  # dataset_fingerprint() of the data at this call
    plan: Optional[RunPlan] = None     # on a run's first entry: the plan the site fixed
    # The delta the dataset's lifetime cap is composed at: fixed by the site at the dataset's
    # first use (client/budget.py) and repeated on every entry; absent in older ledgers.
    dataset_delta: Optional[float] = Field(None, gt=0, lt=1)
    # "evaluate": one noised evaluation answer (client/evaluation_policy.py), a Gaussian release
    # of test-row sums with noise multiplier ``noise_multiplier`` (sample rate 1, 1 step, the sums
    # scaled to sensitivity 1: ``max_grad_norm`` 1); absent: a DP-SGD training call.
    kind: Optional[Literal["evaluate"]] = None

    @property
    def is_evaluation(self) -> bool:
        return self.kind == "evaluate"

    def expected_hash(self) -> str:
        # Optional fields left unset are not hashed, so entries written before they existed verify.
        return _sha256_json(self.model_dump(exclude={"hash"}, exclude_none=True))

    def line(self) -> str:
        return _canonical(self.model_dump(exclude_none=True))

    def of_dataset(self, name: str, fingerprint: Optional[str] = None) -> bool:
        """On the dataset ``name``; an entry from before dataset names counts where its content
        hash is ``fingerprint``."""
        return self.dataset == name or (self.fingerprint is None and fingerprint is not None
                                        and self.dataset == fingerprint)


class PrivacyLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._depth = 0  # this instance's nesting of locked(): the flock is taken once

    @contextmanager
    def locked(self) -> Iterator["PrivacyLedger"]:
        """Hold the ledger's lock across a check and the append it leads to: another process
        (or another PrivacyLedger on the same file) waits, so two trainings cannot both pass a
        budget check before either is recorded."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            yield self

    def entries(self) -> list[LedgerEntry]:
        """All entries, after verifying the whole chain and the head (raises LedgerError)."""
        if not self.path.exists() and not self.head_path.exists():
            return []  # nothing written yet (the folder may not exist either)
        with self._locked():
            return self._load()[1]

    def append(self, entry_fields: dict) -> LedgerEntry:
        """Seal ``entry_fields`` (adds time, prev_hash, hash) and append it atomically."""
        given = sorted(set(entry_fields) & set(_SEALED))
        if given:
            raise ValueError(f"append() computes {given} itself; do not pass them")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._remove_stale_temps()
            text, entries = self._load()
            fields = {
                **entry_fields,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "prev_hash": entries[-1].hash if entries else "",
                "hash": "",
            }
            entry = LedgerEntry.model_validate(fields)
            entry = entry.model_copy(update={"hash": entry.expected_hash()})
            # Ledger first, then head: a kill in between leaves the ledger one entry ahead,
            # which _load() accepts (see the module docstring).
            atomic_write_text(self.path, text + entry.line() + "\n")
            self._write_head(len(entries) + 1, entry.hash)
            return entry

    def history(self, dataset: str) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` of every training call on ``dataset``, in order."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries()
                if e.dataset == dataset and not e.is_evaluation]

    def epsilon(self, dataset: str, delta: float, mechanism: Optional[str] = None) -> float:
        """Epsilon of everything this site ever released about ``dataset`` (training and
        evaluation answers), composed by the accountant (fedtune/privacy/composition.py); with
        ``mechanism``, that accountant for every entry, else each entry's own."""
        from fedtune.privacy.composition import dataset_epsilon

        return dataset_epsilon([e for e in self.entries() if e.dataset == dataset], delta, mechanism)

    def runs(self, dataset: str) -> dict[str, list[int]]:
        """run_id -> rounds trained on ``dataset`` (one per training entry, in ledger order)."""
        out: dict[str, list[int]] = {}
        for e in self.entries():
            if e.dataset == dataset and not e.is_evaluation:
                out.setdefault(e.run_id, []).append(e.round)
        return out

    # --- internals -------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is dropped by the kernel when the holder dies, so a killed writer never wedges it.
        # Each open() is its own lock holder: a second PrivacyLedger waits, this one re-enters.
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _fail(self, what: str) -> LedgerError:
        return LedgerError(f"ledger {self.path}: {what}")

    def _load(self) -> tuple[str, list[LedgerEntry]]:
        """Raw text and verified entries; repairs a head that is exactly one entry behind."""
        text = self._read_text()
        entries = self._verify_chain(text)
        self._check_head(entries)
        return text, entries

    def _read_text(self) -> str:
        try:
            return self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return ""
        except UnicodeDecodeError as err:
            raise self._fail(f"is not UTF-8 text ({err})") from None

    def _verify_chain(self, text: str) -> list[LedgerEntry]:
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # every written line ends with "\n"
        entries: list[LedgerEntry] = []
        for number, line in enumerate([*complete, tail] if tail else complete, start=1):
            try:
                raw = json.loads(line)
                entry = LedgerEntry.model_validate(raw)
            except json.JSONDecodeError:
                raise self._fail(f"entry {number} is not valid JSON (truncated or edited line)") from None
            except ValidationError as err:
                raise self._fail(f"entry {number} is malformed: {_first_error(err)}") from None
            if number > len(complete):
                raise self._fail(f"entry {number} has no line end (the file was truncated)")
            if entry.hash != entry.expected_hash():
                raise self._fail(f"entry {number} was modified (hash mismatch)")
            expected_prev = entries[-1].hash if entries else ""
            if entry.prev_hash != expected_prev:
                raise self._fail(
                    f"entry {number} does not follow entry {number - 1} "
                    "(chain broken: entries were deleted, inserted or reordered)"
                    if number > 1
                    else "entry 1 is not the first entry (chain broken: entries were deleted at the start)"
                )
            entries.append(entry)
        return entries

    def _check_head(self, entries: list[LedgerEntry]) -> None:
        n = len(entries)
        head = self._read_head()
        if head is None:  # never written: only a crash before the first head write explains it
            if n == 0:
                return
            if n == 1:
                self._write_head(1, entries[0].hash)
                return
            raise self._fail(f"has {n} entries but its head file {self.head_path.name} is missing")
        count, last = head
        if count == n and last == (entries[-1].hash if entries else ""):
            return
        if count == n - 1 and last == (entries[-2].hash if n >= 2 else ""):
            # Killed between replacing the ledger and the head: the extra entry was fully written.
            self._write_head(n, entries[-1].hash)
            return
        if count > n:
            raise self._fail(f"has {n} entries but its head records {count}: entries were deleted")
        if count == n:
            raise self._fail(f"its head hash does not match entry {n}: the ledger or its head was edited")
        raise self._fail(
            f"has {n} entries but its head records {count}: entries were added or the head was edited"
        )

    def _read_head(self) -> tuple[int, str] | None:
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._fail(f"head file {self.head_path.name} is not valid JSON") from None
        if (
            not isinstance(head, dict)
            or set(head) != {"count", "hash"}
            or type(head["count"]) is not int
            or not isinstance(head["hash"], str)
        ):
            raise self._fail(f"head file {self.head_path.name} is malformed: {head!r}")
        return head["count"], head["hash"]

    def _write_head(self, count: int, last_hash: str) -> None:
        atomic_write_json(self.head_path, {"count": count, "hash": last_hash})

    def _remove_stale_temps(self) -> None:
        # A writer killed before os.replace leaves its temp file behind (io_utils' naming);
        # under the lock no other writer of this ledger is mid-write.
        pattern = re.compile(rf"\.{re.escape(self.path.name)}(\.head)?\.[A-Za-z0-9_]+\.tmp")
        for p in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            if pattern.fullmatch(p.name):
                p.unlink(missing_ok=True)


def dataset_fingerprint(path_or_bytes: str | Path | bytes | list[str] | tuple[str, ...]) -> str:
    """Hex sha256 of a dataset: a file's bytes (streamed), raw bytes, or a list of strings
    (e.g. generated rows) hashed in order, each length-prefixed so ``["ab"]`` != ``["a", "b"]``."""
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        h.update(path_or_bytes)
    elif isinstance(path_or_bytes, (list, tuple)):
        for row in path_or_bytes:
            data = row.encode("utf-8")
            h.update(f"{len(data)}:".encode())
            h.update(data)
    else:
        with open(path_or_bytes, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256_json(obj: dict) -> str:
    return hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    return f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}"
