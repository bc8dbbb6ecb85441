"""What every benchmark shares: sizes, the model, configs, machine facts, tables and JSON."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Iterable, Sequence

SIZES = ("tiny", "default", "full")
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "simulations" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def model_name(size: str, workdir: Path) -> str:
    """The bundled MiniLM, or (tiny mode, for CI) a tiny random BERT saved with save_pretrained."""
    if size != "tiny":
        return MINILM
    folder = Path(workdir) / "tiny-bert"
    if not (folder / "config.json").exists():
        from fedtune import tiny

        tiny.make_tiny_bert(folder)
    return str(folder)


def config(model: str, sets: Iterable[str] = ()):
    from fedtune.config import load_config

    base = [f'model.name="{model}"', "train.progress=false", "lora.dropout=0.0"]
    return load_config(None, base + list(sets))


def machine() -> dict:
    import flwr
    import opacus
    import peft
    import torch
    import transformers

    from fedtune.training.precision import cpu_has_native_bf16

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "opacus": opacus.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
    }


def write_json(name: str, size: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{size}.json"
    path.write_text(json.dumps({"benchmark": name, "size": size, "machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (also readable in a terminal)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text)) if text else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in text)])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def read_rounds(run_dir: Path) -> list[dict]:
    from fedtune.server.coordinator import read_records

    return read_records(Path(run_dir) / "metrics.jsonl")


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def federated_run(cfg, out_dir: Path) -> list[dict]:
    """One simulation on Flower's engine (Ray), one ClientApp per core; returns its rounds."""
    import shutil

    from fedtune.simulate import simulate

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark run always starts fresh
    ended = simulate(cfg, out_dir)
    if ended != "completed":
        raise RuntimeError(f"{out_dir}: the run {ended}")
    return read_rounds(out_dir)


def model_fp32_bytes(model: str) -> int:
    """The full base model's size in fp32: what sending the whole model would cost."""
    from fedtune.model import load_base_model, load_tokenizer

    cfg = config(model)
    net = load_base_model(cfg.model, load_tokenizer(cfg.model), {0: "a", 1: "b"}, "cpu", 0)
    return 4 * sum(p.numel() for p in net.parameters())
