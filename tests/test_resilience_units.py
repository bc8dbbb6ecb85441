"""Who takes part in a round, the pre-flight and failed rounds, without a federation."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune import __version__, tiny
from fedtune.client.settings import SiteSettings
from fedtune.config import load_config
from fedtune.federation.preflight import PreflightRequest, check_site
from fedtune.server.client_manager import EligibleClientManager
from fedtune.server.coordinator import PreparedRun, RunRecorder, StopRun
from fedtune.server.health import SiteHealth
from fedtune.server.roster import SiteRoster, TooFewSites


# -- exclusion policy ---------------------------------------------------------------------------

def test_a_site_that_fails_once_is_back_next_round():
    health = SiteHealth(max_consecutive_failures=2)
    assert health.failed(7, "connection reset") == "failed"
    assert health.eligible(7)
    health.succeeded(7)
    assert health.failed(7) == "failed" and health.eligible(7)  # the count restarted
    assert health.failed(7) == "excluded" and not health.eligible(7)
    assert "2 rounds in a row" in health.excluded[7]


def test_a_refusal_is_final():
    health = SiteHealth(max_consecutive_failures=5)
    assert health.failed(3, "hospital-a: refused (privacy budget)") == "refused"
    assert not health.eligible(3) and health.excluded[3] == "refused (privacy budget)"
    assert health.failed(4, "hospital-b: refused (site policy)") == "refused"
    assert not health.eligible(4)
    assert health.failed(5, "hospital-c: internal error") == "failed" and health.eligible(5)


def test_the_coordinator_reads_the_refusal_from_the_generic_reply():
    import time

    from flwr.app import Metadata, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.message_type import MessageType
    from fedtune.client.mods import private_errors_mod
    from fedtune.client.policy import BudgetRefusal
    from fedtune.federation.refusal import refusal_kind, refusing_site

    def call_next(msg, ctx):
        raise BudgetRefusal("hospital-a: lifetime budget spent (epsilon 9.9 of 10) on /srv/x.csv")

    context = SimpleNamespace(node_config={"data-path": "/srv/x.csv", "site-id": "hospital-a"})
    msg = make_message(Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                                group_id="1", created_at=time.time(), ttl=3600.0,
                                message_type=MessageType.TRAIN), RecordDict())
    reply = private_errors_mod(msg, context, call_next)
    assert reply.has_error()
    assert reply.error.reason == "hospital-a: refused (privacy budget)"
    assert refusing_site(reply.error.reason) == "hospital-a"
    assert refusal_kind(reply.error.reason) == "refused (privacy budget)"
    assert refusing_site("hospital-a: data error") is None


# -- the pre-flight at a site -------------------------------------------------------------------

@pytest.fixture
def site_file(tmp_path):
    rows = [{"review": r["text"], "sentiment": r["label"]} for r in tiny.separable_rows(40, seed=1)]
    return tiny.write_csv(rows, tmp_path / "hospital-a.csv")


def _request(*sets, version=__version__):
    cfg = load_config(None, ['data.text_column="review"', 'data.label_column="sentiment"',
                             'data.labels=["neg", "pos"]', "train.batch_size=16", *sets])
    return PreflightRequest(run_id="r1", config=cfg.to_toml(), version=version)


def _settings(path, **extra):
    return SiteSettings.model_validate({"site-id": "hospital-a", "data-path": str(path),
                                        "state-dir": str(Path(path).parent / "state"), "text-column": "review",
                                        "label-column": "sentiment", "labels": "neg,pos", **extra})


def _training_bucket(path, settings) -> int:
    """The bucket of the rows the site will train on: its keyed-hash split with its own key."""
    import pandas as pd

    from fedtune.client.secret import site_key
    from fedtune.data.membership import split_rows
    from fedtune.federation.preflight import weight_bucket

    rows = pd.read_csv(path, dtype=str)
    cols = list(rows.columns[:2])
    train, _ = split_rows(rows, cols, 0.2, site_key(settings.state_dir))
    return weight_bucket(len(train))


def test_a_site_with_the_columns_labels_and_rows_is_ready_and_declares_its_bucket(site_file):
    settings = _settings(site_file)
    reply = check_site(_request(), settings)
    assert reply.ready and reply.reason == "" and reply.version == __version__
    assert reply.bucket == _training_bucket(site_file, settings) in (32, 64)  # 40 rows, about 8 in its test split


def test_a_run_naming_other_columns_is_refused_by_site_policy_and_the_detail_stays_in_its_log(site_file, caplog):
    reply = check_site(_request('data.label_column="outcome"'), _settings(site_file))
    assert not reply.ready and reply.reason == "refused (site policy)" and reply.bucket == 0
    assert "'outcome'" in caplog.text  # the detail stays in the site's own log


def test_the_site_answers_only_runs_naming_its_own_columns(site_file, tmp_path):
    cfg_cols = _request('data.text_column="text"', 'data.label_column="label"')
    assert check_site(cfg_cols, _settings(site_file)).reason == "refused (site policy)"
    assert check_site(cfg_cols, _settings(site_file, **{"text-column": "text", "label-column": "label"})).reason == (
        "not ready (site data)")  # its own columns, which its file lacks: said generically
    assert check_site(_request(), _settings(site_file)).ready


def test_other_labels_are_refused_and_the_batch_size_changes_nothing(site_file):
    reply = check_site(_request('data.labels=["neg", "neutral"]'), _settings(site_file))
    assert not reply.ready and reply.reason == "refused (site policy)"
    assert check_site(_request('data.labels=["pos", "neg"]'), _settings(site_file)).ready  # the same set
    ready = check_site(_request(), _settings(site_file))
    assert check_site(_request("train.batch_size=64"), _settings(site_file)) == ready


def test_an_unknown_run_config_key_names_both_versions(site_file):
    request = _request(version="9.9.9")
    # a key a newer coordinator knows and this site's fedtune does not
    request = request.model_copy(update={"config": request.config.replace("[federation]",
                                                                          "[federation]\nnew_knob = 1", 1)})
    reply = check_site(request, _settings(site_file))
    assert not reply.ready
    assert "'federation.new_knob'" in reply.reason and __version__ in reply.reason and "9.9.9" in reply.reason


def test_a_newcomers_run_config_with_auto_batch_and_learning_rate_passes_the_preflight(site_file):
    """The defaults the README recommends: batch size and learning rate "auto", resolved by each
    site from its own rows (a pre-flight that compared "auto" with a row count raised TypeError)."""
    cfg = load_config(None, ['data.text_column="review"', 'data.label_column="sentiment"', 'data.labels=["neg","pos"]'])
    assert cfg.train.batch_size == "auto" and cfg.train.learning_rate == "auto"
    settings = _settings(site_file)
    reply = check_site(PreflightRequest(run_id="r1", config=cfg.to_toml(), version=__version__), settings)
    assert reply.ready and reply.bucket == _training_bucket(site_file, settings), reply


def _query(request: PreflightRequest):
    import time

    from flwr.app import ConfigRecord, Metadata, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.message_type import MessageType

    from fedtune.federation.preflight import RECORD

    return make_message(Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                                 group_id="preflight", created_at=time.time(), ttl=3600.0,
                                 message_type=MessageType.QUERY),
                        RecordDict({RECORD: ConfigRecord(request.to_record())}))


def test_a_preflight_that_fails_unexpectedly_is_a_generic_not_ready_with_the_traceback_at_the_site(
        site_file, tmp_path, monkeypatch):
    from fedtune.client import preflight as site_preflight
    from fedtune.federation.preflight import RECORD, PreflightReply

    def broken(request, settings):
        raise TypeError(f"'<' not supported for {settings.data_path}")  # text that must stay at the site

    monkeypatch.setattr(site_preflight, "check_site", broken)
    state = tmp_path / "state"
    context = SimpleNamespace(node_config={"data-path": str(site_file), "site-id": "hospital-a",
                                           "state-dir": str(state)})
    reply = site_preflight.preflight_mod(_query(_request()), context, call_next=None)
    assert not reply.has_error()  # an answer the coordinator reads, not "did not answer"
    answer = PreflightReply.from_record(reply.content.config_records[RECORD])
    assert (answer.site, answer.ready, answer.reason) == ("hospital-a", False, "internal error")
    assert str(site_file) not in str(reply.content)
    site_log = (state / "site.log").read_text()
    assert "pre-flight failed" in site_log and "TypeError" in site_log and str(site_file) in site_log


# -- the pre-flight at the coordinator ------------------------------------------------------------

class _PreflightGrid:
    """Answers each query with a site's real pre-flight (check_site), or not at all."""

    def __init__(self, sites: dict):
        self.sites, self.asked = sites, []

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedtune.federation.preflight import RECORD

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            if self.sites[node] is None:
                continue
            reply = check_site(PreflightRequest.from_record(msg.content.config_records[RECORD]), self.sites[node])
            replies.append(Message(RecordDict({RECORD: ConfigRecord(reply.to_record())}), reply_to=msg))
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def _roster(nodes, min_sites=2, planned=None):
    manager = SimpleNamespace(all=lambda: {str(n): SimpleNamespace(node_id=n) for n in nodes}, notify=lambda: None)
    return SiteRoster(min_sites=min_sites, planned_sites=planned or len(nodes), join_timeout=1, stage_timeout=5,
                      preflight=True, health=SiteHealth(), client_manager=manager)


