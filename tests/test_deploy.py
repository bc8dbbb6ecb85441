"""A real deployment on 127.0.0.1: `fedtune server` (a Flower SuperLink with TLS and SuperNode
authentication) and `fedtune client` site agents (Flower SuperNodes), each its own process."""

import json
import os
import re
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune import tiny
from fedtune.client.runtime import BUILT
from fedtune.deployment.certs import CertPaths, create_server_cert, create_site_key, init_certs
from fedtune.deployment.flower import check_tls, flower_bin, flower_env, superlink_command, wait_for_port

from simulations.benchmarks.loopback import Processes, fedtune_cmd, free_port, tiny_run_config
from helpers import library_lines

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_models):
    """Certificates for 127.0.0.1 with two registered sites and one unregistered key, two site
    data files (site-b: about 1,120 training rows, above Flower's default SecAgg+ max_weight of 1000),
    the coordinator's evaluation file and a newcomer's 2-round run config: only the model, the
    evaluation file and the federation's size, so batch size ("auto"), learning rate ("auto"),
    privacy (DP at epsilon 8), SecAgg+ and the strategy are fedtune's defaults, as the README
    recommends."""
    root = tmp_path_factory.mktemp("deploy")
    certs = init_certs(root / "certs", ["localhost", "127.0.0.1"], ["site-a", "site-b"])
    rogue = root / "rogue"
    create_site_key(CertPaths(rogue), "rogue")  # kept out of certs/sites: never registered
    data = {s: tiny.write_csv(tiny.separable_rows(n, seed=10 + i), root / f"{s}.csv")
            for i, (s, n) in enumerate([("site-a", 60), ("site-b", 1400)])}
    held = tiny.write_csv(tiny.separable_rows(60, seed=99), root / "eval.csv")
    config = root / "run.toml"
    config.write_text(f"""
[model]
name = "{tiny_models['bert']}"
max_length = 24
[data]
eval = "{held}"
[federation]
sites = 2
rounds = 2
""")
    # The same run from a hostile coordinator: a noise multiplier of 0.05 (epsilon in the
    # thousands). Each site must refuse it or stay within its own budget.
    hostile = root / "hostile.toml"
    hostile.write_text(config.read_text().replace("rounds = 2", "rounds = 1") + "[privacy]\nnoise_multiplier = 0.05\n")
    return {"root": root, "certs": certs, "rogue": CertPaths(rogue).site_key("rogue"), "data": data, "config": config,
            "hostile": hostile}


@pytest.fixture
def procs(tmp_path):
    env = flower_env(tmp_path / "flwr-home")
    p = Processes(env, tmp_path)
    yield p
    left = p.stop_all()
    assert not left, f"processes left running: {left}"


def _client(fed, site, port, runtime_port, *extra):
    return fedtune_cmd("client", "--superlink", f"127.0.0.1:{port}", "--ca", fed["certs"].ca_cert,
                       "--key", fed["certs"].site_key(site), "--data", fed["data"][site], "--labels", "neg,pos",
                       "--state-dir", fed["root"] / "state" / site, "--runtime-port", runtime_port, *extra)


def _flower_log(state: Path) -> str:
    """What the site agent's SuperNode logged (to the state folder, not the console)."""
    path = state / "logs" / "supernode.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def _wait_for(procs, proc, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in procs.log(proc):
            return
        assert proc.poll() is None, procs.log(proc)[-3000:]
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not seen:\n{procs.log(proc)[-3000:]}")


def _ledger_epsilon(state: Path, delta: float = 1e-5, part: str = "file") -> float:
    """Recomputed from the site's own ledger file with the accountant (not what the site reported):
    its training entries, its evaluation answers, or the file (the larger of the two: the keyed-hash
    split keeps test and training rows apart, so they compose in parallel)."""
    from fedtune.privacy.accounting import compute_epsilon
    from fedtune.privacy.ledger import PrivacyLedger

    entries = PrivacyLedger(state / "privacy-ledger.jsonl").entries()  # the chain verifies
    eps = {kind: compute_epsilon([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries
                                  if (e.kind == "evaluate") == (kind == "evaluation")], delta, entries[0].accountant)
           for kind in ("training", "evaluation")}
    return max(eps.values()) if part == "file" else eps[part]


def _training_rows(data: Path, state: Path) -> int:
    """The rows a site trains on: its file less its local test split (0.2 by keyed hash with its key)."""
    import pandas as pd

    from fedtune.client.secret import site_key
    from fedtune.data.membership import split_rows

    rows = pd.read_csv(data, dtype=str)
    return len(split_rows(rows, ["text", "label"], 0.2, site_key(state))[0])


