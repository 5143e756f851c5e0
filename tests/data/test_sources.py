from pathlib import Path

import pytest

from kormedgemma.core.config import load_config
from kormedgemma.core.hub import HubUnavailableError, model_ref
from kormedgemma.data.dictionary import build_dictionary, clean_pairs, read_pairs_tsv, read_umls_mrconso
from kormedgemma.data.sources import collect_texts, is_medical, iter_source_texts


def test_offline_hub_source_names_the_key_to_set(tmp_path):
    config = load_config("a5000", overrides={"paths.root": str(tmp_path)})
    source = config.data.sources["oscar_korean"]
    with pytest.raises(HubUnavailableError, match=r"data.sources.oscar_korean.local_path"):
        next(iter_source_texts(config, "oscar_korean", source))


def test_local_path_wins_over_hub_id(tmp_path):
    copy = tmp_path / "oscar.jsonl"
    copy.write_text('{"content": "한국어 웹 문서입니다."}\n{"content": "두 번째 문서입니다."}\n', encoding="utf-8")
    config = load_config("a5000", overrides={"data.sources.oscar_korean.local_path": str(copy),
                                             "data.sources.oscar_korean.text_field": "content"})
    texts = list(iter_source_texts(config, "oscar_korean", config.data.sources["oscar_korean"]))
    assert texts == ["한국어 웹 문서입니다.", "두 번째 문서입니다."]


def test_medical_filter_and_cap(tmp_path):
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("\n".join([
        "고혈압 환자의 치료와 진단, 합병증에 대한 문서",  # medical: 4 keywords
        "서울의 지하철 노선과 역 이름에 대한 문서",  # not medical
        "당뇨 환자의 증상과 치료 방법에 대한 문서",  # medical
        "감염 환자의 진단과 치료에 대한 문서",  # medical, beyond the cap
    ]), encoding="utf-8")
    config = load_config("tiny", overrides={"data.sources.wiki": {
        "language": "ko", "local_path": str(corpus), "medical_filter": True, "max_docs": 2}})
    texts = list(iter_source_texts(config, "wiki", config.data.sources["wiki"]))
    assert texts == ["고혈압 환자의 치료와 진단, 합병증에 대한 문서", "당뇨 환자의 증상과 치료 방법에 대한 문서"]
    assert not is_medical("시간이 지나 간다", "ko")


def test_source_that_yields_nothing_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    config = load_config("tiny", overrides={"data.sources.bundled_korean_medical.local_path": str(empty)})
    with pytest.raises(ValueError, match="source 'bundled_korean_medical' produced no text"):
        collect_texts(config, "ko", tmp_path / "out")


def test_model_ref_accepts_hub_ids_and_local_folders(tmp_path):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    assert model_ref(config, "google/medgemma-4b-it", "base.model") == "google/medgemma-4b-it"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert model_ref(config, "models/mine", "base.model") == str(tmp_path / "models" / "mine")
    with pytest.raises(FileNotFoundError, match=r"base.model: local folder .*models/base not found \(built by "
                                                r"phase0_data_preparation/00_setup_environment.ipynb\)"):
        model_ref(config, "models/base", "base.model")


def test_offline_model_load_is_a_clear_error(tmp_path):
    from kormedgemma.modeling.base_model import load_tokenizer

    config = load_config("a5000", overrides={"paths.root": str(tmp_path)})
    with pytest.raises(HubUnavailableError, match="set base.model"):
        load_tokenizer(config)


UMLS = """C0020538|ENG|P|L0020538|PF|S0049143|Y|A0069733||M0010566|D006973|MSH|MH|D006973|Hypertension|0|N|256|
C0020538|ENG|S|L0020541|PF|S0049145|N|A0069734||M0010566|D006973|MSH|EN|D006973|High Blood Pressure|0|N|256|
C0020538|KOR|P|L9999999|PF|S9999999|Y|A9999999||M0010566|D006973|MSHKOR|MH|D006973|고혈압|3|N||
C0011849|KOR|P|L9999998|PF|S9999998|Y|A9999998||M0005|D003920|MSHKOR|MH|D003920|당뇨병|3|N||
C0011849|ENG|P|L0011849|VO|S0000001|N|A0000001||M0005|D003920|MSH|EN|D003920|Diabetes, sugar|0|N||
C0011849|ENG|P|L0011850|PF|S0000002|Y|A0000002||M0005|D003920|MSH|MH|D003920|Diabetes Mellitus|0|N||
C0000001|KOR|P|L1|PF|S1|Y|A1||M1|D1|MSHKOR|MH|D1|외톨이 용어|3|N||
"""


