import numpy as np
import pytest
import torch

from kormedgemma.data.batching import PackedBlocks, leading_blocks, pack, replay_plan


def test_pack_wraps_documents_and_cuts_exact_blocks():
    blocks = pack([[10, 11, 12], [20], [30, 31]], seq_len=4, bos_id=2, eos_id=1)
    # stream: 2 10 11 12 1 | 2 20 1 | 2 30 31 1  → 12 tokens → 3 blocks of 4
    assert blocks == [[2, 10, 11, 12], [1, 2, 20, 1], [2, 30, 31, 1]]
    assert pack([[5]], seq_len=4, bos_id=2, eos_id=1) == []  # 3 tokens: less than one block


def _stream(documents, bos=2, eos=1):
    return np.array([t for ids in documents for t in (bos, *ids, eos)], dtype=np.uint32)


def test_packed_blocks_are_the_pack_of_the_same_documents_in_replay_order():
    korean_docs = [[100 + (7 * i + j) % 50 for j in range(5 + i % 9)] for i in range(60)]
    english_docs = [[200 + (3 * i + j) % 40 for j in range(4 + i % 5)] for i in range(8)]
    data = PackedBlocks.build(_stream(korean_docs), _stream(english_docs), seq_len=16, english_fraction=0.25, seed=0)
    korean_blocks, english_blocks = pack(korean_docs, 16, 2, 1), pack(english_docs, 16, 2, 1)
    plan = replay_plan(len(korean_blocks), len(english_blocks), 0.25, seed=0)
    expected = [english_blocks[i] if is_english else korean_blocks[i] for i, is_english in plan]
    assert data[list(range(len(data)))].tolist() == expected
    assert abs(data.english_share - 0.25) < 0.02
    english_rows = data[list(np.flatnonzero(data.is_english))]
    assert bool((english_rows[english_rows > 2] >= 200).all())  # English blocks hold only English ids
    again = PackedBlocks.build(_stream(korean_docs), _stream(english_docs), 16, 0.25, seed=0)
    other = PackedBlocks.build(_stream(korean_docs), _stream(english_docs), 16, 0.25, seed=1)
    assert torch.equal(data[[0, 5, 9]], again[[0, 5, 9]]) and not np.array_equal(data.order, other.order)


def test_leading_blocks_keep_a_short_evaluation_stream():
    stream = np.arange(10, dtype=np.uint32)
    assert leading_blocks(stream, 4, count=5).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert leading_blocks(stream, 4, count=1).tolist() == [[0, 1, 2, 3]]
    assert leading_blocks(stream, 64, count=5).tolist() == [list(range(10))]
    assert leading_blocks(np.zeros(1, dtype=np.uint32), 64, count=5) is None


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer tokens than one block"):
        PackedBlocks.build(_stream([[5, 6]]), _stream([]), seq_len=64, english_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="English corpus holds fewer"):
        PackedBlocks.build(_stream([[5] * 200]), _stream([[7]]), seq_len=16, english_fraction=0.1, seed=0)


def test_english_repeats_count_how_often_a_pass_shows_each_english_block():
    korean, english = np.arange(160, dtype=np.uint32), np.arange(8, dtype=np.uint32)  # 40 and 2 blocks of 4
    blocks = PackedBlocks.build(korean, english, seq_len=4, english_fraction=0.25, seed=0)
    assert int(blocks.is_english.sum()) == 13  # round(40 × 0.25 / 0.75)
    assert blocks.english_repeats == 6.5
    assert PackedBlocks.build(korean, english, seq_len=4, english_fraction=0.0, seed=0).english_repeats == 0.0
    # an English corpus larger than the plan needs lends 13 distinct blocks, each shown once a pass
    plenty = PackedBlocks.build(korean, np.arange(400, dtype=np.uint32), seq_len=4, english_fraction=0.25, seed=0)
    assert len(set(plenty.order[plenty.is_english].tolist())) == 13 and plenty.english_repeats == 1.0

