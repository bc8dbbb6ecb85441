"""Data loading: read a site's file (or the demo set), clean it, map labels, tokenize."""

from fedtune.data.cleaning import CleaningReport, clean_rows
from fedtune.data.demo import generate_demo_rows
from fedtune.data.errors import DataError
from fedtune.data.labels import LabelMap
from fedtune.data.readers import read_table
from fedtune.data.site import SiteData, load_rows, load_site_data
from fedtune.data.tokenization import (
    IGNORE_INDEX,
    TokenizedDataset,
    encode_causal,
    encode_classification,
    encode_prompt_response,
    pad_collate,
)

__all__ = [
    "CleaningReport",
    "DataError",
    "IGNORE_INDEX",
    "LabelMap",
    "SiteData",
    "TokenizedDataset",
    "clean_rows",
    "encode_causal",
    "encode_classification",
    "encode_prompt_response",
    "generate_demo_rows",
    "load_rows",
    "load_site_data",
    "pad_collate",
    "read_table",
]
