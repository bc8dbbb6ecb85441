"""Every benchmark, one after another (never two Ray simulations at once), then a summary with
all their tables: simulations/results/summary-<size>.md.

    python -m simulations.bench.run_all            # default size: about 30 minutes on 2 CPU cores
    python -m simulations.bench.run_all --full     # the whole grid, bigger data (hours on a CPU)
    python -m simulations.bench.run_all --tiny     # tiny model, a few steps: what CI runs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import scale, secagg_cost, step_time, traffic, utility
from .common import RESULTS, log, machine

BENCHMARKS = {"step_time": step_time, "traffic": traffic, "secagg_cost": secagg_cost, "scale": scale,
              "utility": utility}


def run_all(size: str, out_dir: Path | None = None, only: list[str] | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    sections, started = [], time.perf_counter()
    for name, module in BENCHMARKS.items():
        if only and name not in only:
            continue
        log(f"== {name} ({size})")
        t0 = time.perf_counter()
        payload = module.run(size, out_dir)
        sections.append(f"## {name}\n\n{payload['table']}\n\n({time.perf_counter() - t0:.0f} s)\n")
    info = machine()
    head = (f"# Benchmark summary ({size})\n\n`python -m simulations.bench.run_all --size {size}` on {info['date']}: "
            f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, flwr {info['flwr']}, opacus "
            f"{info['opacus']}, peft {info['peft']}, transformers {info['transformers']}. "
            f"Total {time.perf_counter() - started:.0f} s.\n")
    path = out_dir / f"summary-{size}.md"
    path.write_text(head + "\n" + "\n".join(sections))
    log(f"summary: {path}")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the whole grid")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="tiny model, a few steps")
    size.add_argument("--size", choices=["tiny", "default", "full"])
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only these (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run_all(args.size or "default", args.out, args.only)


if __name__ == "__main__":
    main()
