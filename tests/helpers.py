"""Shared test helpers: configs and sites on the tiny models."""

from pathlib import Path

from fedtune.config import load_config


def tiny_config(model_dir: Path, train_file: Path | None = None, eval_file: Path | None = None,
                task: str = "sequence-classification", overrides: list[str] | None = None):
    sets = [
        f"model.name={str(model_dir)!r}".replace("'", '"'),
        f"model.task={task}",
        "model.max_length=32",
        "lora.r=4",
        "lora.dropout=0.0",
        "train.progress=false",
        "train.batch_size=16",
        "train.physical_batch_size=64",
    ]
    if train_file is not None:
        sets.append(f'data.train="{train_file}"')
    if eval_file is not None:
        sets.append(f'data.eval="{eval_file}"')
    return load_config(None, sets + list(overrides or []))
