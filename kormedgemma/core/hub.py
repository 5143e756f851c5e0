"""Hub ids and local paths, interchangeably, and a clear error when the Hub cannot be reached."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

from config.training_config import ProjectConfig
from kormedgemma.core.config import resolve_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailableError(RuntimeError):
    """A Hub model or dataset was needed and could not be fetched (offline, gated, no login)."""


def is_hub_id(ref: str) -> bool:
    """`owner/name`, and not one of this project's relative folders."""
    return bool(_HUB_ID.match(str(ref))) and not str(ref).startswith(("models/", "data/", "./", "../"))


def model_ref(config: ProjectConfig, ref: str, key: str) -> str:
    """A local folder if `ref` names one (relative to the repo root), else a Hub id, else an error."""
    local = resolve_path(config, ref)
    if local.exists():
        return str(local)
    if is_hub_id(ref):
        return ref
    producer = " (built by phase0_data_preparation/00_setup_environment.ipynb)" if ref == "models/base" else ""
    raise FileNotFoundError(f"{key}: local folder {local} not found{producer}, and {ref!r} is not a Hub id")


def is_offline_error(exc: BaseException) -> bool:
    """True for the ways transformers/datasets/huggingface_hub fail without network or login."""
    text = f"{type(exc).__name__}: {exc}".lower()
    markers = ("offline", "connection", "resolve", "couldn't connect", "could not connect",
               "name or service not known", "network", "gated", "401", "403", "max retries",
               "temporary failure", "timed out", "localentrynotfound", "cannot find the requested files")
    return any(marker in text for marker in markers) or isinstance(exc, (ConnectionError, TimeoutError))


@contextlib.contextmanager
def hub_access(what: str, fix: str) -> Iterator[None]:
    """Turn the many ways a Hub download fails offline into one error naming what and the fix."""
    try:
        yield
    except HubUnavailableError:
        raise
    except Exception as exc:  # transformers, datasets and huggingface_hub each fail in their own types
        if is_offline_error(exc):
            raise HubUnavailableError(
                f"{what} could not be fetched from the Hugging Face Hub ({type(exc).__name__}). {fix}") from None
        raise
