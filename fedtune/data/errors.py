"""The one error type the data layer raises for bad input files."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable input data. Every message names the file, and where relevant the column and row,
    so a site operator can fix the file without reading a traceback."""
