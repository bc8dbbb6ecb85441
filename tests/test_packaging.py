"""fedtune as a site installs it: the wheel built from this tree, installed (not editable) into a
fresh virtual environment outside the checkout, run from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest

from fedtune import tiny

from simulations.benchmarks.loopback import Processes, free_port
from helpers import library_lines

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from (the rest of the checkout: tests, simulations, deploy, stays out).
SOURCES = ["pyproject.toml", "setup.py", "README.md", "fedtune", "server", "client"]
# Where each source folder's packages land in the wheel.
INSTALLED_AS = {"fedtune": "fedtune", "server": "fedtune/server", "client": "fedtune/client"}


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps` on a copy of the sources (setuptools writes build/ and *.egg-info
    next to the sources: keep them out of the checkout)."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        path = REPO / name
        if not path.exists():
            continue
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = dest.glob("fedtune-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def source_packages() -> set[str]:
    """Every folder with an __init__.py under fedtune/, server/ and client/, as its path in the wheel."""
    found = set()
    for folder, target in INSTALLED_AS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(REPO / folder)
            found.add(str(Path(target) / rel) if str(rel) != "." else target)
    return found


def test_the_wheel_holds_every_package_of_the_source_tree(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    expected = source_packages()
    assert {"fedtune/deployment", "fedtune/server", "fedtune/client"} <= expected
    assert expected - packages == set(), f"missing from {wheel.name}"
    # server/ and client/ only as fedtune.server / fedtune.client, never top-level.
    assert not [n for n in names if n.split("/")[0] in ("server", "client", "tests", "simulations")]
    for folder, target in INSTALLED_AS.items():  # every module, not only the __init__s
        for module in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in module.parts:
                assert f"{target}/{module.relative_to(REPO / folder)}" in names


def make_site_venv(root: Path, wheel: Path) -> Path:
    """A fresh venv (no system site-packages, no -e), the wheel installed with pip, every
    dependency pinned to the version this environment resolved (so pip takes the same torch
    build from its cache instead of a different one from the index)."""
    target = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    constraints = root / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in frozen.splitlines()
                                   if line and not line.startswith(("-e", "fedtune"))))
    python = target / "bin" / "python"
    # --no-compile: byte-compiling torch and the rest would double the install time.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-c", str(constraints), str(wheel)],
                   check=True, capture_output=True, text=True, env=_clean_env(root))
    return target


def _clean_env(root: Path) -> dict:
    """Nothing that would reach the checkout: no PYTHONPATH, no virtual env of the test runner."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1",
               FLWR_HOME=str(root / "flwr-home"), HOME=str(root / "home"))
    (root / "home").mkdir(exist_ok=True)
    return env


def _str(cmd: list) -> list[str]:
    return [str(c) for c in cmd]


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _subcommands(fedtune: Path, cwd: Path, env: dict) -> list[list[str]]:
    """Every command and sub-command, read from the installed CLI's own parser."""
    code = ("import argparse, json; from fedtune.cli import build_parser\n"
            "def walk(p, path):\n"
            "    out = [path]\n"
            "    for a in p._actions:\n"
            "        if isinstance(a, argparse._SubParsersAction):\n"
            "            for name, sp in a.choices.items(): out += walk(sp, path + [name])\n"
            "    return out\n"
            "print(json.dumps(walk(build_parser(), [])))")
    return json.loads(_run([fedtune.parent / "python", "-c", code], cwd, env))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 12 min on a 2-core machine shared at load 6-15 (install 4, simulation 2, deployment 4)
