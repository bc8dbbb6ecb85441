"""The console a person reads during a run: round lines, following metrics.jsonl, the site
agent's per-round line from its own ledger and traffic, and where library log lines go."""

import io
import json
import logging
import warnings

from fedtune.config import load_config
from fedtune.console import MetricsFollower, format_round, header_lines
from fedtune.deployment.site_view import SiteRoundView, spent
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.run_logs import route_logs, setup_console

RECORD = {"round": 2, "central": {"accuracy": 0.8125, "f1": 0.8, "loss": 0.45},
          "federated": {"loss": 0.5, "accuracy": 0.75},
          "sites": {"site-0": {"epsilon": 3.5}, "site-1": {"epsilon": 4.25}},
          "bytes_up": {"site-0": 1_500_000, "site-1": 500_000}, "bytes_down": {"site-0": 1_000_000}, "seconds": 12.4}


def test_a_round_line_has_central_and_federated_metrics_epsilon_range_traffic_and_time():
    line = format_round(RECORD, 10)
    assert line == "round  2/10  acc 0.812  f1 0.800  loss 0.450  fed acc (noised) 0.750  eps 3.50-4.25  3.0 MB  12 s"
    assert format_round({"round": 0, "central": {"loss": 2.0, "perplexity": 7.4}, "sites": {}}, 3) == \
        "round 0/3  loss 2.000  ppl 7.400  (before training)"
    # Sites that trained without DP, or past any finite bound (the coordinator's record of them).
    no_dp = {**RECORD, "sites": {"site-0": {"epsilon": "undefined (no DP)"}, "site-1": {"epsilon": "undefined (no DP)"}}}
    assert "  eps undefined (no DP)  3.0 MB" in format_round(no_dp, 10)
    mixed = {**RECORD, "sites": {"site-0": {"epsilon": 3.5}, "site-1": {"epsilon": "inf"}}}
    assert "  eps 3.50-inf  3.0 MB" in format_round(mixed, 10)


def test_the_header_names_model_sites_rounds_privacy_and_run_folder(tmp_path):
    cfg = load_config(None, ["federation.sites=4", "federation.rounds=7", "privacy.target_epsilon=3"])
    text = "\n".join(header_lines(cfg, tmp_path / "run", "simulate"))
    assert "4 sites, 7 rounds" in text and "target epsilon 3 per site" in text
    assert str(tmp_path / "run") in text and cfg.model.name in text
    assert text.splitlines()[0].endswith("), FFA-LoRA r=4")  # the defaults' adapter
    off = load_config(None, ["privacy.enabled=false", "lora.freeze_a=false", "lora.r=8"])
    first, second = header_lines(off, tmp_path, "server")[:2]
    assert "DP off" in second and first.endswith("), LoRA r=8")


def test_the_follower_hands_over_each_complete_record_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    seen = []
    follower = MetricsFollower(path, seen.append)
    follower.poll()  # no file yet
    path.write_text(json.dumps({"round": 0}) + "\n" + '{"round": 1, "cen')  # the second line is being written
    follower.poll()
    assert seen == [{"round": 0}]
    path.write_text(json.dumps({"round": 0}) + "\n" + json.dumps({"round": 1}) + "\n")
    follower.poll()
    follower.poll()
    assert seen == [{"round": 0}, {"round": 1}]


def _ledger_entry(ledger, run_id, rnd, noise=1.1, rate=0.1, steps=20):
    ledger.append({"dataset": "d" * 64, "run_id": run_id, "round": rnd, "steps": steps, "sample_rate": rate,
                   "noise_multiplier": noise, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"})


def test_the_site_line_shows_epsilon_recomputed_from_the_ledger_and_bytes_sent(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    _ledger_entry(ledger, "old-run", 1, noise=0.9)  # an earlier run on the same data
    out = io.StringIO()
    view = SiteRoundView("site-a", tmp_path, stream=out)
    _ledger_entry(ledger, "run-x", 1)
    _ledger_entry(ledger, "run-x", 2)
    traffic = [
        {"run_id": 7, "round": "1", "type": "train", "bytes_in": 2_000_000, "bytes_out": 100},
        {"run_id": 7, "round": "1", "type": "train", "bytes_in": 10, "bytes_out": 3_000_000},
        {"run_id": 7, "round": "1", "type": "evaluate", "bytes_in": 2_000_000, "bytes_out": 200},
        {"run_id": 7, "round": "2", "type": "train", "bytes_in": 0, "bytes_out": 0, "error": "BudgetRefusal: spent"},
    ]
    (tmp_path / "traffic.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traffic))
    view.poll()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # round 2 is still open
    one_round = compute_epsilon([(1.1, 0.1, 20)], 1e-5, "rdp")
    lifetime = compute_epsilon([(0.9, 0.1, 20), (1.1, 0.1, 20)], 1e-5, "rdp")
    assert lines[0] == (f"site-a round 1: trained 20 steps at noise 1.10, epsilon {one_round:.2f} this run "
                        f"({lifetime:.2f} lifetime, delta 1e-05); sent 3.00 MB, received 4.00 MB")
    view.poll(final=True)
    # Round 2 is in the ledger (entry after the view started), so its spend is shown.
    two_rounds = compute_epsilon([(1.1, 0.1, 20)] * 2, 1e-5, "rdp")
    assert f"site-a round 2: trained 20 steps at noise 1.10, epsilon {two_rounds:.2f} this run" in out.getvalue()
    assert spent(tmp_path / "privacy-ledger.jsonl", 3, 1) is None


def test_a_refused_round_says_so():
    from fedtune.deployment.site_view import format_site_round

    line = format_site_round("site-b", "3", [{"bytes_in": 10, "bytes_out": 0, "error": "BudgetRefusal: over"}], None)
    assert line == "site-b round 3: refused or failed (BudgetRefusal: over); sent 0.00 MB, received 0.00 MB"


def test_library_lines_and_warnings_go_to_the_log_file_not_the_console(tmp_path, capsys):
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    before, flwr_before = list(root.handlers), list(flwr.handlers)
    try:
        setup_console(verbose=False)
        path = route_logs(tmp_path / "logs", "simulate", verbose=False)
        logging.getLogger("flwr").warning("No fit_metrics_aggregation_fn provided")
        logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's UserWarning", UserWarning)
        logging.getLogger("fedtune.server").info("round 1/2: central accuracy 0.5")
        logging.getLogger("fedtune.server").warning("site-1 sent no update")
        err = capsys.readouterr().err
        assert err.strip() == "WARNING fedtune.server: site-1 sent no update"
        logged = path.read_text()
        for text in ("No fit_metrics_aggregation_fn", "Context impl SQLiteImpl", "UserWarning: a library's",
                     "round 1/2: central", "site-1 sent no update"):
            assert text in logged
        setup_console(verbose=True)
        logging.getLogger("alembic.runtime.migration").info("shown with --verbose")
        assert "shown with --verbose" in capsys.readouterr().err
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()
        flwr.handlers[:] = flwr_before
