"""SecAgg+ with sites that die mid-round and stay dead: Flower's real protocol (its workflow and
its client mod) over an in-process grid (simulations/benchmarks/secagg_shares.py: LoopbackGrid)
that delivers each message to the site's ClientApp and drops every message to a dead site, as a
SuperLink does once the site's deadline has passed."""

import numpy as np
import pytest
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.server.secagg_workflow import ResilientSecAggPlusWorkflow
from simulations.benchmarks.secagg_shares import LoopbackGrid, run_round

SHAPE = (6, 5)


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What a ServerApp process has set when it builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class _Site(NumPyClient):
    def __init__(self, value, examples):
        self.value, self.examples = value, examples

    def fit(self, parameters, config):
        if self.value is None:
            raise ValueError("this site's training fails")
        return [np.asarray(self.value, np.float64)], self.examples, {}


def _client_app(value, examples) -> ClientApp:
    def client_fn(context: Context):
        return _Site(value, examples).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class SiteGrid(LoopbackGrid):
    """The loopback grid with each site (value, examples) answering through ``make_app``
    (tests/test_secagg_site_policy.py swaps in fedtune's own SecAgg+ mod)."""

    make_app = staticmethod(_client_app)

    def __init__(self, sites, die):
        super().__init__({node: self.make_app(*site) for node, site in sites.items()}, die)


def _run(workflow, sites, die, strategy_class=FedAvg):
    grid = SiteGrid(sites, die)
    strategy = strategy_class(fraction_fit=1.0, min_fit_clients=len(sites), min_available_clients=len(sites),
                              accept_failures=True)
    return run_round(grid, workflow, [np.zeros(SHAPE)], strategy)[0]


def _sites(n):
    rng = np.random.default_rng(3)
    return {100 + i: (rng.normal(0, 0.5, SHAPE), 50 * (i + 1)) for i in range(n)}


def _mean(sites, nodes):
    total = sum(sites[n][1] for n in nodes)
    return sum(sites[n][0] * sites[n][1] for n in nodes) / total


def _resilient(halts, shares, threshold):
    return ResilientSecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=1024.0,
                                       stage_timeout=5, train_timeout=5, on_halt=lambda r, s: halts.append(r))


@pytest.mark.parametrize("stage, survivors_in_sum", [
    (None, 4),                         # nobody dies
    ("share_keys", 3),                 # dies after setup, before sharing its keys
    ("collect_masked_vectors", 3),     # dies while training: its masks are removed with its neighbours' shares
    ("unmask", 4),                     # dies during unmasking: its update is in, its mask is recovered
])
def test_four_sites_one_dies_and_the_round_aggregates_the_others(stage, survivors_in_sum):
    sites = _sites(4)
    victim = 102
    halts = []
    got = _run(_resilient(halts, 4, 3), sites, {victim: stage} if stage else {})
    assert halts == []
    nodes = sorted(sites) if survivors_in_sum == 4 else [n for n in sites if n != victim]
    np.testing.assert_allclose(got, _mean(sites, nodes), atol=1e-4)


def test_flowers_own_workflow_halts_when_a_site_dies_before_sharing_keys():
    """What the resilient workflow fixes (the "Not enough shares" halt seen in a deployment)."""
    sites = _sites(4)
    got = _run(SecAggPlusWorkflow(num_shares=4, reconstruction_threshold=3, max_weight=1024.0), sites,
               {102: "share_keys"})
    assert np.array_equal(got, np.zeros(SHAPE))  # no aggregate: the model is unchanged


def test_two_of_five_die_while_training_and_the_three_left_aggregate():
    sites = _sites(5)
    halts = []
    got = _run(_resilient(halts, 5, 3), sites, {101: "collect_masked_vectors", 103: "collect_masked_vectors"})
    assert halts == []
    np.testing.assert_allclose(got, _mean(sites, [100, 102, 104]), atol=1e-4)


def test_too_few_survivors_halt_with_a_reason():
    sites = _sites(4)
    halts = []
    got = _run(_resilient(halts, 4, 3), sites, {101: "collect_masked_vectors", 103: "collect_masked_vectors"})
    assert np.array_equal(got, np.zeros(SHAPE))
    assert len(halts) == 1 and "training stage" in halts[0] and "threshold 3" in halts[0]


def test_a_site_whose_training_fails_is_one_failure_for_the_strategy():
    """Flower 1.42's training stage records each error reply twice; the round's failures (and the
    reasons in metrics.jsonl) count it once."""
    sites = _sites(4)
    sites[102] = (None, 50)  # its training raises: the site answers with an error
    failures = []

    class Recording(FedAvg):
        def aggregate_fit(self, server_round, results, failed):
            failures.append(len(failed))
            return super().aggregate_fit(server_round, results, failed)

    halts = []
    got = _run(_resilient(halts, 4, 3), sites, {}, Recording)
    assert halts == [] and failures == [1]
    np.testing.assert_allclose(got, _mean(sites, [100, 101, 103]), atol=1e-4)


@pytest.mark.parametrize("wrong", [np.ones(SHAPE[1]), np.ones(7), np.ones((5, 6))])
def test_a_site_whose_masked_update_is_not_the_adapter_is_dropped_and_the_others_aggregate(wrong):
    # A row of the adapter's width would broadcast into Flower's sum: every site's aggregate wrong.
    sites = _sites(4)
    sites[102] = (wrong, 50)
    failures, reasons = [], []

    class Recording(FedAvg):
        def aggregate_fit(self, server_round, results, failed):
            failures.append(len(failed))
            reasons.extend(f.args[0].reason for f in failed)
            return super().aggregate_fit(server_round, results, failed)

    halts = []
    got = _run(_resilient(halts, 4, 3), sites, {}, Recording)
    assert halts == [] and failures == [1]
    assert reasons == [f"its masked update is not the adapter: expected integer arrays of shapes [(1,), {SHAPE}], "
                       f"got [(1,), {wrong.shape}]"]
    np.testing.assert_allclose(got, _mean(sites, [100, 101, 103]), atol=1e-4)


def test_a_masked_update_of_floats_is_dropped_and_the_others_aggregate():
    """The right shapes but not integers (Flower's modular sum would raise on it)."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    class Tampering(SiteGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                cfg = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
                if reply.metadata.src_node_id == 102 and cfg is not None and Key.MASKED_PARAMETERS in cfg:
                    cfg[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.float64))
                                                  for b in cfg[Key.MASKED_PARAMETERS]]
            return replies

    sites, halts = _sites(4), []
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=4, min_available_clients=4, accept_failures=True)
    got = run_round(Tampering(sites, {}), _resilient(halts, 4, 3), [np.zeros(SHAPE)], strategy)[0]
    assert halts == []
    np.testing.assert_allclose(got, _mean(sites, [100, 101, 103]), atol=1e-4)
