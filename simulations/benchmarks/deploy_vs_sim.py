"""Deployed against simulated, the same run measured one after the other on this machine:

1. ``fedtune simulate`` (Flower's simulation engine) on 3 sites of one data file;
2. ``fedtune split-data`` writes the simulation's own split, one file per site;
3. a real deployment on 127.0.0.1: ``fedtune server`` (SuperLink, TLS, site authentication) and
   one ``fedtune client`` per site file (SuperNode + the site's long-lived worker).

Both with DP-SGD at epsilon 8 and SecAgg+ (the deployed defaults), batch 32, 1 local epoch. The
steady round is the mean of rounds 2..R (round 1 builds each site). Reports each side's round
and stage seconds (the coordinator's ``metrics.jsonl``), the ratio deployed / simulated, the
longest SecAgg+ protocol exchange (setup, key sharing, unmasking) deployed, and how often each
deployed site built its model for the run (from its log; 1 = once per run).

    python -m simulations.benchmarks.deploy_vs_sim [--size tiny|default|full]

``tiny``: the tiny random BERT, 2 rounds (a check that it runs); ``default``: the bundled
all-MiniLM-L6-v2, 150 rows per site (120 training), 3 rounds; ``full``: 4 rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from simulations.benchmarks.common import RESULTS, log, main_for, table, write_json
from simulations.benchmarks.loopback import Processes, fedtune_cmd, free_port

SITES = 3
ROUNDS = {"tiny": 2, "default": 3, "full": 4}
ROWS_PER_SITE = {"tiny": 60, "default": 150, "full": 150}
PROTOCOL = ("setup", "key sharing", "unmasking")   # SecAgg+ exchanges without training


def _config(path: Path, model: str, max_length: int, train: Path, held: Path, rounds: int) -> Path:
    text = (f'[model]\nname = "{model}"\nmax_length = {max_length}\n'
            f'[data]\ntrain = "{train}"\neval = "{held}"\n'
            '[train]\nbatch_size = 32\nepochs = 1\nlearning_rate = 0.002\n'
            '[privacy]\ntarget_epsilon = 8.0\n'
            f'[federation]\nsites = {SITES}\nrounds = {rounds}\nsecure_aggregation = true\nsite_test_fraction = 0.2\n'
            'partition = "iid"\n')
    path.write_text(text)
    return path


def _records(out: Path) -> list[dict]:
    from fedtune.server.coordinator import read_records

    return [r for r in read_records(out / "metrics.jsonl") if r["round"] > 0]


def _steady(records: list[dict]) -> dict:
    steady = records[1:] or records
    stages = {s: statistics.mean(r["stage_seconds"].get(s, 0.0) for r in steady) for s in steady[0]["stage_seconds"]}
    return {"round_seconds": [r["seconds"] for r in records], "steady_round_s": statistics.mean(r["seconds"] for r in steady),
            "stage_seconds": stages}


def simulated(config: Path, out: Path, env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(fedtune_cmd("simulate", "--config", config, "--out", out), env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fedtune simulate exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return {**_steady(_records(out)), "wall_s": time.perf_counter() - started}


def deployed(config: Path, parts: Path, work: Path) -> dict:
    from fedtune.client.runtime import BUILT
    from fedtune.deployment.certs import init_certs
    from fedtune.deployment.flower import flower_env

    names = [f"site-{i}" for i in range(SITES)]
    certs = init_certs(work / "certs", ["localhost", "127.0.0.1"], names)
    procs = Processes(flower_env(work / "flwr-home"), work)
    out, started = work / "run", time.perf_counter()
    try:
        port = free_port()
        server = procs.start("server", fedtune_cmd("server", "--certs", certs.root, "--port", port, "--state-dir",
                                                   work / "coordinator", "--config", config, "--out", out))
        deadline = time.monotonic() + 180
        while f"site {names[-1]}: registered" not in procs.log(server):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not register the sites:\n{procs.log(server)[-3000:]}")
            time.sleep(0.5)
        for i, s in enumerate(names):
            procs.start(s, fedtune_cmd("client", "--superlink", f"127.0.0.1:{port}", "--ca", certs.ca_cert, "--key",
                                       certs.site_key(s), "--data", parts / f"{s}.csv", "--labels", "neg,pos", "--state-dir",
                                       work / "state" / s, "--runtime-port", free_port()))
        rc = procs.wait(server, 3600)
    finally:
        left = procs.stop_all()
    if rc != 0 or left:
        raise RuntimeError(f"the deployment exited with {rc} (processes left: {left}):\n{procs.log(server)[-3000:]}")
    records = _records(out)
    failed = [r["round"] for r in records if r["failed"] or len(r["sites"]) != SITES]
    if failed:
        raise RuntimeError(f"deployed rounds {failed} failed or missed a site (see {out / 'metrics.jsonl'})")
    builds = {s: (work / "state" / s / "logs" / "supernode.log").read_text(errors="replace").count(BUILT)
              for s in names}
    return {**_steady(records), "wall_s": time.perf_counter() - started, "model_builds": builds}


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    from fedtune import tiny
    from fedtune.deployment.flower import flower_env
    from fedtune.model import BUNDLED_MODEL

    rounds = ROUNDS[size]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, max_length = (str(tiny.make_tiny_bert(work / "tiny-bert")), 24) if size == "tiny" else (BUNDLED_MODEL, 64)
        train = tiny.write_csv(tiny.separable_rows(SITES * ROWS_PER_SITE[size], seed=5), work / "train.csv")
        held = tiny.write_csv(tiny.separable_rows(100, seed=99), work / "eval.csv")
        config = _config(work / "run.toml", model, max_length, train, held, rounds)
        env = flower_env(work / "flwr-home")
        log(f"deploy_vs_sim: simulating {SITES} sites, {rounds} rounds ({'tiny model' if size == 'tiny' else model})")
        sim = simulated(config, work / "sim", env)
        subprocess.run(fedtune_cmd("split-data", "--config", config, "--out", work / "parts"), env=env, check=True,
                       capture_output=True)
        log(f"deploy_vs_sim: deploying the same run on 127.0.0.1 (TLS, {SITES} site agents)")
        dep = deployed(config, work / "parts", work / "deployed")
    stages = list(dict.fromkeys([*sim["stage_seconds"], *dep["stage_seconds"]]))
    ratio = dep["steady_round_s"] / sim["steady_round_s"]
    exchange = max(dep["stage_seconds"].get(s, 0.0) for s in PROTOCOL)
    rows = [["simulated", sim["steady_round_s"], *(sim["stage_seconds"].get(s) for s in stages)],
            ["deployed", dep["steady_round_s"], *(dep["stage_seconds"].get(s) for s in stages)]]
    text = table(["", "steady round s", *stages], rows)
    print(f"\nDeployed vs simulated ({SITES} sites, DP-SGD epsilon 8, SecAgg+, {rounds} rounds, "
          f"{'tiny model' if size == 'tiny' else 'bundled MiniLM'}; steady = rounds 2..{rounds})\n{text}\n"
          f"deployed / simulated steady round: {ratio:.2f}x; longest SecAgg+ protocol exchange deployed: "
          f"{exchange:.2f} s; model builds per deployed site: {dep['model_builds']}")
    payload = {"sites": SITES, "rounds": rounds, "rows_per_site": ROWS_PER_SITE[size], "simulated": sim,
               "deployed": dep, "ratio_steady_round": ratio, "longest_protocol_exchange_s": exchange, "table": text}
    write_json("deploy_vs_sim", size, payload, Path(out_dir) if out_dir is not None else RESULTS)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
