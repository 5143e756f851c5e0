import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from config.training_config import PreprocessConfig
from kormedgemma.core.io import write_jsonl
from kormedgemma.data.cleaning import split_of
from kormedgemma.data.leakage import LeakageIndex
from kormedgemma.data.preprocess import clean_corpus, clean_kormedmcqa
from kormedgemma.data.readers import read_split
from kormedgemma.data.text import hangul_ratio, normalize_text, split_document

SPEC = PreprocessConfig(min_chars=10, valid_fraction=0.1, workers=1)
REPO = Path(__file__).resolve().parents[2]


def test_normalize_composes_hangul_and_strips_invisible_characters():
    decomposed = unicodedata.normalize("NFD", "고혈압")
    assert len(decomposed) == 8
    text = f"  {decomposed}\u200b  환자\x07는\t\t치료 중\r\n\n\n\n다음 줄  "
    assert normalize_text(text) == "고혈압 환자 는 치료 중\n\n다음 줄"


def test_hangul_ratio_counts_non_space_characters():
    assert hangul_ratio("고혈압 BP") == pytest.approx(3 / 5)
    assert hangul_ratio("   ") == 0.0


def _clean(tmp_path, texts, spec=SPEC, korean=True, leakage=None, shards=1, duplicates=None):
    raw = tmp_path / "raw"
    for shard in range(shards):
        write_jsonl(raw / f"src/{shard:05d}.jsonl", [{"text": t, "source": "test"} for t in texts[shard::shards]])
    out = tmp_path / "out"
    result = clean_corpus(raw, out, spec, korean=korean, work=tmp_path / "work", leakage=leakage,
                          duplicates=duplicates, progress=False)
    kept = read_split(out, "train") if (out / "train").is_dir() else []
    kept += read_split(out, "valid") if (out / "valid").is_dir() else []
    return result, kept


def test_filters_drop_short_non_korean_and_exact_duplicates(tmp_path):
    texts = ["고혈압은 뇌졸중의 중요한 위험 인자로 알려져 있으며 꾸준한 조절이 필요하다.", "짧다",
             "This English sentence is long enough to pass the length filter.",
             "고혈압은  뇌졸중의 중요한 위험 인자로 알려져 있으며 꾸준한 조절이 필요하다.",
             "당뇨병 환자는 발 관리를 매일 해야 하며 작은 상처도 의사에게 보여야 한다."]
    result, kept = _clean(tmp_path, texts)
    assert sorted(kept) == sorted([normalize_text(texts[0]), texts[4]])
    assert result.counts["input"] == 5
    assert result.counts["dropped_length"] == 1 and result.counts["dropped_hangul_ratio"] == 1
    assert result.counts["dropped_near_duplicate"] == 1  # the re-spaced copy: identical after normalisation
    assert result.counts["kept"] == 2


def test_minhash_removes_planted_near_duplicates_across_shards(tmp_path):
    import random

    rng = random.Random(0)
    syllables = [chr(0xAC00 + i) for i in range(0, 11172, 7)]
    documents = [" ".join("".join(rng.choice(syllables) for _ in range(3)) for _ in range(120)) for _ in range(40)]
    near = []
    for text in documents[:10]:  # one word in 60 changed: Jaccard of word 5-grams ≈ 0.85
        words = text.split()
        near.append(" ".join(w + "요" if i % 60 == 0 else w for i, w in enumerate(words)))
    result, kept = _clean(tmp_path, documents + near, shards=3, duplicates=tmp_path / "duplicates")
    assert result.counts["dropped_near_duplicate"] == 10
    assert set(documents[10:]) <= set(kept) and len(kept) == 40
    assert all((original in kept) != (copy in kept) for original, copy in zip(documents, near))  # one of each pair
    removed = read_split(tmp_path, "duplicates")  # the audit copy holds exactly the ten that were dropped
    assert len(removed) == 10 and not set(removed) & set(kept)
    assert set(removed) | set(kept) == set(documents) | set(near)


def test_a_long_document_is_split_at_paragraphs_and_kept(tmp_path):
    import random

    rng = random.Random(1)  # distinct paragraphs: identical ones would be (rightly) removed as duplicates
    words = [chr(0xAC00 + i) + chr(0xAC00 + 7 * i % 11172) for i in range(0, 11172, 5)]
    paragraphs = [f"{i}번째 문단: " + " ".join(rng.choice(words) for _ in range(25)) + "." for i in range(30)]
    article = "\n\n".join(paragraphs)
    spec = PreprocessConfig(min_chars=10, max_chars=400, valid_fraction=0.1, workers=1)
    result, kept = _clean(tmp_path, [article], spec=spec)
    assert result.counts["split_documents"] == 1 and len(kept) == result.counts["pieces_from_splits"] > 1
    assert all(len(piece) <= 400 for piece in kept)
    joined = "".join(sorted(kept, key=lambda p: int(p.split("번째")[0]))).replace("\n", "")
    assert joined.replace(" ", "") == article.replace("\n", "").replace(" ", "")  # nothing lost


