import pytest
import torch

from kormedgemma.packing import build_blocks, pack


def test_pack_wraps_documents_and_cuts_exact_blocks():
    blocks = pack([[10, 11, 12], [20], [30, 31]], seq_len=4, bos_id=2, eos_id=1)
    # stream: 2 10 11 12 1 | 2 20 1 | 2 30 31 1  → 12 tokens → 3 blocks of 4
    assert blocks == [[2, 10, 11, 12], [1, 2, 20, 1], [2, 30, 31, 1]]
    assert pack([[5]], seq_len=4, bos_id=2, eos_id=1) == []  # 3 tokens: less than one block


class _Tokenizer:
    bos_token_id, eos_token_id = 2, 1

    def encode(self, text, add_special_tokens=False):
        return [100 + ord(c) % 50 if "가" <= c <= "힣" else 200 + ord(c) % 50 for c in text]


def test_english_share_and_determinism():
    korean = ["가나다라마바사" * 5] * 40
    english = ["abcdefg" * 5] * 3
    data = build_blocks(_Tokenizer(), korean, english, seq_len=16, english_fraction=0.25, seed=0)
    share = data.is_english.float().mean().item()
    assert abs(share - 0.25) < 0.02
    again = build_blocks(_Tokenizer(), korean, english, seq_len=16, english_fraction=0.25, seed=0)
    assert torch.equal(data.blocks, again.blocks) and data.blocks.shape[1] == 16
    english_rows = data.blocks[data.is_english]
    assert bool((english_rows[english_rows > 2] >= 200).all())  # English blocks hold only English ids
    other = build_blocks(_Tokenizer(), korean, english, seq_len=16, english_fraction=0.25, seed=1)
    assert not torch.equal(data.blocks, other.blocks)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than 64 tokens"):
        build_blocks(_Tokenizer(), ["가나"], [], seq_len=64, english_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="English corpus holds fewer"):
        build_blocks(_Tokenizer(), ["가나다라" * 50], ["ab"], seq_len=16, english_fraction=0.1, seed=0)
