"""Split one dataset's rows across simulated sites with flwr-datasets partitioners."""

from __future__ import annotations

import pandas as pd

METHODS = ("iid", "dirichlet", "pathological")


def _partitioner(method: str, num_sites: int, label_column: str, alpha: float, labels_per_site: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if method == "iid":
        return IidPartitioner(num_partitions=num_sites)
    if method == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_sites, partition_by=label_column, alpha=alpha,
            min_partition_size=1, self_balancing=True, seed=seed,
        )
    if method == "pathological":
        # "deterministic" assigns labels round-robin, so every label is used by some site.
        return PathologicalPartitioner(
            num_partitions=num_sites, partition_by=label_column, num_classes_per_partition=labels_per_site,
            class_assignment_mode="deterministic", seed=seed,
        )
    raise ValueError(f"federation.partition = {method!r}: expected one of {', '.join(METHODS)} (or 'files')")


def partition_rows(df: pd.DataFrame, num_sites: int, method: str, label_column: str = "label",
                   alpha: float = 0.5, labels_per_site: int = 2, seed: int = 0) -> list[pd.DataFrame]:
    from datasets import Dataset

    if num_sites > len(df):
        raise ValueError(f"{num_sites} sites but only {len(df)} rows: use fewer sites or more data")
    if method == "pathological" and labels_per_site > df[label_column].nunique():
        raise ValueError(f"federation.labels_per_site = {labels_per_site} exceeds the "
                         f"{df[label_column].nunique()} distinct labels")
    partitioner = _partitioner(method, num_sites, label_column, alpha, labels_per_site, seed)
    partitioner.dataset = Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)
    parts = [partitioner.load_partition(i).to_pandas() for i in range(num_sites)]
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(f"federation.partition = {method!r} left site-{i} with no rows: "
                             "use fewer sites, a larger alpha, or more data")
    return parts
