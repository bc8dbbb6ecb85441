"""One federated run on the coordinator: validate before round 1, run the rounds on Flower's
legacy workflow with SecAgg+, record metrics, checkpoint, and export the adapters."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from pydantic import ValidationError

from fedtune.config import FedTuneConfig, save_config
from fedtune.data import LabelMap, read_table
from fedtune.data.cleaning import clean_rows
from fedtune.data.site import data_columns
from fedtune.federation.dataset import FederatedRows, federated_rows
from fedtune.federation.events import close_events, write_round_events
from fedtune.federation.messages import RoundInstructions, SiteEvalReport, SiteReport
from fedtune.federation.refusal import refusal_kind, refusing_site
from fedtune.io_utils import append_line, atomic_write_json, atomic_write_text, read_jsonl
from fedtune.privacy.display import epsilon_number, epsilon_record, format_epsilon, worst_epsilon
from fedtune.privacy.release import EvaluationSums, combine
from fedtune.training.auto import resolve_class_balance

from .central_eval import CentralEvaluator
from .checkpoints import load_latest, load_optimizer, save_checkpoint
from .client_manager import EligibleClientManager
from .health import SiteHealth
from .metering import MeteredGrid
from .roster import SiteRoster, TooFewSites
from .secagg import SecAggSettings, secagg_settings
from .secagg_workflow import ResilientSecAggPlusWorkflow
from .strategy import make_strategy, optimizer_state

log = logging.getLogger("fedtune.server")


class RunError(ValueError):
    """A run that cannot start; raised before round 1."""


class StopRun(Exception):
    """``failed``: the run cannot go on (too few sites), as opposed to early stopping."""

    def __init__(self, reason: str, interrupted: bool = False, failed: bool = False):
        super().__init__(reason)
        self.interrupted = interrupted
        self.failed = failed


def min_sites(cfg: FedTuneConfig, secagg: Optional[SecAggSettings]) -> int:
    """The fewest sites a round can run with: federation.min_sites, else what SecAgg+ needs to
    unmask (its reconstruction threshold; both of two sites), else one."""
    if cfg.federation.min_sites:
        return cfg.federation.min_sites
    if secagg is None:
        return 1
    if isinstance(secagg.num_shares, float):
        return 2
    return max(2, int(secagg.reconstruction_threshold))


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
    optimizer: dict = field(default_factory=dict)   # the server optimiser's checkpointed state (FedAdam)


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


def with_class_prior(cfg: FedTuneConfig, rows: FederatedRows) -> FedTuneConfig:
    """``train.class_balance`` resolved from the coordinator's own evaluation rows (no site's rows, so
    no site spends privacy on it): sent to every site in the run config with its class prior."""
    column = rows.columns[1]
    ids = rows.label_map.encode(rows.central[column], range(2, len(rows.central) + 2), rows.central_source, column)
    train = resolve_class_balance(cfg.train, cfg.model.task, ids, rows.label_map.num_labels)
    if train.class_balance != "off":
        log.info("train.class_balance = %s: class prior %s from the coordinator's %d evaluation rows",
                 train.class_balance, train.class_prior, len(ids))
    return cfg.model_copy(update={"train": train})


# What a resumed run may change: more rounds, deadlines and the site policy, where outputs go.
# Everything else (model, data split, privacy, SecAgg+, strategy) is the saved run's.
RESUMABLE = ("federation.rounds", "federation.min_sites", "federation.stage_timeout", "federation.train_timeout",
             "federation.join_timeout", "federation.max_consecutive_failures", "federation.early_stopping_patience",
             "federation.merge_final", "train.device", "train.progress")


def resumed_config(out_dir: Path, overrides: list[str]) -> FedTuneConfig:
    """The run's saved config (config.toml in its folder) with explicit, validated overrides."""
    from fedtune.config import ConfigError, load_config, parse_override

    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in RESUMABLE:
            raise RunError(f"--resume: {key} cannot change in a resumed run (it continues the saved run's "
                           f"model, data, privacy and protocol); allowed: {', '.join(RESUMABLE)}")
    try:
        return load_config(Path(out_dir) / "config.toml", overrides)
    except ConfigError as err:
        raise RunError(f"--resume: {err}") from None