def test_split_document_cuts_sentences_only_when_a_paragraph_is_too_long():
    long_paragraph = " ".join(f"문장 {i}은 여기서 끝난다." for i in range(40))
    pieces = split_document("짧은 머리말\n\n" + long_paragraph, max_chars=120, min_chars=20)
    assert all(len(p) <= 120 for p in pieces) and len(pieces) > 3
    assert all(p.endswith("끝난다.") for p in pieces[1:])  # cut between sentences, never inside one
    assert pieces[0].startswith("짧은 머리말\n\n문장 0")  # the 6-character heading joined its neighbour


def test_leakage_guard_drops_a_planted_question_and_reports_it(tmp_path):
    question = "B형 간염 보유자에게서 간세포암 선별을 위해 정기적으로 시행하는 검사 조합으로 가장 적절한 것은?"
    index = LeakageIndex([question])
    leaked = ("기출 문제 모음입니다. B형 간염 보유자에게서   간세포암 선별을 위해\n정기적으로 시행하는 검사 조합으로 "
              "가장 적절한 것은? 정답은 초음파와 알파태아단백이다.")
    clean = "B형 간염은 만성화되면 간경변증과 간세포암으로 진행할 수 있어 정기 검진이 필요하다."
    result, kept = _clean(tmp_path, [clean, leaked], leakage=index)
    assert kept == [clean]
    assert result.counts["dropped_kormedmcqa_overlap"] == 1
    assert [row["question"] for row in result.leaks] == [question]


def test_train_valid_split_is_a_pure_function_of_the_text():
    texts = [f"문장 번호 {i}: 혈압을 재고 기록한다." for i in range(2000)]
    splits = [split_of(t, 0.1, seed=3) for t in texts]
    assert splits == [split_of(t, 0.1, seed=3) for t in texts]
    assert 150 < splits.count("valid") < 250  # ≈ 10%
    assert splits != [split_of(t, 0.1, seed=4) for t in texts]


def test_a_smaller_korean_train_share_keeps_the_held_out_documents_and_a_subset_of_the_training_ones():
    texts = [f"문장 번호 {i}: 혈압을 재고 기록한다." for i in range(2000)]
    by_share = {share: [split_of(t, 0.1, seed=3, train_share=share) for t in texts] for share in (0.25, 0.5, 1.0)}
    assert by_share[1.0] == [split_of(t, 0.1, seed=3) for t in texts]
    valid = {i for i, s in enumerate(by_share[1.0]) if s == "valid"}
    train = {share: {i for i, s in enumerate(splits) if s == "train"} for share, splits in by_share.items()}
    for splits in by_share.values():
        assert {i for i, s in enumerate(splits) if s == "valid"} == valid
    assert train[0.25] < train[0.5] < train[1.0]
    assert 0.2 < len(train[0.25]) / len(train[1.0]) < 0.3 and 0.45 < len(train[0.5]) / len(train[1.0]) < 0.55


