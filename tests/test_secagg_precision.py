"""SecAgg+'s arithmetic with fedtune's settings, on numbers: Flower's own quantiser, masks and
unmasking steps, for sites from 100 to 100,000 rows in one aggregate."""

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine, factor_extract, parameters_addition, parameters_mod, parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedtune.config import load_config
from fedtune.server.secagg import quantisation_error, secagg_settings, weight_bucket

SIZES = [100, 1_000, 10_000, 100_000]


def secagg_mean(values, weights, s):
    """What the coordinator gets from SecAgg+: each site's masked, quantised (w / max_weight) * x,
    summed modulo the modulus, unmasked and dequantised exactly as Flower 1.42 does it."""
    dims = [v.shape for v in values[0]]
    seeds = [bytes([i + 1]) * 32 for i in range(len(values))]
    total = None
    for i, (arrays, w) in enumerate(zip(values, weights)):
        q_ratio = round(w / s.max_weight * s.quantization_range)            # the client, stage 2
        scaled = parameters_multiply(arrays, q_ratio / s.quantization_range)
        q = factor_combine(q_ratio, quantize(scaled, s.clipping_range, s.quantization_range))
        masked = parameters_addition(q, pseudo_rand_gen(seeds[i], s.modulus_range, [(1,), *dims]))
        for j in range(len(values)):  # pairwise masks cancel in the sum
            if j != i:
                pair = pseudo_rand_gen(bytes([min(i, j) + 1, max(i, j) + 1]) * 16, s.modulus_range, [(1,), *dims])
                masked = (parameters_addition if i > j else parameters_subtraction)(masked, pair)
        masked = parameters_mod(masked, s.modulus_range)
        total = masked if total is None else parameters_addition(total, masked)
    total = parameters_mod(total, s.modulus_range)                            # the server, unmask stage
    for seed in seeds:
        total = parameters_subtraction(total, pseudo_rand_gen(seed, s.modulus_range, [(1,), *dims]))
    q_total, recon = factor_extract(parameters_mod(total, s.modulus_range))
    out = dequantize(recon, s.clipping_range, s.quantization_range)
    return [(v - (len(values) - 1) * s.clipping_range) * (s.quantization_range / q_total) for v in out]


def test_sites_from_100_to_100000_rows_aggregate_within_1e_3_of_the_smallest_contribution():
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    rng = np.random.default_rng(1)
    # A site sends its adapter to SecAgg+ in float64 (client/agent.py): in float32 the quantiser's
    # own arithmetic would round away ~6 of its 30 bits.
    values = [[rng.normal(0, 0.05, (64, 48)), rng.normal(0, 0.05, 300)] for _ in SIZES]
    fed = load_config(None, [f"federation.sites={len(SIZES)}"]).federation
    s = secagg_settings(fed, values[0], max(SIZES))
    assert s.max_weight == weight_bucket(100_000) == 131_072
    got = secagg_mean(values, SIZES, s)
    total = sum(SIZES)
    plain = [sum(w * v[k].astype(np.float64) for v, w in zip(values, SIZES)) / total for k in range(2)]
    smallest = [SIZES[0] * a.astype(np.float64) / total for a in values[0]]
    err = np.sqrt(sum(np.sum((g - p) ** 2) for g, p in zip(got, plain)))
    contribution = np.sqrt(sum(np.sum(c ** 2) for c in smallest))
    assert err / contribution <= 1e-3, err / contribution
    # the analytic bound on each of the smallest site's values holds
    assert quantisation_error(s, SIZES[0]) < 1e-3 * 0.05


def test_flowers_old_defaults_would_lose_the_small_site():
    """The same run with Flower's default 2**22 levels: the smallest site's part is lost in noise."""
    np.random.seed(0)
    rng = np.random.default_rng(1)
    values = [[rng.normal(0, 0.05, 2000)] for _ in SIZES]
    fed = load_config(None, [f"federation.sites={len(SIZES)}", "federation.secagg_quantization_range=4194304",
                             "federation.secagg_modulus_range=4294967296"]).federation
    s = secagg_settings(fed, values[0], max(SIZES))
    got = secagg_mean(values, SIZES, s)[0]
    plain = sum(w * v[0].astype(np.float64) for v, w in zip(values, SIZES)) / sum(SIZES)
    smallest = SIZES[0] * values[0][0].astype(np.float64) / sum(SIZES)
    assert np.linalg.norm(got - plain) / np.linalg.norm(smallest) > 1e-2


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (100, 128), (1024, 1024), (1025, 2048),
                                       (5000, 8192), (100_000, 131_072)])
def test_weight_buckets_are_the_next_power_of_two(n, bucket):
    assert weight_bucket(n) == bucket
