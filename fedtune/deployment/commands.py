"""The deployment commands: ``fedtune certs``, ``fedtune server``, ``fedtune submit`` and
``fedtune client`` (argument parsing only; the work is in the modules beside this one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_deployment_commands(sub) -> None:
    p = sub.add_parser("certs", help="CA, coordinator certificate and site keys for a deployment")
    certs = p.add_subparsers(dest="certs_command", metavar="CERTS_COMMAND", required=True)
    c = certs.add_parser("init", help="create the CA, the coordinator's TLS certificate and site key pairs")
    c.add_argument("--dir", type=Path, default=Path("certs"), help="certificate folder (default: ./certs)")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a DNS name or IP address sites use to reach the coordinator (repeatable)")
    c.add_argument("--no-localhost", action="store_true",
                   help="leave localhost and 127.0.0.1 out of the certificate (they let the operator's own "
                        "`flwr` commands reach the coordinator on its machine)")
    c.add_argument("--site", action="append", default=[], metavar="NAME",
                   help="make a key pair for this site (repeatable)")
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run config key (with --resume: the saved config's rounds, deadlines, site policy)")
    p.add_argument("--keep-running", action="store_true", help="keep serving after the --config run ends")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication (local trials only)")
    _verbose(p)
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("submit", help="submit a federated run to a running coordinator and stream it")
    p.add_argument("--config", type=Path, required=True, help="the fedtune run config (read on the coordinator)")
    p.add_argument("--out", type=Path, required=True, help="the run directory on the coordinator")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--connection", default="fedtune")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".fedtune" / "coordinator")
    _verbose(p)
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
    p.add_argument("--allow-non-private", action="store_true",
                   help="accept runs without DP, with noise 0 or past the budget (tests and audits only; "
                        "default: refuse them)")
    p.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's local port for its ClientApps")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    p.add_argument("--max-wait-time", type=float, help="give up after this many seconds without a connection")
    p.add_argument("--heartbeat-interval", type=_heartbeat, metavar="SECONDS",
                   help="how often this site tells the coordinator it is alive, 10-1800 s (default 30, Flower's): "
                        "a site that stops is noticed after two intervals, so shorter frees a round sooner")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (local trials only)")
    _verbose(p)
    p.set_defaults(func=_cmd_client)


def _heartbeat(text: str) -> float:
    """--heartbeat-interval, checked before anything starts (the SuperNode checks it again)."""
    from fedtune.deployment.supernode_pace import check_heartbeat

    try:
        return check_heartbeat(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _verbose(p) -> None:
    from fedtune.cli import add_verbose

    add_verbose(p)


_SITE_FLAGS = [
    ("site-id", str, "the site's name in reports (default: the key file's name)"),
    ("data-format", str, "auto, csv, tsv, jsonl or parquet (default: from the file name)"),
    ("text-column", str, "the text column this site shares (default: text); a run naming another is refused"),
    ("label-column", str, "the label column this site shares (default: label)"),
    ("labels", str, "the label set this site declares, comma-separated (e.g. neg,pos): a classification run must "
                    "name exactly these; unset: no classification run is answered"),
    ("prompt-column", str, "for generation: the prompt column this site shares (default: prompt)"),
    ("response-column", str, "for generation: the response column this site shares (default: response)"),
    ("test-fraction", float, "share of the site's rows held out for its local evaluation (default 0.2, whatever the run asks)"),
    ("device", str, "cpu, cuda, cuda:1 or auto"),
    ("state-dir", str, "where the site keeps its privacy ledger and secrets (default: ~/.fedtune/sites/ID)"),
    ("target-epsilon", float, "this site's epsilon per run (the smaller of this and the run's applies)"),
    ("target-delta", float, "this site's delta (the smaller of this and the run's applies)"),
    ("max-grad-norm", float, "this site's per-sample clipping norm"),
    ("lifetime-epsilon", float, "this site's cap over every run on the same dataset (default: 10)"),
    ("max-noise-multiplier", float, "refuse a run that needs more noise than this (default: 20)"),
    ("dataset", str, "the dataset's name for the lifetime cap (default: the data file's name)"),
    ("answer-evaluation", lambda v: _flag_bool(v), "true/false: answer federated-evaluation requests (default true)"),
    ("max-evaluations", int, "noised evaluation answers per dataset over all runs (default 50), together "
                             "within lifetime-epsilon"),
    ("report-train-loss", lambda v: _flag_bool(v), "true/false: send the un-noised train loss (default false)"),
    ("report-clipping", lambda v: _flag_bool(v), "true/false: send how many values SecAgg+ clipped (default false)"),
    ("privacy-unit", str, "identifier column (e.g. patient id): bound each unit's rows, report its epsilon"),
    ("max-rows-per-unit", int, "with --privacy-unit: the most rows one unit contributes (default 1)"),
    ("secagg-min-neighbours", int, "refuse SecAgg+ rounds whose neighbour set (this site included) is smaller "
                                   "(default 2)"),
    ("accept-app-versions", str, "fedtune app versions whose runs this site answers, comma-separated "
                                 "(default: the installed fedtune's)"),
]


def _flag_bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    import argparse

    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _cmd_certs_init(args) -> int:
    from fedtune.deployment.certs import init_certs

    local = [] if args.no_localhost else [h for h in ("localhost", "127.0.0.1") if h not in args.host]
    hosts = list(args.host) + local
    paths = init_certs(args.dir, hosts, args.site, days=args.days, force=args.force)
    print(f"CA:          {paths.ca_cert}  (keep {paths.ca_key} offline)")
    print(f"coordinator: {paths.server_cert} for {', '.join(hosts)}")
    for site in args.site:
        print(f"site {site}: private {paths.site_key(site)} (give to the site only), "
              f"public {paths.site_public_key(site)}")
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
    from fedtune.deployment.server_command import ServerOptions, serve

    return serve(ServerOptions(
        certs=args.certs, site_keys=args.site_keys, host=args.host, port=args.port, state_dir=args.state_dir,
        connection=args.connection, insecure=args.insecure, config=args.config, out=args.out, resume=args.resume, keep_running=args.keep_running,
        overrides=args.overrides, verbose=args.verbose,
    ))


def _cmd_submit(args) -> int:
    from fedtune.deployment.server_command import submit

    return submit(args.config, args.out, args.connection, args.state_dir, args.resume, overrides=args.overrides,
                  verbose=args.verbose)


def _cmd_client(args) -> int:
    from fedtune.deployment.site_agent import ClientOptions, run_agent

    settings = {flag: getattr(args, flag) for flag in ["data-path", *(f for f, _, _ in _SITE_FLAGS)]}
    if args.allow_plain_updates:
        settings["require-secure-aggregation"] = False
    if args.allow_non_private:
        settings["allow-non-private"] = True
    return run_agent(ClientOptions(
        superlink=args.superlink, ca=args.ca, key=args.key, settings_file=args.settings, settings=settings,
        runtime_port=args.runtime_port, insecure=args.insecure, max_retries=args.max_retries,
        max_wait_time=args.max_wait_time, heartbeat_interval=args.heartbeat_interval, verbose=args.verbose,
    ))
