"""Resuming a run: the saved config with explicit overrides, FedAdam's state, durable files."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.config import load_config, save_config
from fedtune.io_utils import append_line, read_jsonl
from fedtune.server.checkpoints import load_optimizer, save_checkpoint
from fedtune.server.coordinator import RunError, resumed_config
from fedtune.server.strategy import make_strategy, optimizer_state, server_learning_rate


def test_resume_uses_the_saved_config_and_only_explicit_overrides(tmp_path):
    save_config(load_config(None, ["federation.rounds=5", "train.batch_size=8", "federation.sites=4"]),
                tmp_path / "config.toml")
    cfg = resumed_config(tmp_path, [])
    assert (cfg.federation.rounds, cfg.train.batch_size, cfg.federation.sites) == (5, 8, 4)
    cfg = resumed_config(tmp_path, ["federation.rounds=8", "federation.train_timeout=60"])
    assert cfg.federation.rounds == 8 and cfg.federation.train_timeout == 60 and cfg.train.batch_size == 8
    with pytest.raises(RunError, match="train.batch_size cannot change in a resumed run"):
        resumed_config(tmp_path, ["train.batch_size=16"])
    with pytest.raises(RunError, match="federation.rounds = 0"):
        resumed_config(tmp_path, ["federation.rounds=0"])


def test_a_torn_last_metrics_line_is_skipped_and_a_bad_middle_line_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"round": 0}))
    append_line(path, json.dumps({"round": 1}))
    with path.open("a") as fh:
        fh.write('{"round": 2, "cent')  # killed mid-write
    assert [r["round"] for r in read_jsonl(path)] == [0, 1]
    path.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_every_file_of_a_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append((str(src), list(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    from collections import OrderedDict

    save_checkpoint(tmp_path, 1, OrderedDict(a=np.ones(3, np.float32)), {"run_id": "r"},
                    {"m_t": [np.ones(3)], "v_t": [np.ones(3)]})
    into_place = next(synced_then for src, synced_then in renamed if os.path.basename(src).startswith(".round-"))
    names = {os.path.basename(p) for p in into_place}
    assert {"adapter.npz", "optimizer.npz", "names.json", "state.json"} <= names


def _fit(values, n):
    from fedtune.federation.messages import SiteReport

    report = SiteReport(site=f"site-{n}", epsilon=1.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0,
                        sample_rate=0.5, steps=2, accountant="prv").to_record()  # what every site's answer carries
    return (SimpleNamespace(node_id=n, cid=str(n)),
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters([values]), n, report))


def _server_opt(sets, initial, optimizer=None, offset=0):
    cfg = load_config(None, list(sets))
    recorder = SimpleNamespace(on_fit=lambda *a: None, absolute=lambda r: offset + r, central_evaluate=None,
                               fit_config=None, evaluate_config=None, roster=SimpleNamespace(min_sites=1),
                               run=SimpleNamespace(optimizer=optimizer or {}))
    return make_strategy(cfg, [initial], recorder)


SERVER_OPTIMISERS = {
    "fedadam": ("federation.strategy=fedadam", "federation.server_learning_rate=0.1"),
    "fedavgm": ("federation.strategy=fedavgm", "federation.server_momentum=0.9"),
}


@pytest.mark.parametrize("name", SERVER_OPTIMISERS)
def test_server_optimiser_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path, name):
    sets = SERVER_OPTIMISERS[name]
    rng = np.random.default_rng(0)
    start = rng.normal(size=5).astype(np.float32)
    updates = [[_fit(rng.normal(size=5), 10), _fit(rng.normal(size=5), 30)] for _ in range(3)]

    full = _server_opt(sets, start)
    for rnd, res in enumerate(updates, start=1):
        out_full = parameters_to_ndarrays(full.aggregate_fit(rnd, res, [])[0])[0]

    first = _server_opt(sets, start)
    after1 = parameters_to_ndarrays(first.aggregate_fit(1, updates[0], [])[0])[0]
    from collections import OrderedDict

    save_checkpoint(tmp_path, 1, OrderedDict(a=after1), {"run_id": "r"}, optimizer_state(first))
    resumed = _server_opt(sets, after1, load_optimizer(tmp_path), offset=1)
    for rnd, res in enumerate(updates[1:], start=1):
        out_resumed = parameters_to_ndarrays(resumed.aggregate_fit(rnd, res, [])[0])[0]
    np.testing.assert_allclose(out_resumed, out_full, rtol=0, atol=1e-6)
    # without the optimiser's state it differs (FedAvgM restarts its momentum, FedAdam its moments)
    fresh = _server_opt(sets, after1, offset=1)
    for rnd, res in enumerate(updates[1:], start=1):
        out_fresh = parameters_to_ndarrays(fresh.aggregate_fit(rnd, res, [])[0])[0]
    assert np.abs(out_fresh - out_full).max() > 1e-3


def test_fedavgm_momentum_moves_further_than_plain_averaging_on_repeated_updates():
    """Every round each site moves the adapter by +1: plain averaging moves the global adapter 1
    a round, server momentum 0.9 moves it 1 then 1.9."""
    def two_rounds(sets):
        strategy, current = _server_opt(sets, np.zeros(3, np.float32)), np.zeros(3)
        for rnd in (1, 2):
            current = parameters_to_ndarrays(strategy.aggregate_fit(rnd, [_fit(current + 1, 10)], [])[0])[0]
        return current

    plain = ("federation.strategy=fedavgm", "federation.server_learning_rate=1.0")
    np.testing.assert_allclose(two_rounds(plain), 2.0, atol=1e-6)
    np.testing.assert_allclose(two_rounds(plain + ("federation.server_momentum=0.9",)), 2.9, atol=1e-6)
    # The default under FFA-LoRA: a server step of twice the mean update, 2 a round.
    np.testing.assert_allclose(two_rounds(("federation.strategy=fedavgm",)), 4.0, atol=1e-6)


@pytest.mark.parametrize("sets, want", [
    ((), 2.0),                                                   # the defaults: FedAvgM under FFA-LoRA
    (("lora.freeze_a=false",), 1.0),                             # A trained too: plain averaging
    (("federation.server_learning_rate=0.5",), 0.5),             # as set
    (("federation.strategy=fedadam",), 1e-2),
    (("federation.strategy=fedavg",), None),
])
def test_server_learning_rate_unset_follows_the_strategy_and_ffa_lora(sets, want):
    assert server_learning_rate(load_config(None, list(sets))) == want


def test_fedavgm_momentum_starts_at_the_first_round_with_an_aggregate():
    """Round 1 with no result (every site failed) aggregates nothing; round 2 then starts the
    momentum (Flower's FedAvgM alone would assert that round 1 created it)."""
    strategy = _server_opt(("federation.strategy=fedavgm", "federation.server_momentum=0.9",
                            "federation.server_learning_rate=1.0"), np.zeros(3, np.float32))
    assert strategy.aggregate_fit(1, [], [RuntimeError("site down")])[0] is None
    current = np.zeros(3)
    for rnd in (2, 3):
        current = parameters_to_ndarrays(strategy.aggregate_fit(rnd, [_fit(current + 1, 10)], [])[0])[0]
    np.testing.assert_allclose(current, 2.9, atol=1e-6)  # 1, then 1 + 0.9 + 1: momentum from round 2 on
