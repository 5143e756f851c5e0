"""Phases 3-4: one training loop (accelerator, optimizers, checkpoints, resume), EEVE's seven
stages, the instruction-tuning recipe, their loss curves.
"""
