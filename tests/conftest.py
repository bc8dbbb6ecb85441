import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedtune import tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "bert": tiny.make_tiny_bert(root / "bert"),
            "gpt2": tiny.make_tiny_gpt2(root / "gpt2"),
            "llama": tiny.make_tiny_llama(root / "llama"),
        }


@pytest.fixture(scope="session")
def separable_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("separable")
    return {
        "train": tiny.write_csv(tiny.separable_rows(512, seed=1), root / "train.csv"),
        "eval": tiny.write_csv(tiny.separable_rows(200, seed=2), root / "eval.csv"),
    }
