"""Phase 6: the 4-bit AWQ model and its quality and memory report, and serving it (vLLM or the
transformers fallback) behind an optional API key.
"""
