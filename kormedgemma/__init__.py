"""Korean MedGemma: teach MedGemma (Gemma 3) Korean.

All pipeline logic lives in this package; the numbered notebooks are narratives over it.
Nothing here downloads or builds anything at import time.
"""
from kormedgemma.core.quiet import quiet_torchao as _quiet_torchao

__version__ = "0.1.0"
# torchao (imported by peft, transformers, compressed-tensors) logs its missing optional CUDA kernels
# as "Failed to load …" on every import; a reader of an executed notebook takes that for an error.
_quiet_torchao()