def prepare_run(cfg: Optional[FedTuneConfig], out_dir: Path, resume: bool = False, simulated: bool = True,
                overrides: Optional[list[str]] = None) -> PreparedRun:
    """Everything that can fail before round 1 fails here, with a message naming what to change.
    On resume ``cfg`` is not used: the saved config with ``overrides`` (RESUMABLE keys) is."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    latest = load_latest(ckpt_dir) if ckpt_dir.exists() else None
    if latest is not None and not resume:
        raise RunError(f"{out_dir} already holds a run (checkpoints/): pass --resume to continue it, or a new --out")
    if resume:
        if latest is None:
            raise RunError(f"--resume: no checkpoint in {ckpt_dir}")
        cfg = resumed_config(out_dir, list(overrides or []))
    rows = federated_rows(cfg) if simulated else coordinator_rows(cfg)
    if rows.label_map is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": rows.label_map.labels})})
        cfg = with_class_prior(cfg, rows)
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
    optimizer = load_optimizer(ckpt_dir) if latest is not None else {}
    return PreparedRun(cfg, out_dir, evaluator, initial, run_id, offset, state, secagg, simulated, optimizer)


@dataclass
class RunRecorder:
    """Collects each round's results and writes metrics.jsonl, privacy.json and checkpoints."""

    run: PreparedRun
    grid: MeteredGrid
    stop_after_round: Optional[int] = None
    current: dict = field(default_factory=dict)
    latest_arrays: Optional[list] = None
    round_started: float = 0.0
    sampled: set = field(default_factory=set)
    refused: dict = field(default_factory=dict)
    strategy: Optional[object] = None
    fit_workflow: Optional[object] = None

    def __post_init__(self):
        fed = self.run.cfg.federation
        self.roster = SiteRoster(
            min_sites=min_sites(self.run.cfg, self.run.secagg), planned_sites=fed.sites,
            join_timeout=fed.join_timeout, stage_timeout=fed.stage_timeout, preflight=not self.run.simulated,
            health=SiteHealth(fed.max_consecutive_failures), fixed_max_weight=fed.secagg_max_weight,
            max_weight=self.run.secagg.max_weight if self.run.secagg else 0.0,
            needed_for=" for SecAgg+" if self.run.secagg else "")
        s = self.run.state
        self.best_round = s.get("best_round")
        self.best_value = s.get("best_value")
        self.stale = s.get("stale", 0)
        self.privacy: dict = s.get("privacy", {})
        self.latest_arrays = self.run.initial
        self.round_started = time.perf_counter()
        self.stage_marks: list[tuple[str, float]] = []
        self.failed_rounds = 0

    @property
    def cfg(self) -> FedTuneConfig:
        return self.run.cfg

    @property
    def node_site(self) -> dict:
        return self.roster.node_site

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
            max_weight=self.roster.max_weight if secagg else 0.0,
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

    def mark_stage(self, name: str) -> None:
        """A stage of the round starts now; it lasts until the next one starts or the round ends."""
        self.stage_marks.append((name, time.perf_counter()))

    def start_round(self, server_round: int) -> None:
        self.round_started = time.perf_counter()
        self.current = {"round": self.absolute(server_round), "sites": {}, "failures": 0, "failed": None,
                        "aggregated": False}
        self.grid.errors.clear()

    def admit(self, server_round: int) -> None:
        """The pre-flight for newly connected sites, and the settings they imply."""
        try:
            self.roster.admit(self.grid, self.run.run_id, self.cfg.to_toml())
        except TooFewSites as too_few:
            raise StopRun(f"round {self.absolute(server_round)}: {too_few}; stopping the run", failed=True) from None
        if self.run.secagg and self.roster.max_weight:
            self.run.secagg.max_weight = self.roster.max_weight
            if self.fit_workflow is not None:
                self.fit_workflow.max_weight = self.roster.max_weight

    def round_failed(self, server_round: int, reason: str, answered: set, results: list) -> None:
        """Aggregation did not happen: the round is recorded as failed, the model is unchanged.
        Sites that trained before the protocol stopped have spent privacy: recorded too."""
        self.current["failed"] = reason
        log.error("round %d FAILED: %s; the model is unchanged", self.absolute(server_round), reason)
        for proxy, res in results:
            self._record_site(proxy.node_id, res, trained=False)
        self._count_failures(server_round, answered)

    def central_evaluate(self, server_round: int, arrays: list[np.ndarray], config: dict):
        if server_round > 0:
            self.mark_stage("central evaluation")
        self.latest_arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        metrics = self.run.evaluator.evaluate(self.latest_arrays)
        metrics.pop("examples", None)
        if self.run.evaluator.last_samples:  # a few prompts with this round's answers (the report shows them)
            append_line(self.run.out_dir / "answers.jsonl", json.dumps(
                {"round": self.absolute(server_round), "samples": self.run.evaluator.last_samples}))
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
        """The sites sampled for a round (only eligible ones); stop the run if too few."""
        kept = [(proxy, ins) for proxy, ins in instructions if self.roster.eligible(proxy.node_id)]
        self.sampled = {proxy.node_id for proxy, _ in kept}
        needed = self.roster.min_sites
        if len(kept) < needed:
            raise StopRun(f"round {self.absolute(server_round)}: only {len(kept)} site(s) can train, {needed} "
                          f"needed{' for SecAgg+' if self.run.secagg else ''}; stopping the run", failed=True)
        return kept

    def _count_failures(self, server_round: int, answered: set, malformed: Optional[dict] = None) -> None:
        """Sampled sites that sent no usable update (``malformed``: node -> why its answer was not
        the adapter): a budget refusal leaves a site out for the rest of the run, other failures
        only after max_consecutive_failures rounds in a row."""
        rnd = self.absolute(server_round)
        malformed = malformed or {}
        for node in sorted(self.sampled - answered):
            error = malformed.get(node) or self.grid.errors.get(node, "")
            if node not in malformed and node not in self.node_site and refusing_site(error):
                self.node_site[node] = refusing_site(error)
            site = self.node_site.get(node, f"node {node}")
            verdict = self.roster.health.failed(node, error)
            if verdict == "refused":
                self.refused[node] = rnd
                log.warning("round %d: %s %s; left out of later rounds", rnd, site, refusal_kind(error))
            elif verdict == "excluded":
                log.warning("round %d: %s sent no update, %s; left out of later rounds", rnd, site,
                            self.roster.health.excluded[node])
            else:
                log.warning("round %d: %s %s; it is asked again next round", rnd, site,
                            f"sent a malformed answer: {error}" if node in malformed else
                            "sent no update (failed or too slow)")
        for node in answered & self.sampled:
            self.roster.health.succeeded(node)

    def on_fit(self, server_round: int, results, failures, malformed: Optional[dict] = None,
               unreadable: Optional[dict] = None) -> None:
        """``results``: the usable updates; ``malformed``: node -> (why, its answer) for the answers
        that were not one, each also in ``failures`` and counted as that site's failure (a malformed
        answer whose report is valid still records the privacy the site says it spent);
        ``unreadable``: node -> why, SecAgg+ sites whose masked update is in the sum but whose
        report is malformed (they contributed: not a failure; what they spent is not known here)."""
        malformed, unreadable = malformed or {}, unreadable or {}
        for node, (_, res) in malformed.items():
            try:
                self._record_site(node, res, trained=False)
            except ValidationError:
                pass  # its report is what was malformed: nothing to record
        self.current["failures"] = len(failures)
        reasons = _failure_reasons(failures) + [f"{self.node_site.get(node, f'node {node}')}: {why[:200]}"
                                                for node, (why, _) in malformed.items()] + [
            f"{self.node_site.get(node, f'node {node}')}: {why}; its masked update is in the sum, the privacy "
            "it spent is not known here" for node, why in unreadable.items()]
        if reasons:
            # Sites send only a generic reason ("site-2: data error"); the details stay at the site.
            self.current["failure_reasons"] = reasons
            log.warning("round %d: %s", self.absolute(server_round), "; ".join(reasons))
        self.current["aggregated"] = True
        self._count_failures(server_round, {proxy.node_id for proxy, _ in results} | set(unreadable),
                             {node: why for node, (why, _) in malformed.items()})
        for proxy, res in results:
            self._record_site(proxy.node_id, res, trained=True)

    def _record_site(self, node: int, res, trained: bool) -> None:
        report = SiteReport.from_record(res.metrics)
        self.node_site[node] = report.site
        epsilon = epsilon_record(report.epsilon, report.accountant)
        if trained:
            site_record = {"examples": res.num_examples, "epsilon": epsilon}
            if report.train_loss is not None:  # only sites that opt in send their un-noised loss
                site_record["train_loss"] = report.train_loss
            self.current["sites"][report.site] = site_record
        self.privacy[report.site] = {
            "epsilon": epsilon, "epsilon_total": epsilon_record(report.epsilon_total, report.accountant),
            "delta": report.delta, "noise_multiplier": report.noise_multiplier,
            "max_grad_norm": report.max_grad_norm, "steps": report.steps, "sample_rate": report.sample_rate,
            "accountant": report.accountant, "target_epsilon": self.cfg.privacy.target_epsilon,
        }
        if report.rows_per_unit:
            self.privacy[report.site].update({
                "rows_per_unit": report.rows_per_unit,
                "epsilon_unit": epsilon_record(report.epsilon_unit, report.accountant),
                "delta_unit": epsilon_record(report.delta_unit),
            })
        if trained and report.clipped_values:
            log.warning("%s: %d adapter values outside the SecAgg+ clipping range were clipped; raise "
                        "federation.secagg_clipping_range", report.site, report.clipped_values)

    def on_federated(self, server_round: int, results) -> None:
        """Federated evaluation: the sites' noised sums (fedtune/privacy/release.py), added up and
        divided here. Secondary to the central evaluation, which is exact on the coordinator's own
        rows; at small sites the noise can move it by tens of points (simulations/RESULTS.md)."""
        declined = sorted(str(res.metrics.get("fedtune.site", "?")) for _, res in results
                          if res.metrics.get("fedtune.declined"))
        if declined:  # the sites' own settings or evaluation budgets
            self.current["evaluation_declined"] = declined
        reports = []
        for proxy, res in results:
            if res.metrics.get("fedtune.declined") or res.metrics.get("fedtune.examples") is None:
                continue
            report = SiteEvalReport.from_record(res.metrics)
            self.node_site.setdefault(proxy.node_id, report.site)
            reports.append(report)
            spent = self.privacy.get(report.site)
            if spent is not None and report.epsilon_total is not None:  # the answer is in its ledger too
                spent["epsilon_total"] = epsilon_record(max(epsilon_number(spent["epsilon_total"]) or 0.0,
                                                            report.epsilon_total), spent.get("accountant"))
        self.current["federated"] = combine([EvaluationSums(examples=r.examples, correct=r.correct,
                                                            loss_sum=r.loss_sum) for r in reports])

    def end_round(self, server_round: int) -> None:
        rnd = self.absolute(server_round)
        down, up = self.grid.take()
        failed = self.current.get("failed")
        if not failed and not self.current.get("aggregated"):
            failed = "no aggregate (no site sent an update)"
        record = {
            "round": rnd,
            "failed": failed,
            "central": self.current.get("central"),
            "federated": self.current.get("federated"),
            "sites": self.current.get("sites", {}),
            **{k: self.current[k] for k in ("failure_reasons", "evaluation_declined") if k in self.current},
            "bytes_up": {self.node_site.get(n, str(n)): b for n, b in sorted(up.items())},
            "bytes_down": {self.node_site.get(n, str(n)): b for n, b in sorted(down.items())},
            "seconds": round(time.perf_counter() - self.round_started, 3),
            "stage_seconds": self._stage_seconds(),
            "secagg_max_weight": self.run.secagg.max_weight if self.run.secagg else None,
        }
        self._write_record(record)
        self._log_round(rnd, record["central"], record["sites"], failed)
        improved = not failed and self._track_best(rnd, record["central"])
        if failed:
            self.failed_rounds += 1
        atomic_write_json(self.run.out_dir / "privacy.json", self.privacy_json())
        save_checkpoint(self.run.out_dir / "checkpoints", rnd, self.run.evaluator.named(self.latest_arrays), {
            "run_id": self.run.run_id, "best_round": self.best_round, "best_value": self.best_value,
            "stale": self.stale, "privacy": self.privacy,
        }, optimizer_state(self.strategy) if self.strategy is not None else None)
        if improved:
            self.run.evaluator.export(self.latest_arrays, self.run.out_dir / "best" / "adapter")
        patience = self.cfg.federation.early_stopping_patience
        if patience and self.stale >= patience and rnd < self.cfg.federation.rounds:
            raise StopRun(f"early stopping: no improvement in central {self._metric()} for {patience} rounds")
        if self.stop_after_round is not None and rnd >= self.stop_after_round and rnd < self.cfg.federation.rounds:
            raise StopRun(f"stopped after round {rnd} (as asked)", interrupted=True)

    # -- bookkeeping ---------------------------------------------------------------------

    def _stage_seconds(self) -> dict[str, float]:
        """Seconds per stage of the round that ends now (SecAgg+: setup, key sharing, training,
        unmasking; plain: fit; then central and federated evaluation), in order."""
        ends = [t for _, t in self.stage_marks[1:]] + [time.perf_counter()]
        stages = {name: round(end - start, 3) for (name, start), end in zip(self.stage_marks, ends)}
        self.stage_marks = []
        return stages

    def _metric(self) -> str:
        metric = self.cfg.federation.early_stopping_metric
        if self.cfg.model.task == "causal-lm" and metric in ("accuracy", "f1"):
            # Answers scored where the rows are prompt/response pairs; perplexity otherwise.
            answered = self.cfg.eval.generate is not False and bool(self.run.evaluator.dataset.texts)
            return "exact_match" if answered else "perplexity"
        return metric

    def _track_best(self, rnd: int, central: Optional[dict]) -> bool:
        metric = self._metric()
        if not central or metric not in central:
            return False
        value = central[metric]
        higher_better = metric in ("accuracy", "f1", "exact_match")
        better = self.best_value is None or (value > self.best_value if higher_better else value < self.best_value)
        if better:
            self.best_round, self.best_value, self.stale = rnd, value, 0
        else:
            self.stale += 1
        return better

    def _write_record(self, record: dict) -> None:
        record["target_epsilon"] = self.cfg.privacy.target_epsilon if self.cfg.privacy.enabled else None
        append_line(self.run.out_dir / "metrics.jsonl", json.dumps(record))
        write_round_events(self.run.out_dir, record)  # the same round for TensorBoard (live view)

    def _log_round(self, rnd: int, central: Optional[dict], sites: Optional[dict] = None,
                   failed: Optional[str] = None) -> None:
        if failed:
            log.error("round %d/%d: FAILED (%s); model unchanged", rnd, self.cfg.federation.rounds, failed)
            return
        central = central or {}
        parts = [f"{k} {v:.4f}" for k, v in central.items() if isinstance(v, float)]
        eps = worst_epsilon([s.get("epsilon") for s in (sites or {}).values()])
        if eps is not None:
            parts.append(f"max site epsilon {format_epsilon(eps)}")
        log.info("round %d/%d: central %s", rnd, self.cfg.federation.rounds, ", ".join(parts))

    def privacy_json(self) -> dict:
        return {"sites": self.privacy, "target_epsilon": self.cfg.privacy.target_epsilon,
                "delta": self.cfg.privacy.target_delta, "enabled": self.cfg.privacy.enabled,
                "secure_aggregation": self.run.secagg is not None, "refused": {self.node_site.get(n, f"node {n}"): r for n, r in self.refused.items()},
                "left_out": {self.node_site.get(n, f"node {n}"): why
                             for n, why in self.roster.health.excluded.items()}}


