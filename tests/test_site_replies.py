"""Replies carry only what the site permits: generic errors, evaluation only noised, accounted
and under the site's cap, train replies without the un-noised loss or clipping counts unless the
site opts in.

Everything here drives the site's ClientApp or client directly on the tiny model (no Ray)."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.app.message_type import MessageType
from flwr.common import FitIns, EvaluateIns, ndarrays_to_parameters
from flwr.common.serde import message_to_proto
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict

from fedtune import tiny
from fedtune.adapters import get_adapter_arrays, pack
from fedtune.client.agent import SiteClient
from fedtune.client.app import make_client_app
from fedtune.client.budget import BudgetRefusal
from fedtune.client.replies import LOG_FILE, SiteReplyError, public_reason
from fedtune.client.runtime import site_runtime
from fedtune.client.settings import SiteSettings
from fedtune.data.errors import DataError
from fedtune.federation.messages import RoundInstructions, SiteReport
from fedtune.privacy.ledger import PrivacyLedger

from helpers import tiny_config

SECRET_LABEL = "zz-secret-diagnosis-4711"


def _run_config(model_dir: Path, extra=()) -> str:
    cfg = tiny_config(model_dir, overrides=['data.labels=["neg","pos"]', "train.epochs=1", "privacy.accountant=rdp",
                                            *extra])
    return cfg.to_toml()


def _instructions(config: str, run_id="run-a", rnd=1, rounds=2) -> dict:
    return RoundInstructions(run_id=run_id, round=rnd, rounds=rounds, config=config).to_record()


def _node_config(data: Path, state: Path, **extra) -> dict:
    return {"site-id": "clinic-7", "data-path": str(data), "state-dir": str(state),
            "require-secure-aggregation": False, "labels": "neg,pos", **extra}


def _message(kind: str, instr: dict) -> Message:
    params = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    if kind == MessageType.TRAIN:
        content = fitins_to_recorddict(FitIns(params, instr), keep_input=True)
    else:
        content = evaluateins_to_recorddict(EvaluateIns(params, instr), keep_input=True)
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return make_message(metadata, content)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


SECRET_COLUMN = "zz_secret_notes_col"


@pytest.fixture()
def bad_column_file(tmp_path):
    """The site's own text column is missing: its file names it otherwise."""
    rows = [{SECRET_COLUMN: r["text"], "label": r["label"]} for r in tiny.separable_rows(30, seed=3)]
    return tiny.write_csv(rows, tmp_path / "private-ward-b" / "patients.csv")


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_data_error_reaches_the_coordinator_only_as_a_generic_reason(tiny_models, bad_column_file, tmp_path, kind):
    state = tmp_path / "state"
    app = make_client_app()
    msg = _message(kind, _instructions(_run_config(tiny_models["bert"])))
    reply = app(msg, _context(_node_config(bad_column_file, state)))

    assert reply.has_error()
    assert reply.error.reason == "clinic-7: data error"
    # Nothing the coordinator receives names the file, the folder or the file's columns.
    sent = message_to_proto(reply).SerializeToString()
    for needle in (SECRET_COLUMN, "patients.csv", "private-ward-b", str(bad_column_file)):
        assert needle.encode() not in sent, needle
    # The site's own log keeps the whole story, so its operator can fix the file.
    log_text = (state / LOG_FILE).read_text()
    assert SECRET_COLUMN in log_text and "patients.csv" in log_text and "clinic-7: data error" in log_text


def test_rows_with_an_undeclared_label_are_left_out_and_counted_only_at_the_site(tiny_models, tmp_path, caplog):
    rows = tiny.separable_rows(30, seed=3)
    rows[11]["label"] = SECRET_LABEL
    data = tiny.write_csv(rows, tmp_path / "ward" / "patients.csv")
    state = tmp_path / "state"
    config = _run_config(tiny_models["bert"])
    client = SiteClient(SiteSettings.model_validate(_node_config(data, state)))
    with caplog.at_level("WARNING", logger="fedtune.client.site"):
        site = site_runtime(config, client.settings, state)
    assert len(site.data.train) + len(site.data.eval) == 29
    assert "1 of 30 rows have a label outside the declared set" in caplog.text
    _, n, metrics = client.fit(pack(list(get_adapter_arrays(site.model).values())), _instructions(config, rounds=1))
    assert n == len(site.data.train) and SECRET_LABEL not in json.dumps(metrics)


