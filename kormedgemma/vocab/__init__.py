"""Phases 1-2: the Korean SentencePiece model, piece selection, the merge into Gemma 3's tokenizer,
and the new rows' initialisation (EEVE, WECHSEL, hybrid, the baselines).
"""
