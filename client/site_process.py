"""What a fedtune site runs for each message: its own ``flwr-clientapp``.

In Flower 1.42 a SuperNode (``--isolation subprocess``) starts Flower's SuperExec, which starts
the bare command ``flwr-clientapp`` from ``PATH`` for every message
(``flwr.supercore.superexec.executor.subprocess_executor``). Flower's own ``flwr-clientapp``
installs the run's bundle and imports the ClientApp it names, bundle folder first on
``sys.path`` (``flwr.supernode.runtime.run_clientapp``), so the coordinator would choose the code
that runs next to the site's data. ``fedtune client`` puts a ``flwr-clientapp`` of its own
first on the SuperNode's ``PATH`` (:func:`install_launcher`), which runs :func:`main`:

1. pull the task (message, context, run, bundle) from the SuperNode with Flower's own
   ``pull_task_input``, over the SuperNode's local Runtime API, with the task's token;
2. review the bundle (client/approval.py) without unpacking or importing anything from it;
   record the decision in the site's state folder;
3. answer with the **installed** ``fedtune.client.app:app`` when the bundle is fedtune's app,
   else with ``<site>: refused (site policy)``; any failure here is a generic reason, with the
   traceback in the site's log;
4. push the reply and the Context back (Flower's ``push_message`` / ``push_task_output``:
   SecAgg+'s keys live in ``context.state``).

Nothing from the bundle is imported, executed or put on ``sys.path``. The Flower functions used
are pinned with Flower itself (``fedtune.deployment.flower.FLOWER_VERSION``), and
tests/test_site_process.py checks their signatures.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("fedtune.client.site")

LAUNCHER = "flwr-clientapp"      # the name Flower's SuperExec starts from PATH
LAUNCHER_DIR = "bin"             # in the site's state folder, first on the SuperNode's PATH


def install_launcher(state_folder: Path, python: str = sys.executable) -> Path:
    """Write ``<state>/bin/flwr-clientapp``, which runs this module with the site's own Python;
    returns its folder (to put first on the SuperNode's PATH). A script file, not ``python -m``:
    ``-m`` would put the working directory first on ``sys.path``."""
    folder = Path(state_folder) / LAUNCHER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / LAUNCHER
    text = (f"#!{python}\n"
            "# Written by `fedtune client`: the SuperNode starts this instead of Flower's flwr-clientapp, so\n"
            "# every message is answered by the fedtune installed here, never by a run's bundle.\n"
            "import sys\n\n"
            "from fedtune.client.site_process import main\n\n"
            "sys.exit(main())\n")
    tmp = script.with_name(script.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, script)
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    """``flwr-clientapp``'s command line (as Flower's SuperExec calls it)."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(prog=LAUNCHER, description="fedtune's site process for one message")
    parser.add_argument("--runtime-api-address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS)
    add_args_flwr_app_common(parser)  # --token/--token-file, --insecure, --root-certificates, --parent-pid
    args = parser.parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    return run_task(args.runtime_api_address, token, args.insecure, certificates, args.parent_pid)


def run_task(address: str, token: str, insecure: bool, certificates: Optional[bytes] = None,
             parent_pid: Optional[int] = None) -> int:
    """One task of the SuperNode, as Flower's ``run_clientapp`` does it, minus the bundle."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=LAUNCHER), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, code = None, SubStatus.FAILED, 1
    try:
        message, context, run, fab = pull_task_input(client)
        reply = answer(message, context, run.run_id, fab.content)
        push_message(client, reply, context)
        status, code = SubStatus.COMPLETED, 0
    except Exception as exc:  # noqa: BLE001 - nothing of it may reach the coordinator
        log.error("site process: the task could not be completed: %s", exc, exc_info=exc)
    finally:
        retry.max_tries = 1
        # Only the generic status travels; the Context carries SecAgg+'s keys to the next message.
        push_task_output(client=client, context=context, sub_status=status, details="")
        heartbeat.stop()
        client.close()
    return code


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
