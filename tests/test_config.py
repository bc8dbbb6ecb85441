from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtune.config import BUNDLED_MODEL, ConfigError, FedTuneConfig, load_config, parse_override


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_use_the_bundled_model_and_no_data_unless_asked():
    cfg = load_config(None)
    assert cfg.model.name == BUNDLED_MODEL
    # The demo only when asked for: a coordinator's or a files-partition config has no data.train.
    assert cfg.data.builtin is None and cfg.data.train is None
    assert cfg.privacy.enabled and cfg.privacy.accountant == "prv"
    assert load_config(None, ["data.builtin=demo"]).data.builtin == "demo"


def test_the_cli_without_a_config_runs_the_demo_explicitly():
    from fedtune.cli import _load

    bare = SimpleNamespace(config=None, overrides=[])
    assert _load(bare).data.builtin == "demo"
    files = SimpleNamespace(config=None, overrides=["federation.partition=files", 'federation.site_files=["a.csv"]',
                                                    'data.eval="e.csv"'])
    assert _load(files).data.builtin is None


def test_files_partition_sites_follow_the_files_and_columns_are_kept(tmp_path):
    path = write(tmp_path, """
[data]
eval = "eval.csv"
text_column = "review"
label_column = "sentiment"
[federation]
partition = "files"
site_files = ["a.csv", "b.csv", "c.csv", "d.csv"]
""")
    cfg = load_config(path)
    assert cfg.federation.sites == 4 and cfg.data.builtin is None
    assert (cfg.data.text_column, cfg.data.label_column) == ("review", "sentiment")
    with pytest.raises(ConfigError, match="one file per site: 4 site_files for sites = 3"):
        load_config(path, ["federation.sites=3"])
    with pytest.raises(ConfigError, match="remove data.builtin"):
        load_config(path, ["data.builtin=demo"])


def test_no_training_data_is_a_clear_error():
    from fedtune.data import DataError
    from fedtune.data.site import load_rows

    with pytest.raises(DataError, match="no training data: set data.train"):
        load_rows(load_config(None).data, "sequence-classification", 0)


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[train]\nbatch_size = 32\n[data]\ntrain = "site.csv"\n')
    cfg = load_config(path, ["train.learning_rate=1e-4", 'lora.target_modules=["query"]', "privacy.enabled=false"])
    assert cfg.train.batch_size == 32
    assert cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["query"]
    assert cfg.privacy.enabled is False
    # relative data paths are taken relative to the config file, not the working directory
    assert cfg.data.train == (tmp_path / "site.csv").resolve()
    assert cfg.data.builtin is None


def test_unknown_key_is_named_with_allowed_keys(tmp_path):
    path = write(tmp_path, "[train]\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.learning_rat" in msg and "unknown key" in msg and "learning_rate" in msg
    assert str(path) in msg


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"privacyy: unknown key"):
        load_config(None, ["privacyy.enabled=true"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.precision=fp8", r"train.precision = 'fp8': Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("privacy.accountant=gdp", r"privacy.accountant = 'gdp': Input should be 'prv' or 'rdp'"),
        ("train.batch_size=0", r"train.batch_size = 0: .*Input should be 'auto' or a whole number greater than or equal to 1"),
        ("train.learning_rate=-1", r"train.learning_rate = -1: .*Input should be 'auto' or a number greater than 0"),
        ("lora.dropout=1.5", r"lora.dropout = 1.5: Input should be less than 1"),
        ("model.task=translation", r"model.task = 'translation'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.learning_rate")


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/run.toml")


def test_file_and_builtin_together_is_refused():
    with pytest.raises(ConfigError, match="either data.train"):
        load_config(None, ["data.train=x.csv", "data.builtin=demo"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "lora.r=4", "data.train=/data/site.csv"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    assert isinstance(cfg, FedTuneConfig)
