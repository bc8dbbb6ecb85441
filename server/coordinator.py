"""One federated run on the coordinator: validate before round 1, run the rounds on Flower's
legacy workflow with SecAgg+, record metrics, checkpoint, and export the adapters."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedtune.config import FedTuneConfig, save_config
from fedtune.data import LabelMap, read_table
from fedtune.data.cleaning import clean_rows
from fedtune.data.site import data_columns
from fedtune.federation.dataset import FederatedRows, federated_rows
from fedtune.federation.events import close_events, write_round_events
from fedtune.federation.messages import RoundInstructions, SiteReport
from fedtune.io_utils import atomic_write_json

from .central_eval import CentralEvaluator
from .checkpoints import load_latest, save_checkpoint
from .metering import MeteredGrid
from .secagg import SecAggSettings, secagg_settings
from .strategy import make_strategy

log = logging.getLogger("fedtune.server")


class RunError(ValueError):
    """A run that cannot start; raised before round 1."""


class StopRun(Exception):
    def __init__(self, reason: str, interrupted: bool = False):
        super().__init__(reason)
        self.interrupted = interrupted


@dataclass
class PreparedRun:
    cfg: FedTuneConfig
    out_dir: Path
    evaluator: CentralEvaluator
    initial: list[np.ndarray]
    run_id: str
    offset: int                       # rounds already done (resume)
    state: dict
    secagg: Optional[SecAggSettings]
    simulated: bool


def coordinator_rows(cfg: FedTuneConfig) -> FederatedRows:
    """A deployed coordinator knows only its own evaluation file and the label names."""
    if cfg.data.eval is None:
        raise RunError("the coordinator needs data.eval: its own held-out evaluation file")
    cols = data_columns(cfg.data, cfg.model.task)
    central, _ = clean_rows(read_table(cfg.data.eval, cfg.data.format), cols, str(cfg.data.eval))
    label_map = None
    if cfg.model.task == "sequence-classification":
        label_map = LabelMap(cfg.data.labels) if cfg.data.labels else LabelMap.from_values(central[cols[1]])
    return FederatedRows([], central, str(cfg.data.eval), cols, label_map)


def prepare_run(cfg: FedTuneConfig, out_dir: Path, resume: bool = False, simulated: bool = True) -> PreparedRun:
    """Everything that can fail before round 1 fails here, with a message naming what to change."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    latest = load_latest(ckpt_dir) if ckpt_dir.exists() else None
    if latest is not None and not resume:
        raise RunError(f"{out_dir} already holds a run (checkpoints/): pass --resume to continue it, or a new --out")
    if resume:
        if latest is None:
            raise RunError(f"--resume: no checkpoint in {ckpt_dir}")
        saved = FedTuneConfig.model_validate(_load_toml(out_dir / "config.toml"))
        cfg = saved.model_copy(update={"federation": saved.federation.model_copy(
            update={"rounds": cfg.federation.rounds})})
    rows = federated_rows(cfg) if simulated else coordinator_rows(cfg)
    if rows.label_map is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": rows.label_map.labels})})
    evaluator = CentralEvaluator(cfg, rows.central, rows.columns, rows.label_map, rows.central_source)
    initial = list(evaluator.initial_arrays().values())
    offset, state, run_id = 0, {}, cfg.federation.run_id or uuid.uuid4().hex[:12]
    if latest is not None:
        offset, arrays, state = latest
        initial, run_id = list(arrays.values()), state["run_id"]
    secagg = None
    if cfg.federation.secure_aggregation:
        largest = max((len(s) for s in rows.sites), default=None)
        secagg = secagg_settings(cfg.federation, initial, largest)
    return PreparedRun(cfg, out_dir, evaluator, initial, run_id, offset, state, secagg, simulated)