def test_umls_pairs_korean_with_the_preferred_english_name(tmp_path):
    path = tmp_path / "MRCONSO.RRF"
    path.write_text(UMLS, encoding="utf-8")
    assert list(read_umls_mrconso(path)) == [("고혈압", "Hypertension", "umls:MSHKOR"),
                                              ("당뇨병", "Diabetes Mellitus", "umls:MSHKOR")]
    bad = tmp_path / "bad.RRF"
    bad.write_text("not|an|rrf\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.RRF:1: not an MRCONSO.RRF row"):
        list(read_umls_mrconso(bad))


def test_dictionary_merges_sources_and_deduplicates(tmp_path):
    path = tmp_path / "MRCONSO.RRF"
    path.write_text(UMLS, encoding="utf-8")
    extra = tmp_path / "kmesh.tsv"
    extra.write_text("고혈압\thypertension\n폐렴\tpneumonia\nno hangul\tnone\n", encoding="utf-8")
    bundled = tmp_path / "bundled.tsv"
    bundled.write_text("ko\ten\tsource\n폐렴\tpneumonia\tbundled\n", encoding="utf-8")
    config = load_config("tiny", overrides={"data.dictionary.bundled": str(bundled),
                                            "data.dictionary.umls_mrconso": str(path),
                                            "data.dictionary.extra_tsv": [str(extra)]})
    figures = build_dictionary(config, tmp_path / "out")
    assert figures["per_source"] == {"bundled": 1, "umls:MSHKOR": 2}
    assert (tmp_path / "out" / "medical_ko_en.tsv").read_text(encoding="utf-8").splitlines() == [
        "ko\ten\tsource", "폐렴\tpneumonia\tbundled", "고혈압\tHypertension\tumls:MSHKOR",
        "당뇨병\tDiabetes Mellitus\tumls:MSHKOR"]
    assert "kmesh" not in figures["per_source"]  # both kmesh pairs duplicate or lack Hangul
    assert figures["dropped"] == 3
    assert clean_pairs([("고혈압", "A", "x"), ("고혈압", "a", "y"), ("", "b", "z")]) == [("고혈압", "A", "x")]