def _wait_for_file(procs, proc, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, procs.log(proc)[-5000:]
        time.sleep(1)


# -- a hostile coordinator's own code ---------------------------------------------------------------

HOSTILE_SERVER = """
import json, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context) -> None:
    deadline, nodes = time.monotonic() + 60, []
    while len(nodes) < 2 and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    asked = [Message(RecordDict({"ask": ConfigRecord({"what": "first row"})}), dst_node_id=n, message_type="query")
             for n in nodes]
    replies = [{"error": r.error.reason} if r.has_error() else {"row": r.content.config_records["row"]["row"]}
               for r in grid.send_and_receive(asked, timeout=120)]
    with open(context.run_config["out"], "w") as fh:
        json.dump({"nodes": len(nodes), "replies": replies}, fh)
"""

# Whoever imports it leaves a marker naming its program: the coordinator's own `flwr run` and
# flwr-serverapp may (the coordinator runs its own code); a site's flwr-clientapp must not.
MARK = """import os, sys
open({marker!r} + "-" + str(os.getpid()), "w").write(sys.argv[0])
"""

# At a site: returns the site's first data row.
HOSTILE_CLIENT = MARK + """
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def steal(msg, context):
    first = open(context.node_config["data-path"]).read().splitlines()[1]
    return Message(RecordDict({{"row": ConfigRecord({{"row": first}})}}), reply_to=msg)
"""


def _ran_at_a_site(marker: Path) -> list[str]:
    """The programs at a site that imported the hostile code (Flower's per-message flwr-clientapp)."""
    programs = [m.read_text() for m in marker.parent.glob(marker.name + "-*")]
    return [p for p in programs if Path(p).name in ("flwr-clientapp", "flower-superexec", "flower-supernode")]


def _hostile_app(folder: Path, marker: Path, own_fedtune: bool) -> Path:
    """(a) a Flower App whose ClientApp reads the file named by data-path; (b) one whose
    manifest names fedtune.client.app:app and ships its own fedtune/ package."""
    import tomli_w

    from fedtune.deployment.flower import app_manifest

    folder.mkdir(parents=True)
    manifest = app_manifest()
    manifest["tool"]["flwr"]["app"]["components"]["serverapp"] = "hostile_server:app"
    if own_fedtune:
        (folder / "fedtune" / "client").mkdir(parents=True)
        (folder / "fedtune" / "__init__.py").write_text(MARK.format(marker=str(marker)))
        (folder / "fedtune" / "client" / "__init__.py").write_text("")
        (folder / "fedtune" / "client" / "app.py").write_text(HOSTILE_CLIENT.format(marker=str(marker)))
    else:
        manifest["tool"]["flwr"]["app"]["components"]["clientapp"] = "hostile_client:app"
        (folder / "hostile_client.py").write_text(HOSTILE_CLIENT.format(marker=str(marker)))
    (folder / "hostile_server.py").write_text(HOSTILE_SERVER)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(manifest))
    return folder


