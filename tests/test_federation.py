"""Federated fine-tuning on Flower's simulation engine: SecAgg+, egress, resume, bad configs."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune import tiny
from fedtune.config import load_config
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.checkpoints import load_latest
from fedtune.server.coordinator import RunError, prepare_run, read_records
from fedtune.server.secagg import SecAggSettingsError
from fedtune.simulate import simulate

CANARIES = ["canary zq 1 xv 2 kw", "canary kw 3 zq 4 xv", "canary xv 5 kw 6 zq"]


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    """One file per site, each with a unique canary sentence, and the coordinator's eval file."""
    root = tmp_path_factory.mktemp("sites")
    files = []
    for i in range(3):
        rows = tiny.separable_rows(60, seed=10 + i)
        rows += [{"text": CANARIES[i], "label": "pos"}] * 1
        files.append(tiny.write_csv(rows, root / f"site-{i}.csv"))
    held = tiny.write_csv(tiny.separable_rows(60, seed=99), root / "eval.csv")
    return files, held


def fed_config(model_dir: Path, files, held, extra=()):
    sets = [
        f'model.name="{model_dir}"', "model.max_length=24", "lora.r=4", "lora.dropout=0.0",
        "train.batch_size=16", "train.epochs=1", "train.learning_rate=1e-2",
        f'data.eval="{held}"', "federation.sites=3", "federation.rounds=2", "federation.partition=files",
        "federation.site_files=[" + ",".join(f'"{f}"' for f in files) + "]",
        "federation.site_test_fraction=0.2",
    ]
    return load_config(None, sets + list(extra))


# Runs compared value for value must train deterministically: each site's DP randomness is fresh
# and secret for every training, so these use noise 0 and a batch larger than a site (Poisson
# sampling at rate 1 takes every row), which a site accepts only with its own switch.
DETERMINISTIC = ["privacy.noise_multiplier=0.0", "train.batch_size=64",
                 'federation.site_privacy={"*"={allow_non_private=true}}']


