"""Flower's own strategies (FedAvg weighted by examples, FedProx, FedAdam) on the legacy path,
which is where SecAgg+ runs in flwr 1.42, with hooks that record each round."""

from __future__ import annotations

import random

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvg, FedProx

from fedtune.config import FedTuneConfig
from fedtune.training.auto import auto_learning_rate

from .secagg import sites_per_round

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def make_strategy(cfg: FedTuneConfig, initial: list[np.ndarray], recorder):
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]

    class RecordingStrategy(base):
        def configure_fit(self, server_round, parameters, client_manager):
            recorder.start_round(server_round)
            # Which sites train is drawn from a seeded generator: same seeds, same run.
            random.seed(cfg.train.seed * 7_919 + recorder.absolute(server_round))
            return recorder.select(server_round, super().configure_fit(server_round, parameters, client_manager))

        def aggregate_fit(self, server_round, results, failures):
            recorder.on_fit(server_round, results, failures)
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
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
            recorder.end_round(server_round)
            return out

    n = sites_per_round(fed)
    kwargs = dict(
        fraction_fit=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_fit_clients=n,
        min_evaluate_clients=max(1, int(fed.fraction_evaluate * fed.sites)),
        min_available_clients=fed.sites,
        evaluate_fn=recorder.central_evaluate,
        on_fit_config_fn=recorder.fit_config,
        on_evaluate_config_fn=recorder.evaluate_config,
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        # eta_l is only recorded by Flower's FedAdam (the sites' rates are their own).
        lr = cfg.train.learning_rate
        kwargs.update(eta=fed.server_learning_rate, eta_l=auto_learning_rate(cfg.privacy.enabled) if lr == "auto" else lr,
                      tau=1e-3)
    return RecordingStrategy(**kwargs)
