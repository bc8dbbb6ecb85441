"""SecAgg+ as the site enforces it (client/secagg_policy.py) and masks from a cryptographic
generator at both ends (fedtune/federation/secagg_masks.py), on Flower's real protocol code."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.client import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.client.mods import secure_aggregation_mod
from fedtune.client.secagg_policy import SecAggRefusal, check_secagg_message
from fedtune.federation.secagg_masks import CONFIG_KEY, GENERATOR, secure_rand_gen

from test_secagg_dropout import SiteGrid, _Site, _mean, _resilient, _run, _sites, server_identity  # noqa: F401


# -- the mask generator -----------------------------------------------------------------------------

def test_loading_fedtunes_apps_replaces_flowers_32_bit_mask_generator_at_both_ends():
    """In a fresh interpreter, as a SuperNode's message process or a ServerApp process starts."""
    for app in ("fedtune.client.app", "fedtune.server.app"):
        code = (f"import {app}\nimport importlib\n"
                "from fedtune.federation.secagg_masks import secure_rand_gen\n"
                "for m in ('flwr.client.mod.secure_aggregation.secaggplus_mod',"
                " 'flwr.server.workflow.secure_aggregation.secaggplus_workflow'):\n"
                "    assert importlib.import_module(m).pseudo_rand_gen is secure_rand_gen, m\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]


def test_the_masks_flower_calls_use_the_whole_seed():
    """Seeds that agree in their 32-bit XOR fold give Flower's MT19937 the same masks (a 2^32
    search finds them); the generator Flower's modules call now gives different ones."""
    flower = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as weak

    seed = bytes(range(32))
    twin = bytearray(seed)
    for i in (0, 4):  # the same 4 bytes XORed into two words: the fold is unchanged
        twin[i:i + 4] = (int.from_bytes(twin[i:i + 4], "little") ^ 0xDEADBEEF).to_bytes(4, "little")
    dims = [(50,)]
    assert np.array_equal(weak(seed, 2**40, dims)[0], weak(bytes(twin), 2**40, dims)[0])
    assert not np.array_equal(flower.pseudo_rand_gen(seed, 2**40, dims)[0],
                              flower.pseudo_rand_gen(bytes(twin), 2**40, dims)[0])


@pytest.mark.parametrize("num_range", [2**40, 2**32, 1000, 3])
def test_masks_are_in_range_deterministic_and_roughly_uniform(num_range):
    a = secure_rand_gen(b"s" * 32, num_range, [(4000,), (), (3, 2)])
    b = secure_rand_gen(b"s" * 32, num_range, [(4000,), (), (3, 2)])
    assert [x.shape for x in a] == [(4000,), (), (3, 2)] and all(x.dtype == np.int64 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    values = a[0]
    assert values.min() >= 0 and values.max() < num_range
    assert abs(values.mean() / (num_range - 1) - 0.5) < 0.03  # uniform: mean half the range (4000 draws)


# -- the site's rules, stage by stage ---------------------------------------------------------------

def _setup(shares=3, threshold=2, sampled=3, generator=GENERATOR):
    cfg = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sampled, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
           Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0}
    if generator is not None:
        cfg[CONFIG_KEY] = generator
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(cfg)})


def _state(shares=3, threshold=2, neighbours=(1, 2, 3)):
    return {RECORD_KEY_STATE: ConfigRecord({"share_num": shares, "threshold": threshold,
                                            "public_keys_dict:K": list(neighbours),
                                            "public_keys_dict:V": [b"k"] * (2 * len(neighbours))})}


def _share_keys(nodes):
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS,
                                                         **{str(n): [b"pk1-%d" % n, b"pk2-%d" % n] for n in nodes}})})


def _unmask(active, dead):
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                                                         Key.DEAD_NODE_ID_LIST: dead})})


