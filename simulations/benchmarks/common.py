"""What every benchmark shares: sizes, the model, configs, machine facts, tables, JSON, and the
one-Ray-at-a-time guard."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

# Offline model resolution and a quiet Flower, also when a script is run on its own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SIZES = ("tiny", "default", "full")
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "simulations" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"   # ../shared/data beside the checkout; never copied in
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def skipped_without_shared_data(benchmark: str) -> dict | None:
    """The benchmark's result when ../shared/data (real SST-2 / AG News) is absent: skipped, saying why."""
    if SHARED_DATA.is_dir():
        return None
    reason = f"{SHARED_DATA} is absent (real SST-2 / AG News data, see its README): {benchmark} skipped"
    log(reason)
    return {"skipped": reason, "table": reason}


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
    """A FedTuneConfig from the defaults plus ``key=value`` overrides (as ``--set`` takes them)."""
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
        "cpu": cpu, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine shows here; the interleaved ratios are meant to survive it.
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "opacus": opacus.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
    }


def write_json(name: str, size: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{size}.json"
    path.write_text(json.dumps({"benchmark": name, "size": size, "machine": machine(), **payload}, indent=2) + "\n")
    log(f"{name}: wrote {path}")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (also readable in a terminal)."""
    def cell(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in text)])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _foreign_ray() -> list[int]:
    """Ray clusters that this process did not start (another test run or benchmark)."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] not in mine and ("raylet" in (proc.info["name"] or "") or "gcs_server" in cmd):
                found.append(proc.info["pid"])
        except psutil.Error:
            pass
    return found


def wait_for_ray_to_be_free(timeout_s: float = 900, poll_s: float = 5) -> None:
    # Two Ray clusters at once on this machine abort with SIGABRT: wait for any other to end.
    waited = 0.0
    while (pids := _foreign_ray()) and waited < timeout_s:
        if waited == 0:
            log(f"another Ray cluster is running (pids {pids}); waiting for it to finish")
        time.sleep(poll_s)
        waited += poll_s


def federated_run(cfg, out_dir: Path) -> list[dict]:
    """One simulation on Flower's engine (Ray), one ClientApp per core; returns its metrics records."""
    from fedtune.run_logs import route_logs
    from fedtune.server.coordinator import read_records
    from fedtune.simulate import simulate

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark run always starts fresh
    if _QUIET["on"]:  # Flower's and Ray's lines go to the run's logs/ (as for `fedtune simulate`)
        route_logs(out_dir / "logs", "simulate", False)
    wait_for_ray_to_be_free()
    ended = simulate(cfg, out_dir)
    if ended != "completed":
        raise RuntimeError(f"{out_dir}: the run {ended}")
    return read_records(out_dir / "metrics.jsonl")


def model_fp32_bytes(model: str) -> int:
    """The full base model (with a 2-label head) in fp32: what sending the whole model would cost."""
    from fedtune.model import load_base_model, load_tokenizer

    cfg = config(model)
    net = load_base_model(cfg.model, load_tokenizer(cfg.model), {0: "a", 1: "b"}, "cpu", 0)
    return 4 * sum(p.numel() for p in net.parameters())


_QUIET = {"on": False}


def quiet_console() -> None:
    """From the command line: library lines and warnings go to each federated run's logs/
    folder, the console keeps the benchmark's own lines (tests calling run() are left alone)."""
    from fedtune.run_logs import setup_console

    setup_console(False)
    _QUIET["on"] = True


def main_for(run: Callable, doc: str, argv=None) -> None:
    """The command line every benchmark script shares."""
    quiet_console()
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)
