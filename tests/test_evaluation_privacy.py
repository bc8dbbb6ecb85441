"""Nothing a site answers reconstructs its rows: evaluation and pre-flight, as a hostile
coordinator would drive them (its own columns, split, run ids and rounds), through the site's
own ClientApp on the tiny model; the evaluation mechanism checked statistically on neighbouring
files; epsilon recomputed from the ledger."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict

from fedtune import __version__, tiny
from fedtune.adapters import get_adapter_arrays, pack
from fedtune.client.app import make_client_app
from fedtune.client.runtime import site_runtime
from fedtune.client.settings import SiteSettings
from fedtune.federation.messages import RoundInstructions
from fedtune.federation.preflight import RECORD, PreflightReply, PreflightRequest, check_site
from fedtune.privacy.ledger import PrivacyLedger

from helpers import tiny_config

SITE = "clinic-9"


@pytest.fixture()
def hidden_column_site(tmp_path):
    """A site's file with a column it does not share: a yes/no diagnosis per row."""
    rows = tiny.separable_rows(40, seed=11)
    rng = np.random.default_rng(5)
    for row in rows:
        row["diagnosis"] = "yes" if rng.random() < 0.5 else "no"
    data = tiny.write_csv(rows, tmp_path / "ward" / "rows.csv")
    return data, {r["text"]: r["diagnosis"] for r in rows}


def _node(data: Path, state: Path, **extra) -> dict:
    return {"site-id": SITE, "data-path": str(data), "state-dir": str(state), "require-secure-aggregation": False,
            "labels": "neg,pos", "max-evaluations": 5, **extra}


def _config(model: Path, *sets) -> str:
    return tiny_config(model, overrides=['data.labels=["neg","pos"]', "train.epochs=1", "federation.rounds=1000000",
                                         *sets]).to_toml()


def _ask(app, node: dict, kind: str, config: str, arrays, run_id: str, rnd: int = 1, rounds: int = 10**6):
    instr = RoundInstructions(run_id=run_id, round=rnd, rounds=rounds, config=config).to_record()
    params = ndarrays_to_parameters(arrays)
    content = (fitins_to_recorddict(FitIns(params, instr), keep_input=True) if kind == MessageType.TRAIN
               else evaluateins_to_recorddict(EvaluateIns(params, instr), keep_input=True))
    msg = make_message(Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                                group_id=str(rnd), created_at=time.time(), ttl=3600.0, message_type=kind), content)
    return app(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))


def _metrics(reply) -> dict:
    return {} if reply.has_error() else dict(reply.content.config_records["evaluateres.metrics"])


def test_the_hidden_column_reconstruction_fails_whatever_the_coordinator_sends(tiny_models, hidden_column_site,
                                                                              tmp_path):
    """The attack of the issue, driven as a coordinator would: name the hidden column as the
    label, ask for a test fraction of 0.9999, change the split seed once per row, use fresh run
    ids and rounds = 10^6. Every request naming the hidden column is refused by the site's policy
    (train and evaluate alike), so nothing about it is answered; a run on the site's own columns
    is answered only after it trains, only noised, and never more than max-evaluations times."""
    data, hidden = hidden_column_site
    state = tmp_path / "state"
    node = _node(data, state)
    app = make_client_app()
    own = _config(tiny_models["bert"])
    arrays = pack(list(get_adapter_arrays(site_runtime(own, SiteSettings.model_validate(node), state).model).values()))

    answered_hidden = []
    for i in range(len(hidden)):  # one split seed per row, each under a fresh run id
        hostile = _config(tiny_models["bert"], 'data.label_column="diagnosis"', 'data.labels=["no","yes"]',
                          "federation.site_test_fraction=0.9999", f"train.seed={i}")
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            reply = _ask(app, node, kind, hostile, arrays, run_id=f"probe-{i}")
            assert reply.has_error() and reply.error.reason == f"{SITE}: refused (site policy)"
            answered_hidden.append(_metrics(reply))
    assert not any(answered_hidden)
    # Nothing was read or spent for them: the ledger is empty.
    assert PrivacyLedger(state / "privacy-ledger.jsonl").entries() == []

    # The site's own columns, fresh run ids: no answer without a training plan for the run.
    for i in range(20):
        reply = _ask(app, node, MessageType.EVALUATE, own, arrays, run_id=f"fresh-{i}")
        assert _metrics(reply).get("fedtune.declined") is True
    # Trained once, then asked 50 times under that run and rounds = 10^6: max-evaluations (5) answers.
    assert _ask(app, node, MessageType.TRAIN, own, arrays, run_id="run-0").error.reason == (
        f"{SITE}: refused (privacy budget)")  # 10^6 rounds of training fit no noise the site allows
    assert not _ask(app, node, MessageType.TRAIN, own, arrays, run_id="run-1", rounds=2).has_error()
    answers = [_metrics(_ask(app, node, MessageType.EVALUATE, own, arrays, run_id="run-1", rnd=r))
               for r in range(1, 51)]
    given = [a for a in answers if not a.get("fedtune.declined")]
    assert len(given) == 5
    held = len(site_runtime(own, SiteSettings.model_validate(node), state).data.eval)
    # Noised: the released row counts are not the site's count (nor whole numbers).
    assert all(a["fedtune.examples"] != held and a["fedtune.examples"] != round(a["fedtune.examples"]) for a in given)
    entries = PrivacyLedger(state / "privacy-ledger.jsonl").entries()
    assert sum(e.is_evaluation for e in entries) == 5


