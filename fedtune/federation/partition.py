"""Split one dataset's rows across simulated sites with flwr-datasets partitioners."""

from __future__ import annotations

import warnings

import pandas as pd

METHODS = ("iid", "dirichlet", "pathological")


def _partitioner(method: str, num_sites: int, label_column: str, alpha: float, labels_per_site: int,
                 seed: int, min_size: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if method == "iid":
        return IidPartitioner(num_partitions=num_sites)
    if method == "dirichlet":
        # self_balancing stops one site from swallowing most rows when alpha is small.
        return DirichletPartitioner(
            num_partitions=num_sites, partition_by=label_column, alpha=alpha,
            min_partition_size=min_size, self_balancing=True, shuffle=True, seed=seed,
        )
    # "deterministic" gives site i labels i..i+k-1 (cyclically), the mode that uses the most
    # labels; "random" may leave labels (and their rows) unused.
    return PathologicalPartitioner(
        num_partitions=num_sites, partition_by=label_column, num_classes_per_partition=labels_per_site,
        class_assignment_mode="deterministic", shuffle=True, seed=seed,
    )


def _check(df: pd.DataFrame, num_sites: int, method: str, label_column: str, alpha: float,
           labels_per_site: int) -> None:
    if method not in METHODS:
        raise ValueError(f"federation.partition = {method!r}: expected one of {', '.join(METHODS)} (or 'files')")
    if num_sites < 1:
        raise ValueError(f"federation.sites = {num_sites}: need at least 1 site")
    if num_sites > len(df):
        raise ValueError(f"federation.partition = {method!r}: {num_sites} sites but only {len(df)} rows; "
                         "use fewer sites or more data")
    if method == "iid":
        return
    if label_column not in df.columns:
        raise ValueError(f"federation.partition = {method!r} splits by label, but there is no "
                         f"{label_column!r} column (columns: {', '.join(map(str, df.columns))})")
    num_labels = df[label_column].nunique()
    if method == "dirichlet" and not alpha > 0:
        raise ValueError(f"federation.alpha = {alpha}: must be > 0 (small = skewed, large = close to iid)")
    if method == "pathological":
        if not 1 <= labels_per_site <= num_labels:
            raise ValueError(f"federation.labels_per_site = {labels_per_site}: must be between 1 and the "
                             f"{num_labels} distinct labels in {label_column!r}")
        # Site i holds labels i..i+k-1, so sites + k - 1 labels are covered at most.
        if num_sites + labels_per_site - 1 < num_labels:
            raise ValueError(f"federation.partition = 'pathological': {num_sites} sites with {labels_per_site} "
                             f"labels each cannot cover all {num_labels} labels, so rows would be dropped; "
                             f"use more sites or a larger labels_per_site")


def partition_rows(df: pd.DataFrame, num_sites: int, method: str, label_column: str = "label",
                   alpha: float = 0.5, labels_per_site: int = 2, seed: int = 0) -> list[pd.DataFrame]:
    """The rows of each site, in site order; the same split for the same arguments."""
    from datasets import Dataset

    _check(df, num_sites, method, label_column, alpha, labels_per_site)
    if method == "iid":
        # IidPartitioner cuts contiguous shards without shuffling: shuffle first, or rows
        # sorted by label (or by source) would give each site a skewed slice.
        df = df.sample(frac=1.0, random_state=seed)
    ds = Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)
    # Dirichlet redraws (up to 10 times) until every site has min_size rows. flwr's default of
    # 10 fails on small datasets, so ask for at most half the average site size, and if even
    # that fails keep one draw with no minimum: the check below names any empty site.
    min_sizes = [max(1, min(10, len(df) // (2 * num_sites))), 0] if method == "dirichlet" else [0]
    for min_size in min_sizes:
        partitioner = _partitioner(method, num_sites, label_column, alpha, labels_per_site, seed, min_size)
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                # Dirichlet warns on every redraw; a failure is reported below instead.
                warnings.simplefilter("ignore")
                parts = [partitioner.load_partition(i).to_pandas() for i in range(num_sites)]
            break
        except ValueError as err:
            if min_size == 0:
                raise ValueError(f"federation.partition = {method!r} could not split {len(df)} rows over "
                                 f"{num_sites} sites ({err}); use fewer sites or more data") from err
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(f"federation.partition = {method!r} left site-{i} with no rows: "
                             "use fewer sites, a larger alpha, or more data")
    return parts
