"""The coordinator's side of the pre-flight (fedtune.federation.preflight): ask every newly
connected site whether it can take part, before it is sampled for a round."""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from fedtune import __version__
from fedtune.federation.preflight import RECORD, PreflightReply, PreflightRequest

log = logging.getLogger("fedtune.server")


def ask_sites(grid, node_ids: Iterable[int], run_id: str, config_toml: str, timeout: float
              ) -> dict[int, PreflightReply | str]:
    """Each node's reply, or why there is none (an error text) when it did not answer in time."""
    request = PreflightRequest(run_id=run_id, config=config_toml, version=__version__).to_record()
    nodes = sorted(node_ids)
    messages = [Message(RecordDict({RECORD: ConfigRecord(dict(request))}), dst_node_id=n,
                        message_type=MessageType.QUERY, group_id="preflight") for n in nodes]
    answers: dict[int, PreflightReply | str] = {n: f"no answer within {timeout:g} s" for n in nodes}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            answers[node] = f"error: {reply.error.reason[:200]}"
        elif RECORD in reply.content.config_records:
            answers[node] = PreflightReply.from_record(reply.content.config_records[RECORD])
        else:
            answers[node] = "answered without a pre-flight record (an older fedtune?)"
    return answers
