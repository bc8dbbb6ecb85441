"""Flower's SecAgg+ workflow with a deadline for every stage, dropout recovery that works when a
site dies before or while training, and a result that says whether the round aggregated.

Flower 1.42's ``SecAggPlusWorkflow`` has one timeout for all four stages, and its unmasking
asks for the key shares of every site sampled at setup: a site that dies before it shared its
keys left no shares anywhere, so one such site halts the round ("Not enough shares to recover
secret") although the others hold every share needed. Here the protocol continues with the
sites that shared their keys (the survivors never masked with the dead one), and a site that
dies during training is unmasked with its neighbours' shares as the protocol intends."""

from __future__ import annotations

import io
from logging import INFO
from typing import Callable, Optional

import numpy as np
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.supercore import log as flwr_log

from fedtune.federation.secagg_masks import CONFIG_KEY, GENERATOR, install

install()  # the coordinator unmasks with the sites' generator, never Flower's 32-bit one


class ResilientSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``max_weight`` may be changed between rounds (the coordinator sets it from the sites'
    pre-flight, in configure_fit, which Flower's setup stage calls before it reads it)."""

    def __init__(self, *, stage_timeout: float, train_timeout: float, on_halt: Callable[[str, WorkflowState], None],
                 on_stage: Optional[Callable[[str], None]] = None, **settings):
        super().__init__(timeout=stage_timeout, **settings)
        self.stage_timeout, self.train_timeout = stage_timeout, train_timeout
        self.on_halt = on_halt
        self.on_stage = on_stage  # told each stage's name as it starts (the round's stage timings)

    def setup_stage(self, grid, context, state: WorkflowState) -> bool:
        # Each site checks that its mask generator is the coordinator's (fedtune/federation/secagg_masks.py).
        return super().setup_stage(_NamingMaskGenerator(grid), context, state)

    def share_keys_stage(self, grid, context, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        # Only the sites that shared their keys take part from here on: the others hold no
        # share and no survivor masked its update with them.
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid, context, state: WorkflowState) -> bool:
        before = len(state.failures)
        ok = super().collect_masked_vectors_stage(_CheckingMaskedVectors(grid), context, state)
        # Flower 1.42 appends each error reply of this stage twice (in two loops over the replies).
        once = {id(f.args[0]) if f.args else id(f): f for f in state.failures[before:]}
        state.failures[before:] = list(once.values())
        return ok

    def unmask_stage(self, grid, context, state: WorkflowState) -> bool:
        # A site that died while training is unmasked against the survivors only: Flower would
        # also remove masks with sites that never sent an update (two or more dropouts).
        for node in state.sampled_node_ids - state.active_node_ids:
            state.nid_to_neighbours[node] = (state.nid_to_neighbours[node] & state.active_node_ids) | {node}
        return super().unmask_stage(grid, context, state)

    def __call__(self, grid, context) -> None:
        state = WorkflowState()
        stages = [(self.setup_stage, self.stage_timeout, "setup"),
                  (self.share_keys_stage, self.stage_timeout, "key sharing"),
                  (self.collect_masked_vectors_stage, self.train_timeout, "training"),
                  (self.unmask_stage, self.stage_timeout, "unmasking")]
        flwr_log(INFO, "Secure aggregation commencing.")
        for step, timeout, name in stages:
            if self.on_stage is not None:
                self.on_stage(name)
            self.timeout = timeout
            answered_before = len(state.active_node_ids)
            if not step(grid, context, state):
                sampled = answered_before if name != "setup" else len(state.nid_to_proxies)
                self.on_halt(f"SecAgg+ stopped at the {name} stage: {len(state.active_node_ids)} of {sampled} "
                             f"site(s) answered within {timeout:g} s, threshold {state.threshold}", state)
                flwr_log(INFO, "Secure aggregation halted.")
                return
        flwr_log(INFO, "Secure aggregation completed.")


class _NamingMaskGenerator:
    """The grid, but every SecAgg+ setup message also names the coordinator's mask generator."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        for msg in messages:
            msg.content.config_records[RECORD_KEY_CONFIGS][CONFIG_KEY] = GENERATOR
        return self._grid.send_and_receive(messages, *args, **kwargs)


def _npy_shape(data: bytes) -> tuple:
    """The shape in a serialized ndarray's .npy header (Flower's ``ndarray_to_bytes``), read without
    the data."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return tuple(header(f)[0])


class _CheckingMaskedVectors:
    """The grid, but a site's masked update that is not integer arrays of the shapes of the adapter it
    was sent (plus SecAgg+'s weight factor), or a reply Flower could not read, comes back as that
    site's error reply. Flower would add it
    into the sum as it is: numpy raises on most wrong shapes and broadcasts some silently (a row of
    an adapter matrix's width), corrupting every site's aggregate. As an error, the site counts as
    dropped out and its masks are removed with its neighbours' shares."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        from flwr.app import Error, Message
        from flwr.common import bytes_to_ndarray
        from flwr.common.constant import ErrorCode
        from flwr.compat.common import recorddict_compat as compat
        from flwr.common.secure_aggregation.secaggplus_constants import Key

        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = []
        for reply in self._grid.send_and_receive(messages, *args, **kwargs):
            request = sent.get(reply.metadata.src_node_id)
            if reply.has_error() or request is None:
                replies.append(reply)
                continue
            want = [(1,), *(_npy_shape(a.data) for a in request.content.array_records["fitins.parameters"].values())]
            try:
                arrays = [bytes_to_ndarray(b)
                          for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
                compat.recorddict_to_fitres(reply.content, True)  # what Flower reads of it next
                got = [a.shape for a in arrays]
                if got == want and any(a.dtype.kind not in "iu" for a in arrays):
                    got = f"{[str(a.dtype) for a in arrays]} values, not integers"
            except Exception as e:  # noqa: BLE001 - whatever a site sent
                got = f"an unreadable reply ({type(e).__name__})"
            if got != want:
                reason = f"its masked update is not the adapter: expected integer arrays of shapes {want}, got {got}"
                reply = Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=request)
            replies.append(reply)
        return replies