def test_a_run_naming_other_columns_is_refused_by_site_policy_and_names_nothing(tiny_models, tmp_path):
    good = tiny.write_csv(tiny.separable_rows(20, seed=4), tmp_path / "g.csv")
    app = make_client_app()
    msg = _message(MessageType.TRAIN, _instructions(_run_config(tiny_models["bert"], ['data.text_column="notes_secret_col"'])))
    reply = app(msg, _context(_node_config(good, tmp_path / "s")))
    assert reply.error.reason == "clinic-7: refused (site policy)"
    assert b"notes_secret_col" not in message_to_proto(reply).SerializeToString()


def test_a_plain_update_refused_by_policy_says_so_and_no_more(tmp_path):
    app = make_client_app()
    node = _node_config(tmp_path / "nowhere.csv", tmp_path / "s")
    node["require-secure-aggregation"] = True
    reply = app(_message(MessageType.TRAIN, {"x": 1}), _context(node))
    assert reply.error.reason == "clinic-7: refused (site policy)"


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY])
def test_a_broken_state_folder_reaches_the_coordinator_only_as_a_generic_reason(tmp_path, kind):
    """A file where the state folder should be (as a full disk would, every write there fails):
    whatever the message, the reply is a generic reason or an ordinary answer, never the path
    or the exception's text (traffic_mod's own write, the failure log, the refusal)."""
    from fedtune.config import load_config
    from fedtune.federation.preflight import RECORD, PreflightRequest

    state = tmp_path / "secret-ward-state"
    state.write_text("not a folder")
    data = tiny.write_csv(tiny.separable_rows(20, seed=4), tmp_path / "g.csv")
    node = _node_config(data, state)
    node["require-secure-aggregation"] = True  # a train message without SecAgg+ is refused: a failure path
    if kind == MessageType.QUERY:
        request = PreflightRequest(run_id="r", config=load_config(None).to_toml(), version="0")
        msg = make_message(Metadata(run_id=1, message_id="m-2", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind),
                           RecordDict({RECORD: ConfigRecord(request.to_record())}))
    else:
        msg = _message(kind, {"x": 1})
    reply = make_client_app()(msg, _context(node))
    sent = message_to_proto(reply).SerializeToString()
    assert b"secret-ward-state" not in sent and b"Error" not in sent.replace(b"error", b""), sent
    if reply.has_error():
        assert reply.error.reason in ("clinic-7: refused (site policy)", "clinic-7: internal error"), reply.error.reason


@pytest.mark.parametrize("exc, kind", [
    (BudgetRefusal("epsilon 7.3 of 2 on /data/x.csv"), "refused (privacy budget)"),
    (DataError("/data/x.csv: row 5: label 'HIV+'"), "data error"),
    (PermissionError("needs SecAgg+"), "refused (site policy)"),
    (RuntimeError("CUDA out of memory at /home/site/x"), "internal error"),
    (SiteReplyError("site-2: data error"), None),
])
def test_public_reason_is_the_site_and_the_kind(exc, kind):
    reason = public_reason("site-2", exc)
    assert reason == (f"site-2: {kind}" if kind else str(exc))
    assert "/" not in reason and "HIV" not in reason
    assert public_reason("evil\nsite: /etc/passwd", exc).startswith(("site: ", "site-2"))


def test_the_coordinator_records_generic_failure_reasons():
    from flwr.app import Error

    from fedtune.server.coordinator import _failure_reasons

    failures = [Exception(Error(code=2, reason="site-1: refused (privacy budget)")), RuntimeError()]
    assert _failure_reasons(failures) == ["site-1: refused (privacy budget)"]


# -- evaluation: only for a run the site trains, noised, recorded, capped per dataset -------------

@pytest.fixture(scope="module")
def good_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("good-site")
    rows = tiny.separable_rows(40, seed=5)
    for i, row in enumerate(rows):
        row["patient"] = f"p{i % 10}"  # 10 patients, 4 rows each
    return tiny.write_csv(rows, root / "site.csv")