def _failure_reasons(failures) -> list[str]:
    """The generic reasons sites gave (Flower wraps each failed reply's Error in an Exception)."""
    out = []
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
        reason = getattr(error, "reason", None)
        if isinstance(reason, str) and reason:
            out.append(reason[:200])
    return out


def _truncate_metrics(path: Path, last_round: int) -> None:
    """On resume, drop records of rounds after the checkpoint (a crash may have left one)."""
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path) if r["round"] <= last_round]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def execute_run(grid, context, run: PreparedRun, stop_after_round: Optional[int] = None) -> str:
    """Run the remaining rounds; returns how the run ended."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if run.offset == 0:
        (run.out_dir / "metrics.jsonl").unlink(missing_ok=True)
    else:
        _truncate_metrics(run.out_dir / "metrics.jsonl", run.offset)
    save_config(run.cfg, run.out_dir / "config.toml")
    fed = run.cfg.federation
    metered = MeteredGrid(grid, default_timeout=fed.train_timeout)
    recorder = RunRecorder(run, metered, stop_after_round)
    remaining = fed.rounds - run.offset
    ended = "completed"
    if remaining > 0:
        strategy = recorder.strategy = make_strategy(run.cfg, run.initial, recorder)
        manager = EligibleClientManager(recorder.roster.eligible, fed.join_timeout, on_leave=recorder.roster.left)
        recorder.roster.client_manager = manager
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy,
                            client_manager=manager)

        def fit_workflow(grid_, context_):  # plain FedAvg: one fit stage
            recorder.mark_stage("fit")
            default_fit_workflow(grid_, context_)

        if run.secagg:
            settings = run.secagg.model_dump()
            settings["max_weight"] = settings["max_weight"] or 1.0  # deployed: set by the pre-flight
            fit_workflow = ResilientSecAggPlusWorkflow(
                **settings, stage_timeout=fed.stage_timeout, train_timeout=fed.train_timeout,
                on_stage=recorder.mark_stage, on_halt=lambda reason, state: recorder.round_failed(
                    _current_round(ctx), reason, set(state.active_node_ids), list(state.legacy_results)))
            recorder.fit_workflow = fit_workflow

        def evaluate_and_record(grid_, context_):
            if not recorder.current.get("failed"):  # a failed round left the model unchanged: nothing to ask
                recorder.mark_stage("federated evaluation")
                default_evaluate_workflow(grid_, context_)
            recorder.end_round(_current_round(context_))

        try:
            DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=evaluate_and_record)(metered, ctx)
        except StopRun as stop:
            log.info("%s", stop)
            if stop.interrupted:
                return "interrupted"
            ended = f"{'stopped' if stop.failed else 'ended early'}: {stop}"
    if ended == "completed" and recorder.failed_rounds:
        ended = (f"stopped: no round aggregated ({recorder.failed_rounds} failed)"
                 if recorder.failed_rounds >= remaining else f"completed, {recorder.failed_rounds} round(s) failed")
    _finalize(run, recorder)
    return ended


def _current_round(context) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


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
    return read_jsonl(path)


