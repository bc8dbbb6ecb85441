"""The site's one long-lived worker: it answers every message of this site's SuperNode.

``fedtune client`` runs Flower's SuperNode with ``--isolation process``: the SuperNode then
starts no process of its own for a message; it waits for an external worker to claim the task
from its local Runtime API. This module is that worker (in Flower 1.42 the same calls as
Flower's own SuperExec, ``supercore/superexec/run_superexec.py``, and ``flwr-clientapp``,
``supernode/runtime/run_clientapp.py``):

1. claim the next ClientApp task with ``AcquireTask``, signed with the SuperExec auth secret that
   the agent creates (mode 0600) and hands to both the SuperNode and this worker: no other
   process on the machine can claim the site's tasks;
2. per task, with the task's own token: pull the message, Context, run and bundle
   (``pull_task_input``), send task heartbeats;
3. review the bundle (client/approval.py) without unpacking or importing anything from it;
   answer with the **installed** ``fedtune.client.app:app`` when the bundle is fedtune's app,
   else with ``<site>: refused (site policy)``; any failure is a generic reason, with the
   traceback in the site's log;
4. push the reply and the Context back (``push_message`` / ``push_task_output``), refusals
   included: SecAgg+'s keys live in ``context.state``.

Tasks are handled one at a time, in this one process, so what a site builds for a run (its
tokenizer, rows, the base model with LoRA, its noise calibration: client/runtime.py) is built
once per run and kept warm between messages and rounds. Nothing from the bundle is imported,
executed or put on ``sys.path``. The Flower functions used are pinned with Flower itself
(``fedtune.deployment.flower.FLOWER_VERSION``), and tests/test_site_worker.py checks them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("fedtune.client.site")

POLL_SECONDS = 0.05        # between AcquireTask calls to the site's own SuperNode (loopback)
TASK_RETRY_SECONDS = 60.0  # a task whose Runtime API stays unreachable this long is given up
DROP_CHECK_SECONDS = 1.0   # while a task's input arrives: how often to check that it still exists
OBJECT_POLL_SECONDS = 0.02  # a message object the SuperNode is still receiving: asked again this often ...
OBJECT_WAIT_SECONDS = 5.0   # ... for this long, before Flower's own backoff (1 s, 2 s, ... 10 s) applies


def _retry(max_time: Optional[float]):
    """Retries transport errors only. Flower's own HTTP retry (``make_simple_http_retry_invoker``)
    sends SIGINT to its own process on a 401, which is right for a one-message process and wrong
    for a worker that outlives a stale task token."""
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=5), recoverable_exceptions=httpx.TransportError,
                        max_tries=None, max_time=max_time)


def _runtime_client(address: str, interceptors: list, max_time: Optional[float]):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=_retry(max_time),
    )


def serve(address: str, secret: bytes, poll: float = POLL_SECONDS, stop: Optional[threading.Event] = None) -> int:
    """Claim and answer this SuperNode's ClientApp tasks until ``stop`` is set; returns how many
    were handled. A SuperNode that restarts is waited for."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    if not secret:
        raise ValueError("the site worker needs the SuperExec auth secret that its SuperNode was started with")
    stop = stop or threading.Event()
    client = _runtime_client(address, [SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))], max_time=None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])

    def acquire() -> Optional[str]:
        """The token of the next task, if the SuperNode has one."""
        claimed = client.AcquireTask(request)
        return claimed.token if claimed.HasField("task") and claimed.token else None

    handled = 0
    try:
        while not stop.is_set():
            try:
                token = acquire()
            except Exception as exc:  # noqa: BLE001 - e.g. a SuperNode that refuses us: keep the worker
                log.error("site worker: could not ask the SuperNode for a task: %s", exc)
                stop.wait(5.0)
                continue
            while token is not None:  # a task dropped while its input was pulled hands over the next one
                token = run_task(address, token, acquire)
                handled += 1
            stop.wait(poll)
    finally:
        client.close()
    return handled


class TaskDropped(RuntimeError):
    """The SuperNode no longer holds the task (its run stopped while the message was arriving)."""


class _TaskClient:
    """One task's Runtime API client; once the task is dropped, pulling its objects stops."""

    def __init__(self, client):
        self._client = client
        self.dropped = threading.Event()

    def __getattr__(self, name):
        return getattr(self._client, name)

    def PullObject(self, request):  # noqa: N802 - Flower's method name
        """The SuperNode creates the task before the message's objects have arrived from the
        SuperLink; Flower's pull then backs off 1 s, 2 s, 4 s... Ask again every
        ``OBJECT_POLL_SECONDS`` for ``OBJECT_WAIT_SECONDS`` first (its own store, on loopback)."""
        deadline = time.monotonic() + OBJECT_WAIT_SECONDS
        while True:
            if self.dropped.is_set():
                raise TaskDropped("the SuperNode dropped this task")
            response = self._client.PullObject(request)
            if response.object_available or not response.object_found or time.monotonic() > deadline:
                return response
            time.sleep(OBJECT_POLL_SECONDS)


