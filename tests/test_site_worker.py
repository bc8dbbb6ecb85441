"""A site runs only the code it installed: the bundle review, the site's long-lived worker, the
SuperNode it runs beside, and the Flower 1.42 functions they rely on (client/approval.py,
client/site_worker.py, fedtune/deployment/supernode_pace.py, fedtune/deployment/site_agent.py)."""

import inspect
import io
import json
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w

from fedtune import __version__, tiny
from fedtune.client.approval import accepted_versions, review_bundle, run_decisions
from fedtune.client.site_worker import answer
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


# -- the site's worker and its SuperNode ----------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_only_the_worker_holding_the_sites_secret_can_claim_its_supernodes_tasks(tmp_path):
    """The SuperNode as the agent starts it (--isolation process, paced, secret file): its
    Runtime API refuses AcquireTask without the secret or with another one."""
    import threading

    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from fedtune.client.site_worker import _runtime_client, serve
    from fedtune.deployment import processes
    from fedtune.deployment.flower import flower_env, supernode_command, wait_for_port
    from fedtune.deployment.site_agent import write_secret

    secret = write_secret(tmp_path)
    (tmp_path / "node.toml").write_text('data-path = "/nonexistent"\n')
    port = _free_port()
    # No SuperLink listens on port 9: the SuperNode's Runtime API is up before it connects.
    cmd = supernode_command("127.0.0.1:9", tmp_path / "node.toml", port, None, None, insecure=True,
                            secret_file=secret)
    supernode = processes.start(cmd, flower_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 60, supernode)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            _runtime_client(f"127.0.0.1:{port}", [], max_time=5).AcquireTask(request)
        stop = threading.Event()
        threading.Timer(1.0, stop.set).start()
        assert serve(f"127.0.0.1:{port}", secret.read_bytes(), stop=stop) == 0  # accepted, no task yet
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

        wrong = SuperExecAuthHttpInterceptor(master_secret=b"x" * 32,
                                             protected_methods={"/flwr.proto.Runtime/AcquireTask"})
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            _runtime_client(f"127.0.0.1:{port}", [wrong], max_time=5).AcquireTask(request)
    finally:
        processes.stop(supernode)


def test_the_supernodes_fixed_waits_are_shortened_only_while_a_run_is_active():
    from fedtune.deployment.supernode_pace import ACTIVE_PULL_SECONDS, REPLY_POLL_SECONDS, PacedTime

    clock = SimpleNamespace(now=1000.0)
    clock.monotonic = lambda: clock.now
    paced = PacedTime(clock)
    assert paced.pace(3) == 3                        # idle: Flower's own pull interval
    paced.message_arrived()
    assert paced.pace(3) == ACTIVE_PULL_SECONDS < 3  # a run is active: pull often
    assert paced.pace(0.5) == REPLY_POLL_SECONDS < 0.5
    assert paced.pace(7) == 7                        # anything else is Flower's
    clock.now += 121
    assert paced.pace(3) == 3                        # quiet for two minutes: back to 3 s


def test_a_sites_heartbeat_interval_reaches_what_flower_reports_and_waits_by(tmp_path):
    """``fedtune client --heartbeat-interval``: the SuperNode launcher sets the interval Flower 1.42
    hard-codes (30 s) where the SuperNode reports it and where its heartbeat thread waits by;
    outside Flower's 10-1800 s it is an error before anything starts."""
    import importlib

    from fedtune.deployment import supernode_pace
    from fedtune.deployment.flower import supernode_command

    modules = [importlib.import_module(name) for name in supernode_pace.PINNED_HEARTBEAT_LINES]
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [30, 30]
    try:
        supernode_pace.set_heartbeat(10.0)
        assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [10.0, 10.0]
    finally:
        for m in modules:
            m.HEARTBEAT_DEFAULT_INTERVAL = 30
    for bad in (5.0, 3600.0):
        with pytest.raises(ValueError, match="between 10 and 1800"):
            supernode_pace.set_heartbeat(bad)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 32)
    cmd = supernode_command("127.0.0.1:1", tmp_path / "node.toml", 9094, None, None, insecure=True,
                            secret_file=secret, heartbeat_interval=12.0)
    assert cmd[cmd.index("--heartbeat-interval") + 1] == "12.0"
    assert "--heartbeat-interval" not in supernode_command("127.0.0.1:1", tmp_path / "node.toml", 9094, None, None,
                                                            insecure=True, secret_file=secret)


def test_a_worker_that_keeps_dying_is_restarted_then_stops_the_agent(tmp_path):
    import sys

    from fedtune.deployment.flower import DeploymentError, flower_env
    from fedtune.deployment.site_agent import WORKER_RESTARTS, WorkerKeeper

    keeper = WorkerKeeper([sys.executable, "-c", "raise SystemExit(3)"], flower_env(), {})
    keeper.start()
    with pytest.raises(DeploymentError, match="exited 5 times"):
        for _ in range(WORKER_RESTARTS + 1):
            keeper.process.wait(30)
            keeper.check()
    assert len(keeper.starts) == WORKER_RESTARTS
    keeper.stop()


