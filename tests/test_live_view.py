"""The live view of a run: TensorBoard event files written each round, and `fedtune report`'s
self-contained page, rendered in a real headless Chromium."""

import base64
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.federation.events import close_events, write_round_events
from fedtune.federation.privacy_report import write_privacy_report

RECORDS = [
    {"round": 0, "central": {"accuracy": 0.5, "f1": 0.33, "loss": 0.69}, "federated": None, "sites": {},
     "bytes_up": {}, "bytes_down": {}, "seconds": 0.0, "target_epsilon": 8.0},
    {"round": 1, "central": {"accuracy": 0.7, "f1": 0.68, "loss": 0.6}, "federated": {"loss": 0.62, "accuracy": 0.66},
     "sites": {"site-0": {"examples": 40, "train_loss": 0.65, "epsilon": 5.5},
               "site-1": {"examples": 40, "train_loss": 0.66, "epsilon": 5.6}},
     "bytes_up": {"site-0": 250_000, "site-1": 250_000}, "bytes_down": {"site-0": 120_000, "site-1": 120_000},
     "seconds": 21.5, "target_epsilon": 8.0},
    {"round": 2, "central": {"accuracy": 0.8, "f1": 0.79, "loss": 0.5}, "federated": {"loss": 0.52, "accuracy": 0.77},
     "sites": {"site-0": {"examples": 40, "train_loss": 0.55, "epsilon": 7.9},
               "site-1": {"examples": 40, "train_loss": 0.57, "epsilon": 8.0}},
     "bytes_up": {"site-0": 250_000, "site-1": 250_000}, "bytes_down": {"site-0": 120_000, "site-1": 120_000},
     "seconds": 19.0, "target_epsilon": 8.0},
]


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TFRecord event files under ``folder`` (what TensorBoard reads)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_each_round_is_written_as_tensorboard_scalars(tmp_path):
    for record in RECORDS:
        write_round_events(tmp_path, record)
    # On disk as each round ends, before the run closes the writer: a live view.
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["central/accuracy"] == pytest.approx({0: 0.5, 1: 0.7, 2: 0.8})
    assert scalars["federated/accuracy"] == pytest.approx({1: 0.66, 2: 0.77})
    assert scalars["epsilon/site-1"] == pytest.approx({1: 5.6, 2: 8.0})
    assert scalars["train_loss/site-0"] == pytest.approx({1: 0.65, 2: 0.55})
    assert scalars["MB_up/all_sites"] == pytest.approx({1: 0.5, 2: 0.5})
    assert scalars["MB_down/site-0"] == pytest.approx({1: 0.12, 2: 0.12})
    assert scalars["seconds/round"] == pytest.approx({1: 21.5, 2: 19.0})
    close_events(tmp_path)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-7"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (run / "run.json").write_text(json.dumps({"run_id": "abc", "ended": "completed"}))
    (run / "config.toml").write_text('[model]\nname = "tiny <model> & co"\n')
    write_privacy_report({"sites": {"site-0": {"epsilon": 7.9, "epsilon_total": 7.9, "delta": 1e-5,
                                               "noise_multiplier": 1.2, "max_grad_norm": 1.0, "sample_rate": 0.4,
                                               "steps": 6, "accountant": "rdp"}},
                          "target_epsilon": 8.0, "delta": 1e-5, "enabled": True, "secure_aggregation": True},
                         run / "privacy.md")
    return run


def test_the_report_page_is_self_contained(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    images = page.count('src="data:image/png;base64,')
    assert images == 2  # central metrics and epsilon, embedded
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing loaded
    assert "<td>site-0</td>" in page and "SecAgg+" in page              # the privacy report
    assert "tiny &lt;model&gt; &amp; co" in page                         # the config, escaped
    assert "<th>round</th>" in page and "best round: 2" in page          # the per-round table
    assert main(["report", str(run_dir.parent)]) == 2                    # not a run folder: a clear error


CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_report_renders_in_headless_chromium(run_dir, tmp_path):
    from fedtune.federation.report_page import write_report

    page = write_report(run_dir)
    shot = tmp_path / "report.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    # The browser parsed the page: its text, the table and both images are in the DOM it built.
    assert "fedtune run: run-7" in dom and "best round: 2" in dom and dom.count("<img") == 2
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1800)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots drawn, not a blank page
    # The plots' line colours (matplotlib's blue and orange) are on screen: the images decoded.
    pixels = set(image.getdata())
    assert any(abs(r - 31) < 30 and abs(g - 119) < 30 and abs(b - 180) < 30 for r, g, b in pixels)
