"""Flower's own strategies (FedAvg weighted by examples, FedProx, FedAdam, FedAvgM) on the legacy path,
which is where SecAgg+ runs in flwr 1.42, with hooks that record each round."""

from __future__ import annotations

import random

import numpy as np
from flwr.common import EvaluateIns, FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from pydantic import ValidationError

from fedtune.adapters import AdapterMismatchError, pack, unpack
from fedtune.config import FedTuneConfig
from fedtune.federation.messages import SiteReport
from fedtune.training.auto import auto_learning_rate


STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM}


def server_learning_rate(cfg: FedTuneConfig) -> float | None:
    """federation.server_learning_rate, or when unset: FedAdam 1e-2; FedAvgM 2.0 under FFA-LoRA
    (A frozen, so the mean of the sites' B is the exact mean update and a step of twice it
    learned more under DP: simulations/RESULTS.md section 5) and 1.0 (plain averaging) when A is
    trained too (averaged A and B only approximate the mean product; 2.0 diverged there)."""
    fed = cfg.federation
    if fed.server_learning_rate is not None:
        return fed.server_learning_rate
    if fed.strategy == "fedadam":
        return 1e-2
    if fed.strategy == "fedavgm":
        return 2.0 if cfg.lora.freeze_a else 1.0
    return None


