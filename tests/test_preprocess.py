import unicodedata

import pytest

from config.training_config import PreprocessConfig
from kormedgemma.preprocess import (LeakageIndex, clean_corpus, clean_kormedmcqa, hangul_ratio,
                                    near_duplicate_flags, normalize_text, split_train_valid)
from kormedgemma.io import write_jsonl

SPEC = PreprocessConfig(min_chars=10, valid_fraction=0.1)


def test_normalize_composes_hangul_and_strips_invisible_characters():
    decomposed = unicodedata.normalize("NFD", "고혈압")
    assert len(decomposed) == 8
    text = f"  {decomposed}\u200b  환자\x07는\t\t치료 중\r\n\n\n\n다음 줄  "
    assert normalize_text(text) == "고혈압 환자 는 치료 중\n\n다음 줄"


def test_hangul_ratio_counts_non_space_characters():
    assert hangul_ratio("고혈압 BP") == pytest.approx(3 / 5)
    assert hangul_ratio("   ") == 0.0


def _rows(texts):
    return [{"text": t, "source": "test"} for t in texts]


def test_filters_drop_short_non_korean_and_exact_duplicates():
    texts = ["고혈압은 뇌졸중의 중요한 위험 인자이다.", "짧다", "This English sentence is long enough to pass length.",
             "고혈압은  뇌졸중의 중요한 위험 인자이다.", "당뇨병 환자는 발 관리를 매일 해야 한다."]
    result = clean_corpus(_rows(texts), SPEC, korean=True)
    assert [r["text"] for r in result.rows] == [texts[0], texts[4]]
    assert result.counts == {"input": 5, "dropped_length": 1, "dropped_hangul_ratio": 1,
                             "dropped_exact_duplicate": 1, "kept": 2}


def test_minhash_removes_a_planted_near_duplicate():
    base = "만성 콩팥병 환자는 혈압과 혈당을 함께 조절해야 하며, 단백뇨가 있으면 안지오텐신 전환효소 억제제를 우선 고려한다."
    near = base.replace("고려한다", "고려할 수 있다")
    other = "급성 충수염은 배꼽 주위 통증이 오른쪽 아랫배로 옮겨 가는 경우가 많아 진찰과 영상 검사로 진단한다."
    flags = near_duplicate_flags([base, other, near], threshold=0.7, num_perm=128, shingle_chars=5)
    assert flags == [False, False, True]
    result = clean_corpus(_rows([base, other, near]), PreprocessConfig(min_chars=10, minhash_threshold=0.7), korean=True)
    assert [r["text"] for r in result.rows] == [base, other]
    assert result.counts["dropped_near_duplicate"] == 1


def test_leakage_guard_drops_text_containing_a_test_question():
    question = "B형 간염 보유자에게서 간세포암 선별을 위해 정기적으로 시행하는 검사 조합은?"
    index = LeakageIndex([question], ngram_chars=25)
    leaked = "기출 문제 모음: B형 간염 보유자에게서   간세포암 선별을 위해 정기적으로 시행하는 검사는 무엇일까?"
    clean = "B형 간염은 만성화되면 간경변증과 간세포암으로 진행할 수 있다."
    assert index.overlaps(leaked) and not index.overlaps(clean)
    result = clean_corpus(_rows([clean, leaked]), SPEC, korean=True, leakage=index)
    assert [r["text"] for r in result.rows] == [clean]
    assert result.counts["dropped_kormedmcqa_overlap"] == 1


def test_short_questions_must_appear_whole():
    index = LeakageIndex(["당화혈색소가 반영하는 기간은?"], ngram_chars=25)
    assert index.overlaps("문제: 당화혈색소가 반영하는 기간은? 답은 두세 달")
    assert not index.overlaps("당화혈색소는 두세 달의 평균 혈당을 반영한다.")


def test_split_is_deterministic_and_disjoint():
    rows = _rows([f"문장 번호 {i}" for i in range(50)])
    train, valid = split_train_valid(rows, 0.1, seed=3)
    again = split_train_valid(rows, 0.1, seed=3)
    assert (train, valid) == again and len(valid) == 5 and len(train) == 45
    assert not {r["text"] for r in train} & {r["text"] for r in valid}


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="too few to split"):
        split_train_valid([], 0.1, seed=0)


def test_bad_kormedmcqa_rows_are_counted_not_fatal(tmp_path):
    good = {"question": "질문?", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": 3}
    rows = [good, {**good, "answer": 7}, {**good, "C": ""}, {**good, "question": "  "}, {**good, "answer": "2"}]
    write_jsonl(tmp_path / "raw" / "doctor" / "test.jsonl", rows)
    figures = clean_kormedmcqa(tmp_path / "raw", tmp_path / "out", ["doctor"], ["test"])
    assert figures["rows"] == {"doctor": {"test": 2}}
    assert [(b["row"], b["reason"]) for b in figures["bad_rows"]] == [
        (2, "answer 7 outside 1-5"), (3, "missing option C"), (4, "empty question")]


def test_phase0_outputs_follow_the_artifact_contract(tiny_phase0):
    from kormedgemma.artifacts import artifact_path
    from kormedgemma.io import read_jsonl
    from kormedgemma.manifest import read_manifest

    config, figures = tiny_phase0
    for key in ("korean", "english"):
        folder = artifact_path(config, key)
        train = list(read_jsonl(folder / "train.jsonl"))
        valid = list(read_jsonl(folder / "valid.jsonl"))
        assert train and valid and set(train[0]) == {"text", "source"}
        assert len(train) + len(valid) == figures[key]["filters"]["kept"]
        assert read_manifest(folder)["metrics"]["train"]["docs"] == len(train)
        assert (folder / "length_histogram.png").stat().st_size > 1000
    mcqa = artifact_path(config, "kormedmcqa")
    assert sorted(p.name for p in mcqa.iterdir() if p.is_dir()) == ["dentist", "doctor", "nurse", "pharm"]
    row = next(read_jsonl(mcqa / "doctor" / "test.jsonl"))
    assert {"question", "A", "B", "C", "D", "E", "answer", "subject"} <= set(row)
    assert figures["kormedmcqa"]["total"] == 68
    dictionary = artifact_path(config, "dictionary") / "medical_ko_en.tsv"
    assert dictionary.read_text(encoding="utf-8").splitlines()[0] == "ko\ten\tsource"
