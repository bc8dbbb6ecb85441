"""`fedtune train-local` end to end, through the CLI."""

import json

import pytest
import tomllib

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.data import LabelMap
from tests.conftest import SHARED_DATA

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _tiny_args(model_dir, train, held):
    return [
        "--set", f'model.name="{model_dir}"', "--set", "model.max_length=32", "--set", "lora.r=4",
        "--set", f'data.train="{train}"', "--set", f'data.eval="{held}"', "--set", "train.progress=false",
        "--set", "train.batch_size=32", "--set", "train.epochs=1",
    ]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train-local" in out and "show-config" in out


def test_train_local_writes_every_output(tiny_models, separable_files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train-local", "--out", str(out)] + _tiny_args(tiny_models["bert"], separable_files["train"],
                                                                 separable_files["eval"]))
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert LabelMap.load(out / "label_map.json").labels == ["neg", "pos"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) >= {"accuracy", "f1", "loss"}
    privacy = metrics["privacy"]
    assert set(privacy) == {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "steps", "sample_rate",
                            "accountant"}
    assert 0 < privacy["epsilon"] <= 8.0 and privacy["noise_multiplier"] > 0 and privacy["steps"] > 0
    resolved = load_config(out / "config.toml")
    assert resolved.train.batch_size == 32
    assert tomllib.loads((out / "config.toml").read_text())["data"]["train"] == str(separable_files["train"])
    assert "epsilon" in capsys.readouterr().out


def test_bad_config_is_one_clear_error(tmp_path, capsys):
    code = main(["train-local", "--out", str(tmp_path / "x"), "--set", "train.learnin_rate=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.learnin_rate: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_bad_data_is_one_clear_error(tiny_models, tmp_path, capsys):
    bad = tmp_path / "site.csv"
    bad.write_text("sentence,label\nhello,1\n")
    code = main(["train-local", "--out", str(tmp_path / "x"), "--set", f'model.name="{tiny_models["bert"]}"',
                 "--set", f'data.train="{bad}"'])
    assert code == 2
    assert "no column 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_config_trains_minilm_well_under_dp(tmp_path):
    """The README's demo job: the bundled MiniLM on the generated data at epsilon 8."""
    out = tmp_path / "demo"
    assert main(["train-local", "--config", str(REPO / "simulations" / "demo.toml"), "--out", str(out),
                 "--set", "train.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy"]["epsilon"] <= 8.0
    assert metrics["eval"]["accuracy"] >= 0.6, metrics  # chance is 0.25


@pytest.mark.slow
def test_real_sst2_file_trains(tmp_path):
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA} (see shared/data/README.md)")
    import pandas as pd

    sample = pd.read_csv(SHARED_DATA / "sst2" / "train.tsv", sep="\t", quoting=3).sample(600, random_state=0)
    train = tmp_path / "sst2-sample.tsv"
    sample.to_csv(train, sep="\t", index=False, quoting=3)
    out = tmp_path / "sst2"
    assert main(["train-local", "--out", str(out), "--set", f'data.train="{train}"',
                 "--set", f'data.eval="{SHARED_DATA / "sst2" / "validation.tsv"}"',
                 "--set", "data.text_column=sentence", "--set", "model.max_length=48",
                 "--set", "train.epochs=1", "--set", "train.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["examples"] == 872
    assert LabelMap.load(out / "label_map.json").labels == ["0", "1"]
