"""SecAgg+'s masks from a cryptographic generator, at both ends.

Flower 1.42 expands every mask seed with ``pseudo_rand_gen``
(``flwr.common.secure_aggregation.secaggplus_utils``): the 32-byte seed is folded by XOR to 32
bits and fed to NumPy's MT19937. Unmasking reveals each surviving site's private-mask seed by
design, so only the pairwise masks hide a site's update, and a search over 2^32 seeds per
neighbour undoes them (upstream issue 7522). Here each mask is SHAKE-256 of the full seed
(domain-separated), reduced to the mask range without bias, and :func:`install` puts it in place
of ``pseudo_rand_gen`` in the two Flower modules that imported it by name: the client mod (each
site) and the server workflow (the coordinator's unmasking). fedtune's ClientApp and ServerApp
call :func:`install` when they are loaded, in a deployment and in a simulation alike.

Both ends must expand seeds the same way, or the sum is silently wrong. The coordinator's
fedtune names its generator in the SecAgg+ setup message (:data:`CONFIG_KEY`); a site whose
generator differs, or that is not told, refuses the round before it sends anything
(client/secagg_policy.py).
"""

from __future__ import annotations

import hashlib

import numpy as np

GENERATOR = "shake256-v1"
CONFIG_KEY = "fedtune.mask-generator"   # in the setup stage's ConfigRecord, next to Flower's keys
_DOMAIN = b"fedtune/secagg-mask/shake256/v1\x00"


def secure_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Drop-in for Flower's ``pseudo_rand_gen``: one int64 array per shape, each value uniform in
    [0, num_range), from SHAKE-256 of the whole seed. Power-of-two ranges (fedtune's modulus
    always is) take the low bits of 8 bytes; any other range is sampled by rejection."""
    if num_range < 1 or num_range > 2**62:
        raise ValueError(f"mask range {num_range} outside 1..2^62")
    counts = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    values = _uniform(seed, num_range, sum(counts))
    out, start = [], 0
    for dims, n in zip(dimensions_list, counts):
        chunk = values[start:start + n]
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
        start += n
    return out


def _uniform(seed: bytes, num_range: int, n: int) -> np.ndarray:
    power_of_two = num_range & (num_range - 1) == 0
    limit = (2**64 // num_range) * num_range  # accepted draws: below the largest multiple of the range
    got: list[np.ndarray] = []
    have, block = 0, 0
    while have < n:
        want = (n - have) + ((n - have) >> 4) + 16
        stream = hashlib.shake_256(_DOMAIN + block.to_bytes(8, "little") + bytes(seed)).digest(8 * want)
        draws = np.frombuffer(stream, dtype="<u8")
        if power_of_two:
            kept = draws & np.uint64(num_range - 1)
        else:
            kept = draws[draws < np.uint64(limit)] % np.uint64(num_range)
        got.append(kept.astype(np.int64))
        have += len(kept)
        block += 1
    return np.concatenate(got)[:n]


# The two modules that imported ``pseudo_rand_gen`` by name. Imported by module path: the package
# ``flwr.client.mod.secure_aggregation`` re-exports a *function* named ``secaggplus_mod``, which
# hides the module of the same name from attribute access.
_FLOWER_MODULES = ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow")


def _modules():
    import importlib

    return [importlib.import_module(name) for name in _FLOWER_MODULES]


def install() -> None:
    """Put :func:`secure_rand_gen` in place of Flower's 32-bit generator wherever Flower's
    SecAgg+ code calls it (idempotent)."""
    for module in _modules():
        if not hasattr(module, "pseudo_rand_gen"):  # the pinned Flower changed: fail loudly, never mask weakly
            raise RuntimeError(f"{module.__name__} has no pseudo_rand_gen: fedtune's SecAgg+ masks need flwr 1.42.0")
        module.pseudo_rand_gen = secure_rand_gen

