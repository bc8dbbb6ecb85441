"""SecAgg+ as the site enforces it, before Flower's client mod sends anything.

Flower 1.42's mod takes the coordinator's settings as they come: a reconstruction threshold of
1, a neighbour set holding only the site itself, and "active" and "dead" lists that overlap are
all accepted, and each site sees only its own lists. With one neighbour and threshold 1 the
coordinator rebuilt a site's mask seed from its own share and read the site's update. So each
stage is checked here first, and a round that breaks any rule is refused
(``refused (site policy)``) before the site answers it:

- setup: the share count and the sites sampled (the site's neighbour set, itself included, is
  at most the smaller) are at least the site's ``secagg-min-neighbours`` (default 2: at least one
  other site's mask hides the update); the reconstruction threshold is above half the shares (so no node's
  mask seed and its key can both be rebuilt: that would take two disjoint majorities) and at most
  the shares; the coordinator names the same mask generator as the site's
  (fedtune/federation/secagg_masks.py: a mismatch would silently corrupt the sum);
- key sharing: the neighbour set holds the site, at most the announced shares and at least the
  threshold and the site's minimum (fewer than the shares when a neighbour dropped out at setup);
- training: every key share comes from a neighbour;
- unmasking: the active and dead lists do not overlap and name only neighbours.
"""

from __future__ import annotations

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from fedtune.federation.secagg_masks import CONFIG_KEY, GENERATOR


class SecAggRefusal(PermissionError):
    """A SecAgg+ round this site will not take part in (a generic policy refusal for the coordinator)."""


def check_secagg_message(content, state_records, node_id: int, min_neighbours: int) -> None:
    """Raise :class:`SecAggRefusal` for a SecAgg+ message this site must not answer; removes
    fedtune's own setup key before Flower's mod reads the record."""
    configs = content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        _check_setup(configs, min_neighbours)
        del configs[CONFIG_KEY]
        return
    saved = state_records.get(RECORD_KEY_STATE)
    if saved is None:
        raise SecAggRefusal(f"SecAgg+ stage {stage!r} without a setup at this site")
    shares, threshold = int(saved["share_num"]), int(saved["threshold"])
    neighbours = set(saved.get("public_keys_dict:K", []))
    if stage == Stage.SHARE_KEYS:
        # Fewer than the announced shares when neighbours dropped out at setup (SecAgg+'s dropout
        # tolerance); never fewer than the threshold or the site's minimum, never more.
        announced = {int(nid) for nid in configs.keys() if nid != Key.STAGE}
        if node_id not in announced or not max(min_neighbours, threshold) <= len(announced) <= shares:
            raise SecAggRefusal(f"SecAgg+ key sharing names {len(announced)} neighbours "
                                f"({'with' if node_id in announced else 'without'} this site) for {shares} shares, "
                                f"threshold {threshold}, this site's minimum {min_neighbours}")
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        outside = set(configs.get(Key.SOURCE_LIST, [])) - neighbours
        if outside:
            raise SecAggRefusal(f"SecAgg+ key shares from {len(outside)} node(s) outside this site's neighbours")
    elif stage == Stage.UNMASK:
        active, dead = list(configs.get(Key.ACTIVE_NODE_ID_LIST, [])), list(configs.get(Key.DEAD_NODE_ID_LIST, []))
        if len(set(active)) != len(active) or len(set(dead)) != len(dead) or set(active) & set(dead):
            raise SecAggRefusal("SecAgg+ unmasking lists a node twice, or both active and dead")
        if (set(active) | set(dead)) - neighbours:
            raise SecAggRefusal("SecAgg+ unmasking names nodes outside this site's neighbours")
        if len(active) < threshold:
            raise SecAggRefusal(f"SecAgg+ unmasking with {len(active)} active nodes, below the threshold {threshold}")


def _check_setup(configs, min_neighbours: int) -> None:
    generator = configs.get(CONFIG_KEY)
    if generator != GENERATOR:
        raise SecAggRefusal(f"SecAgg+ mask generator {generator!r} from the coordinator, {GENERATOR!r} at this site: "
                            "the masks would not cancel (the coordinator needs the same fedtune)")
    # More shares than sites sampled is Flower's way of saying "every sampled site": the neighbour
    # set is then all of them, and key sharing checks its real size against the threshold.
    sampled, shares, threshold = (int(configs[k]) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    if min(shares, sampled) < min_neighbours:
        raise SecAggRefusal(f"SecAgg+ with {shares} shares for {sampled} sites: this site needs at least "
                            f"{min_neighbours} (secagg-min-neighbours)")
    if not shares / 2 < threshold <= shares:
        raise SecAggRefusal(f"SecAgg+ reconstruction threshold {threshold} of {shares} shares: this site needs more "
                            "than half of the shares")