def test_a_preflight_names_a_sites_missing_column_before_round_1(site_file, tmp_path, server_identity):
    other = tiny.write_csv([{"text": r["text"], "sentiment": r["label"]} for r in tiny.separable_rows(40, 2)],
                           tmp_path / "hospital-b.csv")
    sites = {1: _settings(site_file),
             2: SiteSettings.model_validate({"site-id": "hospital-b", "data-path": str(other)})}
    roster = _roster([1, 2], min_sites=2)
    cfg = load_config(None, ['data.text_column="review"', 'data.label_column="sentiment"', 'data.labels=["neg","pos"]',
                             "train.batch_size=16"])
    with pytest.raises(TooFewSites, match=r"1 site\(s\) can take part before round 1, 2 needed "
                                          r"\(left out: hospital-b: pre-flight: refused \(site policy\)\)"):
        roster.admit(_PreflightGrid(sites), "r1", cfg.to_toml())
    assert roster.eligible(1) and not roster.eligible(2)
    assert roster.max_weight == _training_bucket(site_file, sites[1])  # from hospital-a's declared bucket


def test_sites_that_do_not_answer_are_asked_again_and_max_weight_follows_the_largest(site_file, tmp_path,
                                                                                        server_identity):
    big = tiny.write_csv([{"review": r["text"], "sentiment": r["label"]} for r in tiny.separable_rows(700, 3)],
                         tmp_path / "big.csv")
    grid = _PreflightGrid({1: _settings(site_file), 2: None})
    roster = _roster([1, 2], min_sites=1)
    cfg = _request().config
    roster.admit(grid, "r1", cfg)
    assert roster.eligible(1) and not roster.eligible(2)
    assert roster.max_weight == _training_bucket(site_file, grid.sites[1])
    grid.sites[2] = _settings(big, **{"site-id": "big", "state-dir": str(tmp_path / "big-state")})
    roster.admit(grid, "r1", cfg)
    assert grid.asked == [1, 2, 2] and roster.eligible(2)
    assert roster.max_weight == 1024  # 560 training rows -> bucket 1024


