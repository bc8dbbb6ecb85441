import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# GGUF models are dequantized into this session's own cache, never into the user's ~/.cache.
os.environ.setdefault("FEDTUNE_MODEL_CACHE", tempfile.mkdtemp(prefix="fedtune-test-model-cache-"))

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
            # A path to a .gguf file is a model name: dequantized once, then loaded as a folder.
            "gguf-llama": tiny.make_tiny_gguf(root / "gguf-llama"),
        }


@pytest.fixture(scope="session")
def separable_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("separable")
    return {
        "train": tiny.write_csv(tiny.separable_rows(512, seed=1), root / "train.csv"),
        "eval": tiny.write_csv(tiny.separable_rows(200, seed=2), root / "eval.csv"),
    }
