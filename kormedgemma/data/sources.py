"""Phase 0 collection: text sources and KorMedMCQA, from local files or the Hugging Face Hub.

A local path always wins over a Hub id, so an offline box (or a test) points any source at a
copy. Hub sources are streamed and capped: OSCAR and mC4 Korean are far larger than a training
box's disk and larger than the ~10K-token vocabulary expansion needs.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm

from config.training_config import KorMedMCQAConfig, ProjectConfig, SourceConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.core.config import resolve_input
from kormedgemma.core.hub import hub_access
from kormedgemma.core.io import numbered_rows, write_jsonl, write_jsonl_shards
from kormedgemma.core.manifest import write_artifact

MCQA_FIELDS = ("question", "A", "B", "C", "D", "E", "answer")

# Words whose presence marks a document as medical (Korean Wikipedia, web crawls). A document is
# kept when it holds at least `MEDICAL_MIN_HITS` distinct ones: one stray "병원" is not enough.
# Single syllables are avoided: "간" (liver) also matches 시간 (time).
MEDICAL_KEYWORDS_KO = (
    "질환", "질병", "증상", "치료", "진단", "환자", "병원", "의사", "간호", "약물", "투여", "수술", "감염",
    "바이러스", "세균", "종양", "염증", "혈압", "당뇨", "심장", "폐렴", "간염", "신장", "혈액", "면역",
    "백신", "처방", "부작용", "합병증", "임상", "의학", "약리", "해부", "생리", "병리", "치과", "약사", "증후군",
)
MEDICAL_KEYWORDS_EN = (
    "disease", "disorder", "symptom", "treatment", "therapy", "diagnosis", "patient", "clinical",
    "hospital", "physician", "nurse", "drug", "dose", "surgery", "infection", "virus", "bacteria",
    "cancer", "tumor", "inflammation", "blood", "pressure", "diabetes", "cardiac", "heart", "lung",
    "kidney", "liver", "immune", "vaccine", "syndrome", "medical", "medicine", "pharmac", "dental",
)
MEDICAL_MIN_HITS = 3


def is_medical(text: str, language: str) -> bool:
    keywords = MEDICAL_KEYWORDS_KO if language == "ko" else MEDICAL_KEYWORDS_EN
    lowered = text.lower()
    return sum(1 for word in keywords if word in lowered) >= MEDICAL_MIN_HITS


def sources_table(config: ProjectConfig) -> list[dict[str, Any]]:
    """One row per configured source: where it comes from, how much, under which licence."""
    rows = []
    for name, source in config.data.sources.items():
        rows.append({
            "source": name, "language": source.language, "enabled": source.enabled,
            "origin": source.local_path or f"hub:{source.hub_id}" + (f" ({source.hub_config})" if source.hub_config else ""),
            "cap (docs)": source.max_docs, "medical filter": source.medical_filter,
            "approx. size": source.approx_size, "licence": source.licence, "description": source.description,
        })
    mcqa = config.data.kormedmcqa
    rows.append({
        "source": "kormedmcqa", "language": "ko", "enabled": True,
        "origin": mcqa.local_path or f"hub:{mcqa.hub_id}", "cap (docs)": None, "medical filter": False,
        "approx. size": "7,469 questions (doctor, nurse, pharm, dentist)", "licence": mcqa.licence,
        "description": "Korean licensing-exam multiple choice: instruction tuning and evaluation",
    })
    return rows


def iter_source_texts(config: ProjectConfig, name: str, source: SourceConfig) -> Iterator[str]:
    """Texts of one source, filtered to medicine where configured, capped at `max_docs`."""
    raw = _iter_local(resolve_input(config, source.local_path), source.text_field) if source.local_path \
        else _iter_hub(name, source)
    texts: Iterable[str] = (t for t in raw if isinstance(t, str) and t.strip())
    if source.medical_filter:
        texts = (t for t in texts if is_medical(t, source.language))
    return iter(itertools.islice(texts, source.max_docs) if source.max_docs else texts)


def _iter_local(path: Path, text_field: str) -> Iterator[str]:
    if not path.exists():
        raise FileNotFoundError(f"local source {path} not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".csv")) if path.is_dir() else [path]
    for file in files:
        if file.suffix in (".csv", ".jsonl"):
            for number, row in numbered_rows(file):
                if text_field not in row:
                    raise ValueError(f"{file}:{number}: row without the text field {text_field!r} "
                                     f"(set the source's text_field)")
                yield row[text_field]
        else:
            with open(file, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip() and not line.lstrip().startswith("#"):
                        yield line.strip()


def _iter_hub(name: str, source: SourceConfig) -> Iterator[str]:
    with hub_access(f"source {name!r} ({source.hub_id})",
                    f"Download a copy on a machine with network and set data.sources.{name}.local_path, "
                    f"or disable it with data.sources.{name}.enabled=false"):
        from datasets import load_dataset

        # Streamed: failures can come at any row, so the whole loop is inside the guard.
        for row in load_dataset(source.hub_id, source.hub_config, split=source.split, streaming=True):
            yield row[source.text_field]


def collect_texts(config: ProjectConfig, language: str, out_dir: Path) -> dict[str, int]:
    """Write `<source>/<shard>.jsonl` ({"text", "source"}) for each enabled source of `language`."""
    counts: dict[str, int] = {}
    for name, source in config.data.sources.items():
        if not source.enabled or source.language != language:
            continue
        rows = ({"text": text, "source": name} for text in
                tqdm(iter_source_texts(config, name, source), desc=f"collect {name}", unit="doc",
                     total=source.max_docs, mininterval=2.0))
        counts[name] = write_jsonl_shards(out_dir / name, rows, config.data.raw_shard_mb * 1_000_000)
        if counts[name] == 0:
            raise ValueError(f"source {name!r} produced no text: check its path/filters "
                             f"(medical_filter={source.medical_filter})")
    if not counts:
        raise ValueError(f"no enabled source with language {language!r}: add one under data.sources")
    return counts


# --------------------------------------------------------------------------- KorMedMCQA
def collect_kormedmcqa(config: ProjectConfig, out_dir: Path) -> dict[str, dict[str, int]]:
    """Copy every subset/split into `out_dir/<subset>/<split>.jsonl` as given (validation is phase 0.04)."""
    mcqa = config.data.kormedmcqa
    counts: dict[str, dict[str, int]] = {}
    for subset in mcqa.subsets:
        counts[subset] = {}
        for split in mcqa.splits:
            rows = list(_mcqa_rows(config, mcqa, subset, split))
            counts[subset][split] = write_jsonl(out_dir / subset / f"{split}.jsonl", rows)
    return counts


def _mcqa_rows(config: ProjectConfig, mcqa: KorMedMCQAConfig, subset: str, split: str) -> Iterator[dict]:
    if mcqa.local_path:
        folder = resolve_input(config, mcqa.local_path) / subset
        path = find_mcqa_file(folder, split)
        if path is None:
            raise FileNotFoundError(f"KorMedMCQA {subset}/{split} not found under {folder} "
                                    f"({mcqa_looked_for(split)})")
        yield from (row for _, row in numbered_rows(path))
        return
    with hub_access(f"KorMedMCQA ({mcqa.hub_id}, {subset}/{split})",
                    "Download it elsewhere (<subset>/<split>.jsonl) and set data.kormedmcqa.local_path"):
        from datasets import load_dataset

        dataset = load_dataset(mcqa.hub_id, subset, split=split)
    for row in dataset:
        yield {key: _plain(value) for key, value in row.items()}


# The Hub's `dev` split is `valid.csv` in the GitHub copies of KorMedMCQA (and in pandas exports).
MCQA_SPLIT_ALIASES = {"dev": ("valid",)}
MCQA_SUFFIXES = (".jsonl", ".csv")


def mcqa_file_names(split: str) -> list[str]:
    """File names that hold `split` in a `<subset>/` folder, in the order they are tried."""
    return [f"{name}{suffix}" for name in (split, *MCQA_SPLIT_ALIASES.get(split, ())) for suffix in MCQA_SUFFIXES]


def find_mcqa_file(folder: Path, split: str) -> Optional[Path]:
    """The file holding `split` in `folder` (one subset), or None: the one place that locates it."""
    return next((folder / name for name in mcqa_file_names(split) if (folder / name).is_file()), None)


def mcqa_looked_for(split: str) -> str:
    """What `find_mcqa_file` looked for, for error messages."""
    aliases = MCQA_SPLIT_ALIASES.get(split, ())
    alias = "".join(f"; {a!r} is accepted as another name of the {split!r} split" for a in aliases)
    return f"looked for {', '.join(mcqa_file_names(split))}{alias}"


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.loads(json.dumps(value, default=str))


def mcqa_answer(value: Any) -> tuple[Optional[int], Optional[str]]:
    """(1–5, None) or (None, reason). Upstream answers are 1–5; GitHub CSV copies use letters A–E."""
    if isinstance(value, bool):
        return None, f"answer {value!r} is not 1-5 or a letter A-E"
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip() if isinstance(value, str) else ""
        if len(text) == 1 and text.upper() in "ABCDE":
            return "ABCDE".index(text.upper()) + 1, None
        if not (text.isascii() and text.isdigit()):
            return None, f"answer {value!r} is not 1-5 or a letter A-E"
        number = int(text)
    if not 1 <= number <= 5:
        return None, f"answer {number} outside 1-5"
    return number, None


def validate_mcqa_row(row: dict[str, Any], subset: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(clean row in the project schema, None) or (None, reason it is unusable).

    The question and options keep their text as written: lm-evaluation-harness renders
    ``{{A}}``… unchanged and strips only the question (`data.kormedmcqa.doc_to_text` does the same), so
    stripping here would change the prompts the published scores were measured on.
    """
    question = row.get("question")
    if question is None or str(question).strip() == "":
        return None, "empty question"
    options = {}
    for letter in "ABCDE":
        option = row.get(letter)
        if option is None or str(option).strip() == "":
            return None, f"missing option {letter}"
        options[letter] = str(option)
    answer, reason = mcqa_answer(row.get("answer"))
    if answer is None:
        return None, reason
    clean = {"question": str(question), **options, "answer": answer,
             "subject": str(row.get("subject") or subset)}
    cot = row.get("cot")
    if isinstance(cot, str) and cot.strip():
        clean["cot"] = cot.strip()
    return clean, None


