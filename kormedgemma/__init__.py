"""Korean MedGemma: teach MedGemma (Gemma 3) Korean.

All pipeline logic lives in this package; the numbered notebooks are narratives over it.
Nothing here downloads or builds anything at import time.
"""
__version__ = "0.1.0"
