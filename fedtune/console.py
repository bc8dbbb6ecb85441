"""What a person watching a federated run reads: a short header, a progress bar over rounds and
one line per round, read from the run's ``metrics.jsonl`` as the coordinator writes it (the same
way for a simulation, where the coordinator runs in this process, and for ``fedtune server``,
where it runs in Flower's ``flwr-serverapp`` process)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from fedtune.config import FedTuneConfig


def header_lines(cfg: FedTuneConfig, out_dir: Path, what: str) -> list[str]:
    fed, privacy = cfg.federation, cfg.privacy
    if privacy.enabled:
        dp = f"DP-SGD, target epsilon {privacy.target_epsilon:g} per site at delta {privacy.target_delta:g}"
    else:
        dp = "DP off (no privacy guarantee)"
    secagg = "SecAgg+" if fed.secure_aggregation else "no secure aggregation"
    return [
        f"fedtune {what}: {cfg.model.name} ({cfg.model.task}), "
        f"{'FFA-LoRA' if cfg.lora.freeze_a else 'LoRA'} r={cfg.lora.r}",
        f"  {fed.sites} sites, {fed.rounds} rounds, {fed.strategy}, {secagg}; {dp}",
        f"  run folder {out_dir}  (logs in {Path(out_dir) / 'logs'})",
    ]


def _mb(counts: Optional[dict]) -> float:
    return sum((counts or {}).values()) / 1e6


def format_round(record: dict, rounds: int) -> str:
    """One line: central accuracy / F1 / loss (or exact match of generated answers and perplexity;
    exact, the coordinator's own rows),
    federated accuracy (the sites' noised answers), the largest and smallest site epsilon, MB sent
    (both ways), seconds."""
    central, fed = record.get("central") or {}, record.get("federated") or {}
    parts = []
    for key, label in (("accuracy", "acc"), ("exact_match", "em"), ("f1", "f1"), ("loss", "loss"),
                       ("perplexity", "ppl")):
        if isinstance(central.get(key), (int, float)):
            parts.append(f"{label} {central[key]:.3f}")
    fed_key = "perplexity" if "perplexity" in fed else "accuracy"
    if isinstance(fed.get(fed_key), (int, float)):
        # The sites' own test rows, each answer noised by its site (fedtune/privacy/release.py).
        parts.append(f"fed {'ppl' if fed_key == 'perplexity' else 'acc'} (noised) {fed[fed_key]:.3f}")
    eps = [s["epsilon"] for s in (record.get("sites") or {}).values() if (s or {}).get("epsilon") is not None]
    if eps:  # numbers, "inf" or "undefined (no DP)" (a site that trained without DP)
        from fedtune.privacy.display import epsilon_number, format_epsilon, worst_epsilon

        text = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else format_epsilon(v)  # noqa: E731
        lo, hi = text(min(eps, key=epsilon_number)), text(worst_epsilon(eps))
        parts.append(f"eps {lo}-{hi}" if lo != hi else f"eps {hi}")
    if record.get("round", 0):
        parts.append(f"{_mb(record.get('bytes_up')) + _mb(record.get('bytes_down')):.1f} MB")
        parts.append(f"{record.get('seconds', 0):.0f} s")
    width = len(str(rounds))
    label = "before training" if record.get("round") == 0 else ""
    return f"round {record.get('round'):>{width}}/{rounds}  " + "  ".join(parts) + (f"  ({label})" if label else "")


class RoundProgress:
    """A tqdm bar over rounds, with each round's line printed above it."""

    def __init__(self, rounds: int, offset: int = 0, stream: Optional[TextIO] = None):
        from tqdm import tqdm

        stream = stream if stream is not None else sys.stdout  # the stdout at the call, not at import
        self.rounds, self.stream = rounds, stream
        self.bar = tqdm(total=rounds, initial=offset, unit="round", desc="rounds", file=stream,
                        dynamic_ncols=True, leave=False, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| "
                        "{elapsed} elapsed, {remaining} left")

    def round(self, record: dict) -> None:
        self.bar.write(format_round(record, self.rounds), file=self.stream)
        if record.get("round", 0) > self.bar.n:
            self.bar.update(record["round"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class BackgroundPoller:
    """Calls ``poll()`` every ``interval`` seconds in a daemon thread; ``stop()`` ends the thread
    and polls once more (``final_poll``) for what was written just before."""

    def __init__(self, interval: float, name: str):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def poll(self) -> None:
        raise NotImplementedError

    def final_poll(self) -> None:
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.final_poll()


class MetricsFollower(BackgroundPoller):
    """Reads new lines of a run's metrics.jsonl in a background thread and hands each record to
    ``on_record`` (tolerates a file that does not exist yet or is truncated on resume)."""

    def __init__(self, path: Path, on_record: Callable[[dict], None], interval: float = 0.5):
        super().__init__(interval, "fedtune-metrics")
        self.path, self.on_record = Path(path), on_record
        self.seen = 0

    def poll(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return
        lines = text.splitlines()
        if len(lines) < self.seen:  # a resumed run rewrote the file
            self.seen = len(lines)
        complete = lines if text.endswith("\n") else lines[:-1]  # a line being written waits
        for line in complete[self.seen:]:
            self.seen += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.on_record(record)


class RunView:
    """Header, progress bar and per-round lines for one run, fed from its metrics.jsonl."""

    def __init__(self, cfg: FedTuneConfig, out_dir: Path, what: str, stream: Optional[TextIO] = None):
        self.cfg, self.out_dir, self.stream = cfg, Path(out_dir), stream if stream is not None else sys.stdout
        self.what = what
        self.progress: Optional[RoundProgress] = None
        self.follower: Optional[MetricsFollower] = None

    def __enter__(self) -> "RunView":
        for line in header_lines(self.cfg, self.out_dir, self.what):
            print(line, file=self.stream)
        self.stream.flush()
        metrics = self.out_dir / "metrics.jsonl"
        # On resume the rounds already recorded are not shown again.
        done = sum(1 for _ in metrics.open()) if metrics.is_file() else 0
        self.progress = RoundProgress(self.cfg.federation.rounds, stream=self.stream)
        self.follower = MetricsFollower(metrics, self.progress.round)
        self.follower.seen = done
        self.follower.start()
        return self

    def __exit__(self, *exc) -> None:
        self.follower.stop()
        self.progress.close()
        time.sleep(0)  # let tqdm clear its line before the summary is printed


def print_outcome(out_dir: Path, ended: str, what: str, stream: Optional[TextIO] = None) -> None:
    """The summary table and where the results are."""
    stream = stream if stream is not None else sys.stdout
    from fedtune.federation.summary import format_summary
    from fedtune.server.coordinator import read_records

    out_dir = Path(out_dir)
    print(f"\nfedtune {what} -> {out_dir} ({ended})", file=stream)
    metrics = out_dir / "metrics.jsonl"
    print(format_summary(read_records(metrics)) if metrics.is_file() else "no rounds recorded", file=stream)
    shown = [p for p in (out_dir / "plots" / "central.png", out_dir / "plots" / "epsilon.png",
                         out_dir / "privacy.md", out_dir / "final" / "adapter") if p.exists()]
    if shown:
        print("results: " + ", ".join(str(p) for p in shown), file=stream)
    print(f"logs: {out_dir / 'logs'}", file=stream)
