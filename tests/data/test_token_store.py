"""The token store (step 1.04): exact ids, the blocks phase 3 reads, the tokenizer check, flat memory."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kormedgemma.core.artifacts import artifact_path
from kormedgemma.data.batching import pack, replay_plan
from kormedgemma.data.readers import read_split
from kormedgemma.data.token_store import TokenStore

REPO = Path(__file__).resolve().parents[2]


def _tokenizer(config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))


def test_store_holds_each_document_as_bos_ids_eos_exactly(tiny_phase1):
    config, _, _ = tiny_phase1
    tokenizer = _tokenizer(config)
    store = TokenStore(artifact_path(config, "token_store"))
    for corpus in ("korean", "english"):
        for split in ("train", "valid"):
            texts = read_split(artifact_path(config, corpus), split)
            documents = [d.tolist() for d in store.documents(corpus, split)]
            assert len(documents) == len(texts) == store.meta["parts"][f"{corpus}/{split}"]["docs"]
            for text, ids in zip(texts, documents):
                assert ids == [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False),
                               tokenizer.eos_token_id]
            assert store.chars(corpus, split).tolist() == [len(t) for t in texts]
            row = next(r for r in store.summary() if r["part"] == f"{corpus}/{split}")
            assert row["tokens_per_char"] == round(sum(map(len, documents)) / sum(map(len, texts)), 3)


def test_stage_blocks_from_the_store_equal_blocks_built_from_text(tiny_phase1):
    from kormedgemma.training.stage import stage_config, stage_data

    config, _, _ = tiny_phase1
    tokenizer = _tokenizer(config)
    spec = stage_config(config, 1)
    data = stage_data(config, tokenizer, spec, seed=11)
    encode = lambda corpus, split: [tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
                                    for t in read_split(artifact_path(config, corpus), split)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    korean, english = pack(encode("korean", "train"), spec.seq_len, bos, eos), pack(encode("english", "train"), spec.seq_len, bos, eos)
    plan = replay_plan(len(korean), len(english), spec.english_replay_fraction, seed=11)
    assert data.train[list(range(len(data.train)))].tolist() == [english[i] if e else korean[i] for i, e in plan]
    valid = pack(encode("korean", "valid"), spec.seq_len, bos, eos, keep_short=True)[:spec.eval_blocks]
    assert data.valid["korean"].tolist() == valid


def test_prefix_chars_counts_whole_documents_exactly_and_the_cut_one_by_its_token_share(tiny_phase1):
    config, _, _ = tiny_phase1
    tokenizer = _tokenizer(config)
    store = TokenStore(artifact_path(config, "token_store"))
    texts = read_split(artifact_path(config, "korean"), "valid")
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts]  # <bos> … <eos>
    assert store.prefix_chars("korean", "valid", 0) == 0.0
    assert store.prefix_chars("korean", "valid", lengths[0]) == len(texts[0])
    assert store.prefix_chars("korean", "valid", lengths[0] + lengths[1]) == len(texts[0]) + len(texts[1])
    assert store.prefix_chars("korean", "valid", lengths[0] + 3) == pytest.approx(len(texts[0]) + len(texts[1]) * 3 / lengths[1])
    assert store.prefix_chars("korean", "valid", sum(lengths)) == sum(map(len, texts))


def test_tokens_for_chars_inverts_prefix_chars(tiny_phase1):
    config, _, _ = tiny_phase1
    store = TokenStore(artifact_path(config, "token_store"))
    offsets = store.offsets("korean", "valid")
    total_chars = int(store.chars("korean", "valid").sum())
    assert store.tokens_for_chars("korean", "valid", 0) == 0
    assert store.tokens_for_chars("korean", "valid", total_chars * 10) == int(offsets[-1])  # beyond the split: all
    for boundary in offsets[1:4]:  # whole documents: exactly their ids
        assert store.tokens_for_chars("korean", "valid", store.prefix_chars("korean", "valid", int(boundary))) == int(boundary)
    for tokens in (5, 37, int(offsets[2]) + 3):
        assert abs(store.tokens_for_chars("korean", "valid", store.prefix_chars("korean", "valid", tokens)) - tokens) <= 1


def test_eval_chars_gives_blocks_covering_that_much_text(tiny_phase1):
    from dataclasses import replace

    from kormedgemma.training.stage import stage_config, stage_data

    config, _, _ = tiny_phase1
    tokenizer = _tokenizer(config)
    store = TokenStore(artifact_path(config, "token_store"))
    spec = replace(stage_config(config, 1), seq_len=16, eval_chars=120)
    blocks = stage_data(config, tokenizer, spec, seed=11).valid["korean"]
    covered = store.prefix_chars("korean", "valid", blocks.numel())
    per_block = store.prefix_chars("korean", "valid", 16 * len(blocks)) / len(blocks)
    assert abs(covered - 120) <= per_block / 2 + 1e-9  # to the nearest whole block
    assert blocks.shape[1] == 16


def test_a_store_made_under_another_tokenizer_is_refused(tiny_phase1):
    from kormedgemma.modeling.base_model import load_tokenizer

    config, _, _ = tiny_phase1
    store = TokenStore(artifact_path(config, "token_store"))
    store.check_tokenizer(_tokenizer(config))
    with pytest.raises(ValueError, match="another tokenizer"):
        store.check_tokenizer(load_tokenizer(config))  # the base tokenizer, without the Korean pieces


def test_a_missing_store_names_the_step_that_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="04_tokenize_corpus"):
        TokenStore(tmp_path)


_PEAK = """
import json, random, resource, sys
from pathlib import Path
from transformers import AutoTokenizer
from kormedgemma.data.token_store import write_part

if __name__ == "__main__":
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    documents = int(sys.argv[3])
    rng = random.Random(0)
    syllables = [chr(0xAC00 + i) for i in range(0, 11172, 3)]
    texts = (" ".join("".join(rng.choice(syllables) for _ in range(3)) for _ in range(300)) for _ in range(documents))
    stats = write_part(tokenizer, texts, Path(sys.argv[2]) / "part", batch_docs=256)
    print(json.dumps({"docs": stats.docs, "tokens": stats.tokens,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_token_store_memory_is_flat_in_corpus_size(tiny_phase1, tmp_path):
    config, _, _ = tiny_phase1
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    runs = []
    for documents in (1000, 4000):
        done = subprocess.run([sys.executable, str(script), str(artifact_path(config, "merged_tokenizer")),
                               str(tmp_path / str(documents)), str(documents)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[1]["docs"] == 4 * runs[0]["docs"]
    ids = np.fromfile(tmp_path / "4000" / "part.ids", dtype=np.uint32)
    assert ids.size == runs[1]["tokens"]
    # 4× the tokens (~9M ids here) would add ~250 MB as Python int lists; the store adds a few MB at most
    assert runs[1]["peak_mb"] - runs[0]["peak_mb"] < 20, runs