def _client(data: Path, state: Path, **extra) -> SiteClient:
    return SiteClient(SiteSettings.model_validate(_node_config(data, state, **{"test-fraction": 0.25, **extra})))


def _arrays(client: SiteClient, config: str, state: Path) -> list[np.ndarray]:
    site = site_runtime(config, client.settings, state)
    return pack(list(get_adapter_arrays(site.model).values()))


def test_evaluation_is_answered_only_for_a_trained_run_noised_recorded_and_capped_per_dataset(
        tiny_models, good_site, tmp_path):
    from fedtune.privacy.release import noise_std

    config = _run_config(tiny_models["bert"])
    state = tmp_path / "state"
    client = _client(good_site, state, **{"max-evaluations": 3})
    arrays = _arrays(client, config, state)
    declined = {"fedtune.site": "clinic-7", "fedtune.declined": True}
    # No training plan accepted for run-a yet: declined, before the adapter touches a test row.
    assert client.evaluate(arrays, _instructions(config, run_id="run-a")) == (0.0, 0, declined)
    assert "no training plan accepted" in (state / LOG_FILE).read_text()
    client.fit(arrays, _instructions(config, run_id="run-a", rounds=1))
    client.fit(arrays, _instructions(config, run_id="run-b", rounds=1))
    answers = [client.evaluate(arrays, _instructions(config, run_id=run, rnd=r))
               for run, r in (("run-a", 1), ("run-a", 2), ("run-b", 1))]
    held = len(site_runtime(config, client.settings, state).data.eval)
    for _, n, metrics in answers:
        assert set(metrics) == {"fedtune.site", "fedtune.examples", "fedtune.correct", "fedtune.epsilon_total"}
        assert metrics["fedtune.examples"] != held and n == max(0, round(metrics["fedtune.examples"]))
    entries = PrivacyLedger(state / "privacy-ledger.jsonl").entries()
    evaluations = [e for e in entries if e.kind == "evaluate"]
    assert [(e.run_id, e.round) for e in evaluations] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]
    z = evaluations[0].noise_multiplier
    assert noise_std("sequence-classification", z)["correct"] > 1  # at 3 answers within epsilon 10: still > 1 row
    # The cap counts answers per dataset over all runs: a fourth (any run) is declined.
    assert client.evaluate(arrays, _instructions(config, run_id="run-b", rnd=2)) == (0.0, 0, declined)
    off = _client(good_site, tmp_path / "state-off", **{"answer-evaluation": False})
    _, n, metrics = off.evaluate(arrays, _instructions(config))
    assert n == 0 and metrics["fedtune.declined"] is True


def test_coordinator_adds_the_sites_noised_sums_and_copes_with_declined_evaluations():
    from types import SimpleNamespace as NS

    from fedtune.server.coordinator import RunRecorder

    recorder = RunRecorder.__new__(RunRecorder)
    recorder.current, recorder.roster, recorder.privacy = {}, NS(node_site={}), {}
    results = [
        (NS(node_id=1), NS(num_examples=10, loss=0.0, metrics={"fedtune.site": "a", "fedtune.examples": 10.4,
                                                               "fedtune.correct": 7.9})),
        (NS(node_id=3), NS(num_examples=30, loss=0.0, metrics={"fedtune.site": "c", "fedtune.examples": 29.6,
                                                               "fedtune.correct": 24.1})),
        (NS(node_id=2), NS(num_examples=0, loss=0.0, metrics={"fedtune.site": "b", "fedtune.declined": True})),
    ]
    recorder.on_federated(1, results)
    assert recorder.current["federated"] == {"examples": 40.0, "accuracy": pytest.approx(32.0 / 40.0)}
    assert recorder.current["evaluation_declined"] == ["b"]
    recorder.current = {}
    recorder.on_federated(2, results[2:])
    assert recorder.current["federated"] is None and recorder.current["evaluation_declined"] == ["b"]


# -- train replies: fields absent by default, present when the site opts in ------------------

