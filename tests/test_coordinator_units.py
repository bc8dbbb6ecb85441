"""Coordinator pieces without a federation: SecAgg+ settings, early stopping, checkpoints, metering."""

import json
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.model import ModelLoadError
from fedtune.server.checkpoints import load_latest, save_checkpoint
from fedtune.server.coordinator import PreparedRun, RunRecorder, StopRun
from fedtune.server.secagg import SecAggSettingsError, secagg_settings


def _fed(*sets):
    return load_config(None, list(sets)).federation


def test_secagg_defaults_follow_the_number_of_sites():
    adapter = [np.full((4, 4), 0.1, np.float32)]
    s = secagg_settings(_fed("federation.sites=3"), adapter, 500)
    assert (s.num_shares, s.reconstruction_threshold) == (3, 2)
    s = secagg_settings(_fed("federation.sites=10"), adapter, 500)
    assert s.num_shares == 10 and 2 <= s.reconstruction_threshold < 10
    assert s.max_weight >= 500
    # Two sites: Flower's fractional form, every site holds a share and must answer.
    s = secagg_settings(_fed("federation.sites=2"), adapter, 500)
    assert (s.num_shares, s.reconstruction_threshold) == (1.0, 1.0)


def test_secagg_quantization_overflow_is_refused():
    with pytest.raises(SecAggSettingsError, match="overflows"):
        secagg_settings(_fed("federation.sites=4", "federation.secagg_quantization_range=1073741824",
                             "federation.secagg_modulus_range=4294967296"),
                        [np.zeros(3, np.float32)], 10)


def test_secagg_threshold_not_below_shares_is_refused():
    with pytest.raises(SecAggSettingsError, match="threshold"):
        secagg_settings(_fed("federation.sites=4", "federation.secagg_num_shares=4",
                             "federation.secagg_reconstruction_threshold=1"), [np.zeros(3, np.float32)], 10)


class _FakeEvaluator:
    names = ["a"]

    def named(self, arrays):
        return OrderedDict(a=np.asarray(arrays[0], np.float32))

    def export(self, arrays, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{}")


def _recorder(tmp_path, *sets):
    cfg = load_config(None, ["federation.rounds=10", *sets])
    run = PreparedRun(cfg, tmp_path, _FakeEvaluator(), [np.zeros(2, np.float32)], "run1", 0, {}, None, True)
    grid = SimpleNamespace(take=lambda: ({}, {}), errors={})
    return RunRecorder(run, grid)


def _round(rec, rnd, accuracy):
    rec.start_round(rnd)
    rec.current["central"] = {"accuracy": accuracy, "loss": 1.0}
    rec.current["aggregated"] = True  # as on_fit does when SecAgg+ delivered an aggregate
    rec.end_round(rnd)


def test_early_stopping_after_patience_rounds_without_improvement(tmp_path):
    rec = _recorder(tmp_path, "federation.early_stopping_patience=2")
    _round(rec, 1, 0.5)
    _round(rec, 2, 0.6)
    _round(rec, 3, 0.55)
    with pytest.raises(StopRun, match="early stopping"):
        _round(rec, 4, 0.59)
    assert rec.best_round == 2
    assert (tmp_path / "best" / "adapter" / "adapter_config.json").is_file()
    state = load_latest(tmp_path / "checkpoints")[2]
    assert state["best_round"] == 2 and state["stale"] == 2
    rounds = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_no_early_stopping_when_off(tmp_path):
    rec = _recorder(tmp_path)
    for rnd, acc in enumerate([0.5, 0.4, 0.3, 0.2], start=1):
        _round(rec, rnd, acc)
    assert rec.best_round == 1


def test_checkpoint_write_is_atomic_and_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, OrderedDict(a=np.ones(3, np.float32)), {"run_id": "r"})
    import fedtune.server.checkpoints as ck

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_replace_dir", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, OrderedDict(a=np.zeros(3, np.float32)), {"run_id": "r"})
    rnd, arrays, state = load_latest(tmp_path)
    assert rnd == 1 and np.array_equal(arrays["a"], np.ones(3, np.float32))
    assert not list(tmp_path.glob(".round-*")), "a failed write leaves no half-written folder"


def test_merged_export_is_a_plain_model_with_the_same_logits(tiny_models, separable_files, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedtune.federation.dataset import federated_rows
    from fedtune.server.central_eval import CentralEvaluator

    sets = [f'model.name="{tiny_models["bert"]}"', "model.max_length=24", "lora.r=4",
            f'data.train="{separable_files["train"]}"', "federation.partition=iid", "federation.merge_final=true"]
    rows = federated_rows(load_config(None, sets))
    # The default mean-pooling head cannot be carried by a plain transformers model: refused.
    with pytest.raises(ModelLoadError, match="merge_final = true needs model.pooling = 'cls'"):
        CentralEvaluator(load_config(None, sets), rows.central, rows.columns, rows.label_map, rows.central_source)
    cfg = load_config(None, sets + ["model.pooling=cls"])
    ev = CentralEvaluator(cfg, rows.central, rows.columns, rows.label_map, rows.central_source)
    arrays = [a + 0.05 for a in ev.initial_arrays().values()]  # a non-trivial adapter
    ev.export_merged(arrays, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = ev.collate([ev.dataset[i] for i in range(4)])
    ev.model.eval()
    with torch.no_grad():
        want = ev.model(input_ids=batch[0], attention_mask=batch[1]).logits
        got = merged(input_ids=batch[0], attention_mask=batch[1]).logits
    assert torch.allclose(want, got, atol=1e-5)


def test_a_user_set_threshold_at_the_share_count_is_refused_not_lowered():
    with pytest.raises(SecAggSettingsError, match="threshold < shares"):
        secagg_settings(_fed("federation.sites=5", "federation.secagg_num_shares=4",
                             "federation.secagg_reconstruction_threshold=4"), [np.zeros(3, np.float32)], 10)
    s = secagg_settings(_fed("federation.sites=5", "federation.secagg_num_shares=4",
                             "federation.secagg_reconstruction_threshold=3"), [np.zeros(3, np.float32)], 10)
    assert (s.num_shares, s.reconstruction_threshold) == (4, 3)


def test_fraction_evaluate_zero_asks_no_site_to_evaluate():
    """Federated evaluation off (the coordinator's central evaluation only): no evaluate message."""
    from flwr.server.client_manager import SimpleClientManager

    from fedtune.server.strategy import make_strategy

    manager = SimpleClientManager()
    for cid in ("1", "2"):
        manager.register(SimpleNamespace(cid=cid, node_id=int(cid)))
    recorder = SimpleNamespace(central_evaluate=None, fit_config=None, evaluate_config=lambda rnd: {},
                               run=SimpleNamespace(optimizer={}))
    asked = {}
    for fraction in (1.0, 0.0):
        cfg = load_config(None, [f"federation.fraction_evaluate={fraction}"])
        strategy = make_strategy(cfg, [np.zeros(2, np.float32)], recorder)
        asked[fraction] = strategy.configure_evaluate(1, strategy.initial_parameters, manager)
    assert len(asked[1.0]) == 2 and asked[0.0] == []
