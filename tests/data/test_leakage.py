"""The KorMedMCQA leakage guard finds documents that hold a held-out question, not ones that share a term.

Unit tests use questions written for them; the real-data tests read the real KorMedMCQA and the real
Korean Wikipedia medical articles from ../shared/data and skip, saying why, when those are absent.
"""
from __future__ import annotations

import csv
import json
import pickle
import random
import re
from pathlib import Path

import pytest

from kormedgemma.data.leakage import HeldoutQuestion, LeakageIndex, LeakMatch, compact_text, heldout_questions

# A case question long enough to be matched by its n-grams (≥ 35 compact characters of evidence).
PNEUMONIA = HeldoutQuestion(
    text="58세 남자가 3일 전부터 시작된 발열과 기침, 누런 가래로 응급실에 왔다. 2주 전 인플루엔자를 앓았고 "
         "당뇨병으로 메트포르민을 복용하고 있다. 체온 38.9℃, 호흡 28회/분이고 흉부 방사선사진에서 오른쪽 "
         "아래엽에 공동을 동반한 경화가 보인다. 가장 가능성이 높은 원인균은?",
    options=("폐렴사슬알균", "황색포도알균", "레지오넬라균", "폐렴미코플라스마", "인플루엔자균"),
    source="doctor/test:900",
)
# Questions that name the long terms the old any-25-gram rule tripped over (written like the real
# pharm/valid 30, 38, 49 and doctor/test 0 rows, which name the same terms).
RSV = HeldoutQuestion(
    text="호흡기 세포융합 바이러스(respiratory syncytial virus) 감염의 고위험군인 미숙아에게 유행 기간 동안 "
         "매달 근육주사하여 중증 하기도감염을 예방하는 단클론항체는?",
    options=("오말리주맙", "팔리비주맙", "베바시주맙", "아달리무맙", "토실리주맙"), source="pharm/valid:900")
COMT = HeldoutQuestion(
    text="파킨슨병 환자에서 레보도파의 말초 대사를 억제하여 약효 소실 현상을 줄이는 catechol-O-methyltransferase "
         "(COMT) 억제제는?",
    options=("셀레길린", "엔타카폰", "카르비도파", "아만타딘", "프라미펙솔"), source="pharm/valid:901")
VEGF = HeldoutQuestion(
    text="vascular endothelial growth factor (VEGF)에 결합하여 신생혈관 생성을 억제하며 습성 연령관련황반변성에 "
         "유리체내 주사로 쓰는 약물은?",
    options=("라니비주맙", "리툭시맙", "세툭시맙", "트라스투주맙", "인플릭시맙"), source="pharm/valid:902")
LAW = HeldoutQuestion(
    text="2개월 여아가 DTaP 예방접종 후 주사 부위에 심한 발적과 부종이 생겨 예방접종을 실시한 의원을 다시 찾았다. "
         "「감염병의 예방 및 관리에 관한 법률」에 따라 예방접종 후 이상반응을 진단한 의사가 신고해야 할 대상은?",
    options=("보건복지부장관", "질병관리청장", "관할 보건소장", "시·도지사", "대한의사협회장"), source="doctor/test:901")
SHORT = HeldoutQuestion(text="이종골 이식재의 장점은?", options=("감염 위험이 없다", "공급량이 많다"),
                        source="dentist/test:900")
QUESTIONS = [PNEUMONIA, RSV, COMT, VEGF, LAW, SHORT]

PROSE = ("폐렴은 폐의 실질에 생기는 염증으로, 원인에 따라 세균성, 바이러스성, 진균성 폐렴으로 나눈다. "
         "지역사회획득 폐렴의 가장 흔한 원인균은 폐렴사슬알균이며, 노인과 만성질환자에서 사망률이 높다.")

