"""SecAgg+ shares per site: every site (a share of every other site's keys) against
2 ceil(log2 n) + 1 (Bell et al., CCS 2020), on Flower's own protocol code.

One SecAgg+ round of n sites, each with a vector of an adapter's size, over an in-process grid
(:class:`LoopbackGrid`, which tests/test_secagg_dropout.py also uses): fedtune's coordinator
workflow (server/secagg_workflow.py) and, at each site, fedtune's SecAgg+ checks
(client/secagg_policy.py, which refuse a threshold at or below half the shares) before Flower's
client mod, with fedtune's SHAKE-256 masks. What is timed is the protocol's own work, per site
(key agreement, Shamir shares, one mask per neighbour over the whole vector) and at the
coordinator (unmasking), with no training and no network: sites work in parallel when
deployed, so a round's protocol cost is about the slowest site plus the coordinator. Each round
checks that the aggregate is the weighted mean of the sites' vectors.

    python -m simulations.benchmarks.secagg_shares [--size tiny|default|full]
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path

import numpy as np

from simulations.benchmarks.common import RESULTS, log, main_for, table, write_json

SITES = {"tiny": [4, 8], "default": [8, 16, 24, 32, 48], "full": [8, 16, 24, 32, 48, 64, 96]}
VALUES = {"tiny": 2_000, "default": 74_880, "full": 74_880}  # default: the MiniLM adapter's values
MAX_WEIGHT = 1024.0


class LoopbackGrid:
    """Flower's grid in one process: each message goes to a copy of its site's ClientApp (its own
    copy of the message, as over the network). A site in ``die`` (node -> SecAgg+ stage) stops
    answering from that stage on, as a SuperLink drops messages to a site past its deadline.
    ``seconds[node]``: the time spent in that site's app."""

    def __init__(self, apps: dict, die: dict | None = None):
        from flwr.app import Context, RecordDict

        self.apps, self.die, self.dead = apps, dict(die or {}), set()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in apps}
        self.seconds = dict.fromkeys(apps, 0.0)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            node = msg.metadata.dst_node_id
            if self.die.get(node) == msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]:
                self.dead.add(node)
            if node in self.dead:
                continue
            started = time.perf_counter()
            try:
                replies.append(self.apps[node](msg, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode answers with an error, as Flower does
                replies.append(Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg))
            self.seconds[node] += time.perf_counter() - started
        return replies


def run_round(grid: LoopbackGrid, workflow, initial: list[np.ndarray], strategy=None) -> list[np.ndarray]:
    """One SecAgg+ round of ``workflow`` over ``grid``; the new global arrays."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    manager = SimpleClientManager()
    for node in grid.apps:
        manager.register(GridClientProxy(node, grid, 1))
    n = len(grid.apps)
    strategy = strategy or FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n,
                                  accept_failures=True)
    ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1,
                                                                 WorkflowKey.START_TIME: 0.0})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(initial),
                                                                                   True)
    workflow(grid, ctx)
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD],
                                                                   keep_input=True))


def as_coordinator() -> None:
    """What a ServerApp process has set before it builds messages (Flower's task identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        setattr(TaskIdentity, name, value)


def _site_app(vector: np.ndarray, examples: int, min_neighbours: int = 2):
    """A site that answers with ``vector``, checking each SecAgg+ message as fedtune's sites do."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    from fedtune.client.secagg_policy import check_secagg_message

    class Site(NumPyClient):
        def fit(self, parameters, config):
            return [vector], examples, {}

    def checked(msg, context, call_next):
        check_secagg_message(msg.content, context.state.config_records, msg.metadata.dst_node_id, min_neighbours)
        return secaggplus_mod(msg, context, call_next)

    return ClientApp(client_fn=lambda context: Site().to_client(), mods=[checked])


def threshold_for(shares: int) -> int:
    """The coordinator's derived threshold (server/secagg.py): two thirds of the shares."""
    return min(max(2, math.ceil(2 * shares / 3)), shares - 1)


def one_round(sites: int, shares: int, values: int, seed: int = 0) -> dict:
    from fedtune.federation.secagg_masks import install
    from fedtune.server.secagg_workflow import ResilientSecAggPlusWorkflow

    install()
    as_coordinator()
    rng = np.random.default_rng(seed)
    data = {100 + i: (rng.normal(0, 0.05, values), int(rng.integers(20, 500))) for i in range(sites)}
    grid = LoopbackGrid({n: _site_app(v, e) for n, (v, e) in data.items()})
    halts: list = []
    threshold = threshold_for(shares)
    workflow = ResilientSecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                           max_weight=MAX_WEIGHT, stage_timeout=600, train_timeout=600,
                                           on_halt=lambda reason, state: halts.append(reason))
    started = time.perf_counter()
    [aggregate] = run_round(grid, workflow, [np.zeros(values)])
    total = time.perf_counter() - started
    if halts:
        raise RuntimeError(f"{sites} sites, {shares} shares: {halts}")
    mean = sum(v * e for v, e in data.values()) / sum(e for _, e in data.values())
    site_s = list(grid.seconds.values())
    return {"sites": sites, "shares": shares, "threshold": threshold, "values": values,
            "site_mean_s": statistics.mean(site_s), "site_max_s": max(site_s),
            "coordinator_s": total - sum(site_s), "max_error": float(np.abs(aggregate - mean).max())}


def run(size: str = "default", out_dir: Path | None = None) -> dict:
    from fedtune.server.secagg import ALL_SHARE_UP_TO, default_shares

    values, results = VALUES[size], []
    for n in SITES[size]:
        log_shares = min(n, 2 * math.ceil(math.log2(n)) + 1)
        for rule, shares in (("every site", n), ("2 log2 n + 1", log_shares)):
            log(f"secagg_shares: {n} sites, {shares} shares ({rule})")
            results.append({"rule": rule, "default": shares == default_shares(n),
                            **one_round(n, shares, values)})
    rows = [[r["sites"], r["rule"], r["shares"], r["threshold"], r["site_mean_s"], r["site_max_s"],
             r["coordinator_s"], r["site_max_s"] + r["coordinator_s"], "yes" if r["default"] else "", r["max_error"]]
            for r in results]
    text = table(["sites", "shares rule", "shares", "threshold", "site s (mean)", "site s (max)", "coordinator s",
                  "slowest site + coordinator s", "fedtune's default", "max error"], rows)
    print(f"\nSecAgg+ protocol work per round ({values} values per site, no training, in one process; fedtune "
          f"shares every site up to {ALL_SHARE_UP_TO} sites)\n{text}")
    payload = {"values": values, "all_share_up_to": ALL_SHARE_UP_TO, "results": results, "table": text}
    write_json("secagg_shares", size, payload, Path(out_dir) if out_dir is not None else RESULTS)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
