"""Phase 5 and the experiments: KorMedMCQA as lm-evaluation-harness scores it, English retention,
bits per character, parity with the harness itself, the init ablation, the method against the
no-expansion baseline.
"""
