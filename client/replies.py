"""What a site says back when it cannot answer: a short, generic reason for the coordinator,
the whole story for the site's own log.

Flower forwards a ClientApp's exception text to the coordinator, and fedtune's data errors name
the site's file, rows, columns and raw label values (which is what the site's operator needs).
So every failure is split in two here: :func:`public_reason` ("site-2: refused (privacy
budget)", "site-2: data error", "site-2: internal error") is all that travels;
:func:`log_failure` writes the full message and traceback to the site's logger and to
``site.log`` in its state folder.
"""

from __future__ import annotations

import functools
import logging
import re
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from fedtune.federation.refusal import DATA_ERROR, INTERNAL_ERROR, KINDS, REFUSED_BUDGET, REFUSED_POLICY

log = logging.getLogger("fedtune.client.site")

LOG_FILE = "site.log"

# An exception class may set ``public_kind`` to say which generic reason it maps to.

_SAFE_SITE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SiteReplyError(RuntimeError):
    """A failure already logged at the site; its text is the generic reason, safe to send."""


def failure_kind(exc: BaseException) -> str:
    """Which generic kind of refusal or failure ``exc`` is."""
    from fedtune.data.errors import DataError

    kind = getattr(exc, "public_kind", None)
    if isinstance(kind, str) and kind in KINDS:
        return kind
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "BudgetRefusal" in names:
        return REFUSED_BUDGET
    if isinstance(exc, PermissionError) or "PolicyRefusal" in names:
        return REFUSED_POLICY
    if isinstance(exc, DataError) or _from_data_layer(exc):
        return DATA_ERROR
    return INTERNAL_ERROR


def public_reason(site_id: Optional[str], exc: BaseException) -> str:
    """The text the coordinator may see: the site's name and the kind of failure, nothing else."""
    if isinstance(exc, SiteReplyError):
        return str(exc)
    return f"{safe_site_id(site_id)}: {failure_kind(exc)}"


def safe_site_id(site_id: Optional[str]) -> str:
    # The site id comes from the site's own settings; still, never let it carry arbitrary text.
    return site_id if site_id and _SAFE_SITE.fullmatch(site_id) else "site"


def log_failure(site_id: Optional[str], exc: BaseException, state_folder: Optional[Path] = None,
                what: str = "message") -> str:
    """Log ``exc`` in full at the site (logger, and ``site.log`` in its state folder when known);
    returns the generic reason to send instead."""
    reason = public_reason(site_id, exc)
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.error("%s: %s failed (the coordinator is told only %r): %s", site_id or "site", what, reason, exc)
    log.debug("%s", detail)
    if state_folder is not None:
        write_site_log(state_folder, f"{what} failed; sent {reason!r}\n{detail}")
    return reason


def write_site_log(state_folder: Path, text: str) -> None:
    """Append ``text`` to the site's own log file (never fails the caller)."""
    try:
        folder = Path(state_folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with (folder / LOG_FILE).open("a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {text.rstrip()}\n")
    except OSError as err:  # a log that cannot be written must not turn into a reply
        log.warning("cannot write the site log in %s: %s", state_folder, err)


def guarded(what: str):
    """Decorate a site client's ``fit``/``evaluate``: a failure is logged in full at the site
    and re-raised as a :class:`SiteReplyError` whose text is only the generic reason."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, parameters, config):
            try:
                return method(self, parameters, config)
            except SiteReplyError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a generic reply
                reason = log_failure(self.settings.site_id, exc, self.state_folder(config), what)
                raise SiteReplyError(reason) from None

        return run

    return wrap


def _from_data_layer(exc: BaseException) -> bool:
    # KeyError/ValueError raised by fedtune.data (labels, tokenization) carry raw values too.
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "fedtune/data/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")
