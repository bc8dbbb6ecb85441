"""The coordinator as adversary: a site enforces its own privacy, whatever the run config says.

Each test drives one site's client (``SiteClient``) directly, with its settings from a node
config as in a deployment, and sends it what a hostile coordinator could send. Whatever it
sends, the site either refuses before any step or stays within its budget, and that is checked
by recomputing epsilon from the site's own ledger file with the accountant, never from what the
site reports. Positive controls (an honest run, a resume with the same rounds) must end close
to the target, so that a site that refuses everything fails this suite.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import torch

from fedtune import tiny
from fedtune.adapters import get_adapter_arrays, pack
from fedtune.client import agent as agent_module
from fedtune.client.agent import SiteClient
from fedtune.client.budget import BudgetRefusal, SiteBudget
from fedtune.client.policy import SitePolicy, run_terms
from fedtune.client.replies import SiteReplyError
from fedtune.client import runtime as runtime_module
from fedtune.client.runtime import site_runtime
from fedtune.client.secret import KEY_FILE, site_key
from fedtune.client.settings import settings_from_node_config
from fedtune.config import PrivacyConfig
from fedtune.federation.messages import RoundInstructions
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger

from helpers import tiny_config

DELTA = 1e-5
SITE_EPSILON = 2.0   # the site's own run budget (node config), the run asks for 8
ROWS = 64            # about 51 after the site's test split; batch 16: 4 (or 3) steps per epoch


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return tiny.write_csv(tiny.separable_rows(ROWS, seed=5), tmp_path_factory.mktemp("site") / "records.csv")


@pytest.fixture
def trainings(monkeypatch):
    """Counts the trainers the site builds: a refusal must come before any of them."""
    built = []
    real = agent_module.LocalTrainer

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        built.append(trainer)
        return trainer

    monkeypatch.setattr(agent_module, "LocalTrainer", spy)
    return built


class Site:
    """One deployed site (node config) facing a coordinator that sends whatever it likes."""

    def __init__(self, model, data_file, state, accountant="rdp", **node):
        """``accountant``: RDP by default (a calibration in milliseconds); the default PRV has its own
        tests. The site keeps its default local test split (0.2 of its rows, by keyed hash)."""
        self.state = state
        self.node = {"site-id": "site-a", "data-path": str(data_file), "state-dir": str(state), "labels": "neg,pos",
                     **node}
        self.model = model
        self.arrays = None
        self.accountant = accountant

    def config(self, *overrides):
        return tiny_config(self.model, overrides=['data.labels=["neg","pos"]', "train.epochs=1",
                                                   f"privacy.accountant={self.accountant}",
                                                   "privacy.target_epsilon=8", *overrides])

    def send(self, run_id, rnd, rounds, *overrides, state_root="") -> str:
        """One train message; 'trained' or 'refused'."""
        settings = settings_from_node_config(self.node)
        toml = self.config(*overrides).to_toml()
        if self.arrays is None:
            self.arrays = pack(list(get_adapter_arrays(site_runtime(toml, settings, self.state).model).values()))
        instr = RoundInstructions(run_id=run_id, round=rnd, rounds=rounds, config=toml, site_state_root=state_root)
        try:
            arrays, _, _ = SiteClient(settings).fit([a.copy() for a in self.arrays], instr.to_record())
        except SiteReplyError as reply:  # what the coordinator is told: the kind of refusal only
            if not str(reply).startswith(f"{settings.site_id}: refused ("):
                raise
            return "refused"
        self.arrays = arrays
        return "trained"

    def ledger(self) -> list[dict]:
        path = self.state / "privacy-ledger.jsonl"
        PrivacyLedger(path).entries()  # the chain and head verify
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def epsilon(self, run_id=None, delta=DELTA) -> float:
        """Recomputed from the ledger file with the accountant, not from anything the site said."""
        entries = [e for e in self.ledger() if run_id is None or e["run_id"] == run_id]
        if not entries:
            return 0.0
        mechanisms = {e["accountant"] for e in entries}
        assert len(mechanisms) == 1
        return compute_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], delta,
                               mechanisms.pop())


@pytest.fixture
def site(tiny_models, data_file, tmp_path):
    return Site(tiny_models["bert"], data_file, tmp_path / "state", **{"target-epsilon": SITE_EPSILON})


# -- positive controls: an honest coordinator gets (close to) the whole budget ------------------

def test_an_honest_run_spends_close_to_the_sites_budget(site, trainings):
    assert [site.send("honest", r, 3) for r in (1, 2, 3)] == ["trained"] * 3
    assert len(trainings) == 3
    assert 0.8 * SITE_EPSILON <= site.epsilon("honest") <= SITE_EPSILON  # the site's 2, not the run's 8
    entries = site.ledger()
    # One epoch a round: as many steps as Poisson batches per epoch (4 for 64 rows, 3 when the
    # site's keyed test split leaves 48 or fewer).
    assert entries[0]["plan"]["rounds"] == 3
    assert entries[0]["plan"]["steps_per_round"] == round(1 / entries[0]["sample_rate"]) in (3, 4)
    assert len({e["noise_multiplier"] for e in entries}) == 1  # the plan's noise, every round
    assert all(e["dataset"] == "records" for e in entries)     # named after the file, not its bytes


def test_under_the_default_prv_accountant_an_honest_run_spends_the_budget_and_a_hostile_one_is_held(
        tiny_models, data_file, tmp_path, trainings):
    """fedtune's default accountant (PRV), with the site's test split: the honest run gets its
    budget; a run that grows its rounds and epochs midway stays within it, recomputed from the
    ledger with PRV."""
    prv = Site(tiny_models["bert"], data_file, tmp_path / "state", accountant="prv",
               **{"target-epsilon": SITE_EPSILON})
    assert [prv.send("honest", r, 2) for r in (1, 2)] == ["trained"] * 2
    assert all(e["accountant"] == "prv" for e in prv.ledger())
    assert 0.8 * SITE_EPSILON <= prv.epsilon("honest") <= SITE_EPSILON * (1 + 1e-6)
    assert [prv.send("grows", 1, 2), prv.send("grows", 2, 4, "train.epochs=3")] == ["trained"] * 2
    assert prv.epsilon("grows") <= SITE_EPSILON * (1 + 1e-6)
    assert prv.epsilon() <= 10.0 * (1 + 1e-6)


def test_a_resume_with_the_same_rounds_finishes_the_plan(site, trainings):
    assert [site.send("resumed", r, 3) for r in (1, 2)] == ["trained"] * 2
    runtime_module._CACHE.clear()  # a fresh process, as after a restart
    assert site.send("resumed", 3, 3) == "trained"
    assert 0.8 * SITE_EPSILON <= site.epsilon("resumed") <= SITE_EPSILON


def test_a_larger_delta_from_the_run_is_clamped_to_the_sites_and_buys_no_noise(site, trainings):
    """Delta 0.05 (at or above 1/64 rows: it would allow releasing a row) and 0.99/N: the run's
    delta is only a request; the site holds the dataset to its own (min(1e-5, 1/(10 N)) here),
    fixed at first use and recorded in its ledger, and trains with the noise that delta needs."""
    assert site.send("honest", 1, 2) == "trained"
    honest = site.ledger()[-1]
    for run, delta in (("loose", 0.05), ("just-below-1/N", 0.99 / ROWS)):
        assert site.send(run, 1, 2, f"privacy.target_delta={delta}") == "trained"
        entry = site.ledger()[-1]
        assert entry["delta"] == honest["delta"] == entry["dataset_delta"] == min(1e-5, 1 / (10 * ROWS))
        assert entry["noise_multiplier"] >= honest["noise_multiplier"] * (1 - 1e-9)  # no noise bought with delta


def test_with_k_rows_per_unit_the_run_budget_binds_the_units_epsilon(tiny_models, tmp_path, trainings):
    """Group privacy: k rows of one unit have k times a row's epsilon; the site's caps bind that."""
    from fedtune.privacy.group import group_privacy

    rows = tiny.separable_rows(ROWS, seed=6)
    for i, row in enumerate(rows):
        row["patient"] = f"p{i // 2}"  # 2 rows per patient
    data = tiny.write_csv(rows, tmp_path / "patients.csv")
    unit_site = Site(tiny_models["bert"], data, tmp_path / "state",
                     **{"target-epsilon": SITE_EPSILON, "privacy-unit": "patient", "max-rows-per-unit": 2})
    assert [unit_site.send("units", r, 2) for r in (1, 2)] == ["trained"] * 2
    assert all(e["rows_per_unit"] == 2 for e in unit_site.ledger())
    per_row = unit_site.epsilon("units")
    per_unit, _ = group_privacy(per_row, DELTA, 2)
    assert 0.8 * SITE_EPSILON <= per_unit <= SITE_EPSILON * (1 + 1e-6)  # the unit's 2, not each row's


# -- refused before any step ---------------------------------------------------------------------

@pytest.mark.parametrize("request_", [
    ["privacy.enabled=false"],
    ["privacy.noise_multiplier=0.05"],
    ["privacy.noise_multiplier=0.0"],
    # the coordinator's view of this site can only make it stricter in a deployment
    ["privacy.enabled=false",
     'federation.site_privacy={"site-a"={allow_non_private=true, target_epsilon=100, lifetime_epsilon=1000}}'],
], ids=["dp-off", "noise-0.05", "noise-0", "coordinator-loosens-site"])
def test_a_hostile_run_config_is_refused_before_any_step(site, trainings, request_):
    assert site.send("hostile", 1, 2, *request_) == "refused"
    assert trainings == [] and site.ledger() == []


@pytest.mark.parametrize("request_", [["privacy.enabled=false"], ["privacy.noise_multiplier=0.0"]],
                         ids=["dp-off", "noise-0"])
def test_a_request_the_policy_forbids_is_refused_before_any_row_is_read(site, monkeypatch, request_):
    from fedtune.client import runtime

    site.send("honest", 1, 1)                 # the adapter's arrays, from an honest run
    runtime._CACHE.clear()                    # a fresh worker: nothing of the site is warm
    read = []
    monkeypatch.setattr(runtime, "read_table", lambda *a, **k: read.append(a) or pytest.fail("a row was read"))
    assert site.send("hostile", 1, 2, *request_) == "refused"
    assert read == [] and runtime._CACHE == {}


def test_the_coordinator_cannot_move_the_sites_ledger(site, tmp_path):
    assert site.send("moved", 1, 2, state_root=str(tmp_path / "elsewhere")) == "trained"
    assert not (tmp_path / "elsewhere").exists()
    assert len(site.ledger()) == 1


def test_coordinator_site_privacy_can_make_a_site_stricter(site):
    assert site.send("stricter", 1, 1, 'federation.site_privacy={"site-a"={target_epsilon=0.5}}') == "trained"
    assert 0.4 <= site.epsilon("stricter") <= 0.5


# -- stays within its budget whatever the coordinator changes -------------------------------------

def _within(site, run_id):
    eps_run = site.epsilon(run_id)
    assert eps_run <= SITE_EPSILON * (1 + 1e-6), eps_run
    assert site.epsilon() <= 10.0 * (1 + 1e-6)  # the default lifetime cap
    return eps_run


def test_rounds_that_grow_between_rounds_spend_only_what_is_left(site):
    sent = [site.send("grow", 1, 2), site.send("grow", 2, 4)] + [site.send("grow", r, 4) for r in (3, 4)]
    assert sent[0] == "trained"
    _within(site, "grow")
    # more rounds asked mid-run: the rest of the budget is spread over them, so the noise rises
    noise = [e["noise_multiplier"] for e in site.ledger()]
    assert len(noise) >= 2 and noise[1] > noise[0]


def test_a_resume_with_more_rounds_spends_only_what_is_left(site):
    assert [site.send("more", r, 3) for r in (1, 2, 3)] == ["trained"] * 3
    spent = site.epsilon("more")
    later = [site.send("more", r, 6) for r in (4, 5, 6)]
    assert "refused" in later
    assert _within(site, "more") <= max(spent, SITE_EPSILON)


def test_a_re_sent_round_spends_only_what_is_left(site):
    sent = [site.send("again", 1, 3), site.send("again", 2, 3), site.send("again", 2, 3), site.send("again", 3, 3)]
    assert sent[:2] == ["trained", "trained"]
    assert "refused" in sent  # the re-send used round 3's share: round 3 itself no longer fits
    _within(site, "again")


def test_a_reused_run_id_spends_only_what_is_left(site):
    assert [site.send("same-id", r, 2) for r in (1, 2)] == ["trained"] * 2
    again = [site.send("same-id", r, 2) for r in (1, 2)]
    assert again == ["refused", "refused"]
    _within(site, "same-id")


def test_twenty_local_epochs_stay_within_the_budget(site):
    replies = [site.send("epochs", 1, 3, "train.epochs=20"),
               site.send("epochs", 2, 3),                      # back to 1 epoch: recalibrated with the history
               site.send("epochs", 3, 3, "train.epochs=20")]
    # Each round is trained (a refusal would leave nothing to check), with more noise for more steps.
    assert replies == ["trained"] * 3
    entries = site.ledger()
    per_epoch = entries[1]["steps"]  # the site's training rows / batch 16
    assert [e["steps"] for e in entries] == [20 * per_epoch, per_epoch, 20 * per_epoch]
    assert entries[0]["noise_multiplier"] > entries[1]["noise_multiplier"] < entries[2]["noise_multiplier"]
    _within(site, "epochs")


def test_the_lifetime_cap_follows_the_dataset_name_not_its_bytes(tiny_models, data_file, tmp_path, caplog):
    grown = tmp_path / "records.csv"
    grown.write_bytes(data_file.read_bytes())
    site = Site(tiny_models["bert"], grown, tmp_path / "state")  # no own run budget: the run's 8
    assert site.send("first", 1, 1) == "trained"
    assert 0.8 * 8 <= site.epsilon("first") <= 8
    tiny.write_csv(tiny.separable_rows(ROWS + 8, seed=5), grown)  # rows added: new bytes, same dataset
    runtime_module._CACHE.clear()  # the next message's process reads the file again
    with caplog.at_level(logging.WARNING):
        assert site.send("second", 1, 1) == "trained"
    assert "changed since its last training" in caplog.text
    first, second = site.ledger()
    assert second["noise_multiplier"] > first["noise_multiplier"]  # only what was left of the cap of 10
    assert 0.8 * 10 <= site.epsilon() <= 10 * (1 + 1e-6)   # recomputed over the whole ledger
    site.send("third", 1, 1)  # trains with more noise, or refuses: either way the cap holds
    assert site.epsilon() <= 10 * (1 + 1e-6)


def test_non_private_training_only_when_the_site_allows_it(tiny_models, data_file, tmp_path, trainings):
    site = Site(tiny_models["bert"], data_file, tmp_path / "state", **{"allow-non-private": True})
    assert site.send("audit", 1, 1, "privacy.enabled=false") == "trained"
    assert len(trainings) == 1 and trainings[0].engine is None
    assert site.epsilon() == float("inf")  # recorded: the ledger says this data has no guarantee left


def test_non_private_training_is_reproducible_and_dp_training_is_not(tiny_models, data_file, tmp_path, trainings):
    """Without DP (the site allows it) a round retrained, after a coordinator restart or in another
    run with the same config, gives the same update: its seeds come from train.seed, the site and
    the round, not the run id. With DP two trainings of the same round draw fresh seeds."""
    off = Site(tiny_models["bert"], data_file, tmp_path / "off", **{"allow-non-private": True})
    start = pack(list(get_adapter_arrays(site_runtime(off.config().to_toml(), settings_from_node_config(off.node),
                                                      off.state).model).values()))

    def train(site, run_id, *overrides):
        runtime_module._CACHE.clear()  # a fresh ClientApp process, as after a restart
        site.arrays = [a.copy() for a in start]
        assert site.send(run_id, 2, 3, *overrides) == "trained"
        return site.arrays, trainings[-1]._generator.initial_seed()

    first, seed_1 = train(off, "run", "privacy.enabled=false")
    assert any(np.abs(a - s).max() > 1e-4 for a, s in zip(first, start))  # it trained
    for run_id in ("run", "another-run"):  # the round retrained after a restart; a second run
        again, seed_2 = train(off, run_id, "privacy.enabled=false")
        assert seed_2 == seed_1
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    other, seed_3 = train(off, "another-seed", "privacy.enabled=false", "train.seed=1")
    assert seed_3 != seed_1 and any(not np.array_equal(a, b) for a, b in zip(first, other))

    on = Site(tiny_models["bert"], data_file, tmp_path / "on")
    dp_1, dp_seed_1 = train(on, "private")
    dp_2, dp_seed_2 = train(on, "private-again")
    assert len({dp_seed_1, dp_seed_2, seed_1}) == 3
    assert trainings[-1]._noise_seed != trainings[-2]._noise_seed
    assert any(not np.array_equal(a, b) for a, b in zip(dp_1, dp_2))


# -- randomness the accountant's assumptions hold for -------------------------------------------

def test_poisson_sample_and_noise_come_from_independent_fresh_streams(site, monkeypatch):
    """The sampler's and the noise's first draws over many rounds: never equal, uncorrelated, and a
    re-sent (run, round) never draws the same again. Fails with one seed for both."""
    seen = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append((kwargs["sample_seed"], kwargs["noise_seed"]))
        raise Stop  # before any step: nothing is recorded, the next call is the same round again

    monkeypatch.setattr(agent_module, "LocalTrainer", capture)
    for i in range(100):
        with pytest.raises(SiteReplyError, match="internal error"):  # the guard hides Stop's text
            site.send("stream", 1 + i % 2, 3)
    assert site.ledger() == []
    draws = lambda seed: torch.rand(16, generator=torch.Generator().manual_seed(seed)).numpy()  # noqa: E731
    sample = np.concatenate([draws(s) for s, _ in seen])
    noise = np.concatenate([draws(n) for _, n in seen])
    assert not np.any(sample == noise)
    # The first 16 draws of each stream: 1,600 pairs, so independent streams give |r| about 0.025
    # and 0.25 is 10 standard deviations (with the first draw only, 100 pairs, 1 run in 80 failed).
    assert abs(np.corrcoef(sample, noise)[0, 1]) < 0.25
    assert len({s for s, _ in seen}) == len(seen) and len({n for _, n in seen}) == len(seen)


def test_train_local_never_samples_from_the_public_seed(tiny_models, separable_files, tmp_path, monkeypatch):
    from fedtune import local

    seeds = []
    real = local.LocalTrainer

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seeds.append((trainer._generator.initial_seed(), trainer._noise_seed))
        raise RuntimeError("stop")

    monkeypatch.setattr(local, "LocalTrainer", spy)
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=["train.seed=0"])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stop"):
            local.run_train_local(cfg, tmp_path / "out")
    (s1, n1), (s2, n2) = seeds
    assert s1 != s2 and n1 != n2 and s1 != n1 and 0 not in (s1, s2)


def test_one_seed_for_sampler_and_noise_is_refused(tiny_models, separable_files):
    from fedtune.local import prepare_site
    from fedtune.training.trainer import LocalTrainer

    cfg = tiny_config(tiny_models["bert"], separable_files["train"])
    s = prepare_site(cfg)
    with pytest.raises(ValueError, match="independent seeds"):
        LocalTrainer(s.model, s.data.train, s.collate, cfg.model.task, cfg.train, cfg.privacy, s.device, "fp32",
                     noise_multiplier=1.0, sample_seed=7, noise_seed=7)


# -- ledger integrity ------------------------------------------------------------------------------

def test_two_runs_on_one_state_folder_cannot_both_pass_the_cap(tmp_path):
    """Check and append under one lock: the second run sees the first's spend. Without the lock
    both would pass the check on the empty ledger and together overshoot the cap."""
    policy = SitePolicy(lifetime_epsilon=2.5, max_noise_multiplier=50)
    terms = run_terms(policy, PrivacyConfig(target_epsilon=2.0, accountant="rdp"), 1000)
    path = tmp_path / "privacy-ledger.jsonl"
    start = threading.Barrier(2)
    outcome = {}

    def run(run_id):
        budget = SiteBudget(PrivacyLedger(path), "records", "f" * 64, policy, terms, run_id)
        start.wait()
        try:
            with budget.round(run_id, 1, 1, 100, 0.05) as grant:
                time.sleep(0.5)  # training
                grant.record(100, 0.05)
            outcome[run_id] = "trained"
        except BudgetRefusal:
            outcome[run_id] = "refused"

    threads = [threading.Thread(target=run, args=(name,)) for name in ("run-1", "run-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    history = PrivacyLedger(path).history("records")
    assert "trained" in outcome.values()
    assert compute_epsilon(history, DELTA, "rdp") <= 2.5 * (1 + 1e-6)
    assert compute_epsilon(history[:1], DELTA, "rdp") > 1.9  # the first got its whole run budget


def test_the_dp_key_is_never_read_incomplete(tmp_path):
    keys, errors = [], []

    def read():
        try:
            keys.append(site_key(tmp_path / "state"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(keys) == 16 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert not list((tmp_path / "state").glob("*.tmp"))
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / KEY_FILE).write_bytes(b"\x01" * 5)
    with pytest.raises(RuntimeError, match="corrupt DP noise key"):
        site_key(tmp_path / "short")