def test_a_site_that_reconnects_is_asked_the_preflight_again_and_taken_back_unless_it_refused(
        site_file, server_identity):
    """A site left out for failures whose agent restarts (its SuperNode goes offline, then
    connects again with the same key, so the same node) rejoins; a refusal stays final."""
    grid = _PreflightGrid({n: _settings(site_file) for n in (1, 2, 3)})
    roster = _roster([1, 2, 3], min_sites=1)
    cfg = _request().config
    roster.admit(grid, "r1", cfg)
    assert grid.asked == [1, 2, 3] and all(roster.eligible(n) for n in (1, 2, 3))
    assert [roster.health.failed(3), roster.health.failed(3)] == ["failed", "excluded"]
    assert roster.health.failed(2, "hospital-a: refused (privacy budget)") == "refused"
    roster.admit(grid, "r1", cfg)
    assert grid.asked == [1, 2, 3] and not roster.eligible(3) and not roster.eligible(2)  # still connected: out
    # Flower's node poller unregisters a SuperNode that stopped sending heartbeats.
    manager = EligibleClientManager(roster.eligible, join_timeout=0.5, on_leave=roster.left)
    for n in (2, 3):
        manager.register(SimpleNamespace(cid=str(n), node_id=n))
        manager.unregister(SimpleNamespace(cid=str(n), node_id=n))
    roster.admit(grid, "r1", cfg)  # both are back (the roster's client manager lists them)
    assert grid.asked == [1, 2, 3, 3] and roster.eligible(3)   # the pre-flight again, then taken back
    assert not roster.eligible(2) and roster.health.excluded[2] == "refused (privacy budget)"
    assert roster.health.failed(3) == "excluded"  # failures in a row are not forgotten by a restart