def test_dictionary_reads_columns_named_by_the_header(tmp_path):
    # The KCD export's layout: code, Korean, English, a flag. Read by position it would pair codes
    # with Korean names.
    kcd = tmp_path / "kcd_ko_en.tsv"
    kcd.write_text("# KCD-8 export\n\nkcd\tko\ten\tlatest\nA00\t콜레라\tCholera\t\n"
                   "I10\t본태성(원발성) 고혈압\tEssential (primary) hypertension\t1\n",
                   encoding="utf-8")
    assert list(read_pairs_tsv(kcd, "kcd_ko_en")) == [
        ("콜레라", "Cholera", "kcd_ko_en"), ("본태성(원발성) 고혈압", "Essential (primary) hypertension", "kcd_ko_en")]
    config = load_config("tiny", overrides={"data.dictionary.extra_tsv": [str(kcd)]})
    figures = build_dictionary(config, tmp_path / "out")
    assert figures["per_source"]["kcd_ko_en"] == 2
    bad = tmp_path / "bad.tsv"
    bad.write_text("code\tko\tname\nA00\t콜레라\tCholera\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"needs both a 'ko' and an 'en' column"):
        list(read_pairs_tsv(bad, "bad"))


@pytest.mark.skipif(not (Path(__file__).parents[3] / "shared/data/ko_en_medical_terms_kcd/kcd_ko_en.tsv").is_file(),
                    reason="../shared/data (the real KCD dictionary) is not beside this checkout")
def test_real_kcd_dictionary_pairs_korean_with_english():
    pairs = list(read_pairs_tsv(Path(__file__).parents[3] / "shared/data/ko_en_medical_terms_kcd/kcd_ko_en.tsv", "kcd"))
    assert len(pairs) == 22_551
    assert ("콜레라", "Cholera", "kcd") in pairs
    assert all(not ko[:1].isascii() or not ko[1:3].isdigit() for ko, _, _ in pairs[:100])  # no KCD codes as Korean


def test_offline_kormedmcqa_names_the_local_path_key(tmp_path):
    from kormedgemma.data.sources import collect_kormedmcqa

    config = load_config("a5000", overrides={"paths.root": str(tmp_path)})
    with pytest.raises(HubUnavailableError, match=r"sean0042/KorMedMCQA, doctor/train.*data.kormedmcqa.local_path"):
        collect_kormedmcqa(config, tmp_path / "out")
    assert not (tmp_path / "out" / "doctor" / "train.jsonl").exists()


def test_kormedmcqa_from_a_local_folder_in_csv(tmp_path):
    from kormedgemma.data.sources import collect_kormedmcqa

    folder = tmp_path / "kmcqa" / "doctor"
    folder.mkdir(parents=True)
    (folder / "test.csv").write_text("question,A,B,C,D,E,answer\n질문?,가,나,다,라,마,2\n", encoding="utf-8")
    config = load_config("tiny", overrides={"data.kormedmcqa.local_path": str(tmp_path / "kmcqa"),
                                            "data.kormedmcqa.subsets": ["doctor"],
                                            "data.kormedmcqa.splits": ["test"]})
    assert collect_kormedmcqa(config, tmp_path / "out") == {"doctor": {"test": 1}}


MCQA_COLUMNS = ["subject", "year", "period", "q_number", "question", "A", "B", "C", "D", "E", "answer", "cot"]
KORMEDMCQA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kormedmcqa"
# SOURCE.txt's table: train, valid (the upstream dev), test, fewshot.
KORMEDMCQA_ROWS = {"doctor": (1890, 164, 435, 5), "nurse": (582, 291, 878, 5),
                   "pharm": (632, 300, 885, 5), "dentist": (297, 304, 811, 5)}


def _pandas_csv(path: Path, rows: list[list]) -> None:
    """A split the way the GitHub copies of KorMedMCQA hold it: pandas to_csv, index column included."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=MCQA_COLUMNS).to_csv(path)


def _mcqa_config(root: Path, splits: list[str], subsets: tuple[str, ...] = ("doctor",)):
    return load_config("tiny", overrides={"data.kormedmcqa.local_path": str(root),
                                          "data.kormedmcqa.subsets": list(subsets),
                                          "data.kormedmcqa.splits": splits})


def test_kormedmcqa_pandas_csv_with_letters_and_a_valid_split(tmp_path):
    from kormedgemma.core.io import read_jsonl
    from kormedgemma.data.sources import collect_kormedmcqa, validate_mcqa_row

    folder = tmp_path / "kmcqa" / "doctor"
    _pandas_csv(folder / "test.csv", [
        ["doctor", 2022, 1, 1, " 고혈압의 1차 약제는?\n", "이뇨제 ", "항생제", "스테로이드", "진통제", "항히스타민제", "A", None],
        ["doctor", 2022, 1, 2, "폐렴의 흔한 원인균은?", "대장균", "폐렴사슬알균", "녹농균", "결핵균", "포도알균", " e ", None],
    ])
    _pandas_csv(folder / "valid.csv", [
        ["doctor", 2021, 1, 7, "당뇨병 진단 기준 HbA1c는?", "5.0%", "5.7%", "6.0%", "6.5%", "7.0%", "d", None]])
    _pandas_csv(folder / "fewshot.csv", [
        ["doctor", 2019, 2, 3, "쇼크의 1차 처치는?", "수액", "수혈", "승압제", "산소", "관찰", 1, "차근차근 생각해봅시다. 수액이다."]])
    assert (folder / "test.csv").read_text(encoding="utf-8").startswith(",subject,year,")  # the pandas index column
    config = _mcqa_config(tmp_path / "kmcqa", ["test", "dev", "fewshot"])
    out = tmp_path / "out"
    assert collect_kormedmcqa(config, out) == {"doctor": {"test": 2, "dev": 1, "fewshot": 1}}

    raw = {split: list(read_jsonl(out / "doctor" / f"{split}.jsonl")) for split in ("test", "dev", "fewshot")}
    assert "" not in raw["test"][0] and "Unnamed: 0" not in raw["test"][0]
    assert set(raw["test"][0]) == set(MCQA_COLUMNS)
    clean = {split: [validate_mcqa_row(row, "doctor") for row in rows] for split, rows in raw.items()}
    assert all(reason is None for rows in clean.values() for _, reason in rows)
    test, dev, fewshot = ([row for row, _ in clean[s]] for s in ("test", "dev", "fewshot"))
    assert [row["answer"] for row in test] == [1, 5]
    assert dev[0]["answer"] == 4 and dev[0]["question"] == "당뇨병 진단 기준 HbA1c는?"  # dev came from valid.csv
    assert fewshot[0]["answer"] == 1 and fewshot[0]["cot"] == "차근차근 생각해봅시다. 수액이다."
    assert test[0]["A"] == "이뇨제 " and test[0]["question"] == " 고혈압의 1차 약제는?\n"  # as written


def test_kormedmcqa_missing_dev_names_the_valid_alias(tmp_path):
    from kormedgemma.data.sources import collect_kormedmcqa

    _pandas_csv(tmp_path / "kmcqa" / "doctor" / "test.csv", [
        ["doctor", 2022, 1, 1, "질문?", "가", "나", "다", "라", "마", "B", None]])
    with pytest.raises(FileNotFoundError, match=r"doctor/dev not found .*looked for dev\.jsonl, dev\.csv, "
                                                 r"valid\.jsonl, valid\.csv; 'valid' is accepted"):
        collect_kormedmcqa(_mcqa_config(tmp_path / "kmcqa", ["test", "dev"]), tmp_path / "out")


@pytest.mark.parametrize("answer, expected", [
    (3, (3, None)), ("4", (4, None)), (" 2 ", (2, None)), ("B", (2, None)), (" e\n", (5, None)),
    (0, (None, "answer 0 outside 1-5")), ("6", (None, "answer 6 outside 1-5")),
    ("F", (None, "answer 'F' is not 1-5 or a letter A-E")), ("AB", (None, "answer 'AB' is not 1-5 or a letter A-E")),
    ("", (None, "answer '' is not 1-5 or a letter A-E")), (None, (None, "answer None is not 1-5 or a letter A-E")),
    (True, (None, "answer True is not 1-5 or a letter A-E")), (2.5, (None, "answer 2.5 is not 1-5 or a letter A-E")),
])
def test_mcqa_answers_are_numbers_or_letters(answer, expected):
    from kormedgemma.data.sources import validate_mcqa_row

    row = {"question": "질문?", "A": "가", "B": "나", "C": "다", "D": "라", "E": "마", "answer": answer}
    clean, reason = validate_mcqa_row(row, "doctor")
    assert ((clean or {}).get("answer"), reason) == expected


def test_whitespace_only_option_is_missing():
    from kormedgemma.data.sources import validate_mcqa_row

    row = {"question": "질문?", "A": "가", "B": "나", "C": " \t", "D": "라", "E": "마", "answer": "A"}
    assert validate_mcqa_row(row, "doctor") == (None, "missing option C")


@pytest.mark.skipif(not KORMEDMCQA.is_dir(), reason=f"the real KorMedMCQA copy ({KORMEDMCQA}) is not on this machine")
def test_real_kormedmcqa_folder_collects_every_row(tmp_path):
    from kormedgemma.core.io import read_jsonl
    from kormedgemma.data.sources import collect_kormedmcqa, validate_mcqa_row

    config = _mcqa_config(KORMEDMCQA, ["train", "dev", "test", "fewshot"], tuple(KORMEDMCQA_ROWS))
    counts = collect_kormedmcqa(config, tmp_path / "out")
    assert {s: tuple(c[split] for split in ("train", "dev", "test", "fewshot")) for s, c in counts.items()} \
        == KORMEDMCQA_ROWS
    bad, answers = [], {n: 0 for n in range(1, 6)}
    for subset, splits in counts.items():
        for split in splits:
            for number, row in enumerate(read_jsonl(tmp_path / "out" / subset / f"{split}.jsonl"), start=1):
                clean, reason = validate_mcqa_row(row, subset)
                if clean is None:
                    bad.append((subset, split, number, reason))
                else:
                    answers[clean["answer"]] += 1
    assert bad == []
    assert sum(answers.values()) == 7489 and min(answers.values()) > 1000  # every letter is used