def _heartbeat_fn(client: _TaskClient):
    """Flower's ``make_task_heartbeat_fn_http``, except that a task the SuperNode no longer holds
    is marked dropped (Flower's own raises SIGINT, which would stop this long-lived worker)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        if not res.success:
            client.dropped.set()
        return True

    return beat


def _pull_input(client: _TaskClient, acquire) -> tuple[Optional[tuple], Optional[str]]:
    """Flower's ``pull_task_input``, watched: (the task's input, None), or (None, the next task's
    token) when the SuperNode moved on. In Flower 1.42 a SuperNode handles one message at a time
    (it waits for the reply before it pulls the next), so a new task while this one's input is
    still arriving means it dropped this one (a run stopped mid-transfer: it neither deletes the
    message nor finishes the task), whose objects would otherwise be pulled for two hours."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    got: dict = {}

    def pull() -> None:
        try:
            got["input"] = pull_task_input(client)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            got["error"] = exc

    puller = threading.Thread(target=pull, name="fedtune-pull-task-input", daemon=True)
    puller.start()
    while puller.is_alive():
        puller.join(DROP_CHECK_SECONDS)
        if not puller.is_alive():
            break
        if client.dropped.is_set():  # the task's heartbeat was refused
            return None, None
        try:
            token = acquire()
        except Exception as exc:  # noqa: BLE001 - the SuperNode restarting: keep waiting for the input
            log.warning("site worker: could not ask the SuperNode for a task: %s", exc)
            continue
        if token is not None:
            client.dropped.set()
            return None, token
    if "error" in got:
        raise got["error"]
    return got["input"], None


def run_task(address: str, token: str, acquire=lambda: None) -> Optional[str]:
    """One task, as Flower's ``run_clientapp`` does it, minus the bundle. Returns the token of a
    task claimed meanwhile (when this one turned out dropped), else None."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _TaskClient(_runtime_client(address, [RuntimeTokenHttpInterceptor(token)], max_time=TASK_RETRY_SECONDS))
    heartbeat = HeartbeatSender(_heartbeat_fn(client))
    heartbeat.start()
    context, status, code, what, following = None, SubStatus.FAILED, 1, "a message", None
    started = time.monotonic()
    try:
        task_input, following = _pull_input(client, acquire)
        if task_input is None:
            what = "a message the SuperNode dropped while it arrived"
        else:
            message, context, run, fab = task_input
            what = f"{message.metadata.message_type} message (round {message.metadata.group_id or '-'})"
            pulled = time.monotonic()
            reply = answer(message, context, run.run_id, fab.content)
            answered = time.monotonic()
            push_message(client, reply, context)
            status, code = SubStatus.COMPLETED, 0
            what += f" (pull {pulled - started:.2f} s, answer {answered - pulled:.2f} s, push"
            what += f" {time.monotonic() - answered:.2f} s)"
    except Exception as exc:  # noqa: BLE001 - nothing of it may reach the coordinator
        log.error("site worker: the task could not be completed: %s", exc, exc_info=exc)
    finally:
        try:
            # Only the generic status travels; the Context carries SecAgg+'s keys to the next message.
            push_task_output(client=client, context=context, sub_status=status, details="")
        except Exception as exc:  # noqa: BLE001 - the task lapses at the SuperNode; the worker goes on
            log.error("site worker: could not close the task: %s", exc)
        heartbeat.stop()
        if following is None:
            client.close()  # a dropped task's puller may still hold it for one more call
    log.info("site worker: %s %s in %.2f s", "answered" if code == 0 else "abandoned" if following or
             client.dropped.is_set() else "failed", what, time.monotonic() - started)
    return following


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m fedtune.client.site_worker``: started (and restarted) by ``fedtune client``."""
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    parser = argparse.ArgumentParser(prog="fedtune-site-worker", description="fedtune's site worker")
    parser.add_argument("--runtime-api-address", required=True, help="the site's SuperNode, 127.0.0.1:PORT")
    parser.add_argument("--secret-file", required=True, type=Path, help="the SuperExec auth secret (mode 0600)")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of the SuperNode otherwise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.runtime_api_address, load_superexec_auth_secret(str(args.secret_file)), args.poll, stop)
    return 0


def answer(message, context, run_id, bundle: bytes):
    """The reply to one message: the installed fedtune ClientApp's for an approved run, else a
    refusal; never an exception's text."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    from fedtune.federation.refusal import INTERNAL_ERROR, REFUSED_POLICY

    from .approval import accepted_versions, record_decision, review_bundle
    from .replies import log_failure, safe_site_id, write_site_log
    from .settings import settings_from_node_config

    site_id, folder = None, None
    try:
        settings = settings_from_node_config(context.node_config)
        site_id, folder = settings.site_id, settings.state_dir
        review = review_bundle(bundle, accepted_versions(settings.accept_app_versions))
        recorded = record_decision(folder, str(run_id), review) if folder is not None else None
        if not review.accepted:
            if recorded is not None:  # once per run: every message of it is refused the same way
                text = (f"refused run {run_id}: {review.reason}; bundle sha256 {review.bundle}, "
                        f"files {review.files}, components {review.components}")
                log.warning("%s: %s", site_id, text)
                write_site_log(folder, text)
            reason = f"{safe_site_id(site_id)}: {REFUSED_POLICY}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        from .app import app  # the fedtune installed at this site

        return app(message=message, context=context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a generic reply
        try:
            reason = log_failure(site_id, exc, folder, what=str(message.metadata.message_type))
        except Exception:  # noqa: BLE001 - even if the site cannot log it
            reason = f"{safe_site_id(site_id)}: {INTERNAL_ERROR}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


if __name__ == "__main__":
    raise SystemExit(main())
