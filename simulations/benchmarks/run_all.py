"""Every benchmark, one after another (never two Ray simulations at once), then a summary of all
their tables in simulations/results/summary-<size>.md.

    python -m simulations.benchmarks.run_all           # default size: the other benchmarks ~15 min, deploy_load ~35 min (loaded machine); utility 2 h 20 min, ablation 45 min and small_sites about 40 min on 2 CPU cores
    python -m simulations.benchmarks.run_all --full    # the whole grid, more rows (hours on a CPU)
    python -m simulations.benchmarks.run_all --tiny    # tiny random model, a few steps: what CI runs
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `simulations.benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from simulations.benchmarks import (  # noqa: E402
    ablation, audit, deploy_load, deploy_vs_sim, scale, secagg_cost, secagg_shares, small_sites, step_time, traffic,
    utility)
from simulations.benchmarks.common import RESULTS, log, machine, quiet_console  # noqa: E402

BENCHMARKS = {"step_time": step_time, "traffic": traffic, "secagg_cost": secagg_cost, "secagg_shares": secagg_shares,
              "scale": scale,
              "deploy_load": deploy_load, "deploy_vs_sim": deploy_vs_sim, "utility": utility, "ablation": ablation,
              "audit": audit, "small_sites": small_sites}


def run_all(size: str, out_dir: Path | None = None, only: list[str] | None = None) -> Path:
    """Runs the benchmarks in order; one that fails is reported in the summary and the rest still
    run. Returns the summary's path; raises at the end if any failed."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, failed, started = [], [], time.perf_counter()
    for name, module in BENCHMARKS.items():
        if only and name not in only:
            continue
        log(f"== {name} ({size})")
        t0 = time.perf_counter()
        try:
            body = module.run(size, out_dir)["table"]
        except Exception:  # keep going: one broken benchmark should not cost the others' 30 minutes
            failed.append(name)
            body = "FAILED:\n\n```\n" + traceback.format_exc() + "```"
            log(f"{name} failed:\n{traceback.format_exc()}")
        sections.append(f"## {name}\n\n{body}\n\n({time.perf_counter() - t0:.0f} s)\n")
    info = machine()
    head = (f"# Benchmark summary ({size})\n\n`python -m simulations.benchmarks.run_all --size {size}` on "
            f"{info['date']}: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, flwr {info['flwr']}, "
            f"opacus {info['opacus']}, peft {info['peft']}, transformers {info['transformers']}. "
            f"Total {time.perf_counter() - started:.0f} s.\n")
    path = out_dir / f"summary-{size}.md"
    path.write_text(head + "\n" + "\n".join(sections))
    log(f"summary: {path}")
    if failed:
        raise RuntimeError(f"benchmarks failed: {', '.join(failed)} (see {path})")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the whole grid, more rows")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="tiny model, a few steps")
    size.add_argument("--size", choices=["tiny", "default", "full"])
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only these (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    quiet_console()
    run_all(args.size or "default", args.out, args.only)


if __name__ == "__main__":
    main()
