"""Library noise a notebook reader would take for an error, silenced where it is logged.

torchao (stage 6's 8-bit optimizer; imported by transformers, peft and compressed-tensors too)
tries, at import, each prebuilt kernel library its wheel carries and logs a WARNING for every one
this machine cannot load: `Failed to load …/torchao/_C_mxfp8.cpython-310-….so` (built for Python
3.10, Blackwell's MX formats) and `…/_C_cutlass_90a.abi3.so` (H100 CUTLASS kernels). Nothing in
this project calls those kernels (AdamW8bit is PyTorch and Triton), and a call that needed one
would fail on the missing operator, loudly. The same import makes torch log, twice, that torchao
registers its `Enum`s as pytree constants, a deprecation aimed at torchao's authors.

Only those records are dropped: any other torchao or torch warning passes, and setting the
`torchao` logger to DEBUG shows the load failures again. Nothing else is imported here, so this
can run before torchao is (a logger's filter applies to records logged after it is added).
"""
from __future__ import annotations

import logging
import re

_SO_LOAD_FAILURE = re.compile(r"Failed to load \S*torchao[/\\]_C\S*\.so: ")


class _TorchaoImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":
            noise = _SO_LOAD_FAILURE.match(record.getMessage())
            return not noise or logging.getLogger("torchao").isEnabledFor(logging.DEBUG)
        # torch.utils._pytree: "<enum 'KernelPreference'> is an Enum subclass and is now natively
        # supported by torch.compile ... register_constant() on Enum subclasses is deprecated"
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(cls, type) and cls.__module__.split(".")[0] == "torchao"
                    and "register_constant() on Enum subclasses is deprecated" in str(record.msg))


_FILTER = _TorchaoImportNoise()


def quiet_torchao() -> None:
    """Drop torchao's import-time noise (see the module's docstring). Idempotent; call it before
    torchao is first imported."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