# Ordinary Korean medical prose that contains, verbatim, a long term one of the questions also contains.
FALSE_POSITIVES = {
    "respiratory syncytial virus": (RSV, "호흡기 세포융합 바이러스(respiratory syncytial virus, RSV)는 영아 세기관지염과 "
                                    "폐렴의 가장 흔한 원인이다. 주로 겨울철에 유행하며 비말과 오염된 손을 통해 전파된다. "
                                    "대부분 대증치료로 호전되지만 미숙아와 선천심장병 환아는 중증으로 진행할 수 있다."),
    "catechol-O-methyltransferase": (COMT, "도파민은 시냅스에서 재흡수된 뒤 모노아민 산화효소(MAO)와 "
                                     "catechol-O-methyltransferase(COMT)에 의해 분해된다. 이 효소들의 활성은 "
                                     "조현병과 파킨슨병의 약물치료 반응과 관련이 있다고 알려져 있다."),
    "vascular endothelial growth factor": (VEGF, "혈관내피성장인자(vascular endothelial growth factor, VEGF)는 "
                                           "혈관 생성을 촉진하는 신호 단백질이다. 저산소 상태의 조직에서 분비가 "
                                           "늘어나며, 종양이 자라는 데 필요한 새 혈관을 만드는 데에도 관여한다."),
    "「감염병의 예방 및 관리에 관한 법률」": (LAW, "「감염병의 예방 및 관리에 관한 법률」에 따라 예방접종 후 이상반응이 "
                                       "의심되는 사람을 진료한 의사는 그 사실을 신고하여야 한다. 이 법은 국민 건강에 위해가 "
                                       "되는 감염병의 발생과 유행을 막기 위하여 2010년 전부 개정되었다."),
}


@pytest.fixture(scope="module")
def index() -> LeakageIndex:
    return LeakageIndex(QUESTIONS)


def respace(text: str, seed: int = 0) -> str:
    """Spaces removed or added at random, and line breaks inserted: how another source may lay it out."""
    rng = random.Random(seed)
    out = []
    for char in text:
        if char == " " and rng.random() < 0.6:
            continue
        out.append(char)
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "\n", " \n  "]))
    return "".join(out)


def shares_25gram(text: str, question: str) -> bool:
    """The old rule: any whitespace-free 25-character n-gram in common."""
    a, b = re.sub(r"\s+", "", text), re.sub(r"\s+", "", question)
    return any(b[i:i + 25] in a for i in range(len(b) - 24))


# --- planted true leaks ---------------------------------------------------------------------------

def test_whole_question_in_prose_is_found(index):
    match = index.match(PROSE + " 다음은 기출 문제이다. " + PNEUMONIA.text + " " + PROSE)
    assert isinstance(match, LeakMatch)
    assert match.question == PNEUMONIA and match.share == 1.0
    assert match.span_chars == len(compact_text(PNEUMONIA.text))
    assert len(match.excerpt) <= 200 and "58세 남자가" in match.excerpt


def test_respaced_and_reflowed_question_is_found(index):
    for seed in range(5):
        match = index.match(PROSE + "\n\n" + respace(PNEUMONIA.text, seed) + "\n" + PROSE)
        assert match is not None and match.question == PNEUMONIA and match.share == 1.0


def test_question_with_reordered_numbered_options_is_found_and_reports_them(index):
    options = list(reversed(PNEUMONIA.options))
    listed = "\n".join(f"{number}) {option}" for number, option in enumerate(options, start=1))
    match = index.match(f"문제 12. {PNEUMONIA.text}\n{listed}\n정답: 1")
    assert match is not None and match.question == PNEUMONIA
    assert match.question.options == PNEUMONIA.options  # the options are part of what is reported


def test_most_of_a_question_is_found(index):
    head = PNEUMONIA.text[:int(len(PNEUMONIA.text) * 0.7)]
    match = index.match(PROSE + " " + head + " " + PROSE)
    assert match is not None and match.question == PNEUMONIA
    assert 0.5 <= match.share < 1.0


def test_quote_dot_and_bracket_styles_do_not_hide_a_copy(index):
    swapped = LAW.text.replace("「", "「 ").replace("·", "∙").replace("?", " ?").replace(",", "，")
    match = index.match(PROSE + swapped.replace("DTaP", "dtap"))
    assert match is not None and match.question == LAW


def test_short_question_matches_only_when_present_whole(index):
    match = index.match("치주 수술 복습. " + respace(SHORT.text) + " 1) 감염 위험이 없다 2) 공급량이 많다")
    assert match is not None and match.question == SHORT and match.share == 1.0
    assert index.match("이종골 이식재는 소나 돼지의 뼈를 처리하여 만든다.") is None


