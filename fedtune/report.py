"""Human-readable summaries printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from fedtune.privacy.display import format_epsilon


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_local_summary(metrics: dict, out_dir: Path) -> None:
    rows = [("train loss", metrics.get("train_loss")), ("steps", metrics.get("steps"))]
    for key, value in (metrics.get("eval") or {}).items():
        rows.append((f"eval {key}", value))
    privacy = metrics.get("privacy")
    if privacy:
        rows += [
            ("epsilon", format_epsilon(privacy["epsilon"])),  # noise 0: "inf", never a blank
            ("delta", privacy["delta"]),
            ("noise multiplier", privacy["noise_multiplier"]),
            ("accountant", privacy["accountant"]),
        ]
    else:
        rows.append(("privacy", "off (no DP guarantee)"))
    rows += [("precision", metrics.get("precision")), ("seconds", metrics.get("seconds"))]
    width = max(len(k) for k, _ in rows)
    print(f"\nfedtune train-local -> {out_dir}")
    for key, value in rows:
        print(f"  {key:<{width}}  {_fmt(value)}")
    for sample in metrics.get("answers") or []:  # a few evaluation prompts with the model's answers
        prompt = " ".join(sample["prompt"].split())
        print(f"  answer  {sample['answer']!r} (reference {sample['reference']!r}) to: "
              f"{prompt[:90]}{'...' if len(prompt) > 90 else ''}")
