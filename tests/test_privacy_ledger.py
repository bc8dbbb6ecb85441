"""The site's DP ledger: composition, tamper evidence and crash safety."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger, dataset_fingerprint

REPO = Path(__file__).resolve().parents[1]
LEDGER_PY = REPO / "fedtune" / "privacy" / "ledger.py"
DATA_A = dataset_fingerprint(b"dataset A rows")
DATA_B = dataset_fingerprint(b"dataset B rows")


def fields(dataset=DATA_A, run_id="run-1", round=1, steps=100, sample_rate=0.01, noise=1.1):
    return {
        "dataset": dataset,
        "run_id": run_id,
        "round": round,
        "steps": steps,
        "sample_rate": sample_rate,
        "noise_multiplier": noise,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
    }


def make_ledger(tmp_path: Path, n: int = 4) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for r in range(1, n + 1):
        ledger.append(fields(round=r, steps=100 + r))
    return ledger


def lines(ledger: PrivacyLedger) -> list[str]:
    return ledger.path.read_text().splitlines(keepends=True)


# --- append, read back, compose ------------------------------------------------------------


def test_append_and_read_back(tmp_path):
    ledger = PrivacyLedger(tmp_path / "site" / "ledger.jsonl")
    assert ledger.entries() == []
    written = [ledger.append(fields(round=r)) for r in (1, 2, 3)]
    read = ledger.entries()
    assert read == written
    assert [e.prev_hash for e in read] == ["", read[0].hash, read[1].hash]
    assert all(e.hash == e.expected_hash() for e in read)
    assert read[0].time.endswith("+00:00")
    assert json.loads(ledger.head_path.read_text()) == {"count": 3, "hash": read[-1].hash}
    assert PrivacyLedger(ledger.path).entries() == written  # a fresh reader sees the same


def test_append_rejects_sealed_or_unknown_fields(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="hash"):
        ledger.append({**fields(), "hash": "x"})
    with pytest.raises(ValueError):
        ledger.append({**fields(), "typo": 1})
    assert ledger.entries() == []


def test_epsilon_composes_history_across_rounds_and_runs(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append(fields(run_id="run-1", round=1, steps=200, noise=1.0))
    ledger.append(fields(run_id="run-1", round=2, steps=150, noise=1.2))
    ledger.append(fields(dataset=DATA_B, run_id="run-1", round=1, steps=500, noise=0.8))
    ledger.append(fields(run_id="run-2", round=1, steps=300, sample_rate=0.02, noise=1.5))

    hist_a = ledger.history(DATA_A)
    assert hist_a == [(1.0, 0.01, 200), (1.2, 0.01, 150), (1.5, 0.02, 300)]
    assert ledger.history(DATA_B) == [(0.8, 0.01, 500)]
    assert ledger.runs(DATA_A) == {"run-1": [1, 2], "run-2": [1]}
    assert ledger.runs(DATA_B) == {"run-1": [1]}

    for mechanism in ("rdp", "prv"):
        eps = ledger.epsilon(DATA_A, 1e-5, mechanism)
        assert eps == pytest.approx(compute_epsilon(hist_a, 1e-5, mechanism))
        singles = [compute_epsilon([h], 1e-5, mechanism) for h in hist_a]
        assert eps > max(singles)
        assert eps < sum(singles)  # composed, not summed
    # Two runs on one dataset compose: more than run-1 alone.
    assert ledger.epsilon(DATA_A, 1e-5, "rdp") > compute_epsilon(hist_a[:2], 1e-5, "rdp")
    # Other datasets are separate.
    eps_b = compute_epsilon([(0.8, 0.01, 500)], 1e-5, "rdp")
    assert ledger.epsilon(DATA_B, 1e-5, "rdp") == pytest.approx(eps_b)
    assert ledger.epsilon(dataset_fingerprint(b"never trained"), 1e-5, "rdp") == 0.0


def test_dataset_fingerprint(tmp_path):
    f = tmp_path / "train.csv"
    f.write_bytes(b"text,label\nhello,1\n")
    assert dataset_fingerprint(f) == dataset_fingerprint(str(f)) == dataset_fingerprint(f.read_bytes())
    assert len(dataset_fingerprint(f)) == 64
    assert dataset_fingerprint(["a", "b"]) == dataset_fingerprint(["a", "b"])
    assert dataset_fingerprint(["a", "b"]) != dataset_fingerprint(["b", "a"])
    assert dataset_fingerprint(["ab"]) != dataset_fingerprint(["a", "b"])


# --- tampering -----------------------------------------------------------------------------


def test_edited_entry_is_named(tmp_path):
    ledger = make_ledger(tmp_path)
    ls = lines(ledger)
    assert '"steps":103' in ls[2]
    ls[2] = ls[2].replace('"steps":103', '"steps":13')
    ledger.path.write_text("".join(ls))
    with pytest.raises(LedgerError, match=r"ledger .*ledger\.jsonl: entry 3 was modified \(hash mismatch\)"):
        ledger.entries()
    with pytest.raises(LedgerError):  # and nothing can be appended on top of it
        ledger.append(fields())


def test_deleted_middle_entry_breaks_chain(tmp_path):
    ledger = make_ledger(tmp_path)
    ls = lines(ledger)
    ledger.path.write_text("".join(ls[:1] + ls[2:]))
    with pytest.raises(LedgerError, match="entry 2 does not follow entry 1 .*chain broken"):
        ledger.entries()


def test_deleted_first_entry_breaks_chain(tmp_path):
    ledger = make_ledger(tmp_path)
    ledger.path.write_text("".join(lines(ledger)[1:]))
    with pytest.raises(LedgerError, match="entry 1 is not the first entry"):
        ledger.entries()


def test_deleted_last_entry_caught_by_head(tmp_path):
    ledger = make_ledger(tmp_path)
    ledger.path.write_text("".join(lines(ledger)[:-1]))
    with pytest.raises(LedgerError, match="has 3 entries but its head records 4: entries were deleted"):
        ledger.entries()


def test_emptied_or_removed_ledger_is_caught(tmp_path):
    ledger = make_ledger(tmp_path)
    ledger.path.write_text("")
    with pytest.raises(LedgerError, match="has 0 entries but its head records 4"):
        ledger.entries()
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="entries were deleted"):
        ledger.entries()


def test_truncated_last_line(tmp_path):
    ledger = make_ledger(tmp_path)
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])
    with pytest.raises(LedgerError, match="entry 4 is not valid JSON"):
        ledger.entries()
    ledger.path.write_bytes(data[:-1])  # only the final newline lost
    with pytest.raises(LedgerError, match="entry 4 has no line end"):
        ledger.entries()


def test_reordered_lines(tmp_path):
    ledger = make_ledger(tmp_path)
    ls = lines(ledger)
    ls[1], ls[2] = ls[2], ls[1]
    ledger.path.write_text("".join(ls))
    with pytest.raises(LedgerError, match="entry 2 does not follow entry 1"):
        ledger.entries()


def test_bad_json_and_extra_fields(tmp_path):
    ledger = make_ledger(tmp_path)
    ls = lines(ledger)
    ledger.path.write_text("".join([ls[0], "{not json}\n", *ls[2:]]))
    with pytest.raises(LedgerError, match="entry 2 is not valid JSON"):
        ledger.entries()
    extra = json.loads(ls[1]) | {"note": "x"}
    ledger.path.write_text("".join([ls[0], json.dumps(extra) + "\n", *ls[2:]]))
    with pytest.raises(LedgerError, match="entry 2 is malformed"):
        ledger.entries()


def test_edited_head(tmp_path):
    ledger = make_ledger(tmp_path)
    head = json.loads(ledger.head_path.read_text())
    ledger.head_path.write_text(json.dumps({**head, "count": 5}))
    with pytest.raises(LedgerError, match="has 4 entries but its head records 5: entries were deleted"):
        ledger.entries()
    ledger.head_path.write_text(json.dumps({**head, "hash": "0" * 64}))
    with pytest.raises(LedgerError, match="head hash does not match entry 4"):
        ledger.entries()
    ledger.head_path.write_text(json.dumps({**head, "count": 2}))
    with pytest.raises(LedgerError, match="has 4 entries but its head records 2"):
        ledger.entries()
    ledger.head_path.write_text("{")
    with pytest.raises(LedgerError, match="head file .* is not valid JSON"):
        ledger.entries()
    ledger.head_path.unlink()
    with pytest.raises(LedgerError, match="head file .* is missing"):
        ledger.entries()


# --- crash safety --------------------------------------------------------------------------


def test_one_entry_ahead_of_head_is_recovered(tmp_path):
    """Killed between replacing the ledger and the head: the extra entry was fully written."""
    ledger = make_ledger(tmp_path, n=3)
    old_head = ledger.head_path.read_text()
    fourth = ledger.append(fields(round=4))
    ledger.head_path.write_text(old_head)  # as if the head replace never happened

    entries = ledger.entries()
    assert len(entries) == 4 and entries[-1] == fourth
    assert json.loads(ledger.head_path.read_text()) == {"count": 4, "hash": fourth.hash}  # repaired
    ledger.append(fields(round=5))
    assert len(ledger.entries()) == 5

    # Two entries ahead is not a crash: it is tampering.
    ledger.head_path.write_text(old_head)
    with pytest.raises(LedgerError, match="has 5 entries but its head records 3"):
        ledger.entries()


def test_first_entry_without_head_is_recovered(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    first = ledger.append(fields())
    ledger.head_path.unlink()  # killed before the first head was written
    assert ledger.entries() == [first]
    assert json.loads(ledger.head_path.read_text()) == {"count": 1, "hash": first.hash}


def test_stale_temp_files_are_removed(tmp_path):
    ledger = make_ledger(tmp_path, n=1)
    stale = tmp_path / ".ledger.jsonl.abc_123.tmp"
    stale.write_text("half a ledger")
    other = tmp_path / ".other.jsonl.abc_123.tmp"
    other.write_text("not ours")
    ledger.append(fields(round=2))
    assert not stale.exists() and other.exists()
    assert len(ledger.entries()) == 2


# The child loads ledger.py by path: importing the fedtune.privacy package would pull in
# Opacus/torch (seconds per restart), which the ledger does not need to append.
CHILD = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("ledger_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
ledger = mod.PrivacyLedger(Path(sys.argv[2]))
tag = sys.argv[3]
print("ready", flush=True)
r = 0
while True:
    r += 1
    e = ledger.append({"dataset": "d", "run_id": tag, "round": r, "steps": 10, "sample_rate": 0.01,
                       "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"})
    print("committed", e.hash, flush=True)
"""