def _probe_request(*sets) -> PreflightRequest:
    from fedtune.config import load_config

    cfg = load_config(None, ['data.labels=["neg","pos"]', *sets])
    return PreflightRequest(run_id="probe", config=cfg.to_toml(), version=__version__)


@pytest.mark.parametrize("task", ["batch size", "label set", "columns"])
def test_preflight_probes_get_the_same_answer_whatever_the_probe(hidden_column_site, tmp_path, task):
    """A binary search on the batch size, candidate label sets on the hidden column, candidate
    column names: every probe of one kind gets the same reply, which holds no count."""
    data, _ = hidden_column_site
    settings = SiteSettings.model_validate(_node(data, tmp_path / "state"))
    probes = {
        "batch size": [_probe_request(f"train.batch_size={b}") for b in (1, 2, 8, 16, 17, 31, 32, 33, 64, 10**6)],
        "label set": [_probe_request('data.label_column="diagnosis"', f"data.labels={labels}")
                      for labels in ('["no"]', '["yes"]', '["no","yes"]', '["yes","no"]', '["no","yes","maybe"]')],
        "columns": [_probe_request(f'data.text_column="{c}"') for c in ("diagnosis", "text2", "label", "nothing")],
    }[task]
    replies = [check_site(p, settings) for p in probes]
    assert len({r.model_dump_json() for r in replies}) == 1, replies
    assert set(PreflightReply.model_fields) == {"site", "ready", "reason", "version", "bucket"}
    if task == "batch size":
        assert replies[0].ready and replies[0].bucket in (32, 64)  # 40 rows less its keyed-hash test split: within 2x
    else:
        assert replies[0].reason == "refused (site policy)" and replies[0].bucket == 0


# -- the mechanism on neighbouring files --------------------------------------------------------

def _privacy_loss_bound(a: np.ndarray, b: np.ndarray, delta: float, bins: int = 12, min_mass: float = 0.01) -> float:
    """The largest |log P_a(S) / P_b(S)| over a grid of cells S holding at least ``min_mass`` of
    either distribution, after removing up to ``delta`` of probability: an empirical lower
    estimate of the epsilon the two sample sets show (an empty cell on one side: infinite)."""
    lo, hi = np.minimum(a.min(0), b.min(0)), np.maximum(a.max(0), b.max(0)) + 1e-9
    def cells(x):
        idx = np.floor((x - lo) / (hi - lo) * bins).astype(int)
        return idx[:, 0] * bins + idx[:, 1]
    pa = np.bincount(cells(a), minlength=bins * bins) / len(a)
    pb = np.bincount(cells(b), minlength=bins * bins) / len(b)
    worst = 0.0
    for p, q in ((pa, pb), (pb, pa)):
        heavy = p >= min_mass
        if np.any(heavy & (q == 0)):
            return math.inf
        ratio = np.log(np.maximum(p[heavy] - delta, 1e-12) / q[heavy])
        worst = max(worst, float(ratio.max(initial=0.0)))
    return worst