def test_two_sites_refuse_a_coordinators_own_code_then_run_a_dp_secagg_federation_over_tls(federation, procs,
                                                                                             tmp_path):
    """Two sites started with `fedtune client`; the coordinator first submits its own code with
    `flwr run`: (a) a bundle whose ClientApp returns the site's first data row, (b) a bundle
    naming fedtune.client.app:app that ships its own fedtune/ package. Neither runs at a site (no
    marker from a site process, no row), each site refuses every message of those runs. Then
    fedtune's own run on a newcomer's config trains at both sites, every round, and a hostile
    config (noise 0.05) is refused. site-a was started with --target-epsilon 2: its own budget,
    not the run's 8, binds."""
    from fedtune.client.approval import run_decisions

    fed, port = federation, free_port()
    out = tmp_path / "run"
    coordinator_state = tmp_path / "coordinator"
    server = procs.start("server", fedtune_cmd(
        "server", "--certs", fed["certs"].root, "--port", port, "--state-dir", coordinator_state))
    _wait_for(procs, server, "waiting for runs", 60)
    sites = {site: procs.start(site, _client(fed, site, port, free_port(),
                                             *(["--target-epsilon", "2"] if site == "site-a" else [])))
             for site in ("site-a", "site-b")}
    state = {site: fed["root"] / "state" / site for site in ("site-a", "site-b")}
    first_rows = [fed["data"][site].read_text().splitlines()[1] for site in state]
    for name, own_fedtune in (("a", False), ("b", True)):
        marker = tmp_path / f"marker-{name}"
        app = _hostile_app(tmp_path / f"hostile-{name}", marker, own_fedtune)
        answers = tmp_path / f"answers-{name}.json"
        run = procs.start(f"flwr-run-{name}", [flower_bin("flwr"), "run", str(app), "fedtune", "--run-config",
                                               f'out="{answers}"', "--stream"])
        assert procs.wait(run, 300) == 0, procs.log(run)[-3000:]
        got = json.loads(answers.read_text())
        assert got["nodes"] == 2 and sorted(r.get("error", f"answered {r}") for r in got["replies"]) == [
            "site-a: refused (site policy)", "site-b: refused (site policy)"], got
        assert _ran_at_a_site(marker) == []  # the hostile code never ran at a site, not even its import
        assert not any(row in answers.read_text() + procs.log(run) for row in first_rows)
    for site, folder in state.items():
        refused = [d for d in run_decisions(folder) if not d.accepted]
        assert len(refused) == 2 and len({d.bundle for d in refused}) == 2, refused
        assert "refused run" in (folder / "site.log").read_text()
        assert sites[site].poll() is None, procs.log(sites[site])[-3000:]

    # fedtune's own run, on the same coordinator and sites, submitted as an operator would.
    started = time.monotonic()
    submit = procs.start("submit", fedtune_cmd("submit", "--config", fed["config"], "--out", out,
                                               "--state-dir", coordinator_state))
    assert procs.wait(submit, 900) == 0, procs.log(submit)[-3000:]
    print(f"\ndeployment: 2 sites, 2 rounds, wall time {time.monotonic() - started:.1f} s")
    assert "DP-SGD required; epsilon at most 2 per run; lifetime cap 10" in procs.log(sites["site-a"])
    for folder in state.values():
        assert [d.accepted for d in run_decisions(folder)] == [False, False, True]
        # One long-lived worker per site: the base model was loaded once for the whole run.
        assert _flower_log(folder).count(BUILT) == 1, _flower_log(folder)[-3000:]

    # The coordinator's console: header, one line per round, the summary; Flower's lines in logs/.
    console = procs.log(submit)
    assert "fedtune server: " in console and "2 sites, 2 rounds" in console
    for rnd in (0, 1, 2):
        assert f"round {rnd}/2  acc " in console, console
    assert "fedtune run -> " in console and "best round:" in console
    assert library_lines(console) == [], library_lines(console)
    assert "Secure aggregation commencing" in (out / "logs" / "serverapp.log").read_text()
    assert (coordinator_state / "logs" / "superlink.log").is_file()
    assert library_lines(procs.log(server)) == [], library_lines(procs.log(server))
    for site in ("site-a", "site-b"):  # each site's console: what it spent and sent, per round
        _wait_for(procs, sites[site], f"{site} round 2: trained ", 30)
        site_console = procs.log(sites[site])
        assert f"{site} round 1: trained " in site_console and " MB" in site_console, site_console
        assert library_lines(site_console) == [], library_lines(site_console)
        assert _flower_log(fed["root"] / "state" / site).strip()  # Flower's own lines: in the state folder

    assert json.loads((out / "run.json").read_text())["ended"] == "completed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert set(r["bytes_up"]) == {"site-a", "site-b"} and all(v > 0 for v in r["bytes_up"].values())
        assert not r["failed"]
        assert set(r["sites"]) == {"site-a", "site-b"}  # every site trained every round
        assert r["sites"]["site-b"]["examples"] == _training_rows(fed["data"]["site-b"], state["site-b"])
        assert r["secagg_max_weight"] == 2048  # the bucket site-b declared in the pre-flight
        # Federated evaluation: the sites' noised sums, added up by the coordinator.
        assert 0 <= r["federated"]["accuracy"] <= 1 and r["federated"]["examples"] > 0
    privacy = json.loads((out / "privacy.json").read_text())
    assert set(privacy["sites"]) == {"site-a", "site-b"}
    for site in privacy["sites"].values():
        assert 0 < site["epsilon"] <= 8.0 + 1e-6
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    for site in ("site-a", "site-b"):  # each site's own ledger holds both rounds and both answers
        ledger = [json.loads(line) for line in
                  (fed["root"] / "state" / site / "privacy-ledger.jsonl").read_text().splitlines()]
        assert [(e["round"], e.get("kind")) for e in ledger] == [(1, None), (1, "evaluate"), (2, None), (2, "evaluate")]
        # Default site settings: the un-noised loss stays at the site.
        assert all("train_loss" not in r["sites"][site] for r in records[1:])
        # What the coordinator reports for the site is its ledger's epsilon, evaluation included.
        assert privacy["sites"][site]["epsilon_total"] == pytest.approx(_ledger_epsilon(state[site]), rel=1e-6)
        assert _ledger_epsilon(state[site]) <= 10.0 + 1e-6  # the lifetime cap
    assert 0.8 * 2 <= _ledger_epsilon(state["site-a"], part="training") <= 2.0 + 1e-6  # the site's 2, not the run's 8
    assert 0.8 * 8 <= _ledger_epsilon(state["site-b"], part="training") <= 8.0 + 1e-6

    # The hostile run: noise 0.05 fits neither site's budget; each refuses before any step.
    hostile_out = tmp_path / "hostile"
    submit = procs.start("submit-hostile", fedtune_cmd("submit", "--config", fed["hostile"], "--out", hostile_out,
                                               "--state-dir", coordinator_state))
    procs.wait(submit, 600)
    hostile_rounds = [json.loads(line) for line in (hostile_out / "metrics.jsonl").read_text().splitlines()]
    assert len(hostile_rounds) > 1 and all(r["sites"] == {} for r in hostile_rounds)  # no site trained
    assert _ledger_epsilon(state["site-a"], part="training") <= 2.0 + 1e-6
    for site in state.values():  # nothing trained, and no evaluation answered for a run it did not train
        assert len((site / "privacy-ledger.jsonl").read_text().splitlines()) == 4


@pytest.fixture(scope="module")
def coordinator(federation, tmp_path_factory):
    """A serving coordinator (no run) with site-a and site-b registered, shared by the refusal
    and hostile-bundle tests (its port, its processes' environment and state folder); stopped with all its children when they are done, also if one fails."""
    folder = tmp_path_factory.mktemp("coordinator")
    procs = Processes(flower_env(folder / "flwr-home"), folder)
    try:
        port = free_port()
        server = procs.start("server", fedtune_cmd("server", "--certs", federation["certs"].root, "--port", port,
                                                   "--state-dir", folder / "state"))
        _wait_for(procs, server, "waiting for runs", 60)
        yield SimpleNamespace(port=port, env=procs.env, state=folder / "state")
    finally:
        left = procs.stop_all()
        assert not left, f"processes left running: {left}"


def test_a_site_with_an_unregistered_key_is_refused(federation, procs, coordinator):
    cmd = _client(federation, "site-a", coordinator.port, free_port(), "--max-retries", "2")
    cmd[cmd.index("--key") + 1] = str(federation["rogue"])
    rogue = procs.start("rogue", cmd)
    assert procs.wait(rogue, 120) != 0
    assert "Failed to activate SuperNode" in procs.log(rogue) + _flower_log(federation["root"] / "state" / "site-a")