def test_killed_mid_write_never_corrupts(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20240601)
    committed: set[str] = set()
    previous: list[str] = []
    for attempt in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(LEDGER_PY), str(ledger.path), f"kill-{attempt}"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.3))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        out = child.stdout.read()
        child.stdout.close()
        committed |= {line.split()[1] for line in out.splitlines() if line.startswith("committed ")}

        hashes = [e.hash for e in ledger.entries()]  # raises LedgerError on any corruption
        assert hashes[: len(previous)] == previous, f"attempt {attempt}: earlier entries changed"
        assert committed <= set(hashes), f"attempt {attempt}: a committed entry was lost"
        previous = hashes
    assert len(previous) > 10  # the children really did append
    assert isinstance(ledger.entries()[0], LedgerEntry)


def test_a_vanishing_noise_is_accounted_at_once_by_the_rdp_bound():
    """A hostile run config's noise 0.05: PRV's numerics would need GiBs and minutes (then a
    MemoryError) in the site's budget check; the RDP bound (valid, larger) answers at once. Below
    the limit PRV still gives its tighter number."""
    from fedtune.privacy.accounting import PRV_LIMIT, compute_epsilon

    hostile = [(0.05, 32 / 5000, 156)]
    assert compute_epsilon(hostile, 1e-5, "prv") == compute_epsilon(hostile, 1e-5, "rdp") > PRV_LIMIT
    honest = [(0.5, 32 / 5000, 156)]
    assert compute_epsilon(honest, 1e-5, "prv") < compute_epsilon(honest, 1e-5, "rdp") < PRV_LIMIT