@pytest.mark.slow
def test_three_sites_two_rounds_with_secagg(tiny_models, site_files, tmp_path):
    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held, ["privacy.target_epsilon=4"])
    out = tmp_path / "run"
    prepared_initial = prepare_run(cfg, tmp_path / "probe").initial
    assert simulate(cfg, out, cpus=2) == "completed"

    records = read_records(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert set(r) >= {"round", "central", "federated", "sites", "bytes_up", "bytes_down", "seconds"}
        assert set(r["sites"]) == {"site-0", "site-1", "site-2"}
        assert set(r["central"]) >= {"loss", "accuracy", "f1"}
        # The sites' noised sums, added up: row count and accuracy (no F1: not answered).
        assert set(r["federated"]) == {"examples", "accuracy"} and 0 <= r["federated"]["accuracy"] <= 1
        assert all(r["bytes_up"][s] > 0 and r["bytes_down"][s] > 0 for s in r["sites"])
    privacy = json.loads((out / "privacy.json").read_text())["sites"]
    for site, p in privacy.items():
        assert set(p) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "steps", "sample_rate", "accountant"}
        assert 0 < p["epsilon"] <= 4.0, (site, p)
        # Its total covers the evaluation answers too, as recomputed from the simulated site's ledger.
        from fedtune.privacy.ledger import PrivacyLedger

        entries = PrivacyLedger(out / "sites" / site / "privacy-ledger.jsonl").entries()
        assert sum(e.is_evaluation for e in entries) == 2
        assert p["epsilon_total"] == pytest.approx(
            PrivacyLedger(out / "sites" / site / "privacy-ledger.jsonl").epsilon(entries[0].dataset,
                                                                                 entries[0].dataset_delta), rel=1e-6)
    # epsilon grows over rounds and ends close to the target: spread over the whole run
    eps1, eps2 = (records[i]["sites"]["site-0"]["epsilon"] for i in (1, 2))
    assert eps1 < eps2 <= 4.0 and eps2 > 3.5
    for name in ("config.toml", "privacy.json", "label_map.json", "plots/central.png", "plots/epsilon.png",
                 "final/adapter/adapter_config.json", "best/adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "plots" / "central.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_latest(out / "checkpoints")[0] == 2
    final = load_latest(out / "checkpoints")[1]
    changed = [not np.array_equal(a, b) for a, b in zip(final.values(), prepared_initial)]
    assert all(changed), "every adapter tensor of the global model should have moved"


STAGES = {True: ["setup", "key sharing", "training", "unmasking", "central evaluation", "federated evaluation"],
          False: ["fit", "central evaluation", "federated evaluation"]}


@pytest.mark.slow
def test_secagg_aggregate_equals_plain_fedavg_without_noise(tiny_models, site_files, tmp_path):
    files, held = site_files
    extra = [*DETERMINISTIC, "federation.rounds=1", "federation.run_id=compare"]
    results = {}
    for secure in (True, False):
        cfg = fed_config(tiny_models["bert"], files, held, extra + [f"federation.secure_aggregation={str(secure).lower()}"])
        out = tmp_path / f"secure-{secure}"
        simulate(cfg, out, cpus=2)
        results[secure] = load_latest(out / "checkpoints")[1]
        # The same runs: the round's time per stage, which together make up the round's time.
        (record,) = read_records(out / "metrics.jsonl")[1:]
        assert list(record["stage_seconds"]) == STAGES[secure]
        assert sum(record["stage_seconds"].values()) == pytest.approx(record["seconds"], rel=0.02, abs=0.05)
    for name in results[True]:
        np.testing.assert_allclose(results[True][name], results[False][name], atol=1e-4, err_msg=name)


def _capture_mod(folder: Path):
    def capture(msg, context, call_next):
        from flwr.common.serde import recorddict_to_proto

        reply = call_next(msg, context)
        data = recorddict_to_proto(reply.content).SerializeToString() if reply.has_content() else b""
        name = f"{context.node_config['partition-id']}-{msg.metadata.message_type}-{len(list(folder.glob('*')))}"
        (folder / f"{name}-{__import__('uuid').uuid4().hex[:6]}.bin").write_bytes(data)
        return reply

    return capture


@pytest.mark.slow
def test_no_raw_text_or_token_ids_leave_a_site(tiny_models, site_files, tmp_path):
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
    from transformers import AutoTokenizer

    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held)
    captured = tmp_path / "captured"
    captured.mkdir()
    simulate(cfg, tmp_path / "run", client_mods=[_capture_mod(captured)], cpus=2)
    blobs = {p.name: p.read_bytes() for p in captured.glob("*.bin")}
    assert len(blobs) >= 3 * 2 * 5  # 3 sites x 2 rounds x (4 SecAgg+ stages + evaluate)

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    needles = []
    for text in CANARIES:
        needles += [text.encode(), text.upper().encode()]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for dtype in ("<i8", "<i4", ">i8", ">i4", "<f4"):
            needles.append(np.asarray(ids, dtype=dtype).tobytes())
    for name, blob in blobs.items():
        for needle in needles:
            assert needle not in blob, f"a site's raw text or token ids left in {name}"

    adapter_shapes = {tuple(a.shape) for a in load_latest(tmp_path / "run" / "checkpoints")[1].values()}
    for name, blob in blobs.items():
        content = recorddict_from_proto(RecordDictProto.FromString(blob))
        for record in content.array_records.values():
            # SecAgg+ empties the plain arrays; anything left must be adapter-shaped
            assert all(tuple(arr.shape) in adapter_shapes for arr in record.values()), name
        for key, record in content.config_records.items():
            assert key in {"secaggplus_configs", "fitres.metrics", "evaluateres.metrics", "config"} or \
                key.startswith(("fitres", "evaluateres")), (name, key)


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tiny_models, site_files, tmp_path):
    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held, [*DETERMINISTIC, "federation.run_id=resume-test"])
    full, part = tmp_path / "full", tmp_path / "part"
    assert simulate(cfg, full, cpus=2) == "completed"
    assert simulate(cfg, part, stop_after_round=1, cpus=2) == "interrupted"
    assert load_latest(part / "checkpoints")[0] == 1
    assert not (part / "final").exists()
    with pytest.raises(RunError, match="--resume"):
        prepare_run(cfg, part)
    assert simulate(cfg, part, resume=True, cpus=2) == "completed"
    a, b = load_latest(full / "checkpoints")[1], load_latest(part / "checkpoints")[1]
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    assert [r["round"] for r in read_records(part / "metrics.jsonl")] == [0, 1, 2]
    for i in range(3):  # each site's ledger: the same trainings, each round once; one noised answer a round
        a, b = (PrivacyLedger(run / "sites" / f"site-{i}" / "privacy-ledger.jsonl").entries() for run in (full, part))
        train_a, train_b = ([e for e in entries if not e.is_evaluation] for entries in (a, b))
        assert [(e.round, e.steps, e.sample_rate) for e in train_a] == [(e.round, e.steps, e.sample_rate)
                                                                         for e in train_b]
        assert [e.round for e in train_b] == [1, 2]
        assert [e.round for e in a if e.is_evaluation] == [e.round for e in b if e.is_evaluation] == [1, 2]


# -- refused before round 1 ------------------------------------------------------------------

def test_too_few_sites_for_secagg_is_refused(tiny_models, site_files, tmp_path):
    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files[:2], held, ["federation.sites=2", "federation.fraction_train=0.5"])
    with pytest.raises(SecAggSettingsError, match="at least 2 sites"):
        prepare_run(cfg, tmp_path / "x")


def test_unknown_strategy_is_refused():
    with pytest.raises(Exception, match="federation.strategy = 'fedsgd'"):
        load_config(None, ["federation.strategy=fedsgd"])