# -- client manager ----------------------------------------------------------------------------------

def test_sampling_waits_at_most_join_timeout_and_only_for_eligible_sites():
    import time

    manager = EligibleClientManager(lambda node: node != 2, join_timeout=0.5)
    for n in (1, 2):
        manager.register(SimpleNamespace(cid=str(n), node_id=n))
    assert manager.num_available() == 1
    started = time.monotonic()
    assert manager.sample(2, 2) == []
    assert time.monotonic() - started < 5
    assert [p.node_id for p in manager.sample(1, 1)] == [1]


# -- a round that does not aggregate ----------------------------------------------------------------

class _FakeEvaluator:
    names = ["a"]

    def named(self, arrays):
        from collections import OrderedDict

        return OrderedDict(a=np.asarray(arrays[0], np.float32))

    def export(self, arrays, folder):
        folder.mkdir(parents=True, exist_ok=True)


def test_a_round_whose_aggregation_fails_is_recorded_as_failed(tmp_path, caplog):
    cfg = load_config(None, ["federation.rounds=3", "federation.sites=4", "federation.max_consecutive_failures=2"])
    run = PreparedRun(cfg, tmp_path, _FakeEvaluator(), [np.zeros(2, np.float32)], "run1", 0, {}, None, True)
    rec = RunRecorder(run, SimpleNamespace(take=lambda: ({}, {}), errors={}))
    rec.start_round(1)
    rec.sampled = {1, 2, 3, 4}
    rec.current["central"] = {"accuracy": 0.5, "loss": 1.0}
    rec.round_failed(1, "SecAgg+ stopped at the unmasking stage", {1, 2}, [])
    rec.end_round(1)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["failed"] == "SecAgg+ stopped at the unmasking stage" and record["sites"] == {}
    assert "round 1 FAILED" in caplog.text and rec.best_round is None
    assert rec.roster.eligible(3)  # one failure: asked again
    rec.start_round(2)
    rec.sampled = {1, 2, 3}
    rec.round_failed(2, "again", {1, 2}, [])
    assert not rec.roster.eligible(3) and rec.roster.eligible(4)  # two in a row: left out


def test_too_few_sites_stop_the_run_with_a_reason(tmp_path):
    cfg = load_config(None, ["federation.sites=3", "federation.min_sites=3"])
    run = PreparedRun(cfg, tmp_path, _FakeEvaluator(), [np.zeros(2, np.float32)], "run1", 0, {}, None, True)
    rec = RunRecorder(run, SimpleNamespace(take=lambda: ({}, {}), errors={}))
    proxies = [(SimpleNamespace(node_id=n), None) for n in (1, 2)]
    with pytest.raises(StopRun, match="only 2 site\\(s\\) can train, 3 needed") as stop:
        rec.select(1, proxies)
    assert stop.value.failed


def test_fraction_evaluate_zero_asks_no_site_to_evaluate(tmp_path):
    """Central evaluation only: no site is sent the adapter to evaluate (and none answers)."""
    from flwr.common import ndarrays_to_parameters

    from fedtune.server.strategy import make_strategy

    cfg = load_config(None, ["federation.sites=3", "federation.fraction_evaluate=0"])
    run = PreparedRun(cfg, tmp_path, _FakeEvaluator(), [np.zeros(2, np.float32)], "run1", 0, {}, None, True)
    rec = RunRecorder(run, SimpleNamespace(take=lambda: ({}, {}), errors={}))
    manager = EligibleClientManager(lambda node: True, join_timeout=0.5)
    for n in (1, 2, 3):
        manager.register(SimpleNamespace(cid=str(n), node_id=n))
    params = ndarrays_to_parameters([np.zeros(2, np.float32)])
    assert make_strategy(cfg, [np.zeros(2, np.float32)], rec).configure_evaluate(1, params, manager) == []
    everyone = load_config(None, ["federation.sites=3"])
    assert len(make_strategy(everyone, [np.zeros(2, np.float32)], rec).configure_evaluate(1, params, manager)) == 3


