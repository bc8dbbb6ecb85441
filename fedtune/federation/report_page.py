"""``fedtune report RUN_DIR``: one self-contained ``report.html`` for a run folder (the plots as
embedded PNG, the per-round table, the privacy report, the resolved config), to open in any
browser or attach to a mail; it loads nothing from the network."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from fedtune.io_utils import atomic_write_text

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1f24; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.meta { color: #57606a; } img { max-width: 100%; border: 1px solid #d0d7de; margin: .5rem 0; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.status { display: inline-block; padding: .1rem .5rem; border-radius: .3rem; background: #dafbe1; }
.status.bad { background: #ffebe9; }
"""


class ReportError(ValueError):
    """The folder is not a run folder (the message says what is missing)."""


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_to_html(md: str) -> str:
    """The small part of Markdown that privacy.md uses: headings, pipe tables, bullet lists
    (with continuation lines), paragraphs, bold and code."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)  # the page's h1 is the run
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-:") for c in cells):
                    rows.append(cells)
                i += 1
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and (lines[i].startswith("- ") or lines[i].startswith("  ")):
                if lines[i].startswith("- "):
                    items.append(lines[i][2:])
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        elif line.strip():
            para = [line]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
        else:
            i += 1
    return "\n".join(out)


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _rounds_table(records: list[dict]) -> str:
    from fedtune.federation.summary import format_summary

    lines = format_summary(records).splitlines()
    best = lines[-1]
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in lines[:-1] if not set(ln.strip()) <= set("- ")]
    head, body = rows[0], rows[1:]
    table = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
             + "</table>")
    return table + f"<p>{html.escape(best)}</p>"


def _answers(path: Path) -> list[str]:
    """The same evaluation prompts answered before training (round 0) and after the last round."""
    from fedtune.io_utils import read_jsonl

    rounds = read_jsonl(path) if path.is_file() else []
    if not rounds:
        return []
    first, last = rounds[0], rounds[-1]
    after = {s["prompt"]: s["answer"] for s in last["samples"]}
    head = ["prompt", "reference", f"answer, round {first['round']}", f"answer, round {last['round']}"]
    body = [[s["prompt"], s["reference"], s["answer"], after.get(s["prompt"], "")] for s in first["samples"]]
    return ["<h2>Answers before and after</h2>",
            "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
            + "</table>"]


def build_report(run_dir: Path) -> str:
    from fedtune.federation.plots import write_plots
    from fedtune.server.coordinator import read_records

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a run folder, or no round finished yet)")
    records = read_records(metrics)
    plots = run_dir / "plots"
    if not (plots / "central.png").is_file():  # a run still going, or stopped: draw them now
        write_plots(records, plots)
    status_file = run_dir / "run.json"
    ended = json.loads(status_file.read_text()).get("ended") if status_file.is_file() else None
    last = max((r.get("round", 0) for r in records), default=0)
    finished = (run_dir / "final" / "adapter").is_dir()  # a simulation's folder has no run.json
    status = ended or ("finished" if finished else f"in progress or stopped (round {last} recorded)")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>fedtune run {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>fedtune run: {html.escape(run_dir.name)}</h1>",
        f"<p class=\"meta\">{html.escape(str(run_dir.resolve()))} &middot; {len(records) - 1 if records else 0} "
        f"round(s) after round 0 &middot; <span class=\"status{'' if status in ('completed', 'finished') else ' bad'}\">"
        f"{html.escape(status)}</span></p>",
        "<h2>Metrics per round</h2>",
    ]
    parts += [_png(p) for p in (plots / "central.png", plots / "epsilon.png") if p.is_file()]
    parts += ["<h2>Rounds</h2>", _rounds_table(records)]
    parts += _answers(run_dir / "answers.jsonl")
    privacy = run_dir / "privacy.md"
    if privacy.is_file():  # its own heading: "Privacy report"
        parts.append(markdown_to_html(privacy.read_text(encoding="utf-8")))
    elif (run_dir / "privacy.json").is_file():  # a run in progress: privacy.md comes at the end
        parts += ["<h2>Privacy</h2>", f"<pre>{html.escape((run_dir / 'privacy.json').read_text())}</pre>"]
    else:
        parts += ["<h2>Privacy</h2>", "<p>No privacy report yet (written after the first round).</p>"]
    config = run_dir / "config.toml"
    parts.append("<h2>Resolved config</h2>")
    parts.append(f"<pre>{html.escape(config.read_text(encoding='utf-8'))}</pre>" if config.is_file()
                 else "<p>config.toml is missing.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(out, build_report(run_dir))
    out.chmod(0o644)  # a page to share, like the plots
    return out
