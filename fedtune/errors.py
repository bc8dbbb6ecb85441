"""Errors caused by the user's input: the CLI prints these as one clear message, no traceback."""

from fedtune.adapters import AdapterMismatchError
from fedtune.config import ConfigError
from fedtune.data.errors import DataError
from fedtune.model import ModelLoadError
from fedtune.training.precision import PrecisionError


def _federation_errors() -> tuple:
    # Imported lazily: only the simulate/server commands need Flower.
    try:
        from fedtune.server.coordinator import RunError
        from fedtune.server.secagg import SecAggSettingsError
    except ImportError:
        return ()
    return (RunError, SecAggSettingsError)


def _deployment_errors() -> tuple:
    from fedtune.deployment.certs import CertError
    from fedtune.deployment.flower import DeploymentError

    return (CertError, DeploymentError)


def _report_errors() -> tuple:
    from fedtune.federation.report_page import ReportError

    return (ReportError,)


USER_ERRORS = (ConfigError, DataError, ModelLoadError, PrecisionError, AdapterMismatchError, *_federation_errors(),
               *_deployment_errors(), *_report_errors())
