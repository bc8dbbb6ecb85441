"""Errors caused by the user's input: the CLI prints these as one clear message, no traceback."""

from fedtune.adapters import AdapterMismatchError
from fedtune.config import ConfigError
from fedtune.data.errors import DataError
from fedtune.model import ModelLoadError
from fedtune.training.precision import PrecisionError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, PrecisionError, AdapterMismatchError)
