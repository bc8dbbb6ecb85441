"""The table printed at the end of a federated run."""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_summary(records: list[dict]) -> str:
    causal = any("perplexity" in (r.get("central") or {}) for r in records)
    metrics = ["perplexity", "loss"] if causal else ["accuracy", "f1", "loss"]
    header = ["round", *[f"central {m}" for m in metrics], "fed " + metrics[0], "max eps", "MB up", "MB down", "s"]
    rows = []
    for r in records:
        central, fed = r.get("central") or {}, r.get("federated") or {}
        eps = [s.get("epsilon") for s in (r.get("sites") or {}).values() if s.get("epsilon") is not None]
        rows.append([
            r["round"], *[central.get(m) for m in metrics], fed.get(metrics[0]), max(eps) if eps else None,
            sum((r.get("bytes_up") or {}).values()) / 1e6 or None,
            sum((r.get("bytes_down") or {}).values()) / 1e6 or None, r.get("seconds"),
        ])
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    scored = [(r["round"], (r.get("central") or {}).get(metrics[0])) for r in records]
    scored = [(rnd, v) for rnd, v in scored if v is not None]
    if scored:
        best = (min if causal else max)(scored, key=lambda x: x[1])
        lines.append(f"best round: {best[0]} (central {metrics[0]} {_fmt(best[1])})")
    return "\n".join(lines)