def test_a_plain_text_client_cannot_talk_to_the_tls_coordinator(federation, procs, coordinator):
    plain = procs.start("plain", fedtune_cmd(
        "client", "--superlink", f"127.0.0.1:{coordinator.port}", "--insecure", "--data", federation["data"]["site-a"],
        "--state-dir", federation["root"] / "state" / "plain", "--runtime-port", free_port(),
        "--max-retries", "2", "--max-wait-time", "20"))
    assert procs.wait(plain, 120) != 0
    log = procs.log(plain)
    assert "WARNING: --insecure" in log
    assert "Connection attempt failed" in log + _flower_log(federation["root"] / "state" / "plain")


def test_a_certificate_for_another_host_is_rejected(federation, procs, tmp_path):
    """A coordinator whose certificate (from the right CA) names another host: the site's TLS
    check fails on the host name, and the site agent never connects."""
    other = CertPaths(tmp_path / "other-certs")
    other.root.mkdir()
    for name in ("ca.crt", "ca.key"):
        (other.root / name).write_bytes((federation["certs"].root / name).read_bytes())
    create_server_cert(other, ["coordinator.other-host.example"])
    port = free_port()
    # Flower's own SuperLink, started directly: `fedtune server` would stop at registering the
    # sites, since the operator's flwr client rejects the certificate as well.
    procs.start("superlink", superlink_command(other, "127.0.0.1", port, tmp_path / "state.db"))
    wait_for_port("127.0.0.1", port, 60)
    check_tls("127.0.0.1", port, other.ca_cert, server_name="coordinator.other-host.example")  # the CA is fine
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match|not valid"):
        check_tls("127.0.0.1", port, other.ca_cert)
    site = procs.start("site-a", _client(federation, "site-a", port, free_port(),
                                         "--max-retries", "2", "--max-wait-time", "20"))
    assert procs.wait(site, 120) != 0
    assert "certificate verify failed: IP address mismatch" in procs.log(site) + _flower_log(
        federation["root"] / "state" / "site-a")


def test_the_coordinator_certificate_is_checked_against_the_ca(federation, coordinator, tmp_path):
    check_tls("127.0.0.1", coordinator.port, federation["certs"].ca_cert)       # the federation's CA: accepted
    stranger = init_certs(tmp_path / "stranger", ["127.0.0.1"], [])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer|verify failed"):
        check_tls("127.0.0.1", coordinator.port, stranger.ca_cert)              # another CA: rejected


NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")
def _proxy(procs, federation, coordinator, folder: Path, *edits: tuple[str, str]) -> int:
    """deploy/proxy/nginx.conf pointed at this test's coordinator (with ``edits``); its port."""
    certs, port = federation["certs"].root, free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf = (REPO / "deploy" / "proxy" / "nginx.conf").read_text()
    for old, new in [("server coordinator:9092;", f"server 127.0.0.1:{coordinator.port};"), ("/certs/", f"{certs}/"),
                     ("listen 9443 ssl;", f"listen 127.0.0.1:{port} ssl;"), ("proxy_ssl_name coordinator;",
                     "proxy_ssl_name localhost;"), ("pid /tmp/fedtune-proxy.pid;", f"pid {folder}/nginx.pid;"),
                     ("access_log /dev/stdout;", f"access_log {folder}/access.log;"), *edits]:
        assert old in conf
        conf = conf.replace(old, new)
    (folder / "nginx.conf").write_text(conf)
    procs.start(f"nginx-{folder.name}", [NGINX, "-c", str(folder / "nginx.conf"), "-p", str(folder),
                                         "-e", str(folder / "err.log"), "-g", "daemon off;"])
    wait_for_port("127.0.0.1", port, 30)
    return port


