"""The site's secret randomness for DP-SGD.

DP's guarantee needs the Poisson sample and the noise to be unknown to whoever sees the update,
and the accountant assumes the two are independent and that every training it counts drew
fresh randomness. So each training attempt gets two seeds, for the sampler and for the noise,
each derived with its own domain label from a random key only the site holds (kept in its state
folder) and a fresh nonce from the OS's secure random source. Nothing the coordinator chooses
(run id, round, the config's seed) can make two attempts draw the same values.

A site that trains WITHOUT differential privacy (its own allow-non-private switch, a run with
privacy.enabled = false) has nothing to keep secret: its seeds come from the run's public
train.seed, the site's name and the round (``public_seeds``), so a round retrained after a
coordinator restart, or the same run started twice, draws the same data order and the same update.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple, Optional

KEY_FILE = "dp-noise.key"
KEY_BYTES = 32


class DPSeeds(NamedTuple):
    sample: int   # the Poisson sampler's generator
    noise: int    # the Gaussian noise's generator
    other: int    # everything else random in training (dropout): never the sampler's or the noise's


def site_key(state_dir: Path) -> bytes:
    """The site's 32-byte secret, created once. Written to a temp file, synced, then linked into
    place, so a reader never sees it incomplete; a short read is retried, then refused."""
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if another process of this site won the race
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    for attempt in range(5):
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"{path}: corrupt DP noise key ({len(key)} bytes); delete it to draw a new one")


def dp_seeds(key: bytes, run_id: str, rnd: int) -> DPSeeds:
    """Fresh, independent seeds for one training attempt of (run, round)."""
    nonce = secrets.token_bytes(16)

    def derive(domain: str) -> int:
        msg = f"fedtune-dp/{domain}/{run_id}/{rnd}/".encode() + nonce
        return int.from_bytes(hmac.new(key, msg, hashlib.sha256).digest()[:8], "little") >> 1

    return DPSeeds(sample=derive("poisson-sample"), noise=derive("gaussian-noise"), other=derive("other"))


def public_seeds(seed: int, site: str, rnd: int) -> DPSeeds:
    """Reproducible seeds for training WITHOUT DP only: the same (train.seed, site, round) always
    gives the same seeds, whatever the run id (a resumed run is a new Flower run). Nothing here is
    secret: never use these where a sample or noise must be unpredictable."""

    def derive(domain: str) -> int:
        msg = f"fedtune-public/{domain}/{seed}/{site}/{rnd}".encode()
        return int.from_bytes(hashlib.sha256(msg).digest()[:8], "little") >> 1

    return DPSeeds(sample=derive("shuffle"), noise=derive("unused-noise"), other=derive("other"))


def simulated_site_key(seed: int, site: str) -> bytes:
    """The key a *simulated* site's membership hashes use (its local test split): derived from
    the run's public train.seed and the site's name, so that two simulations of the same sites
    hold out the same rows and compare value for value. Whoever runs a simulation owns every
    site in it; a deployed site always uses its own secret (:func:`site_key`)."""
    return hashlib.sha256(f"fedtune-simulated-site/{seed}/{site}".encode()).digest()


def membership_key(settings, seed: int, state_folder: Optional[Path]) -> bytes:
    """The key of a site's membership hashes (its test split: fedtune/data/membership.py): a
    deployed site's own secret; a simulated site's from the run's seed (:func:`simulated_site_key`)."""
    if settings.simulated:
        return simulated_site_key(seed, settings.site_id)
    if state_folder is None:
        raise RuntimeError("a site's test split needs its state folder (its secret key)")
    return site_key(state_folder)
