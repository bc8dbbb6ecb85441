"""The mark a site puts in front of a budget refusal's error message (client/refusals.py), so
the coordinator (server/health.py) can tell "will not train" (final) from "failed" (may recover)."""

import re

BUDGET_REFUSAL_MARK = "[fedtune: budget refusal]"


def refusing_site(error: str) -> str | None:
    """The site named in a marked refusal ("[fedtune: budget refusal] site-3: ...")."""
    found = re.search(re.escape(BUDGET_REFUSAL_MARK) + r" ([A-Za-z0-9._-]+):", error)
    return found.group(1) if found else None