def collect_all(config: ProjectConfig) -> dict[str, Any]:
    """Phase 0.02: raw Korean and English text and KorMedMCQA, each an atomic artifact."""

    local_inputs = {name: resolve_input(config, s.local_path) for name, s in config.data.sources.items()
                    if s.enabled and s.local_path}
    figures: dict[str, Any] = {}
    for language, key in (("ko", "raw_korean"), ("en", "raw_english")):
        inputs = {n: p for n, p in local_inputs.items() if config.data.sources[n].language == language}
        with write_artifact(artifact_path(config, key), "0.02", config, ["data.sources"], inputs) as out:
            out.metrics["docs_per_source"] = collect_texts(config, language, out.path)
        figures[key] = out.metrics["docs_per_source"]
    mcqa = config.data.kormedmcqa
    inputs = {"kormedmcqa": resolve_input(config, mcqa.local_path)} if mcqa.local_path else {}
    with write_artifact(artifact_path(config, "raw_kormedmcqa"), "0.02", config, ["data.kormedmcqa"],
                        inputs) as out:
        out.metrics["rows"] = collect_kormedmcqa(config, out.path)
    figures["raw_kormedmcqa"] = out.metrics["rows"]
    return figures


def raw_headline(metrics: dict[str, Any]) -> str:
    """0.02's line for a collected corpus: documents per source."""
    docs = metrics.get("docs_per_source", {})
    return ", ".join(f"{name}: {count:,}" for name, count in docs.items())


def raw_kormedmcqa_headline(metrics: dict[str, Any]) -> str:
    """0.02's line for KorMedMCQA as collected."""
    rows = metrics.get("rows", {})
    return f"{sum(sum(v.values()) for v in rows.values()):,} questions in {len(rows)} subsets"
