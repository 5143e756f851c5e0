"""The bundled samples hold what the issue promises, in the schema the pipeline reads."""
import json

from kormedgemma.core.config import repo_root
from kormedgemma.data.dictionary import clean_pairs, load_dictionary
from kormedgemma.data.text import hangul_ratio

SAMPLES = repo_root() / "data" / "samples"


def _lines(name):
    return [line for line in (SAMPLES / name).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def test_korean_sentences_are_many_distinct_and_korean():
    lines = _lines("korean_medical.txt")
    assert len(lines) >= 300 and len(set(lines)) == len(lines)
    assert sum(hangul_ratio(line) > 0.5 for line in lines) >= 0.95 * len(lines)


def test_english_sentences_are_enough_and_distinct():
    lines = _lines("english_medical.txt")
    assert len(lines) >= 100 and len(set(lines)) == len(lines)


def test_kormedmcqa_sample_has_every_subset_and_split_with_valid_answers():
    total = 0
    for subset in ("doctor", "nurse", "pharm", "dentist"):
        for split in ("train", "dev", "test", "fewshot"):
            path = SAMPLES / "kormedmcqa" / subset / f"{split}.jsonl"
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            assert rows, f"{subset}/{split} is empty"
            for row in rows:
                assert row["question"].strip() and all(row[k].strip() for k in "ABCDE")
                assert 1 <= row["answer"] <= 5
            total += len(rows)
        assert len([1 for _ in (SAMPLES / "kormedmcqa" / subset / "fewshot.jsonl").open()]) >= 5
    assert total >= 60


def test_dictionary_has_300_clean_pairs():
    pairs = load_dictionary(SAMPLES / "medical_ko_en.tsv")
    assert len(clean_pairs(pairs)) == len(pairs) >= 300