def test_korean_train_share_applies_to_korean_only_and_counts_what_it_left_out(tmp_path):
    import random
    from dataclasses import replace

    rng = random.Random(5)  # distinct texts: near-duplicates would go to MinHash first
    words = [chr(0xAC00 + i) + chr(0xAC00 + 7 * i % 11172) for i in range(0, 11172, 5)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    half = replace(SPEC, korean_train_share=0.5)
    result, kept = _clean(tmp_path / "ko", texts, spec=half)
    expected = [t for t in texts if split_of(t, SPEC.valid_fraction, SPEC.seed, 0.5) is not None]
    assert sorted(kept) == sorted(expected) and len(kept) < len(texts)
    assert result.counts["left_out_by_train_share"] == len(texts) - len(expected)
    vocabulary = [a + b + c for a in "bcdfgklmnp" for b in "aeiou" for c in "rstvxz"]  # letters: MinHash folds digits
    english = [" ".join(rng.choice(vocabulary) for _ in range(30)) for _ in range(200)]
    _, kept_english = _clean(tmp_path / "en", english, spec=half, korean=False)
    assert sorted(kept_english) == sorted(english)


def test_the_same_corpus_gives_the_same_split_with_one_or_two_workers(tmp_path):
    import random

    rng = random.Random(2)
    words = [chr(0xAC00 + i) + chr(0xAC00 + 3 * i % 11172) for i in range(0, 11172, 5)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(60)]
    _, one = _clean(tmp_path / "one", texts, shards=2)
    two_spec = PreprocessConfig(min_chars=10, valid_fraction=0.1, workers=2)
    raw = tmp_path / "one" / "raw"
    clean_corpus(raw, tmp_path / "two", two_spec, korean=True, work=tmp_path / "two-work", progress=False)
    assert sorted(read_split(tmp_path / "two", "valid")) == sorted(read_split(tmp_path / "one" / "out", "valid"))
    assert sorted(read_split(tmp_path / "two", "train")) == sorted(read_split(tmp_path / "one" / "out", "train"))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        clean_corpus(tmp_path / "raw", tmp_path / "out", SPEC, korean=True, work=tmp_path / "work", progress=False)


_PEAK_RSS = """
import json, random, resource, sys
from pathlib import Path
from config.training_config import PreprocessConfig
from kormedgemma.core.io import write_jsonl_shards
from kormedgemma.data.preprocess import clean_corpus

if __name__ == "__main__":
    root, documents = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(0)
    syllables = [chr(0xAC00 + i) for i in range(0, 11172, 3)]
    rows = ({"text": " ".join("".join(rng.choice(syllables) for _ in range(3)) for _ in range(400)), "source": "s"}
            for _ in range(documents))
    write_jsonl_shards(root / "raw" / "s", rows, shard_bytes=1_000_000)
    result = clean_corpus(root / "raw", root / "out", PreprocessConfig(workers=1), korean=True, work=root / "work",
                          progress=False)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"kept": result.counts["kept"], "peak_mb": peak_kb / 1024}))
"""


def _peak_rss(tmp_path: Path, documents: int) -> dict:
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_RSS)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / f"run{documents}"), str(documents)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_preprocessing_memory_is_flat_in_corpus_size(tmp_path):
    """Peak RSS of phase 0 on a corpus 4× larger (~4 MB → ~16 MB of Korean) stays within a few MB: the
    old in-RAM path grew by ~7 bytes per character, ~80 MB here."""
    small, large = _peak_rss(tmp_path, 800), _peak_rss(tmp_path, 3200)
    assert (small["kept"], large["kept"]) == (800, 3200)
    assert large["peak_mb"] - small["peak_mb"] < 15, (small, large)


def test_bad_kormedmcqa_rows_are_counted_not_fatal(tmp_path):
    good = {"question": "질문?", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": 3}
    rows = [good, {**good, "answer": 7}, {**good, "C": ""}, {**good, "question": "  "}, {**good, "answer": "2"}]
    write_jsonl(tmp_path / "raw" / "doctor" / "test.jsonl", rows)
    figures = clean_kormedmcqa(tmp_path / "raw", tmp_path / "out", ["doctor"], ["test"])
    assert figures["rows"] == {"doctor": {"test": 2}}
    assert [(b["row"], b["reason"]) for b in figures["bad_rows"]] == [
        (2, "answer 7 outside 1-5"), (3, "missing option C"), (4, "empty question")]


def test_phase0_outputs_follow_the_artifact_contract(tiny_phase0):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.io import read_jsonl
    from kormedgemma.core.manifest import read_manifest

    config, figures = tiny_phase0
    for key in ("korean", "english"):
        folder = artifact_path(config, key)
        from kormedgemma.data.readers import split_files

        train = [row for file in split_files(folder, "train") for row in read_jsonl(file)]
        valid = [row for file in split_files(folder, "valid") for row in read_jsonl(file)]
        assert train and valid and set(train[0]) == {"text", "source"}
        assert len(train) + len(valid) == figures[key]["filters"]["kept"]
        assert read_manifest(folder)["metrics"]["train"]["docs"] == len(train)
        # the histogram counts every kept text once
        from plotdata import png_size

        from kormedgemma.data.preprocess import plot_length_histogram

        lengths = [len(row["text"]) for row in train + valid]
        (axis,) = plot_length_histogram({key: lengths}).axes
        assert sum(patch.get_height() for patch in axis.patches) == len(lengths)
        assert min(png_size(folder / "length_histogram.png")) >= 200
    mcqa = artifact_path(config, "kormedmcqa")
    assert sorted(p.name for p in mcqa.iterdir() if p.is_dir()) == ["dentist", "doctor", "nurse", "pharm"]
    row = next(read_jsonl(mcqa / "doctor" / "test.jsonl"))
    assert {"question", "A", "B", "C", "D", "E", "answer", "subject"} <= set(row)
    assert figures["kormedmcqa"]["total"] == 68
    dictionary = artifact_path(config, "dictionary") / "medical_ko_en.tsv"
    assert dictionary.read_text(encoding="utf-8").splitlines()[0] == "ko\ten\tsource"
