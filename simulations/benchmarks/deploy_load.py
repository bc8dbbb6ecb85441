"""Deployed load: a real deployment on 127.0.0.1 with 2 to 16 sites. `fedtune server` (a Flower
SuperLink with TLS and site authentication) and one `fedtune client` site agent (a Flower
SuperNode) per site, each its own process tree, with DP-SGD and SecAgg+ on as deployed by
default. The model is the tiny random BERT on purpose: what is measured is the federation's own
cost (SecAgg+ stages, messages, each site's SuperNode and long-lived worker, every site on the same
cores), not training. Per site count: the mean round wall time (the coordinator's metrics.jsonl),
its stages, the peak memory of every process together and of each site agent's process tree (its
agent, SuperNode and worker: what a site's own machine must hold for this model), and the ratio to
the 2-site round.

    python -m simulations.benchmarks.deploy_load [--size tiny|default|full]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from simulations.benchmarks.common import RESULTS, log, main_for, table, write_json
from simulations.benchmarks.loopback import Processes, fedtune_cmd, free_port, tiny_run_config
from simulations.benchmarks.memory import PeakMemory

SITES = {"tiny": [2], "default": [2, 4, 8], "full": [2, 8, 16]}
ROUNDS = {"tiny": 1, "default": 2, "full": 2}
ROWS = 60            # rows per site (a fifth held out as its local test split)
# The coordinator's stages of a SecAgg+ round, in order (server/coordinator.py, stage_seconds).
STAGES = ["setup", "key sharing", "training", "unmasking", "central evaluation", "federated evaluation"]


def _wait_for_text(procs: Processes, proc, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in procs.log(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not seen in the coordinator's output:\n{procs.log(proc)[-3000:]}")
        time.sleep(0.5)


def deploy(model: Path, sites: int, rounds: int, work: Path) -> dict:
    """One run of ``rounds`` rounds with ``sites`` site agents on 127.0.0.1; every process it
    started is stopped before it returns or raises."""
    from fedtune import tiny
    from fedtune.deployment.certs import init_certs
    from fedtune.deployment.flower import flower_env
    from fedtune.server.coordinator import read_records

    work.mkdir(parents=True)
    names = [f"site-{i}" for i in range(sites)]
    certs = init_certs(work / "certs", ["localhost", "127.0.0.1"], names)
    data = {s: tiny.write_csv(tiny.separable_rows(ROWS, seed=10 + i), work / f"{s}.csv") for i, s in enumerate(names)}
    held = tiny.write_csv(tiny.separable_rows(60, seed=99), work / "eval.csv")
    config = tiny_run_config(work / "run.toml", model, held,  # deployed defaults: SecAgg+, every deadline
                             federation={"sites": sites, "rounds": rounds, "secure_aggregation": True})
    out = work / "run"
    procs = Processes(flower_env(work / "flwr-home"), work)
    started = time.perf_counter()
    try:
        with PeakMemory(interval_s=1.0) as memory:
            port = free_port()
            server = procs.start("server", fedtune_cmd(
                "server", "--certs", certs.root, "--port", port, "--state-dir", work / "coordinator",
                "--config", config, "--out", out))
            for s in names:  # registered in the coordinator's order (site-10 before site-2): wait for each
                _wait_for_text(procs, server, f"site {s}: registered", 120)
            memory.track("coordinator", server.pid)
            for s in names:
                agent = procs.start(s, fedtune_cmd(
                    "client", "--superlink", f"127.0.0.1:{port}", "--ca", certs.ca_cert, "--key", certs.site_key(s),
                    "--data", data[s], "--labels", "neg,pos", "--state-dir", work / "state" / s,
                    "--runtime-port", free_port()))
                memory.track(s, agent.pid)
            # Generous: 8 sites on 2 shared cores take minutes a round.
            rc = procs.wait(server, 600 + 240 * sites * rounds)
        wall = time.perf_counter() - started
    finally:
        left = procs.stop_all()
    if left:
        raise RuntimeError(f"{sites} sites: processes left running after the stop: {left}")
    if rc != 0:
        raise RuntimeError(f"{sites} sites: `fedtune server` exited with {rc}:\n{procs.log(server)[-3000:]}")
    records = [r for r in read_records(out / "metrics.jsonl") if r["round"] > 0]
    failed = [r["round"] for r in records if r["failed"] or set(r["sites"]) != set(names)]
    if len(records) != rounds or failed:
        raise RuntimeError(f"{sites} sites: rounds {failed} failed or missed a site (see {out / 'metrics.jsonl'})")
    per_site = [memory.peaks[s] for s in names]
    return {"records": records, "run_wall_s": wall, "peak_rss_bytes": memory.peak,
            "coordinator_peak_rss_bytes": memory.peaks["coordinator"],
            "site_peak_rss_bytes": {"max": max(per_site), "mean": statistics.mean(per_site)}}


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    from fedtune import tiny

    from simulations.benchmarks.plots import plot_round_time_vs_sites

    rounds, results = ROUNDS[size], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = tiny.make_tiny_bert(work / "tiny-bert")
        for n in SITES[size]:
            log(f"deploy_load: {n} sites on 127.0.0.1, {rounds} round(s)")
            got = deploy(model, n, rounds, work / f"sites-{n}")
            seconds = [r["seconds"] for r in got["records"]]
            # As the coordinator recorded them (names and order), averaged over the rounds.
            stages = {s: statistics.mean(r["stage_seconds"].get(s, 0.0) for r in got["records"])
                      for s in got["records"][0]["stage_seconds"]}
            results.append({"sites": n, "rounds": rounds, "round_seconds": seconds,
                            "seconds_per_round": statistics.mean(seconds), "stage_seconds": stages,
                            "run_wall_s": got["run_wall_s"], "peak_rss_bytes": got["peak_rss_bytes"],
                            "site_peak_rss_bytes": got["site_peak_rss_bytes"],
                            "coordinator_peak_rss_bytes": got["coordinator_peak_rss_bytes"],
                            "bytes_up_per_site": statistics.mean(b for r in got["records"] for b in r["bytes_up"].values()),
                            "load_average_1m_after": os.getloadavg()[0]})
            log(f"deploy_load: {n} sites: {statistics.mean(seconds):.1f} s per round")
    base = next(r["seconds_per_round"] for r in results if r["sites"] == min(SITES[size]))
    for r in results:
        r["ratio_vs_fewest"] = r["seconds_per_round"] / base
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_round_time_vs_sites(results, STAGES, out_dir / f"deploy_load-{size}.png").name
    headers = ["sites", "s/round", f"x {min(SITES[size])} sites", *STAGES, "run wall s (incl. start-up)",
               "peak RSS GiB (all)", "per site MiB (max)", "coordinator MiB", "load 1m after"]
    rows = [[r["sites"], r["seconds_per_round"], r["ratio_vs_fewest"], *(r["stage_seconds"].get(s) for s in STAGES),
             r["run_wall_s"], r["peak_rss_bytes"] / 2**30, r["site_peak_rss_bytes"]["max"] / 2**20,
             r["coordinator_peak_rss_bytes"] / 2**20, r["load_average_1m_after"]] for r in results]
    text = table(headers, rows)
    print(f"\nDeployed load (127.0.0.1, TLS, DP-SGD, SecAgg+, tiny model, {rounds} round(s); stage means in s)\n"
          f"{text}\nplot: {plot}")
    payload = {"rounds": rounds, "rows_per_site": ROWS, "stages": STAGES, "results": results, "plots": [plot],
               "table": text}
    write_json("deploy_load", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