@pytest.mark.parametrize("noise_on", [True, False])
def test_released_answers_on_neighbouring_files_stay_within_the_recorded_epsilon(tmp_path, monkeypatch, noise_on):
    """Two neighbouring test sets (one row added, classified correctly), answered 20,000 times
    each by the site's own mechanism at the noise its evaluation budget grants: the empirical
    privacy loss of the released (rows, correct) stays within the epsilon the site records for
    one answer; with the noise switched off (tests only) the same check fails."""
    from fedtune.client.evaluation_policy import EvaluationBudget
    from fedtune.privacy import release
    from fedtune.privacy.composition import compose

    monkeypatch.setattr(release, "_NOISE", noise_on)
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    ledger.append({"dataset": "d", "run_id": "r", "round": 1, "steps": 10, "sample_rate": 0.1,
                   "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp",
                   "dataset_delta": 1e-5})
    budget = EvaluationBudget(ledger, "d", None, answer_evaluation=True, max_evaluations=50, lifetime_epsilon=10.0)
    with budget.answer("r", 1) as grant:
        entry = grant.record()
    recorded = compose([entry], 1e-5)  # one answer's epsilon, as the ledger composes it
    assert 0 < recorded < 10
    task = "sequence-classification"
    correct = np.array([1.0] * 15 + [0.0] * 5)
    neighbour = np.append(correct, 1.0)
    rng = np.random.default_rng(0)

    def sample(values):
        exact = release.exact_sums(task, values)
        out = [release.release(task, exact, grant.noise, rng) for _ in range(20_000)]
        return np.array([[o.examples, o.correct] for o in out])

    loss = _privacy_loss_bound(sample(correct), sample(neighbour), delta=1e-5)
    if noise_on:
        assert loss <= recorded, (loss, recorded)
    else:
        assert loss > recorded  # the check can fail: without noise the answers tell the files apart


# -- epsilon from the ledger equals what the site reports ------------------------------------

def test_epsilon_recomputed_from_the_ledger_equals_the_reported_one_and_composes_in_parallel(
        tiny_models, hidden_column_site, tmp_path):
    from fedtune.client.agent import SiteClient
    from fedtune.client.ledger_view import ledger_view
    from fedtune.federation.messages import SiteEvalReport, SiteReport
    from fedtune.privacy.accounting import compute_epsilon

    data, _ = hidden_column_site
    state = tmp_path / "state"
    client = SiteClient(SiteSettings.model_validate(_node(data, state, **{"lifetime-epsilon": 6.0})))
    config = _config(tiny_models["bert"], "privacy.target_epsilon=4.0", "privacy.accountant=rdp")
    arrays = pack(list(get_adapter_arrays(site_runtime(config, client.settings, state).model).values()))
    instr = lambda rnd: RoundInstructions(run_id="run-1", round=rnd, rounds=2, config=config).to_record()  # noqa: E731
    reports = []
    for rnd in (1, 2):
        reports.append(SiteReport.from_record(client.fit(arrays, instr(rnd))[2]))
        reports.append(SiteEvalReport.from_record(client.evaluate(arrays, instr(rnd))[2]))
    entries = PrivacyLedger(state / "privacy-ledger.jsonl").entries()
    delta = entries[0].dataset_delta
    train = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if not e.is_evaluation]
    answers = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.is_evaluation]
    assert len(train) == 2 and len(answers) == 2 and all(q == 1.0 and s == 1 for _, q, s in answers)
    by_hand = max(compute_epsilon(train, delta, "rdp"), compute_epsilon(answers, delta, "rdp"))
    # parallel: the larger of the two, strictly less than composing both as one history
    assert by_hand < compute_epsilon(train + answers, delta, "rdp")
    assert reports[-1].epsilon_total == pytest.approx(by_hand, rel=1e-9)
    assert reports[-2].epsilon_total <= by_hand + 1e-9
    [view] = ledger_view(state, lifetime_cap=6.0).datasets
    assert view.epsilon == pytest.approx(by_hand, rel=1e-9) and view.evaluations == 2
    assert view.epsilon <= 6.0 + 1e-9 and view.composition == "parallel"