def test_the_installed_wheel_runs_a_simulation_and_a_tls_deployment(wheel, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("site-install")
    assert REPO not in root.parents
    started = time.monotonic()
    site_venv = make_site_venv(root, wheel)
    installed = time.monotonic() - started
    fedtune = site_venv / "bin" / "fedtune"
    work = root / "work"  # every command runs here, outside the checkout
    work.mkdir()
    env = _clean_env(root)

    where = _run([site_venv / "bin" / "python", "-c",
                  "import fedtune, fedtune.server.app, fedtune.client.app, fedtune.deployment.commands as d; "
                  "print(fedtune.__file__); print(d.__file__)"], work, env)
    for line in where.split():
        assert Path(line).is_relative_to(site_venv) and not Path(line).is_relative_to(REPO), where

    commands = _subcommands(fedtune, work, env)
    assert ["server"] in commands and ["client"] in commands and ["certs", "init"] in commands
    for cmd in commands:
        assert "usage: fedtune" in _run([fedtune, *cmd, "--help"], work, env)

    # One round of a simulation on the tiny model.
    data = root / "data"
    files = [tiny.write_csv(tiny.separable_rows(50, seed=10 + i), data / f"site-{i}.csv") for i in range(3)]
    held = tiny.write_csv(tiny.separable_rows(40, seed=99), data / "eval.csv")
    config = root / "sim.toml"
    config.write_text(f"""
[model]
name = "{tiny_models['bert']}"
max_length = 24
[lora]
r = 4
[data]
eval = "{held}"
[train]
batch_size = 16
[privacy]
target_epsilon = 8.0
[federation]
sites = 3
rounds = 1
partition = "files"
site_files = [{", ".join(f'"{f}"' for f in files)}]
site_test_fraction = 0.2
# SecAgg+ has its own tests (test_federation, test_deploy); here it would only add messages: in a
# deployment every message starts a fresh ClientApp process.
secure_aggregation = false
""")
    sim_started = time.monotonic()
    out = _run([fedtune, "simulate", "--config", config, "--out", work / "sim"], work, env, timeout=600)
    simulated = time.monotonic() - sim_started
    assert (work / "sim" / "final" / "adapter" / "adapter_config.json").is_file(), out
    # The console a person reads: header, a line per round, the summary; the libraries' lines
    # and warnings (Flower, Ray, alembic, transformers) only in the run's logs/.
    assert "fedtune simulate: " in out and "3 sites, 1 rounds" in out, out
    assert "round 0/1  acc " in out and "round 1/1  acc " in out and " eps " in out, out
    assert "fedtune simulate -> " in out and "best round:" in out, out
    assert library_lines(out) == [], library_lines(out)
    logs = work / "sim" / "logs"
    assert "run_simulation" in (logs / "simulate.log").read_text()  # Flower's deprecation notice, kept there
    assert (logs / "sites.log").is_file()
    assert list((work / "sim" / "tensorboard").glob("events.out.tfevents.*"))  # the live view's files
    assert "report.html" in _run([fedtune, "report", work / "sim"], work, env)

    # One round of a deployment over TLS: certificates, a coordinator, two site agents.
    dep_started = time.monotonic()
    certs = work / "certs"
    _run([fedtune, "certs", "init", "--dir", certs, "--site", "site-a", "--site", "site-b"], work, env)
    run_config = root / "deploy.toml"
    run_config.write_text(config.read_text().replace("sites = 3", "sites = 2")
                          .replace('partition = "files"\n', "").split("site_files")[0]
                          + "site_test_fraction = 0.2\nsecure_aggregation = false\n")
    procs = Processes(env, root, cwd=work)
    try:
        port = free_port()
        server = procs.start("server", _str([fedtune, "server", "--certs", certs, "--port", port,
                                        "--state-dir", work / "coordinator", "--config", run_config,
                                        "--out", work / "deployed"]))
        deadline = time.monotonic() + 120
        while "site site-b: registered" not in procs.log(server):
            assert server.poll() is None and time.monotonic() < deadline, procs.log(server)[-3000:]
            time.sleep(0.5)
        for i, site in enumerate(["site-a", "site-b"]):
            procs.start(site, _str([fedtune, "client", "--superlink", f"127.0.0.1:{port}", "--ca", certs / "ca.crt",
                               "--key", certs / "sites" / f"{site}.key", "--data", files[i], "--labels", "neg,pos",
                               "--state-dir", work / "state" / site, "--runtime-port", free_port(),
                                    "--allow-plain-updates"]))
        assert procs.wait(server, 600) == 0, procs.log(server)[-5000:]
    finally:
        left = procs.stop_all()
    assert not left, f"processes left running: {left}"
    deployed = time.monotonic() - dep_started
    assert (work / "deployed" / "final" / "adapter" / "adapter_config.json").is_file()
    for site in ("site-a", "site-b"):
        assert (work / "state" / site / "privacy-ledger.jsonl").read_text().strip()
    print(f"\ninstalled wheel: venv + install {installed:.0f} s, 1-round simulation {simulated:.0f} s, "
          f"1-round TLS deployment {deployed:.0f} s, total {time.monotonic() - started:.0f} s")
