"""The site agent's console: one line per round from the site's side, what it spent (from its
own privacy ledger) and what it sent (from ``traffic.jsonl``, written by the ClientApp's
``traffic_mod``), read from the site's state folder while the SuperNode runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

from fedtune.client.traffic import TRAFFIC_FILE
from fedtune.console import BackgroundPoller
from fedtune.io_utils import read_jsonl

EVALUATE = "evaluate"


def _read_jsonl(path: Path) -> list[dict]:
    """The traffic entries so far: none before the first, a torn last line left for the next poll."""
    try:
        return read_jsonl(path)
    except FileNotFoundError:
        return []


def spent(ledger_path: Path, rnd: int, since: int = 0) -> Optional[dict]:
    """What the ledger says about round ``rnd`` among the entries after the first ``since``:
    that round's noise and steps, epsilon over its run so far and over every run on the same data
    (training and evaluation answers, recomputed from the entries as the site's own accountant
    does), whether it trained and how many evaluation answers it recorded."""
    from fedtune.privacy.composition import compose, dataset_epsilon
    from fedtune.privacy.ledger import PrivacyLedger

    entries = PrivacyLedger(ledger_path).entries()
    matches = [e for e in entries[since:] if e.round == rnd]
    if not matches:
        return None
    last = matches[-1]
    upto = entries[: entries.index(last) + 1]
    lifetime = [e for e in upto if e.dataset == last.dataset]
    trained = [e for e in matches if not e.is_evaluation]
    out = {"epsilon_lifetime": dataset_epsilon(lifetime, last.dataset_delta or last.delta),
           "evaluated": len(matches) - len(trained), "trained": bool(trained)}
    if trained:
        step = trained[-1]
        run = [e for e in upto if e.run_id == step.run_id and e.dataset == step.dataset and not e.is_evaluation]
        out.update(steps=sum(e.steps for e in trained), noise=step.noise_multiplier,
                   epsilon_run=compose(run, step.delta), delta=step.delta)
    return out


def format_site_round(site: str, rnd: str, messages: list[dict], ledger: Optional[dict]) -> str:
    sent = sum(m.get("bytes_out", 0) for m in messages) / 1e6
    received = sum(m.get("bytes_in", 0) for m in messages) / 1e6
    errors = [m["error"] for m in messages if m.get("error")]
    parts = [f"{site} round {rnd}:"]
    if ledger and ledger["trained"]:
        parts.append(f"trained {ledger['steps']} steps at noise {ledger['noise']:.2f}, epsilon "
                     f"{ledger['epsilon_run']:.2f} this run ({ledger['epsilon_lifetime']:.2f} lifetime, delta "
                     f"{ledger['delta']:g});")
    if ledger and ledger["evaluated"]:
        parts.append(f"answered evaluation with noise (in the ledger; {ledger['epsilon_lifetime']:.2f} lifetime);")
    if not ledger and errors:
        parts.append(f"refused or failed ({errors[0][:160]});")
    elif not ledger:
        parts.append("nothing trained or answered;")
    parts.append(f"sent {sent:.2f} MB, received {received:.2f} MB")
    return " ".join(parts)


class SiteRoundView(BackgroundPoller):
    """Prints a round's line once the round is over for this site: its evaluate reply is sent,
    or a message of a later round (or another run) arrives; the rest when it stops."""

    def __init__(self, site: str, state_dir: Path, stream: TextIO = sys.stdout, interval: float = 1.0):
        super().__init__(interval, "fedtune-site-view")
        self.site, self.state, self.stream = site, Path(state_dir), stream
        self.seen = len(_read_jsonl(self.state / TRAFFIC_FILE))  # earlier runs' traffic is not shown
        self.ledger_start = self._ledger_count()
        self.pending: dict[tuple, list[dict]] = {}
        self.printed: set[tuple] = set()

    def poll(self, final: bool = False) -> None:
        entries = _read_jsonl(self.state / TRAFFIC_FILE)
        for entry in entries[self.seen:]:
            if not str(entry.get("round")).isdigit():  # not a round: the pre-flight's query
                continue
            key = (entry.get("run_id"), str(entry.get("round")))
            for other in [k for k in self.pending if k != key]:  # a new round: the earlier ones are over
                self._emit(other)
            self.pending.setdefault(key, []).append(entry)
            if entry.get("type") == EVALUATE:
                self._emit(key)
        self.seen = len(entries)
        if final:
            for key in list(self.pending):
                self._emit(key)

    def _emit(self, key: tuple) -> None:
        messages = self.pending.pop(key)
        _, rnd = key
        ledger = None
        try:
            ledger = spent(self.state / "privacy-ledger.jsonl", int(rnd), self.ledger_start)
        except Exception as exc:  # noqa: BLE001 - a broken ledger is reported, the agent goes on
            messages = [*messages, {"error": f"privacy ledger unreadable: {exc}"}]
        print(format_site_round(self.site, rnd, messages, ledger), file=self.stream, flush=True)

    def _ledger_count(self) -> int:
        path = self.state / "privacy-ledger.jsonl"
        return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0

    def final_poll(self) -> None:
        self.poll(final=True)