def _post(port: int, path: str, body: bytes, ca: Path) -> int:
    """The HTTP status of a POST through the proxy."""
    request = urllib.request.Request(f"https://localhost:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_an_adapter_update_larger_than_flowers_5_mb_chunk_crosses_the_proxy_end_to_end(federation, procs, tmp_path):
    """Both sites join through deploy/proxy/nginx.conf and train one SecAgg+ round of a model whose
    adapter is 8.4 MB (a wider random BERT, LoRA r 512 with A trained: 2.1M values): it reaches
    each site in two of Flower's array chunks (5 MB and the rest), and each site's masked update
    goes back as one message of 16.8 MB (measured; SecAgg+'s integers)."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    wide = tiny.make_tiny_bert(tmp_path / "wide-bert", hidden_size=512)
    config = tmp_path / "wide.toml"
    config.write_text(f"""
[model]
name = "{wide}"
max_length = 16
[lora]
r = 512
freeze_a = false
[data]
eval = "{federation['root'] / 'eval.csv'}"
[train]
epochs = 1
[federation]
sites = 2
rounds = 1
fraction_evaluate = 0.0
""")
    # Its own coordinator: the shared one's nodes for these site keys stay as the other tests left them.
    server_port, coordinator_state = free_port(), tmp_path / "coordinator"
    server = procs.start("server", fedtune_cmd("server", "--certs", federation["certs"].root, "--port", server_port,
                                               "--state-dir", coordinator_state))
    _wait_for(procs, server, "waiting for runs", 60)
    port = _proxy(procs, federation, SimpleNamespace(port=server_port), tmp_path / "proxy")
    for site in ("site-a", "site-b"):  # their own state folders: the other tests' ledgers stay theirs
        cmd = _client(federation, site, port, free_port())
        at = cmd.index("--state-dir")
        procs.start(site, cmd[:at + 1] + [tmp_path / "state" / site] + cmd[at + 2:])
    out = tmp_path / "run"
    submit = procs.start("submit", fedtune_cmd("submit", "--config", config, "--out", out,
                                               "--state-dir", coordinator_state))
    assert procs.wait(submit, 600) == 0, procs.log(submit)[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert not record["failed"] and set(record["sites"]) == {"site-a", "site-b"}, record
    assert all(v > FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE for v in record["bytes_up"].values()), record["bytes_up"]
    access = (tmp_path / "proxy" / "access.log").read_text()
    assert '"POST /v1/fleet/push-object HTTP/1.1" 200' in access and " 413 " not in access
    # The global adapter reached each site through the proxy as a full 5 MB chunk and the rest
    # (measured: 5,242,909 and 3,149,989 bytes to each site).
    pulled = [int(n) for n in re.findall(r'"POST /v1/fleet/pull-object HTTP/1\.1" 200 (\d+)', access)]
    assert sum(n >= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE for n in pulled) == 2, sorted(pulled)[-6:]


def test_the_proxy_rule_passes_the_fleet_api_and_refuses_the_control_api(federation, procs, coordinator, tmp_path):
    """deploy/proxy/nginx.conf, pointed at this test's coordinator: a site joins through it, a
    Control API call (which would start runs) is refused, and a request the size of Flower's
    largest object (an adapter update is sent in array chunks of up to 5 MB) reaches the SuperLink:
    the proxy's client_max_body_size is the limit that applies, shown by the same request refused
    (413) by the proxy with a limit below it."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    ca = federation["certs"].ca_cert
    port = _proxy(procs, federation, coordinator, tmp_path)
    assert _post(port, "/v1/control/list-runs", b"", ca) == 403
    chunk = os.urandom(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 64 * 1024)  # a full chunk and its message's framing
    passed = _post(port, "/v1/fleet/push-object", chunk, ca)
    assert passed != 413 and passed >= 400, passed  # the SuperLink's own answer to an unsigned request
    assert '"POST /v1/fleet/push-object HTTP/1.1" 413' not in (tmp_path / "access.log").read_text()
    tight = _proxy(procs, federation, coordinator, tmp_path / "tight",
                   ("client_max_body_size 256m;", "client_max_body_size 4m;"))
    assert _post(tight, "/v1/fleet/push-object", chunk, ca) == 413
    site = procs.start("site-b", _client(federation, "site-b", port, free_port(), "--max-retries", "2"))
    deadline = time.monotonic() + 60
    while "/v1/fleet/pull-messages" not in (tmp_path / "access.log").read_text():
        assert site.poll() is None and time.monotonic() < deadline, procs.log(site)[-3000:]
        time.sleep(1)
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in (tmp_path / "access.log").read_text()


# -- chaos: four deployed sites, one run, the failures one after another ----------------------
# SecAgg+ with 4 sites: 4 shares, threshold 3, so one site at a time may be lost in a round.

CHAOS_SITES = ("site-a", "site-b", "site-c", "site-d")
STAGE_TIMEOUT, TRAIN_TIMEOUT = 120.0, 300.0  # generous: the CI machine is shared and loaded
_STAMP = re.compile(r"^(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):\w+:(.*)$")


def _worker_answered(state: Path, rnd: int) -> int:
    """Train messages of round ``rnd`` the site's worker has answered and closed (client/site_worker.py)."""
    return _flower_log(state).count(f"site worker: answered train message (round {rnd})")


def _site_round_messages(state: Path, rnd: int) -> tuple[int, int]:
    """(train messages received, replies sent) in round ``rnd``, from the site's Flower log."""
    received = sent = 0
    group = None
    for line in _flower_log(state).splitlines():
        if m := re.search(r"\[RUN \d+, ROUND (\S+)\]", line):
            group = m.group(1)
        elif group == str(rnd) and "Receiving: train message" in line:
            received += 1
        elif group == str(rnd) and "Sending: train message" in line:
            sent += 1
    return received, sent


def _secagg_stages(serverapp_log: Path) -> dict[int, dict[int, tuple[int, int, float]]]:
    """Per round and SecAgg+ stage (0 setup, 1 key sharing, 2 training, 3 unmasking), from the
    coordinator's log: (sites asked, sites that answered, seconds the stage took)."""
    stages: dict[int, dict[int, tuple[int, int, float]]] = {}
    rnd, started = None, {}
    for line in serverapp_log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        when, text = time.mktime(time.strptime(m.group(1), "%m/%d/%Y %H:%M:%S")), m.group(2)
        if r := re.fullmatch(r"\[ROUND (\d+)\]", text.strip()):
            rnd = int(r.group(1))
            stages[rnd] = {}
        elif s := re.match(r"\[Stage (\d)\] (?:Sending|Forwarding|Requesting) .*? (\d+) clients", text):
            started[int(s.group(1))] = (when, int(s.group(2)))
        elif s := re.match(r"\[Stage (\d)\] Received .* from (\d+) clients", text):
            stage = int(s.group(1))
            t0, asked = started.pop(stage)
            stages[rnd][stage] = (asked, int(s.group(2)), when - t0)
    return stages


def _kill_family(proc) -> list[int]:
    """SIGKILL a process and every process under it at once (no signal handler runs), as when the
    machine loses power; returns the pids, all checked gone."""
    import psutil

    root = psutil.Process(proc.pid)
    family = [root, *root.children(recursive=True)]
    for p in family:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if running(p)]
        time.sleep(0.2)
    assert not alive, f"still running after SIGKILL: {alive}"
    return [p.pid for p in family]


