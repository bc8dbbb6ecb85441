"""The generic reasons a site may give the coordinator when it does not train (client/replies.py
writes them; server/health.py reads them). Nothing else of a failure leaves the site, so these
few words are also how the coordinator tells "will not train" (final) from "failed" (may recover).
"""

import re

REFUSED_BUDGET = "refused (privacy budget)"
REFUSED_POLICY = "refused (site policy)"
DATA_ERROR = "data error"
INTERNAL_ERROR = "internal error"
KINDS = (REFUSED_BUDGET, REFUSED_POLICY, DATA_ERROR, INTERNAL_ERROR)
REFUSALS = (REFUSED_BUDGET, REFUSED_POLICY)

_REFUSAL = re.compile(r"([A-Za-z0-9._-]{1,64}): (" + "|".join(re.escape(k) for k in REFUSALS) + r")")


def refusing_site(error: str) -> str | None:
    """The site named in a refusal ("site-3: refused (privacy budget)"), else None."""
    found = _REFUSAL.search(error or "")
    return found.group(1) if found else None


def refusal_kind(error: str) -> str | None:
    """Which refusal ("refused (privacy budget)" / "refused (site policy)"), else None."""
    found = _REFUSAL.search(error or "")
    return found.group(2) if found else None