def _load_toml(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


@dataclass
class RunRecorder:
    """Collects each round's results and writes metrics.jsonl, privacy.json and checkpoints."""

    run: PreparedRun
    grid: MeteredGrid
    stop_after_round: Optional[int] = None
    node_site: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)
    latest_arrays: Optional[list] = None
    round_started: float = 0.0
    sampled: set = field(default_factory=set)
    excluded: set = field(default_factory=set)
    refused: dict = field(default_factory=dict)

    def __post_init__(self):
        s = self.run.state
        self.best_round = s.get("best_round")
        self.best_value = s.get("best_value")
        self.stale = s.get("stale", 0)
        self.privacy: dict = s.get("privacy", {})
        self.latest_arrays = self.run.initial
        self.round_started = time.perf_counter()

    @property
    def cfg(self) -> FedTuneConfig:
        return self.run.cfg

    def absolute(self, server_round: int) -> int:
        return self.run.offset + server_round

    # -- messages to sites ---------------------------------------------------------------

    def _instructions(self, server_round: int) -> dict:
        secagg = self.run.secagg
        instr = RoundInstructions(
            run_id=self.run.run_id,
            round=max(1, self.absolute(server_round)),
            rounds=self.cfg.federation.rounds,
            config=self.cfg.to_toml(),
            max_weight=secagg.max_weight if secagg else 0.0,
            clipping_range=secagg.clipping_range if secagg else 0.0,
            proximal_mu=self.cfg.federation.proximal_mu if self.cfg.federation.strategy == "fedprox" else 0.0,
            site_state_root=str(self.cfg.federation.site_state_dir or self.run.out_dir / "sites")
            if self.run.simulated else "",
        )
        return instr.to_record()

    def fit_config(self, server_round: int) -> dict:
        return self._instructions(server_round)

    def evaluate_config(self, server_round: int) -> dict:
        return self._instructions(server_round)

    # -- results ------------------------------------------------------------------------

    def start_round(self, server_round: int) -> None:
        self.round_started = time.perf_counter()
        self.current = {"round": self.absolute(server_round), "sites": {}, "failures": 0}

    def central_evaluate(self, server_round: int, arrays: list[np.ndarray], config: dict):
        self.latest_arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        metrics = self.run.evaluator.evaluate(self.latest_arrays)
        metrics.pop("examples", None)
        if server_round == 0:
            if self.run.offset == 0:  # on resume, round `offset` is already recorded
                self._write_record({"round": 0, "central": metrics, "federated": None, "sites": {},
                                    "bytes_up": {}, "bytes_down": {}, "seconds": 0.0})
                self._log_round(0, metrics)
        else:
            self.current["central"] = metrics
        return float(metrics["loss"]), {k: v for k, v in metrics.items() if k != "loss"}

    # -- sites that refuse (budget spent) or fail are left out of later rounds ---------------

    def select(self, server_round: int, instructions: list) -> list:
        """Drop excluded sites from a round's sample; end the run if too few remain."""
        kept = [(proxy, ins) for proxy, ins in instructions if proxy.node_id not in self.excluded]
        self.sampled = {proxy.node_id for proxy, _ in kept}
        needed = 1
        if self.run.secagg:
            # A two-site federation (fractional shares) runs SecAgg+ with both; a larger one was
            # set up with integer shares, which Flower only accepts above 2 sites.
            needed = 2 if isinstance(self.run.secagg.num_shares, float) else 3
        if len(kept) < needed:
            raise StopRun(f"round {self.absolute(server_round)}: only {len(kept)} site(s) can still train, "
                          f"{needed} needed{' for SecAgg+' if self.run.secagg else ''}; ending the run")
        return kept

    def _exclude_missing(self, server_round: int, results) -> None:
        answered = {proxy.node_id for proxy, _ in results}
        for node in sorted(self.sampled - answered):
            site = self.node_site.get(node, f"node {node}")
            log.warning("round %d: %s sent no update (it refused: privacy budget, or failed); leaving it "
                        "out of later rounds", self.absolute(server_round), site)
            self.excluded.add(node)
            self.refused[node] = self.absolute(server_round)

    def on_fit(self, server_round: int, results, failures) -> None:
        self.current["failures"] = len(failures)
        self._exclude_missing(server_round, results)
        for proxy, res in results:
            report = SiteReport.from_record(res.metrics)
            self.node_site[proxy.node_id] = report.site
            self.current["sites"][report.site] = {
                "examples": res.num_examples, "train_loss": report.train_loss, "epsilon": _finite(report.epsilon),
            }
            self.privacy[report.site] = {
                "epsilon": _finite(report.epsilon), "epsilon_total": _finite(report.epsilon_total), "delta": report.delta, "noise_multiplier": report.noise_multiplier,
                "max_grad_norm": report.max_grad_norm, "steps": report.steps, "sample_rate": report.sample_rate,
                "accountant": report.accountant, "target_epsilon": self.cfg.privacy.target_epsilon,
            }
            if report.clipped_values:
                log.warning("%s: %d adapter values outside the SecAgg+ clipping range were clipped; raise "
                            "federation.secagg_clipping_range", report.site, report.clipped_values)

    def on_federated(self, server_round: int, results) -> None:
        total = sum(res.num_examples for _, res in results)
        if not total:
            self.current["federated"] = None
            return
        fed = {"loss": sum(res.loss * res.num_examples for _, res in results) / total}
        for key in ("accuracy", "f1", "perplexity"):
            vals = [(res.metrics.get(f"fedtune.{key}"), res.num_examples) for _, res in results]
            if all(v is not None for v, _ in vals):
                fed[key] = sum(v * n for v, n in vals) / total
        for proxy, res in results:
            site = res.metrics.get("fedtune.site")
            if site:
                self.node_site.setdefault(proxy.node_id, site)
        self.current["federated"] = fed

    def end_round(self, server_round: int) -> None:
        rnd = self.absolute(server_round)
        down, up = self.grid.take()
        record = {
            "round": rnd,
            "central": self.current.get("central"),
            "federated": self.current.get("federated"),
            "sites": self.current.get("sites", {}),
            "bytes_up": {self.node_site.get(n, str(n)): b for n, b in sorted(up.items())},
            "bytes_down": {self.node_site.get(n, str(n)): b for n, b in sorted(down.items())},
            "seconds": round(time.perf_counter() - self.round_started, 3),
        }
        self._write_record(record)
        self._log_round(rnd, record["central"], record["sites"])
        improved = self._track_best(rnd, record["central"])
        atomic_write_json(self.run.out_dir / "privacy.json", self.privacy_json())
        save_checkpoint(self.run.out_dir / "checkpoints", rnd, self.run.evaluator.named(self.latest_arrays), {
            "run_id": self.run.run_id, "best_round": self.best_round, "best_value": self.best_value,
            "stale": self.stale, "privacy": self.privacy,
        })
        if improved:
            self.run.evaluator.export(self.latest_arrays, self.run.out_dir / "best" / "adapter")
        patience = self.cfg.federation.early_stopping_patience
        if patience and self.stale >= patience and rnd < self.cfg.federation.rounds:
            raise StopRun(f"early stopping: no improvement in central {self._metric()} for {patience} rounds")
        if self.stop_after_round is not None and rnd >= self.stop_after_round and rnd < self.cfg.federation.rounds:
            raise StopRun(f"stopped after round {rnd} (as asked)", interrupted=True)

    # -- bookkeeping ---------------------------------------------------------------------

    def _metric(self) -> str:
        metric = self.cfg.federation.early_stopping_metric
        if self.cfg.model.task == "causal-lm" and metric in ("accuracy", "f1"):
            return "perplexity"
        return metric

    def _track_best(self, rnd: int, central: Optional[dict]) -> bool:
        metric = self._metric()
        if not central or metric not in central:
            return False
        value = central[metric]
        higher_better = metric in ("accuracy", "f1")
        better = self.best_value is None or (value > self.best_value if higher_better else value < self.best_value)
        if better:
            self.best_round, self.best_value, self.stale = rnd, value, 0
        else:
            self.stale += 1
        return better

    def _write_record(self, record: dict) -> None:
        record["target_epsilon"] = self.cfg.privacy.target_epsilon if self.cfg.privacy.enabled else None
        path = self.run.out_dir / "metrics.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        write_round_events(self.run.out_dir, record)  # the same round for TensorBoard (live view)

    def _log_round(self, rnd: int, central: Optional[dict], sites: Optional[dict] = None) -> None:
        central = central or {}
        parts = [f"{k} {v:.4f}" for k, v in central.items() if isinstance(v, float)]
        eps = [s["epsilon"] for s in (sites or {}).values() if s.get("epsilon") is not None]
        if eps:
            parts.append(f"max site epsilon {max(eps):.3f}")
        log.info("round %d/%d: central %s", rnd, self.cfg.federation.rounds, ", ".join(parts))

    def privacy_json(self) -> dict:
        return {"sites": self.privacy, "target_epsilon": self.cfg.privacy.target_epsilon,
                "delta": self.cfg.privacy.target_delta, "enabled": self.cfg.privacy.enabled,
                "secure_aggregation": self.run.secagg is not None, "refused": {self.node_site.get(n, f"node {n}"): r for n, r in self.refused.items()}}


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _truncate_metrics(path: Path, last_round: int) -> None:
    """On resume, drop records of rounds after the checkpoint (a crash may have left one)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= last_round]
    from fedtune.io_utils import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in keep))


def execute_run(grid, context, run: PreparedRun, stop_after_round: Optional[int] = None) -> str:
    """Run the remaining rounds; returns how the run ended."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if run.offset == 0:
        (run.out_dir / "metrics.jsonl").unlink(missing_ok=True)
    else:
        _truncate_metrics(run.out_dir / "metrics.jsonl", run.offset)
    save_config(run.cfg, run.out_dir / "config.toml")
    metered = MeteredGrid(grid)
    recorder = RunRecorder(run, metered, stop_after_round)
    remaining = run.cfg.federation.rounds - run.offset
    ended = "completed"
    if remaining > 0:
        strategy = make_strategy(run.cfg, run.initial, recorder)
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        fit_workflow = SecAggPlusWorkflow(**run.secagg.model_dump(), timeout=None) if run.secagg else None
        try:
            DefaultWorkflow(fit_workflow=fit_workflow)(metered, ctx)
        except StopRun as stop:
            log.info("%s", stop)
            if stop.interrupted:
                return "interrupted"
            ended = f"ended early: {stop}"
    _finalize(run, recorder)
    return ended


def _finalize(run: PreparedRun, recorder: RunRecorder) -> None:
    from fedtune.federation.plots import write_plots
    from fedtune.federation.privacy_report import write_privacy_report

    out = run.out_dir
    run.evaluator.export(recorder.latest_arrays, out / "final" / "adapter")
    if not (out / "best" / "adapter").exists():
        run.evaluator.export(recorder.latest_arrays, out / "best" / "adapter")
    if run.cfg.federation.merge_final:
        run.evaluator.export_merged(recorder.latest_arrays, out / "final" / "merged")
    if run.evaluator.dataset is not None and run.cfg.model.task == "sequence-classification":
        from fedtune.data import LabelMap

        LabelMap(run.cfg.data.labels).save(out / "label_map.json")
    atomic_write_json(out / "privacy.json", recorder.privacy_json())
    write_privacy_report(recorder.privacy_json(), out / "privacy.md")
    records = read_records(out / "metrics.jsonl")
    write_plots(records, out / "plots")
    close_events(out)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


