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
        "train.learning_rate=1e-2",  # tests that exercise "auto" ask for it
        "train.physical_batch_size=64",
    ]
    if train_file is not None:
        sets.append(f'data.train="{train_file}"')
    if eval_file is not None:
        sets.append(f'data.eval="{eval_file}"')
    return load_config(None, sets + list(overrides or []))


# Lines a person should not see without --verbose: Flower's log format, Ray's worker prefixes and
# messages, alembic's and other libraries' loggers, Python warnings.
import re  # noqa: E402

LIBRARY_LINE = re.compile(
    r"^\s*(INFO|DEBUG|WARNING|ERROR)\s+:"           # Flower's console format
    r"|\((ClientAppActor|raylet|pid=)|Ray instance"  # Ray's worker output and start-up
    r"|\b(ray|flwr|alembic|transformers|torch|opacus|peft)(\.\w+)*:"  # library loggers
    r"|\b\w*Warning\b"                                # Python warnings (FutureWarning, UserWarning...)
)


def library_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if LIBRARY_LINE.search(line)]