def test_question_deep_inside_a_long_text_is_found_with_its_excerpt(index):
    filler = (PROSE + "\n") * 1500  # ~180,000 characters: more than one scanning window
    match = index.match(filler + PNEUMONIA.text + "\n" + filler)
    assert match is not None and match.question == PNEUMONIA and match.share == 1.0
    assert "원인균은?" in match.excerpt or "58세" in match.excerpt


# --- planted false positives: a shared long term is not a leak ---------------------------------------

@pytest.mark.parametrize("term", sorted(FALSE_POSITIVES))
def test_prose_sharing_a_long_term_with_a_question_is_not_flagged(index, term):
    question, prose = FALSE_POSITIVES[term]
    assert term in prose and term in question.text
    assert shares_25gram(prose, question.text) or term.startswith("「")  # the old rule flagged these
    assert index.match(prose) is None
    assert not index.overlaps(PROSE + "\n" + prose)


def test_boilerplate_shared_by_many_questions_is_not_evidence():
    header = "다음 사례를 읽고 각 문제에 적합한 답을 고르시오. 혈압 120/80 mmHg, 맥박 72회/분, 호흡 18회/분, 체온 36.5℃이다."
    cases = [f"{header} {age}세 {sex}가 {symptom}으로 왔다. 가장 적절한 처치는?"
             for age, sex, symptom in [(34, "여자", "두통"), (61, "남자", "흉통"), (45, "남자", "복통"),
                                       (27, "여자", "발열"), (70, "여자", "어지럼"), (52, "남자", "호흡곤란")]]
    other_case = header + " 55세 남자가 요통으로 왔다. 진단은?"
    assert LeakageIndex(cases, max_gram_questions=1000).match(other_case) is not None  # were it counted
    index = LeakageIndex(cases)
    assert index.match(other_case) is None
    assert index.match(cases[3]).question.text == cases[3]


# --- the index itself --------------------------------------------------------------------------------

def test_index_is_picklable_and_matches_the_same_after_a_round_trip(index):
    copy = pickle.loads(pickle.dumps(index))
    assert len(copy) == len(index) == len(QUESTIONS)
    document = PROSE + respace(RSV.text)
    assert copy.match(document) == index.match(document) != None  # noqa: E711


def test_plain_strings_are_accepted_and_empty_questions_are_not_indexed():
    index = LeakageIndex([PNEUMONIA.text, "", "   \n"])
    assert len(index) == 1
    assert index.match(PNEUMONIA.text).question == HeldoutQuestion(text=PNEUMONIA.text)
    assert LeakageIndex([]).match(PNEUMONIA.text) is None


@pytest.mark.parametrize("kwargs, name", [
    ({"ngram_chars": 4}, "ngram_chars"), ({"ngram_chars": 13.0}, "ngram_chars"),
    ({"min_share": 0}, "min_share"), ({"min_share": 1.5}, "min_share"), ({"min_share": -0.1}, "min_share"),
    ({"min_span_chars": 0}, "min_span_chars"), ({"max_gram_questions": 0}, "max_gram_questions"),
])
def test_invalid_parameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LeakageIndex(QUESTIONS, **kwargs)