def test_eval_labels_the_sites_lack_are_refused(tiny_models, site_files, tmp_path):
    files, _ = site_files
    bad = tiny.write_csv([{"text": "bright day", "label": "pos"}, {"text": "odd day", "label": "neutral"}],
                         tmp_path / "eval.csv")
    cfg = fed_config(tiny_models["bert"], files, bad)
    with pytest.raises(Exception, match=r"eval.csv: row 2, column 'label': label 'neutral' is not in the label map"):
        prepare_run(cfg, tmp_path / "x")


def test_clipping_range_that_would_clip_is_refused(tiny_models, site_files, tmp_path):
    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held, ["federation.secagg_clipping_range=0.001"])
    with pytest.raises(SecAggSettingsError, match="would clip the adapter"):
        prepare_run(cfg, tmp_path / "x")


def test_max_weight_below_a_sites_examples_is_refused(tiny_models, site_files, tmp_path):
    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held, ["federation.secagg_max_weight=5"])
    with pytest.raises(SecAggSettingsError, match="max_weight"):
        prepare_run(cfg, tmp_path / "x")


@pytest.mark.slow
def test_flwr_run_on_the_flower_app(tiny_models, tmp_path):
    """`flwr run .` (Flower's own CLI, local simulation) runs fedtune's ServerApp and ClientApp."""
    import os
    import shutil
    import subprocess

    import psutil

    repo = Path(__file__).resolve().parents[1]
    train = tiny.write_csv(tiny.separable_rows(240, seed=1), tmp_path / "train.csv")
    config = tmp_path / "fed.toml"
    config.write_text(
        f'[model]\nname = "{tiny_models["bert"]}"\nmax_length = 24\n[lora]\nr = 4\n'
        f'[data]\ntrain = "{train}"\n[train]\nbatch_size = 32\n'
        '[federation]\nsites = 3\nrounds = 1\npartition = "iid"\n'
    )
    out = tmp_path / "out"
    # flwr starts `flower-superlink` from PATH: make it this environment's.
    bin_dir = str(Path(os.sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    flwr = shutil.which("flwr", path=env["PATH"])
    try:
        proc = subprocess.run(
            [flwr, "run", str(repo), "local", "--federation-config", "num-supernodes=3",
             "--run-config", f'config="{config}" out="{out}"', "--stream"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records = read_records(out / "metrics.jsonl")
        assert [r["round"] for r in records] == [0, 1]
        assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    finally:
        # flwr run starts a background SuperLink under this FLWR_HOME: stop it.
        for p in psutil.process_iter(["cmdline", "environ"]):
            try:
                if "flower-superlink" in " ".join(p.info["cmdline"] or []) and \
                        (p.info["environ"] or {}).get("FLWR_HOME") == env["FLWR_HOME"]:
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


@pytest.mark.slow
def test_ffa_lora_sends_only_b_and_keeps_a_identical(tiny_models, site_files, tmp_path):
    from fedtune.local import prepare_site
    from tests.helpers import tiny_config

    files, held = site_files
    cfg = fed_config(tiny_models["bert"], files, held, ["lora.freeze_a=true"])
    out = tmp_path / "ffa"
    simulate(cfg, out, cpus=2)
    names = list(load_latest(out / "checkpoints")[1])
    assert names and not any("lora_A" in n for n in names)  # the global adapter sent around: B + head
    from safetensors.numpy import load_file

    saved = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    fresh = prepare_site(tiny_config(tiny_models["bert"], files[0], overrides=["lora.freeze_a=true"])).model
    for name, param in fresh.named_parameters():
        if "lora_A" in name:
            key = next(k for k in saved if k.replace(".weight", "") in name.replace(".default", ""))
            assert np.array_equal(saved[key], param.detach().numpy()), name


@pytest.mark.slow
def test_demo_recipe_learns_under_dp(tmp_path):
    """The demo config (bundled all-MiniLM-L6-v2, 3 sites, epsilon 8, SecAgg+, the default recipe:
    mean pooling, auto batch and learning rate) learns its 4 classes in a single round; the
    whole 3-round demo is measured in simulations/RESULTS.md."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "simulations" / "federated.toml", ["federation.rounds=1"])
    assert cfg.train.batch_size == "auto" and cfg.train.learning_rate == "auto" and cfg.privacy.enabled
    out = tmp_path / "demo"
    assert simulate(cfg, out, cpus=2) == "completed"
    records = read_records(out / "metrics.jsonl")
    assert records[0]["central"]["accuracy"] < 0.5
    assert records[-1]["round"] == 1 and records[-1]["central"]["accuracy"] >= 0.75, records[-1]["central"]
    privacy = json.loads((out / "privacy.json").read_text())["sites"]
    assert len(privacy) == 3 and all(7.0 < p["epsilon"] <= 8.0 for p in privacy.values()), privacy