def make_strategy(cfg: FedTuneConfig, initial: list[np.ndarray], recorder):
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]
    shapes = [a.shape for a in initial]

    class RecordingStrategy(base):
        """Flower's strategy on the adapter's tensors; its messages carry them packed as one
        array (fedtune/adapters.py: pack), unpacked here before aggregation."""

        def configure_fit(self, server_round, parameters, client_manager):
            recorder.start_round(server_round)
            recorder.admit(server_round)  # pre-flight for new sites; stops the run if too few are left
            # Which sites train is drawn from a seeded generator: same seeds, same run.
            random.seed(cfg.train.seed * 7_919 + recorder.absolute(server_round))
            chosen = recorder.select(server_round, super().configure_fit(server_round, parameters, client_manager))
            return [(proxy, FitIns(_packed(ins.parameters), ins.config)) for proxy, ins in chosen]

        def configure_evaluate(self, server_round, parameters, client_manager):
            return [(proxy, EvaluateIns(_packed(ins.parameters), ins.config))
                    for proxy, ins in super().configure_evaluate(server_round, parameters, client_manager)]

        def aggregate_fit(self, server_round, results, failures):
            # An answer that is not the adapter packed (AdapterMismatchError), or whose report is not
            # a SiteReport, is that site's failure this round, like a site that sent nothing: the
            # others' updates are aggregated. With SecAgg+ every result carries the same unmasked
            # sum, which already holds each site's masked update: a malformed report there is noted
            # (the site contributed; what it spent is unknown here) and its result kept.
            usable, malformed, unreadable, summed = [], {}, {}, []
            for proxy, res in results:
                try:
                    unpacked = _unpacked(res, shapes)
                except AdapterMismatchError as e:
                    malformed[proxy.node_id] = (f"its update is not the adapter: {e}", res)
                    continue
                try:
                    SiteReport.from_record(res.metrics)
                except ValidationError as e:
                    why = f"its report is malformed ({e.error_count()} invalid field(s))"
                    if recorder.run.secagg is not None:
                        unreadable[proxy.node_id] = why
                        summed.append((proxy, unpacked))
                    else:
                        malformed[proxy.node_id] = (why, res)
                    continue
                usable.append((proxy, unpacked))
            failures = [*failures, *(ValueError(why) for why, _ in malformed.values())]
            recorder.on_fit(server_round, usable, failures, malformed, unreadable)
            results = usable + summed
            # The absolute round: FedAdam's bias correction and FedAvgM's momentum continue across a resume.
            absolute = recorder.absolute(server_round)
            if results and getattr(self, "server_momentum", 0.0) > 0 and not self.momentum_vector:
                # FedAvgM creates its momentum in round 1 and asserts it exists afterwards: after a
                # round with no aggregate (every site failed), or a resume from a checkpoint saved
                # without it, start the momentum at this round instead of stopping the run.
                absolute = 1
            parameters, metrics = super().aggregate_fit(absolute, results, failures)
            if parameters is not None:
                # SecAgg+ returns float64; keep the global adapter (and the download) in fp32.
                parameters = ndarrays_to_parameters(
                    [a.astype(np.float32) for a in parameters_to_ndarrays(parameters)]
                )
            return parameters, metrics

        def aggregate_evaluate(self, server_round, results, failures):
            # A site without a local test split answers with 0 examples; Flower's weighted mean
            # over only such answers would divide by zero.
            out = super().aggregate_evaluate(server_round, [(p, r) for p, r in results if r.num_examples > 0],
                                             failures)
            recorder.on_federated(server_round, results)
            return out

    # A round runs with the sites that are there (at least the roster's min_sites, checked before
    # sampling); Flower's own minimums would wait a day for a site that is gone.
    kwargs = dict(
        fraction_fit=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        # Flower passes min_available_clients to every sample() as the minimum, evaluation's too:
        # the roster (before sampling) and select() (after) enforce min_sites for training instead.
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        evaluate_fn=recorder.central_evaluate,
        on_fit_config_fn=recorder.fit_config,
        on_evaluate_config_fn=recorder.evaluate_config,
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True,
        # The recorder keeps every site's metrics itself; Flower's aggregate of them is unused
        # (without these Flower warns each round that none is provided).
        fit_metrics_aggregation_fn=_no_aggregate,
        evaluate_metrics_aggregation_fn=_no_aggregate,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    server_lr = server_learning_rate(cfg)
    if fed.strategy == "fedadam":
        # eta_l is only recorded by Flower's FedAdam (the sites' rates are their own).
        lr = cfg.train.learning_rate
        kwargs.update(eta=server_lr, eta_l=auto_learning_rate(cfg.privacy.enabled) if lr == "auto" else lr,
                      tau=1e-3)
    if fed.strategy == "fedavgm":
        kwargs.update(server_learning_rate=server_lr, server_momentum=fed.server_momentum)
    strategy = RecordingStrategy(**kwargs)
    saved = recorder.run.optimizer
    if fed.strategy == "fedadam" and saved:
        # Resume: FedAdam's moments and its full-precision weights, as checkpointed.
        strategy.m_t, strategy.v_t = saved["m_t"], saved["v_t"]
        strategy.current_weights = saved["current_weights"]
    if fed.strategy == "fedavgm" and saved.get("momentum"):
        # Resume: FedAvgM's momentum (its weights are the checkpointed adapter, passed as initial).
        strategy.momentum_vector = saved["momentum"]
    return strategy


def optimizer_state(strategy) -> dict:
    """What a resumed run needs of the server optimiser (FedAdam's moments and weights, FedAvgM's
    momentum); {} for FedAvg and FedProx."""
    if getattr(strategy, "m_t", None) and getattr(strategy, "v_t", None):
        return {"m_t": strategy.m_t, "v_t": strategy.v_t, "current_weights": strategy.current_weights}
    if getattr(strategy, "momentum_vector", None):
        return {"momentum": strategy.momentum_vector}
    return {}


def _packed(parameters):
    return ndarrays_to_parameters(pack(parameters_to_ndarrays(parameters)))


def _unpacked(res: FitRes, shapes) -> FitRes:
    """A site's answer with its adapter unpacked; AdapterMismatchError if its arrays do not even
    deserialize, or are not the adapter packed."""
    try:
        arrays = parameters_to_ndarrays(res.parameters)
    except Exception as e:  # noqa: BLE001 - bytes a site sent: whatever numpy makes of them
        raise AdapterMismatchError(f"its arrays do not deserialize ({type(e).__name__})") from None
    return FitRes(res.status, ndarrays_to_parameters(unpack(arrays, shapes)), res.num_examples, res.metrics)


def _no_aggregate(metrics: list) -> dict:
    return {}