def _agent_process(agent, module: str):
    """The site agent's process running ``python -m module`` (not its guard)."""
    import psutil

    found = [p for p in psutil.Process(agent.pid).children(recursive=True)
             if module in p.cmdline() and "fedtune.deployment.guard" not in p.cmdline()]
    assert len(found) == 1, found
    return found[0]


def _freeze_worker(agent) -> None:
    """SIGSTOP the site agent's worker (client/site_worker.py): the SuperNode still takes the
    next message, which stays unanswered, as with a machine that hangs."""
    os.kill(_agent_process(agent, "fedtune.client.site_worker").pid, signal.SIGSTOP)


def _until(condition, what: str, server, procs, timeout: float = 600, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert server.poll() is None, f"the coordinator stopped while waiting for {what}:\n{procs.log(server)[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)
    return result


def _log_has(path: Path, *texts: str):
    """Whether ``texts`` appear in this order in the file."""
    def check():
        content = path.read_text(errors="replace") if path.is_file() else ""
        at = 0
        for text in texts:
            at = content.find(text, at)
            if at < 0:
                return False
        return True
    return check


def test_four_sites_survive_a_kill_while_training_a_failure_a_restart_and_a_kill_while_unmasking(
        tiny_models, procs, tmp_path):
    """Chaos, one 5-round run of 4 deployed sites (SecAgg+ threshold 3), one failure at a time:
    round 1: site-d is SIGKILLed with all its processes with its training message unanswered (its
             worker frozen first, so the kill lands there); left dead in round 2,
             then restarted with its state folder; round 3: it trains again (it rejoined);
    round 3: site-b's training message fails once (its data file is briefly gone); round 4: back;
    round 4: site-c is SIGKILLed with all its processes with its unmasking request unanswered (its
             worker frozen first) and left dead: its
             masked update is in round 4's aggregate (its own mask is removed with the key
             shares the others hold, as SecAgg+ defines), round 5 completes without it.
    Every round completes from the live sites within the deadlines; each killed site's ledger
    keeps what it spent."""
    certs = init_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], list(CHAOS_SITES))
    data = {s: tiny.write_csv(tiny.separable_rows(60, seed=20 + i), tmp_path / f"{s}.csv")
            for i, s in enumerate(CHAOS_SITES)}
    held = tiny.write_csv(tiny.separable_rows(60, seed=99), tmp_path / "eval.csv")
    config = tiny_run_config(tmp_path / "run.toml", tiny_models["bert"], held, federation={
        "sites": 4, "rounds": 5, "fraction_evaluate": 0, "secure_aggregation": True,
        "stage_timeout": STAGE_TIMEOUT, "train_timeout": TRAIN_TIMEOUT, "join_timeout": 120.0})
    state = {s: tmp_path / "state" / s for s in CHAOS_SITES}
    port, out = free_port(), tmp_path / "run"
    serverapp_log = out / "logs" / "serverapp.log"
    started = time.monotonic()
    server = procs.start("server", fedtune_cmd("server", "--certs", certs.root, "--port", port, "--state-dir",
                                               tmp_path / "coordinator", "--config", config, "--out", out))
    _wait_for(procs, server, "site site-d: registered", 240)  # four `flwr supernode register` calls

    def agent(site: str, name: str | None = None):
        # The two sites that are killed beat every 10 s (Flower's minimum; its default is 30 s):
        # the coordinator fails their messages 20 s, not 60 s, after they die. site-a keeps 30 s, as
        # it is held (SIGSTOP) below for up to 30 s without being taken for dead.
        beat = ["--heartbeat-interval", "10"] if site in ("site-c", "site-d") else []
        return procs.start(name or site, fedtune_cmd(
            "client", "--superlink", f"127.0.0.1:{port}", "--ca", certs.ca_cert, "--key", certs.site_key(site),
            "--data", data[site], "--labels", "neg,pos", "--state-dir", state[site], "--runtime-port", free_port(),
            *beat))

    agents = {site: agent(site) for site in CHAOS_SITES}

    # (a) Round 1: site-d answered setup and key sharing; its worker is frozen (SIGSTOP) so that
    # the training message it gets next stays unanswered, then the agent and everything it
    # started are killed (a warm worker answers faster than a test could aim a kill).
    _until(lambda: _worker_answered(state["site-d"], 1) == 2, "site-d's round-1 key sharing", server,
           procs, every=0.01)
    _freeze_worker(agents["site-d"])
    _until(lambda: _site_round_messages(state["site-d"], 1)[0] == 3, "site-d's round-1 training message", server,
           procs)
    _kill_family(agents["site-d"])
    killed_d = time.monotonic()

    # Round 2 runs without site-d (it is not even asked); once it has started, site-d restarts
    # with the same key and state folder, is asked the pre-flight again and is back for round 3.
    # A warm round takes seconds, less than an agent takes to start: site-a's SuperNode is held
    # (SIGSTOP, as a slow site; well within its heartbeat's 60 s) until site-d's is connected again.
    _until(_log_has(serverapp_log, "[ROUND 2]", "[Stage 0] Sending configurations to"), "round 2", server, procs)
    held = _agent_process(agents["site-a"], "fedtune.deployment.supernode_pace")
    os.kill(held.pid, signal.SIGSTOP)
    try:
        agents["site-d"] = agent("site-d", "site-d-restarted")
        _until(lambda: _flower_log(state["site-d"]).count("SuperNode ID") == 2, "site-d's SuperNode reconnected",
               server, procs, timeout=30)
    finally:
        os.kill(held.pid, signal.SIGCONT)

    # (d) Round 3: site-b's data file is gone while it trains (its training message fails); it
    # is put back before round 4. Only once site-d is in round 3: one failure at a time.
    _until(_log_has(serverapp_log, "[ROUND 3]", "[Stage 0] Sending configurations to"), "round 3", server, procs)
    assert _log_has(serverapp_log, "[ROUND 3]", "[Stage 0] Sending configurations to 4 clients")(), \
        "site-d did not rejoin before round 3"
    hidden = data["site-b"].with_suffix(".away")
    data["site-b"].rename(hidden)
    try:
        _until(_log_has(serverapp_log, "[ROUND 3]", "[Stage 2] Received masked vectors"), "round 3's training",
               server, procs)
    finally:
        hidden.rename(data["site-b"])

    # (b) Round 4: site-c sent its masked update (its third train reply); its worker is frozen, it
    # receives the unmasking request (its fourth train message) and is killed without answering.
    _until(lambda: _worker_answered(state["site-c"], 4) == 3, "site-c's round-4 masked update", server,
           procs, every=0.01)
    _freeze_worker(agents["site-c"])
    _until(lambda: _site_round_messages(state["site-c"], 4)[0] == 4, "site-c's round-4 unmasking message", server,
           procs, every=0.05)
    _kill_family(agents["site-c"])
    killed_c = time.monotonic()

    assert procs.wait(server, 900) == 0, procs.log(server)[-5000:]
    ended = time.monotonic()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\nchaos: 4 sites, 5 rounds, wall time {ended - started:.0f} s; site-d killed "
          f"{killed_d - started:.0f} s in, site-c {killed_c - started:.0f} s in; round seconds "
          f"{[r['seconds'] for r in records[1:]]}")

    assert json.loads((out / "run.json").read_text())["ended"] == "completed"
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5]
    a, b, c, d = CHAOS_SITES
    expected_sites = {1: {a, b, c}, 2: {a, b, c}, 3: {a, c, d}, 4: {a, b, c, d}, 5: {a, b, d}}
    for r in records[1:]:
        assert not r["failed"], r
        assert set(r["sites"]) == expected_sites[r["round"]], (r["round"], r["sites"])
    assert any(reason.startswith("site-b:") for reason in records[3]["failure_reasons"]), records[3]

    # What the coordinator saw, stage by stage: (sites asked, sites that answered).
    stages = _secagg_stages(serverapp_log)
    expected_stages = {
        1: [(4, 4), (4, 4), (4, 3), (3, 3)],   # site-d dies while training
        2: [(3, 3)] * 4,                       # site-d is gone: not asked
        3: [(4, 4), (4, 4), (4, 3), (3, 3)],   # site-d is back; site-b's training fails
        4: [(4, 4), (4, 4), (4, 4), (4, 3)],   # site-c dies during unmasking
        5: [(3, 3)] * 4,                       # site-c is gone
    }
    for rnd, expected in expected_stages.items():
        assert [stages[rnd][k][:2] for k in range(4)] == expected, (rnd, stages[rnd])
        # Within the deadlines: each stage (log stamps are to the second) and each round (pre-flight,
        # setup, key sharing, unmasking: stage_timeout; training: train_timeout; no federated evaluation).
        for k in range(4):
            assert stages[rnd][k][2] <= (TRAIN_TIMEOUT if k == 2 else STAGE_TIMEOUT) + 1, (rnd, k, stages[rnd])
    for r in records[1:]:
        assert r["seconds"] <= 4 * STAGE_TIMEOUT + TRAIN_TIMEOUT, r
        assert r["federated"] is None  # fraction_evaluate = 0: the coordinator's evaluation only
    # The sites' side: site-d got its training message in round 1 and never answered it;
    # site-c got its unmasking request in round 4 and never answered it.
    assert _site_round_messages(state[d], 1) == (3, 2)
    assert _site_round_messages(state[c], 4) == (4, 3)
    # The restarted site-d was asked the pre-flight again (the others once, before round 1).
    assert [_flower_log(state[s]).count("Receiving: query message") for s in CHAOS_SITES] == [1, 1, 1, 2]

    # Ledgers: intact hash chains (entries() verifies), each spend kept. site-c trained rounds 1-4,
    # round 4's spend included (its update is in that round's aggregate); site-d perhaps round 1
    # (killed while training), then 3-5 after its restart; site-b all but round 3.
    from fedtune.privacy.ledger import PrivacyLedger

    rounds = {s: [e.round for e in PrivacyLedger(state[s] / "privacy-ledger.jsonl").entries()] for s in CHAOS_SITES}
    assert rounds[a] == [1, 2, 3, 4, 5]
    assert rounds[b] == [1, 2, 4, 5]
    assert rounds[c] == [1, 2, 3, 4]
    assert rounds[d] in ([3, 4, 5], [1, 3, 4, 5]), rounds[d]
    privacy = json.loads((out / "privacy.json").read_text())["sites"]
    for site in CHAOS_SITES:  # what each site last reported = what its ledger adds up to
        assert _ledger_epsilon(state[site]) == pytest.approx(privacy[site]["epsilon"], rel=1e-3), site
        assert _ledger_epsilon(state[site]) <= 8.0 + 1e-6


