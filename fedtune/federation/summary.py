"""The table printed at the end of a federated run (plain text: no rich, no pandas)."""

from __future__ import annotations

import math

from fedtune.privacy.display import format_epsilon, worst_epsilon


class _Eps:
    def __init__(self, value):
        self.value = value


def _fmt(value) -> str:
    if isinstance(value, _Eps):
        return format_epsilon(value.value)
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{value:.0f}"  # 12345 rather than 1.234e+04 (perplexity, seconds)
        return f"{value:.4g}"
    return str(value)


def _mb(counts: dict | None) -> float | None:
    # Round 0 (evaluation only) moves no bytes: shown as "-".
    return sum(counts.values()) / 1e6 if counts else None


def format_summary(records: list[dict]) -> str:
    if not records:
        return "no rounds recorded"
    causal = any("perplexity" in (r.get(k) or {}) for r in records for k in ("central", "federated"))
    answered = any("exact_match" in (r.get("central") or {}) for r in records)
    metrics = (["exact_match", "f1"] if answered else []) + ["loss", "perplexity"] if causal else ["accuracy", "f1", "loss"]
    fed_metric = "perplexity" if causal else "accuracy"
    header = ["round", *metrics, f"fed {fed_metric} (noised)", "max eps", "MB up", "MB down", "seconds"]
    rows = []
    for r in records:
        central, fed = r.get("central") or {}, r.get("federated") or {}
        # A site without DP, or with noise 0, shows as "undefined (no DP)" / "inf", never "-".
        eps = worst_epsilon([(s or {}).get("epsilon") for s in (r.get("sites") or {}).values()])
        rnd = f"{r.get('round')} FAILED" if r.get("failed") else r.get("round")  # model unchanged that round
        rows.append([rnd, *[central.get(m) for m in metrics], fed.get(fed_metric),
                     _Eps(eps), _mb(r.get("bytes_up")), _mb(r.get("bytes_down")),
                     r.get("seconds")])
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_best(records, causal))
    return "\n".join(lines)


def _best(records: list[dict], causal: bool) -> str:
    # Highest central accuracy; lowest central loss for causal LM (or when no accuracy exists).
    def scored(metric):
        pts = [(r.get("round"), (r.get("central") or {}).get(metric)) for r in records]
        return [(rnd, v) for rnd, v in pts if isinstance(v, (int, float)) and not math.isnan(v)]

    if not causal and scored("accuracy"):
        rnd, v = max(scored("accuracy"), key=lambda p: p[1])
        return f"best round: {rnd} (central accuracy {_fmt(v)})"
    if causal and scored("exact_match"):
        rnd, v = max(scored("exact_match"), key=lambda p: p[1])
        return f"best round: {rnd} (central exact match {_fmt(v)})"
    if scored("loss"):
        rnd, v = min(scored("loss"), key=lambda p: p[1])
        return f"best round: {rnd} (central loss {_fmt(v)})"
    return "best round: - (no central evaluation recorded)"