def test_train_reply_fields_follow_the_site_settings(tiny_models, good_site, tmp_path):
    config = _run_config(tiny_models["bert"], ["privacy.target_epsilon=4.0"])
    state = tmp_path / "default"
    client = _client(good_site, state)
    _, n, metrics = client.fit(_arrays(client, config, state), _instructions(config, rounds=1))
    assert n > 0 and "fedtune.train_loss" not in metrics and "fedtune.clipped_values" not in metrics
    report = SiteReport.from_record(metrics)
    assert report.train_loss is None and report.clipped_values is None and 0 < report.epsilon <= 4.0 + 1e-6
    assert report.rows_per_unit is None  # no privacy unit: every row is its own unit

    state = tmp_path / "opt-in"
    client = _client(good_site, state, **{"report-train-loss": True, "report-clipping": True,
                                          "privacy-unit": "patient", "max-rows-per-unit": 2})
    # A SecAgg+ clipping range that clips: what the site sends is (examples / max_weight) * value.
    clipping = RoundInstructions(run_id="run-a", round=1, rounds=1, config=config, max_weight=64.0,
                                 clipping_range=1e-4).to_record()
    _, n, metrics = client.fit(_arrays(client, config, state), clipping)
    report = SiteReport.from_record(metrics)
    assert isinstance(report.train_loss, float) and report.clipped_values > 0
    # 10 patients x 4 rows, cut to 2 rows each; about a quarter of them (by keyed hash) held out
    held = site_runtime(config, client.settings, state).data.eval
    assert n + len(held) == 20 and n > 0
    assert report.rows_per_unit == 2
    assert report.epsilon_unit == pytest.approx(2 * report.epsilon)
    assert report.delta_unit == pytest.approx(2 * np.exp(report.epsilon) * report.delta)
    [entry] = PrivacyLedger(state / "privacy-ledger.jsonl").entries()
    assert entry.rows_per_unit == 2
    # The default site, with the same clipping range: the count stays at the site.
    _, _, metrics = _client(good_site, tmp_path / "default-2").fit(
        _arrays(client, config, tmp_path / "default-2"),
        RoundInstructions(run_id="run-b", round=1, rounds=1, config=config, max_weight=64.0,
                          clipping_range=1e-4).to_record())
    assert "fedtune.clipped_values" not in metrics


def test_ledger_entries_written_before_rows_per_unit_still_verify(tmp_path):
    # An entry line exactly as the ledger wrote it before the optional field existed.
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    entry = ledger.append({"dataset": "d", "run_id": "r", "round": 1, "steps": 3, "sample_rate": 0.1,
                           "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"})
    raw = json.loads((tmp_path / "l.jsonl").read_text())
    assert "rows_per_unit" not in raw
    sealed = raw.pop("hash")  # the hash as the ledger computed it before the field existed
    assert hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest() == sealed
    assert ledger.entries() == [entry]


def test_reply_settings_travel_from_the_client_flags_to_the_client_app(tmp_path):
    from flwr.common.config import parse_config_args

    from fedtune.cli import build_parser
    from fedtune.client.settings import settings_from_node_config
    from fedtune.deployment.commands import _SITE_FLAGS
    from fedtune.deployment.site_agent import ClientOptions, node_config_file, site_settings

    data = tiny.write_csv(tiny.separable_rows(10), tmp_path / "d.csv")
    args = build_parser().parse_args([
        "client", "--superlink", "x:1", "--insecure", "--data", str(data), "--answer-evaluation", "false",
        "--max-evaluations", "2", "--report-train-loss", "yes", "--privacy-unit", "pid",
        "--max-rows-per-unit", "3"])
    flags = {f: getattr(args, f) for f in ["data-path", *(f for f, _, _ in _SITE_FLAGS)]}
    settings = site_settings(ClientOptions(superlink="x:1", settings=flags))
    seen = settings_from_node_config(parse_config_args([str(node_config_file(settings, tmp_path))]))
    assert (seen.answer_evaluation, seen.max_evaluations, seen.report_train_loss, seen.report_clipping,
            seen.privacy_unit, seen.max_rows_per_unit) == (False, 2, True, False, "pid", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "--superlink", "x:1", "--report-clipping", "maybe"])
