"""The site's secret randomness for DP-SGD.

DP's guarantee needs the noise (and the Poisson sample) to be unknown to whoever sees the
update. Seeding them from the run config would let the coordinator, which writes that config,
regenerate the noise and subtract it. They are derived from a random key that only the site holds,
kept in its state folder, so a resumed run still draws the same values.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

KEY_FILE = "dp-noise.key"


def site_key(state_dir: Path) -> bytes:
    path = Path(state_dir) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this site created it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
    key = path.read_bytes()
    if len(key) != 32:
        raise RuntimeError(f"{path}: corrupt DP noise key ({len(key)} bytes); delete it to draw a new one")
    return key


def round_seed(key: bytes, run_id: str, rnd: int) -> int:
    digest = hashlib.sha256(key + f"|{run_id}|{rnd}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
