"""The epsilon of a site's dataset, from its ledger: training and evaluation answers composed.

A deployed site splits its rows by a keyed hash of each row (fedtune/data/membership.py): a row
is a test row or a training row whatever the other rows are, so a neighbouring file (one row
added or removed) differs from it in the training rows only or in the test rows only. DP-SGD
reads only the training rows and an evaluation answer (client/evaluation_policy.py) only the
test rows, so the two compose in parallel: the file's epsilon is the larger of the two, each
composed by the accountant over all of its own entries (every run), never their sum. This holds
for adaptive requests too (an adapter chosen after earlier answers): for a neighbour that
differs in a test row, every training output has the same distribution under both files.

With a privacy unit of k > 1 rows (fedtune/data/units.py) one unit's rows can fall on both
sides, so there the two are composed sequentially, as one accountant history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

History = list[tuple[float, float, int]]


def history(entries: Iterable) -> History:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def compose(entries: Sequence, delta: float, mechanism: Optional[str] = None) -> float:
    """One accountant history over ``entries``; entries from different accountants (a site that
    changed its setting): the larger epsilon of the accountants involved."""
    from fedtune.privacy.accounting import compute_epsilon

    if not entries:
        return 0.0
    mechanisms = [mechanism] if mechanism else sorted({e.accountant for e in entries})
    return max(compute_epsilon(history(entries), delta, m) for m in mechanisms)


def sequential(entries: Sequence) -> bool:
    """True where training and evaluation must be composed sequentially (a privacy unit of k > 1)."""
    return max((e.rows_per_unit or 1) for e in entries) > 1 if entries else False


def dataset_epsilon(entries: Sequence, delta: float, mechanism: Optional[str] = None) -> float:
    """Epsilon of every entry of one dataset: max(training, evaluation), or both as one history
    where a privacy unit spans more than one row (see the module text)."""
    entries = list(entries)
    if sequential(entries):
        return compose(entries, delta, mechanism)
    train = [e for e in entries if not e.is_evaluation]
    evaluation = [e for e in entries if e.is_evaluation]
    return max(compose(train, delta, mechanism), compose(evaluation, delta, mechanism))
