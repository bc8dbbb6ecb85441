"""A site runs only the code it installed: the bundle review, the site's own `flwr-clientapp`,
and the Flower 1.42 functions it relies on (client/approval.py, client/site_process.py)."""

import inspect
import io
import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w

from fedtune import __version__, tiny
from fedtune.client.approval import accepted_versions, review_bundle, run_decisions
from fedtune.client.site_process import LAUNCHER, answer, install_launcher
from fedtune.deployment.flower import app_manifest, write_flower_app


def _fab(folder: Path) -> bytes:
    """A bundle exactly as `flwr run` builds it from an app folder (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(folder)


def _app(tmp_path: Path, manifest: dict, files: dict[str, bytes] | None = None) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(tomli_w.dumps(manifest))
    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def _with(manifest: dict, path: str, value) -> dict:
    manifest = json.loads(json.dumps(manifest))
    *parents, key = path.split(".")
    node = manifest
    for p in parents:
        node = node[p]
    node[key] = value
    return manifest


HOSTILE_APP = b"from flwr.clientapp import ClientApp\napp = ClientApp()\n"

CASES = [
    ("fedtune's own app", app_manifest(), {}, True, ""),
    ("run config values changed", _with(app_manifest(), "tool.flwr.app.config.out", "/elsewhere"), {}, True, ""),
    ("its own ClientApp module", _with(app_manifest(), "tool.flwr.app.components.clientapp", "task:app"),
     {"task.py": HOSTILE_APP}, False, "files other than pyproject.toml: task.py"),
    ("fedtune's name, its own fedtune package", app_manifest(),
     {"fedtune/__init__.py": b"open('/tmp/x', 'w')\n", "fedtune/client/app.py": HOSTILE_APP}, False,
     "files other than pyproject.toml: fedtune/__init__.py, fedtune/client/app.py"),
    ("bytecode only", app_manifest(), {"fedtune/__init__.pyc": b"\x00" * 16}, False, "fedtune/__init__.pyc"),
    ("another component, no code", _with(app_manifest(), "tool.flwr.app.components.clientapp", "os:system"), {},
     False, "not fedtune's app manifest"),
    ("another app version", app_manifest("9.9.9"), {}, False, "app version '9.9.9' is not one this site accepts"),
    ("an added config key", _with(app_manifest(), "tool.flwr.app.config.extra", "x"), {}, False,
     "not fedtune's app manifest"),
]


@pytest.mark.parametrize("name,manifest,files,accepted,reason", CASES, ids=[c[0] for c in CASES])
def test_a_site_accepts_only_fedtunes_own_bundle(tmp_path, name, manifest, files, accepted, reason):
    content = {"pyproject.toml": tomli_w.dumps(manifest).encode(), **files}
    # Flower's builder filters file types (it leaves .pyc out); a hostile coordinator need not use it.
    fab = (_fab(_app(tmp_path, manifest, files)) if not any(n.endswith(".pyc") for n in files)
           else _zip(content))
    review = review_bundle(fab, accepted_versions(None))
    assert review.accepted is accepted, review
    assert reason in review.reason
    assert len(review.bundle) == 64 and review.files[0] == "pyproject.toml"


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


def test_a_site_may_accept_other_app_versions_and_refuses_what_is_not_a_bundle(tmp_path):
    fab = _fab(_app(tmp_path, app_manifest("0.0.9")))
    assert not review_bundle(fab, accepted_versions(None)).accepted
    assert review_bundle(fab, accepted_versions(f"{__version__}, 0.0.9")).accepted
    assert not review_bundle(b"not a zip", accepted_versions(None)).accepted
    assert "no pyproject.toml" in review_bundle(_zip({"x.py": b""}), accepted_versions(None)).reason


# -- the site's own flwr-clientapp ------------------------------------------------------------------

def test_the_site_agent_puts_fedtunes_flwr_clientapp_first_on_the_supernodes_path(tmp_path):
    from fedtune.deployment.site_agent import site_env

    env = site_env(tmp_path / "state")
    found = shutil.which(LAUNCHER, path=env["PATH"])
    assert found == str(tmp_path / "state" / "bin" / LAUNCHER)
    # It runs fedtune's main (its own description), not Flower's flwr-clientapp.
    out = subprocess.run([found, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "fedtune's site process for one message" in out.stdout, out.stderr
    assert shutil.which("flower-superexec", path=env["PATH"])  # Flower's SuperExec itself, from this install


def test_the_flower_functions_the_site_process_relies_on_are_as_pinned():
    """Flower 1.42.0: the SuperExec starts `flwr-clientapp` by its bare name (so PATH decides),
    and the runtime functions keep the signatures used in client/site_process.py."""
    import flwr
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    assert flwr.__version__ == "1.42.0"
    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == LAUNCHER
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert 'command = ["flower-superexec"]' in inspect.getsource(start_client_internal.start_client_internal)
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details"]


def _message(message_type, records):
    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    return make_message(Metadata(run_id=7, message_id="m-1", src_node_id=0, dst_node_id=3, reply_to_message_id="",
                                 group_id="g", created_at=time.time(), ttl=3600.0, message_type=message_type), records)


def test_a_refused_run_gets_the_generic_refusal_for_every_message_and_is_recorded_once(tmp_path):
    from flwr.app import RecordDict
    from flwr.app.message_type import MessageType

    from fedtune.client.ledger_view import format_ledger_view, ledger_view

    data = tiny.write_csv(tiny.separable_rows(20, seed=1), tmp_path / "site-a.csv")
    state = tmp_path / "state"
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state)})
    hostile = _zip({"pyproject.toml": tomli_w.dumps(app_manifest()).encode(),
                    "fedtune/__init__.py": b"raise SystemExit('hostile code ran')\n"})
    for kind in (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE):
        reply = answer(_message(kind, RecordDict()), context, 7, hostile)
        assert reply.has_error() and reply.error.reason == "site-a: refused (site policy)"
    decisions = run_decisions(state)
    assert [(d.run_id, d.accepted) for d in decisions] == [("7", False)]
    assert "fedtune/__init__.py" in decisions[0].reason
    site_log = (state / "site.log").read_text()
    assert "refused run 7" in site_log and decisions[0].bundle in site_log
    shown = format_ledger_view(ledger_view(state))
    assert "runs reviewed before answering: 1" in shown and "run 7" in shown and "REFUSED" in shown


def test_an_approved_run_is_answered_by_the_installed_fedtune(tmp_path):
    from flwr.app import ConfigRecord, RecordDict
    from flwr.app.message_type import MessageType

    from fedtune.config import load_config
    from fedtune.federation.preflight import RECORD, PreflightReply, PreflightRequest

    data = tiny.write_csv(tiny.separable_rows(40, seed=1), tmp_path / "site-a.csv")
    state = tmp_path / "state"
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state)})
    request = PreflightRequest(run_id="r", config=load_config(None).to_toml(), version=__version__)
    own = _fab(write_flower_app(tmp_path / "app"))
    reply = answer(_message(MessageType.QUERY, RecordDict({RECORD: ConfigRecord(request.to_record())})),
                   context, 8, own)
    assert not reply.has_error()
    assert PreflightReply.from_record(reply.content.config_records[RECORD]).ready
    assert [(d.run_id, d.accepted) for d in run_decisions(state)] == [("8", True)]


def test_a_broken_state_folder_still_answers_only_generic_words(tmp_path):
    from flwr.app import RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common.serde import message_to_proto

    data = tiny.write_csv(tiny.separable_rows(20, seed=1), tmp_path / "site-a.csv")
    state = tmp_path / "private-state"
    state.write_text("a file where the state folder should be")
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state)})
    hostile = _zip({"pyproject.toml": tomli_w.dumps(app_manifest()).encode(), "x.py": b""})
    reply = answer(_message(MessageType.TRAIN, RecordDict()), context, 9, hostile)
    assert reply.has_error() and reply.error.reason == "site-a: internal error"
    assert b"private-state" not in message_to_proto(reply).SerializeToString()