def _checkpointed(out: Path) -> int:
    latest = out / "checkpoints" / "latest.json"
    return json.loads(latest.read_text())["round"] if latest.is_file() else 0


def _train_messages(state: Path) -> int:
    return _flower_log(state).count("Receiving: train message")


def test_a_coordinator_killed_between_and_in_rounds_resumes_to_the_same_adapter(tiny_models, procs, tmp_path):
    """Chaos: the whole coordinator (fedtune server, SuperLink, ServerApp, flwr run) is SIGKILLed
    once between rounds and once while the sites train, and restarted each time with
    `fedtune server --resume` on the same port and state folder. The two site agents stay up and
    reconnect by themselves. With DP off (each site's own allow-non-private) training is
    reproducible, so the resumed run's final adapter equals an uninterrupted run's on the same
    sites. Plain aggregation: SecAgg+'s stochastic rounding would make the two runs differ by
    quantisation noise, and the restart path (checkpoint, new Flower run, sites reconnecting) is
    the same with it."""
    from safetensors.numpy import load_file

    from fedtune.privacy.ledger import PrivacyLedger

    started = time.monotonic()
    certs = init_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["site-a", "site-b"])
    data = {s: tiny.write_csv(tiny.separable_rows(60, seed=30 + i), tmp_path / f"{s}.csv")
            for i, s in enumerate(("site-a", "site-b"))}
    held = tiny.write_csv(tiny.separable_rows(40, seed=99), tmp_path / "eval.csv")
    config = tiny_run_config(
        tmp_path / "run.toml", tiny_models["bert"], held, train={"learning_rate": 1e-2}, privacy={"enabled": False},
        federation={"sites": 2, "min_sites": 2, "rounds": 3, "site_test_fraction": 0.0, "fraction_evaluate": 0.0,
                    "secure_aggregation": False, "stage_timeout": 120.0, "train_timeout": 300.0,
                    "join_timeout": 180.0})
    port, coordinator_state = free_port(), tmp_path / "coordinator"

    def server(name, out, *extra):
        return procs.start(name, fedtune_cmd("server", "--certs", certs.root, "--port", port, "--state-dir",
                                             coordinator_state, "--config", config, "--out", out, *extra))

    state = {site: tmp_path / "state" / site for site in data}
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    first = server("server-a", run_a)
    _wait_for(procs, first, "site site-b: registered", 60)
    agents = {site: procs.start(site, fedtune_cmd(
        "client", "--superlink", f"127.0.0.1:{port}", "--ca", certs.ca_cert, "--key", certs.site_key(site),
        "--data", data[site], "--labels", "neg,pos", "--state-dir", state[site], "--runtime-port", free_port(),
        "--allow-non-private", "--allow-plain-updates", "--test-fraction", "0")) for site in data}
    assert procs.wait(first, 600) == 0, procs.log(first)[-5000:]
    print(f"\nrestart chaos: run A (uninterrupted) done after {time.monotonic() - started:.0f} s")

    # Run B on the same sites, its own run folder. Killed once right after round 1's checkpoint...
    b = server("server-b1", run_b)
    deadline = time.monotonic() + 400
    while _checkpointed(run_b) < 1:
        assert time.monotonic() < deadline and b.poll() is None, procs.log(b)[-5000:]
        time.sleep(0.2)
    _kill_family(b)
    assert _checkpointed(run_b) == 1
    # ... and once while the sites train round 3 (round 2 checkpointed, round 3 not).
    b = server("server-b2", run_b, "--resume")
    deadline = time.monotonic() + 400
    while _checkpointed(run_b) < 2:
        assert time.monotonic() < deadline and b.poll() is None, procs.log(b)[-5000:]
        time.sleep(0.2)
    seen = {site: _train_messages(state[site]) for site in data}
    while not all(_train_messages(state[site]) > seen[site] for site in data):  # round 3's, received
        assert time.monotonic() < deadline and b.poll() is None, procs.log(b)[-5000:]
        time.sleep(0.2)
    assert _checkpointed(run_b) == 2
    _kill_family(b)
    b = server("server-b3", run_b, "--resume")
    assert procs.wait(b, 600) == 0, procs.log(b)[-5000:]
    print(f"restart chaos: run B (killed twice, resumed twice) done; test wall time "
          f"{time.monotonic() - started:.0f} s")

    for site, agent in agents.items():  # the same site agents throughout: they reconnected by themselves
        assert agent.poll() is None, procs.log(agent)[-3000:]
    for out in (run_a, run_b):
        assert json.loads((out / "run.json").read_text())["ended"] == "completed"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        assert all(not r["failed"] and set(r["sites"]) == {"site-a", "site-b"} for r in records[1:])
    # One fedtune run across the restarts: every site trained each of its rounds at least once.
    for site in data:
        entries = PrivacyLedger(state[site] / "privacy-ledger.jsonl").entries()
        assert len({e.run_id for e in entries}) == 2
        assert sorted({e.round for e in entries if e.run_id == entries[-1].run_id}) == [1, 2, 3]

    final = {out.name: load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")) for out in (run_a, run_b)}
    assert final["run-a"].keys() == final["run-b"].keys()
    rounds = {}
    for rnd in (2, 3):
        with np.load(run_b / "checkpoints" / f"round-{rnd:04d}" / "adapter.npz") as npz:
            rounds[rnd] = [npz[k] for k in sorted(npz.files)]
    # Round 3 moved the adapter well beyond the tolerance below: the comparison can fail.
    assert max(float(np.abs(x - y).max()) for x, y in zip(rounds[2], rounds[3])) > 1e-3
    diff = max(float(np.abs(final["run-a"][k] - final["run-b"][k]).max()) for k in final["run-a"])
    print(f"restart chaos: largest difference between the two final adapters {diff:.2e}")
    for key, value in final["run-a"].items():  # float32, same data order and sums: equal up to rounding
        np.testing.assert_allclose(final["run-b"][key], value, rtol=0, atol=1e-6, err_msg=key)
