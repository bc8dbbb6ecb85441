"""SecAgg+ settings: safe defaults from the number of sites and the adapter's values, and
refusal before round 1 of settings that would silently corrupt the aggregate."""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import BaseModel

from fedtune.config import FederationConfig
from fedtune.federation.preflight import weight_bucket  # what sites declare of their size

log = logging.getLogger("fedtune.server")


class SecAggSettingsError(ValueError):
    pass


def quantisation_error(settings: "SecAggSettings", examples: int) -> float:
    """The largest error SecAgg+'s quantisation adds to each value of a site with ``examples``
    rows: the site sends (examples / max_weight) * value in steps of 2 * clipping / levels, so
    its value itself is known to 2 * clipping * max_weight / (levels * examples)."""
    return 2 * settings.clipping_range * settings.max_weight / (settings.quantization_range * max(1, examples))


class SecAggSettings(BaseModel):
    # A float is Flower's "this fraction of the sampled sites" (1.0: all of them).
    num_shares: int | float
    reconstruction_threshold: int | float
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float


ALL_SHARE_UP_TO = 16  # sites per round up to which every site holds a share of every other's keys


def default_shares(sites: int) -> int:
    """SecAgg+'s shares (neighbours + 1) per site: every sampled site up to ``ALL_SHARE_UP_TO``,
    then 2 * ceil(log2 n) + 1 (Bell et al., CCS 2020: a neighbourhood of O(log n) keeps the
    protocol's guarantees while each site's key sharing and mask work stop growing with n;
    13 at 50 sites, 21 at 1,000)."""
    if sites <= ALL_SHARE_UP_TO:
        return sites
    return min(sites, 2 * math.ceil(math.log2(sites)) + 1)


def sites_per_round(fed: FederationConfig) -> int:
    # Flower samples int(fraction * available) sites, at least min_fit_clients.
    return max(1, int(fed.fraction_train * fed.sites))


def secagg_settings(fed: FederationConfig, adapter: list[np.ndarray], max_site_examples: int | None) -> SecAggSettings:
    n = sites_per_round(fed)
    if n < 2:
        raise SecAggSettingsError(
            f"SecAgg+ needs at least 2 sites per round, this run samples {n} "
            f"(federation.sites = {fed.sites}, fraction_train = {fed.fraction_train}): add sites, raise "
            "fraction_train, or set federation.secure_aggregation = false"
        )
    if n == 2 and not (fed.secagg_num_shares or fed.secagg_reconstruction_threshold):
        # Flower's integer shares must exceed 2; with two sites every site holds a share and
        # both must answer. The coordinator still sees only the sum (each of the two sites can
        # of course subtract its own update from it, as with any two-party average).
        log.warning("SecAgg+ with 2 sites per round: no dropout tolerance; a third site adds it")
        shares, threshold = 1.0, 1.0
    else:
        shares = fed.secagg_num_shares or default_shares(n)
        threshold = fed.secagg_reconstruction_threshold
        if not threshold:  # derived: two thirds of the shares, below the share count
            threshold = min(max(2, math.ceil(2 * shares / 3)), shares - 1)
    if isinstance(shares, int) and (not 2 < shares <= n or not shares / 2 < threshold < shares):
        raise SecAggSettingsError(
            f"federation.secagg_num_shares = {shares} / secagg_reconstruction_threshold = {threshold}: "
            f"need 2 < shares <= sites per round ({n}) and shares / 2 < threshold < shares (every site "
            "refuses a threshold at or below half its shares)"
        )
    # Known site sizes (simulation): the power-of-two bucket of the largest. A deployed
    # coordinator knows none: the sites declare their buckets in the pre-flight (set_max_weight).
    max_weight = fed.secagg_max_weight or (float(weight_bucket(max_site_examples)) if max_site_examples else 0.0)
    if max_site_examples is not None and max_site_examples > max_weight:
        raise SecAggSettingsError(
            f"federation.secagg_max_weight = {max_weight} is below a site's example count ({max_site_examples}): "
            "SecAgg+ would overflow; raise it"
        )
    peak = max(float(np.max(np.abs(a))) for a in adapter) if adapter else 0.0
    # Values grow during training: demand a 4x margin over the starting adapter.
    if 4 * peak > fed.secagg_clipping_range:
        raise SecAggSettingsError(
            f"federation.secagg_clipping_range = {fed.secagg_clipping_range} would clip the adapter "
            f"(largest value {peak:.3g}, 4x margin needed): raise it to at least {4 * peak:.3g}"
        )
    if n * fed.secagg_quantization_range >= fed.secagg_modulus_range:
        raise SecAggSettingsError(
            f"{n} sites x secagg_quantization_range {fed.secagg_quantization_range} overflows "
            f"secagg_modulus_range {fed.secagg_modulus_range}: lower the quantization range or raise the modulus"
        )
    if fed.secagg_modulus_range & (fed.secagg_modulus_range - 1):
        raise SecAggSettingsError(f"federation.secagg_modulus_range = {fed.secagg_modulus_range} must be a power of 2")
    return SecAggSettings(
        num_shares=shares, reconstruction_threshold=threshold, clipping_range=fed.secagg_clipping_range,
        quantization_range=fed.secagg_quantization_range, modulus_range=fed.secagg_modulus_range,
        max_weight=max_weight,
    )