def test_heldout_questions_reads_every_subset_and_split_with_options_and_source(tmp_path):
    for subset, split, rows in [
        ("doctor", "dev", [{"question": "질문 가?", "A": "1", "B": "2", "C": "3", "D": "4", "E": "5"}]),
        ("doctor", "test", [{"question": "", "A": "x"}, {"question": "질문 나?", "A": "가", "B": "나"}]),
        ("nurse", "test", [{"question": "질문 다?", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}]),
        ("nurse", "train", [{"question": "훈련 문항은 제외", "A": "a"}]),
    ]:
        (tmp_path / subset).mkdir(exist_ok=True)
        (tmp_path / subset / f"{split}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    questions = heldout_questions(tmp_path)  # dev, test, fewshot; fewshot is absent here
    assert [(q.source, q.text, q.options) for q in questions] == [
        ("doctor/dev:0", "질문 가?", ("1", "2", "3", "4", "5")),
        ("doctor/test:1", "질문 나?", ("가", "나")),
        ("nurse/test:0", "질문 다?", ("a", "b", "c", "d", "e")),
    ]


# --- the real KorMedMCQA and the real Korean Wikipedia medical articles --------------------------

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MCQA = SHARED / "kormedmcqa"
KOWIKI = SHARED / "kowiki_medical" / "kowiki_medical.jsonl"
SUBSETS = ("doctor", "nurse", "pharm", "dentist")


def read_csv_questions(splits: tuple[str, ...]) -> list[HeldoutQuestion]:
    questions = []
    for subset in SUBSETS:
        for split in splits:
            with open(MCQA / subset / f"{split}.csv", newline="", encoding="utf-8") as handle:
                for number, row in enumerate(csv.DictReader(handle)):
                    questions.append(HeldoutQuestion(text=row["question"], source=f"{subset}/{split}:{number}",
                                                     options=tuple(row[key] for key in "ABCDE")))
    return questions


@pytest.fixture(scope="module")
def real():
    if not (MCQA / "doctor" / "test.csv").is_file() or not KOWIKI.is_file():
        pytest.skip(f"the real KorMedMCQA CSVs and Korean Wikipedia articles are not under {SHARED} "
                    "(they are shared test data, not part of the repository)")
    heldout = read_csv_questions(("valid", "test", "fewshot"))  # valid is upstream dev
    with open(KOWIKI, encoding="utf-8") as handle:
        articles = [json.loads(line) for line in handle]
    return LeakageIndex(heldout), heldout, articles


def test_real_test_questions_planted_into_real_articles_are_found(real):
    index, heldout, articles = real
    rng = random.Random(7)
    sample = rng.sample([q for q in heldout if "/test:" in q.source], 60)
    hosts = [a["text"] for a in articles if len(a["text"]) > 3000]
    for number, question in enumerate(sample):
        host = hosts[number % len(hosts)]
        for planted in (question.text, respace(question.text, number)):
            match = index.match(host[:1500] + "\n" + planted + "\n" + host[1500:3000])
            assert match is not None, (question.source, planted)
            assert compact_text(match.question.text) == compact_text(question.text), question.source


def test_real_articles_are_not_flagged_for_sharing_terms(real):
    # The old any-25-gram rule flagged 24 of these 1,044 articles (감기, 도파민, 유전자 치료, 안락사, …),
    # each for a term name, a law title or a list of diseases also named by a question. Read one by
    # one, none holds a question, and at these settings none is flagged.
    index, _, articles = real
    assert len(articles) == 1044 and len(index) == 4088
    flagged = [(article["title"], match.question.source) for article in articles
               if (match := index.match(article["text"])) is not None]
    assert flagged == []


def test_real_train_questions_that_repeat_a_heldout_question_are_the_ones_flagged(real):
    # KorMedMCQA's train split repeats some later test/valid questions. Each pair below was read: the
    # same stem, re-spaced, with other quote marks, or with a word or two changed. The old rule flagged
    # 551 of the 3,401 train questions.
    index, _, _ = real
    train = read_csv_questions(("train",))
    flagged = {q.source: m.question.source for q in train
               if (m := index.match(q.text + "\n" + "\n".join(q.options))) is not None}
    assert flagged == {
        "nurse/train:55": "nurse/test:350",    # … 나타날 수 있는 징후는? / 사정결과는?
        "nurse/train:204": "nurse/test:792",   # 행동특성은? / 행동 특성은?
        "nurse/train:241": "nurse/test:828",   # identical
        "nurse/train:255": "nurse/test:551",   # identical
        "nurse/train:477": "nurse/test:482",   # the test adds "입원 중인"
        "nurse/train:522": "nurse/test:526",   # identical
        "nurse/train:530": "nurse/valid:239",  # identical
        "nurse/train:541": "nurse/test:545",   # 새어 나와요 / 새어나와요
        "nurse/train:548": "nurse/test:844",   # identical
        "pharm/train:46": "pharm/test:350",    # 혈소판 / 혈소판의
        "pharm/train:298": "pharm/test:865",   # “약사(藥事) ” / ‘약사(藥事)’
        "pharm/train:305": "pharm/test:603",   # 처방전이 있어야만 / 처방전 없이
        "dentist/train:72": "dentist/test:621",  # identical
    }