def test_a_task_the_supernode_dropped_while_its_input_arrived_hands_over_to_the_next(monkeypatch):
    """Flower 1.42's SuperNode neither deletes the message nor finishes the task when a run stops
    while the message's objects arrive; its input would be pulled for two hours. The worker
    notices the SuperNode's next task, stops pulling the dropped one and answers the next."""
    import threading

    from flwr.supernode.runtime import run_clientapp

    from fedtune.client import site_worker

    monkeypatch.setattr(site_worker, "DROP_CHECK_SECONDS", 0.05)
    stopped = threading.Event()

    def pull_forever(client):  # an object that never becomes available
        try:
            while True:
                client.PullObject(None)
                time.sleep(0.02)
        finally:
            stopped.set()

    monkeypatch.setattr(run_clientapp, "pull_task_input", pull_forever)
    unavailable = SimpleNamespace(object_found=True, object_available=False)
    client = site_worker._TaskClient(SimpleNamespace(PullObject=lambda request: unavailable))
    offers = iter([None, None, "next-token"])
    assert site_worker._pull_input(client, lambda: next(offers)) == (None, "next-token")
    assert client.dropped.is_set() and stopped.wait(5)  # the dropped task's pulls stop

    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: ("message", "context", "run", "fab"))
    fresh = site_worker._TaskClient(SimpleNamespace())
    assert site_worker._pull_input(fresh, lambda: pytest.fail("no need to look")) == (
        ("message", "context", "run", "fab"), None)


def test_an_object_still_arriving_at_the_supernode_is_asked_for_again_at_once():
    from fedtune.client import site_worker

    answers = iter([SimpleNamespace(object_found=True, object_available=False)] * 3
                   + [SimpleNamespace(object_found=True, object_available=True, object_content=b"x")])
    calls = []
    client = site_worker._TaskClient(SimpleNamespace(PullObject=lambda request: calls.append(request) or next(answers)))
    assert client.PullObject("id").object_content == b"x" and len(calls) == 4
    missing = SimpleNamespace(object_found=False, object_available=False)
    client = site_worker._TaskClient(SimpleNamespace(PullObject=lambda request: calls.append(request) or missing))
    assert client.PullObject("id") is missing and len(calls) == 5  # not found: Flower's error, at once


def test_a_message_object_not_yet_at_the_superlink_is_asked_for_again_after_a_short_first_wait(monkeypatch):
    """fast_object_pulls: Flower's pull with its waits between retries recorded (no real sleep)."""
    import threading

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from fedtune.deployment.flower import OBJECT_BACKOFF_SECONDS, fast_object_pulls

    waits = []

    class RecordedEvent(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return self.is_set()

    monkeypatch.setattr(inflatable_utils, "threading", SimpleNamespace(Event=RecordedEvent, Lock=threading.Lock))
    module = SimpleNamespace(pull_objects=None)
    fast_object_pulls(module)
    tries = iter(range(6))

    def pull(object_id):
        if next(tries) < 4:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(["o"], pull, max_concurrent_pulls=1) == {"o": b"content"}
    assert len(waits) == 4
    assert waits[0] <= OBJECT_BACKOFF_SECONDS * 1.2 and sum(waits) < 1.0  # Flower's own first wait alone: 1 s


def test_the_flower_functions_the_site_worker_relies_on_are_as_pinned():
    """Flower 1.42.0: with --isolation process the SuperNode starts no SuperExec (so no process
    that could run a bundle's code), AcquireTask hands out ClientApp tasks with a token, and the
    runtime functions keep the signatures used in client/site_worker.py; the SuperNode loop has
    the lines supernode_pace.py shortens."""
    import flwr
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    from fedtune.deployment.supernode_pace import check_heartbeat_pinned, check_pinned

    assert flwr.__version__ == "1.42.0"
    check_pinned(start_client_internal)
    check_heartbeat_pinned()
    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert 'if isolation == ISOLATION_MODE_SUBPROCESS:\n        runtime_address' in loop
    # One message at a time: the SuperNode waits for the reply before it pulls the next message
    # (what site_worker._pull_input relies on to tell a dropped task).
    assert "while not (reply_messages := state.get_messages_legacy(is_reply=True)):" in inspect.getsource(
        start_client_internal._push_messages)
    assert "AcquireTask" in inspect.getsource(run_superexec.run_superexec)
    assert run_superexec._SUPEREXEC_AUTH_METHODS == {"/flwr.proto.Runtime/AcquireTask"}
    assert TaskType.CLIENT_APP.value == "flwr-clientapp"
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert {"task", "token"} <= set(AcquireTaskResponse.DESCRIPTOR.fields_by_name)
    assert list(inspect.signature(SuperExecAuthHttpInterceptor).parameters) == ["master_secret", "protected_methods"]
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert "client.PullObject" in inspect.getsource(run_clientapp.pull_task_input)  # through _TaskClient
    from flwr.supercore.inflatable import inflatable_protobuf_utils

    assert "if not response.object_available:" in inspect.getsource(inflatable_protobuf_utils)
    # fast_object_pulls: both ends call the module-level name, which takes initial_backoff.
    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    assert "all_object_contents = pull_objects(" in inspect.getsource(http_grid)
    assert inspect.signature(pull_objects).parameters["initial_backoff"].default == 1
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
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state),
                                           "labels": "neg,pos"})
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
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state),
                                           "labels": "neg,pos"})
    request = PreflightRequest(run_id="r", config=load_config(None, ['data.labels=["neg","pos"]']).to_toml(),
                               version=__version__)
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
    context = SimpleNamespace(node_config={"data-path": str(data), "site-id": "site-a", "state-dir": str(state),
                                           "labels": "neg,pos"})
    hostile = _zip({"pyproject.toml": tomli_w.dumps(app_manifest()).encode(), "x.py": b""})
    reply = answer(_message(MessageType.TRAIN, RecordDict()), context, 9, hostile)
    assert reply.has_error() and reply.error.reason == "site-a: internal error"
    assert b"private-state" not in message_to_proto(reply).SerializeToString()
