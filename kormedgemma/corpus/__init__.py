"""The data layer below every phase: corpus readers, the token store, and batching.

Phases read processed text, token ids and batches only through this package, so no phase
module borrows a reader or a collate function from another phase, and every reader streams
(the `a5000` corpus is larger than a workstation's RAM).
"""