def _answer(site: str, arrays, report=True):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedtune.federation.messages import SiteReport

    metrics = SiteReport(site=site, epsilon=1.5, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0,
                         sample_rate=0.5, steps=4, accountant="prv").to_record() if report else {"fedtune.site": 7}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, metrics)


def _recording_strategy(tmp_path, secagg):
    from fedtune.server.strategy import make_strategy

    cfg = load_config(None, ["federation.sites=4", "federation.max_consecutive_failures=2", "federation.strategy=fedavg"])
    initial = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    run = PreparedRun(cfg, tmp_path, _FakeEvaluator(), initial, "run1", 0, {}, secagg, True)
    rec = RunRecorder(run, SimpleNamespace(take=lambda: ({}, {}), errors={}))
    return rec, make_strategy(cfg, initial, rec)


def test_a_malformed_answer_is_that_sites_failure_and_the_other_updates_are_aggregated(tmp_path, caplog):
    from flwr.common import parameters_to_ndarrays

    from fedtune.adapters import pack

    rec, strategy = _recording_strategy(tmp_path, secagg=None)
    update = [np.full((2, 2), 2.0, np.float32), np.full(3, 2.0, np.float32)]
    rec.start_round(1)
    rec.sampled = {1, 2, 3, 4}
    garbage = _answer("site-3", [])
    garbage.parameters.tensors = [b"not an array"]
    results = [(SimpleNamespace(node_id=1), _answer("site-0", pack(update))),
               (SimpleNamespace(node_id=2), _answer("site-1", [np.ones(5, np.float32)])),   # not the adapter
               (SimpleNamespace(node_id=3), _answer("site-2", pack(update), report=False)),  # not a report
               (SimpleNamespace(node_id=4), garbage)]                                         # not even arrays
    parameters, _ = strategy.aggregate_fit(1, results, [])
    # The aggregate is site-0's update alone.
    assert all(np.allclose(got, want) for got, want in zip(parameters_to_ndarrays(parameters), update, strict=True))
    assert rec.current["failures"] == 3 and list(rec.current["sites"]) == ["site-0"]
    assert rec.current["failure_reasons"] == [
        "site-1: its update is not the adapter: expected the adapter packed as one flat array of 7 values (2 tensors), "
        "got (5,)", "node 3: its report is malformed (8 invalid field(s))",
        "site-3: its update is not the adapter: its arrays do not deserialize (ValueError)"]
    assert rec.privacy["site-1"]["epsilon"] == 1.5  # it trained: the privacy it reports is recorded
    assert rec.roster.health.failures == {2: 1, 3: 1, 4: 1} and rec.roster.eligible(2)  # asked again next round
    assert "sent a malformed answer" in caplog.text


def test_with_secagg_a_malformed_report_is_noted_and_the_sum_kept(tmp_path):
    from flwr.common import parameters_to_ndarrays

    from fedtune.adapters import pack
    from fedtune.server.secagg import secagg_settings

    cfg = load_config(None, ["federation.sites=4"])
    rec, strategy = _recording_strategy(tmp_path, secagg=secagg_settings(cfg.federation, [np.zeros(7)], 100))
    total = [np.full((2, 2), 3.0, np.float32), np.full(3, 3.0, np.float32)]  # Flower sets every result to the sum
    rec.start_round(1)
    rec.sampled = {1, 2}
    results = [(SimpleNamespace(node_id=1), _answer("site-0", pack(total))),
               (SimpleNamespace(node_id=2), _answer("site-1", pack(total), report=False))]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert all(np.allclose(got, want) for got, want in zip(parameters_to_ndarrays(parameters), total, strict=True))
    assert rec.current["failures"] == 0 and rec.roster.health.failures == {}  # it contributed: not a failure
    assert rec.current["failure_reasons"] == ["node 2: its report is malformed (8 invalid field(s)); its masked "
                                              "update is in the sum, the privacy it spent is not known here"]