@pytest.mark.parametrize("content, state, refused", [
    (_setup(), {}, None),                                                      # fedtune's own: 3 shares, threshold 2
    (_setup(shares=2, threshold=2, sampled=2), {}, None),                      # two sites, both needed
    (_setup(shares=1, threshold=1, sampled=1), {}, "1 shares"),                # a neighbour set of the site alone
    (_setup(shares=2, threshold=1, sampled=2), {}, "more than half"),          # threshold 1: one share rebuilds a seed
    (_setup(shares=4, threshold=2, sampled=4), {}, "more than half"),          # half is not enough
    (_setup(shares=4, threshold=3, sampled=3), {}, None),                      # a site lost since: all 3 are neighbours
    (_setup(shares=3, threshold=2, sampled=1), {}, "at least 2"),             # sampled alone
    (_setup(generator=None), {}, "mask generator None"),                       # a coordinator that does not say
    (_setup(generator="mt19937-32"), {}, "'mt19937-32' from the coordinator"),  # or uses another one
    (_share_keys([1, 2, 3]), _state(), None),
    (_share_keys([1, 2]), _state(), None),                                    # one neighbour dropped out at setup
    (_share_keys([1]), _state(), "1 neighbours"),                              # the site alone
    (_share_keys([2, 3]), _state(), "without this site"),
    (_share_keys([1, 2, 3, 4]), _state(), "4 neighbours"),                     # more than the shares
    (_share_keys([1, 2, 3]), _state(shares=4, threshold=3), None),            # fewer sites than shares
    (_unmask([1, 2], [3]), _state(), None),
    (_unmask([1, 2], [2]), _state(), "both active and dead"),                  # different stories to different sites
    (_unmask([1, 2, 2], []), _state(), "twice"),
    (_unmask([1, 2, 9], []), _state(), "outside this site's neighbours"),
    (_unmask([1], [2, 3]), _state(), "below the threshold"),
    (_unmask([1, 2], []), {}, "without a setup"),
])
def test_the_site_refuses_secagg_rounds_that_would_expose_its_update(content, state, refused):
    if refused is None:
        check_secagg_message(content, state, node_id=1, min_neighbours=2)
        assert CONFIG_KEY not in content.config_records[RECORD_KEY_CONFIGS]  # Flower's mod never sees fedtune's key
    else:
        with pytest.raises(SecAggRefusal, match=refused):
            check_secagg_message(content, state, node_id=1, min_neighbours=2)


def test_a_site_may_demand_more_neighbours():
    with pytest.raises(SecAggRefusal, match="at least 4"):
        check_secagg_message(_setup(), {}, node_id=1, min_neighbours=4)


# -- end to end on Flower's protocol code -----------------------------------------------------------

class _FedtuneSites(SiteGrid):
    """Each site runs fedtune's SecAgg+ mod (its rules, then Flower's mod) as a simulated site."""

    make_app = staticmethod(lambda value, examples: ClientApp(client_fn=lambda ctx: _Site(value, examples).to_client(),
                                                              mods=[secure_aggregation_mod]))

    def __init__(self, sites, die):
        super().__init__(sites, die)
        for i, node in enumerate(sites):
            self.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": len(sites)})


@pytest.mark.parametrize("stage", [None, "setup", "share_keys", "collect_masked_vectors"])
def test_fedtunes_coordinator_and_sites_aggregate_the_exact_mean_also_when_a_site_drops_out(monkeypatch, stage):
    """The sites' own checks leave SecAgg+'s dropout tolerance intact: a site lost at any stage
    (at setup its neighbours see fewer keys than shares) and the others still aggregate."""
    import test_secagg_dropout

    monkeypatch.setattr(test_secagg_dropout, "SiteGrid", _FedtuneSites)
    sites, halts = _sites(4), []
    got = _run(_resilient(halts, 4, 3), sites, {102: stage} if stage else {})
    assert halts == []
    nodes = sorted(sites) if stage is None else [n for n in sites if n != 102]
    np.testing.assert_allclose(got, _mean(sites, nodes), atol=1e-4)


def test_a_coordinator_with_another_mask_generator_gets_refusals_not_a_wrong_sum(monkeypatch):
    """Flower's own workflow names no generator: every fedtune site refuses at setup, the round
    stops, and the model is unchanged (a silently wrong sum is what a mismatch would give)."""
    import test_secagg_dropout

    monkeypatch.setattr(test_secagg_dropout, "SiteGrid", _FedtuneSites)
    sites = _sites(4)
    got = _run(SecAggPlusWorkflow(num_shares=4, reconstruction_threshold=3, max_weight=1024.0, timeout=5), sites, {})
    assert np.array_equal(got, np.zeros_like(got))


def test_at_20_sites_each_site_shares_keys_with_a_log_sized_neighbourhood_and_the_sum_is_exact(monkeypatch):
    """Above 16 sites the coordinator's default shares grow with log2(sites) (server/secagg.py),
    with a threshold the sites' own checks accept; one site lost while training, the rest still
    aggregate to the exact mean."""
    import test_secagg_dropout

    from fedtune.config import load_config
    from fedtune.server.secagg import default_shares, secagg_settings

    assert [default_shares(n) for n in (3, 16, 17, 20, 50, 1000)] == [3, 16, 11, 11, 13, 21]
    fed = load_config(None, ["federation.sites=20"]).federation
    settings = secagg_settings(fed, [np.zeros(3, np.float32)], 50)
    assert (settings.num_shares, settings.reconstruction_threshold) == (11, 8)
    monkeypatch.setattr(test_secagg_dropout, "SiteGrid", _FedtuneSites)
    sites, halts = _sites(20), []
    got = _run(_resilient(halts, settings.num_shares, settings.reconstruction_threshold), sites,
               {105: "collect_masked_vectors"})
    assert halts == []
    np.testing.assert_allclose(got, _mean(sites, [n for n in sites if n != 105]), atol=1e-4)
