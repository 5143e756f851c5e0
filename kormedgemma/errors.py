"""Which exceptions are the user's to fix (one-line message) rather than bugs (traceback)."""
from __future__ import annotations

from config.training_config import ConfigError
from kormedgemma.hub import HubUnavailableError
from kormedgemma.io import JsonlError, MissingArtifactError


def is_user_error(exc: BaseException) -> bool:
    from kormedgemma.quantize import QuantizationError
    from kormedgemma.runner import NotebookFailed
    from kormedgemma.serve import ServeError

    return isinstance(exc, (ConfigError, MissingArtifactError, JsonlError, HubUnavailableError,
                            NotebookFailed, FileNotFoundError, ValueError, MemoryError, QuantizationError,
                            ServeError))
