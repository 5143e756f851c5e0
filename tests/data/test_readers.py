"""Readers of the processed corpora: sharded splits streamed in order, samples drawn across shards."""
from __future__ import annotations

import pytest

from kormedgemma.core.io import MissingArtifactError, write_jsonl
from kormedgemma.data.readers import iter_split, read_split, sample_split


@pytest.fixture()
def two_shards(tmp_path):
    folder = tmp_path / "korean"
    write_jsonl(folder / "valid" / "00000.jsonl", [{"text": f"첫째 조각 {i}"} for i in range(100)])
    write_jsonl(folder / "valid" / "00001.jsonl", [{"text": f"둘째 조각 {i}"} for i in range(100)])
    return folder


def test_split_streams_shards_in_order(two_shards):
    texts = list(iter_split(two_shards, "valid"))
    assert texts[0] == "첫째 조각 0" and texts[100] == "둘째 조각 0" and len(texts) == 200
    assert read_split(two_shards, "valid", limit=3) == ["첫째 조각 0", "첫째 조각 1", "첫째 조각 2"]


def test_sample_is_drawn_across_shards_with_its_positions(two_shards):
    everything = list(iter_split(two_shards, "valid"))
    indices, texts = sample_split(two_shards, "valid", 20, seed=3)
    assert len(texts) == 20 and indices == sorted(set(indices))
    assert texts == [everything[i] for i in indices]           # positions point at the same texts
    assert any(i < 100 for i in indices) and any(i >= 100 for i in indices)  # both shards (sources)
    assert sample_split(two_shards, "valid", 20, seed=3) == (indices, texts)   # reproducible
    assert sample_split(two_shards, "valid", 20, seed=4)[0] != indices
    assert sample_split(two_shards, "valid", 500)[1] == everything             # asks for more: all, in order


def test_missing_split_names_the_notebook_that_writes_it(tmp_path):
    with pytest.raises(MissingArtifactError, match="04_preprocess_data.ipynb"):
        sample_split(tmp_path, "valid", 5)
