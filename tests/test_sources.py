import pytest

from kormedgemma.config import load_config
from kormedgemma.dictionary import build_dictionary, clean_pairs, read_umls_mrconso
from kormedgemma.hub import HubUnavailableError, model_ref
from kormedgemma.sources import collect_texts, is_medical, iter_source_texts


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
    from kormedgemma.base_model import load_tokenizer

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


def test_offline_kormedmcqa_names_the_local_path_key(tmp_path):
    from kormedgemma.sources import collect_kormedmcqa

    config = load_config("a5000", overrides={"paths.root": str(tmp_path)})
    with pytest.raises(HubUnavailableError, match=r"sean0042/KorMedMCQA, doctor/train.*data.kormedmcqa.local_path"):
        collect_kormedmcqa(config, tmp_path / "out")
    assert not (tmp_path / "out" / "doctor" / "train.jsonl").exists()


def test_kormedmcqa_from_a_local_folder_in_csv(tmp_path):
    from kormedgemma.sources import collect_kormedmcqa

    folder = tmp_path / "kmcqa" / "doctor"
    folder.mkdir(parents=True)
    (folder / "test.csv").write_text("question,A,B,C,D,E,answer\n질문?,가,나,다,라,마,2\n", encoding="utf-8")
    config = load_config("tiny", overrides={"data.kormedmcqa.local_path": str(tmp_path / "kmcqa"),
                                            "data.kormedmcqa.subsets": ["doctor"],
                                            "data.kormedmcqa.splits": ["test"]})
    assert collect_kormedmcqa(config, tmp_path / "out") == {"doctor": {"test": 1}}
