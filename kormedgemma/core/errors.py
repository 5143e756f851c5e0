"""Which exceptions are the user's to fix (one-line message) rather than bugs (traceback)."""
from __future__ import annotations

from config.training_config import ConfigError
from kormedgemma.core.hub import HubUnavailableError
from kormedgemma.core.io import JsonlError, MissingArtifactError


class UserError(Exception):
    """An error whose message names the cause and the fix (a failed notebook, a quantisation that
    cannot start, a server that did not come up). Layers above `core` subclass it, so this module
    needs to know none of them."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, ConfigError, MissingArtifactError, JsonlError, HubUnavailableError,
                            FileNotFoundError, ValueError, MemoryError))
