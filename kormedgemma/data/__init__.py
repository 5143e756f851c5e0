"""Phase 0 and what every later phase reads: sources, the bilingual dictionary, cleaning,
deduplication and the leakage guard, KorMedMCQA's task (rows, prompts, answer rules), the
processed splits' readers, the token store and packed batches.
"""
