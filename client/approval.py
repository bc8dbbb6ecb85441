"""A site's approval of a run, before any message of it is answered.

The coordinator submits a Flower App bundle (FAB) with each run, and Flower's own
``flwr-clientapp`` would import whatever ClientApp the bundle names, with the bundle's folder
first on ``sys.path``. A fedtune site never does that (client/site_worker.py): it answers
with the fedtune it installed, and only for a run whose bundle is fedtune's own app manifest
(``fedtune.deployment.flower.app_manifest``): a ``pyproject.toml`` (and Flower's ``.info/``
metadata), no code, equal to that manifest apart from its config values, for an app version
the site accepts (its ``accept-app-versions`` setting; default: the installed fedtune's).

Every decision is recorded once per run and bundle in ``runs.jsonl`` in the site's state
folder (run id, bundle hash, components, time); ``fedtune ledger show`` lists them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from fedtune import __version__

RUNS_FILE = "runs.jsonl"
MANIFEST = "pyproject.toml"
FLOWER_METADATA = ".info/"       # Flower's own bundle metadata (the CONTENT hash list)


class BundleReview(BaseModel):
    """What the site decided about one run's bundle, and why (for its own log and records)."""

    bundle: str                  # sha256 of the bundle's bytes
    accepted: bool
    reason: str = ""             # why it was refused (site-side only; the coordinator gets the generic refusal)
    files: list[str] = []
    components: dict[str, str] = {}
    version: Optional[str] = None


class RunDecision(BundleReview):
    run_id: str
    time: str


def accepted_versions(setting: Optional[str]) -> set[str]:
    """The app versions a site accepts: its comma-separated setting, else the installed fedtune's."""
    if not setting:
        return {__version__}
    return {v.strip() for v in setting.split(",") if v.strip()}


def review_bundle(content: bytes, versions: set[str]) -> BundleReview:
    digest = hashlib.sha256(content).hexdigest()

    def refuse(reason: str, **seen) -> BundleReview:
        return BundleReview(bundle=digest, accepted=False, reason=reason, **seen)

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            files = bundle.namelist()
            manifest_bytes = bundle.read(MANIFEST) if MANIFEST in files else None
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as exc:
        return refuse(f"the bundle is not a readable zip archive ({exc})")
    if manifest_bytes is None:
        return refuse(f"the bundle has no {MANIFEST}", files=files)
    try:
        manifest = tomllib.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return refuse(f"the bundle's {MANIFEST} is not valid TOML ({exc})", files=files)
    app = manifest.get("tool", {}).get("flwr", {}).get("app", {}) if isinstance(manifest.get("tool"), dict) else {}
    components = {str(k): str(v) for k, v in (app.get("components") or {}).items()} if isinstance(app, dict) else {}
    version = manifest.get("project", {}).get("version") if isinstance(manifest.get("project"), dict) else None
    seen = {"files": files, "components": components, "version": str(version) if version is not None else None}
    other = [f for f in files if f != MANIFEST and not f.startswith(FLOWER_METADATA)]
    if other:
        shown = ", ".join(other[:10]) + (f" and {len(other) - 10} more" if len(other) > 10 else "")
        return refuse(f"the bundle carries files other than {MANIFEST}: {shown}", **seen)
    if version not in versions:
        return refuse(f"app version {version!r} is not one this site accepts ({', '.join(sorted(versions))})", **seen)
    from fedtune.deployment.flower import app_manifest

    if _shape(manifest) != _shape(app_manifest(str(version))):
        return refuse(f"the bundle's {MANIFEST} is not fedtune's app manifest (components {components})", **seen)
    return BundleReview(bundle=digest, accepted=True, **seen)


def _shape(manifest: dict) -> dict:
    """The manifest with its run-config values left out (a run may set them; their keys stay)."""
    shape = json.loads(json.dumps(manifest))
    config = shape.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if isinstance(config, dict):
        shape["tool"]["flwr"]["app"]["config"] = sorted(config)
    return shape


def record_decision(state_folder: Path, run_id: str, review: BundleReview) -> Optional[RunDecision]:
    """Append the decision to ``runs.jsonl`` unless this run and bundle are recorded already;
    returns the new record (None when it was known)."""
    path = Path(state_folder) / RUNS_FILE
    if any(d.run_id == run_id and d.bundle == review.bundle for d in run_decisions(state_folder)):
        return None
    decision = RunDecision(run_id=run_id, time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           **review.model_dump())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:  # one short line, one write: appended whole
        fh.write(decision.model_dump_json() + "\n")
    return decision


def run_decisions(state_folder: Path) -> list[RunDecision]:
    """Every recorded decision, oldest first (a line that does not parse is skipped)."""
    path = Path(state_folder) / RUNS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(RunDecision.model_validate_json(line))
        except ValueError:
            continue
    return out
