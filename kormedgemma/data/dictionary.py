"""The Korean–English medical dictionary that anchors WECHSEL's cross-lingual alignment.

Sources: pairs bundled with this project, UMLS MRCONSO.RRF when the user supplies it (Korean
strings, e.g. the MSHKOR Korean MeSH translation, paired with the English preferred name of the
same concept), and extra TSV exports. Pairs are NFC-normalised and deduplicated.
"""
from __future__ import annotations

import csv
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from config.training_config import ProjectConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.core.config import resolve_input
from kormedgemma.core.io import atomic_file
from kormedgemma.core.manifest import write_artifact

HANGUL = re.compile(r"[\uac00-\ud7a3]")
DICTIONARY_FILE = "medical_ko_en.tsv"


def read_pairs_tsv(path: Path, default_source: str) -> Iterator[tuple[str, str, str]]:
    """Rows `ko<TAB>en[<TAB>source]`, or any TSV whose header row names `ko` and `en` columns.

    A header is how real exports come: the KCD list is `kcd<TAB>ko<TAB>en<TAB>latest`, and reading
    it by position would pair codes with Korean names. `#` comments and blank lines are skipped.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"dictionary file {path} not found")
    ko_col, en_col, source_col = 0, 1, 2
    first = True
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            cells = line.rstrip("\n").rstrip("\r").split("\t")
            if first:  # the first row that is not a comment may be a header
                first = False
                names = [c.strip().lower() for c in cells]
                if "ko" in names or "en" in names:
                    if not {"ko", "en"} <= set(names):
                        raise ValueError(f"{path}: the header names {names} but a dictionary needs both a "
                                         "'ko' and an 'en' column")
                    ko_col, en_col = names.index("ko"), names.index("en")
                    source_col = names.index("source") if "source" in names else -1
                    continue
            if len(cells) <= max(ko_col, en_col):
                raise ValueError(f"{path}:{number}: expected ko<TAB>en[<TAB>source] (or the header's columns), "
                                 f"got {line.strip()!r}")
            source = cells[source_col] if 0 <= source_col < len(cells) and cells[source_col].strip() else default_source
            yield cells[ko_col], cells[en_col], source


def read_umls_mrconso(path: Path) -> Iterator[tuple[str, str, str]]:
    """Pair each Korean string with its concept's English preferred name.

    MRCONSO.RRF columns: CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF.
    The English name chosen per CUI is the first with TS=P, STT=PF, ISPREF=Y, else any English one.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"UMLS file {path} not found (data.dictionary.umls_mrconso)")
    english: dict[str, tuple[int, str]] = {}
    korean: list[tuple[str, str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            cells = line.rstrip("\n").split("|")
            if len(cells) < 17:
                raise ValueError(f"{path}:{number}: not an MRCONSO.RRF row ({len(cells)} fields, expected 18)")
            cui, lat, ts, stt, ispref, sab, string, suppress = (
                cells[0], cells[1], cells[2], cells[4], cells[6], cells[11], cells[14], cells[16])
            if suppress in ("O", "E", "Y"):
                continue
            if lat == "ENG":
                rank = 0 if (ts, stt, ispref) == ("P", "PF", "Y") else 1
                if cui not in english or rank < english[cui][0]:
                    english[cui] = (rank, string)
            elif lat == "KOR":
                korean.append((cui, string, sab))
    for cui, string, sab in korean:
        if cui in english:
            yield string, english[cui][1], f"umls:{sab}"


def clean_pairs(pairs: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """NFC, trimmed, Korean side must hold Hangul, first occurrence of each (ko, en) kept."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for ko, en, source in pairs:
        ko = unicodedata.normalize("NFC", ko).strip()
        en = unicodedata.normalize("NFC", en).strip()
        if not ko or not en or not HANGUL.search(ko):
            continue
        key = (ko, en.lower())
        if key in seen:
            continue
        seen.add(key)
        kept.append((ko, en, source))
    return kept


def build_dictionary(config: ProjectConfig, out_dir: Path) -> dict[str, object]:
    """Write `medical_ko_en.tsv` (ko, en, source) into `out_dir`; returns counts per source."""
    spec = config.data.dictionary
    pairs: list[tuple[str, str, str]] = list(read_pairs_tsv(resolve_input(config, spec.bundled), "bundled"))
    if spec.umls_mrconso:
        pairs += list(read_umls_mrconso(resolve_input(config, spec.umls_mrconso)))
    for extra in spec.extra_tsv:
        pairs += list(read_pairs_tsv(resolve_input(config, extra), Path(extra).stem))
    kept = clean_pairs(pairs)
    if not kept:
        raise ValueError("the bilingual dictionary is empty: check data.dictionary paths")
    with atomic_file(out_dir / DICTIONARY_FILE) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["ko", "en", "source"])
        writer.writerows(kept)
    per_source = Counter(source for _, _, source in kept)
    return {"pairs": len(kept), "read": len(pairs), "dropped": len(pairs) - len(kept),
            "per_source": dict(per_source), "unique_korean_terms": len({ko for ko, _, _ in kept})}


def load_dictionary(path: Path) -> list[tuple[str, str, str]]:
    return list(read_pairs_tsv(path, "unknown"))


def build_dictionary_artifact(config: ProjectConfig) -> Path:
    """Phase 0.03: data/bilingual_dict/medical_ko_en.tsv with its manifest."""

    spec = config.data.dictionary
    inputs = {"bundled": resolve_input(config, spec.bundled)}
    if spec.umls_mrconso:
        inputs["umls_mrconso"] = resolve_input(config, spec.umls_mrconso)
    inputs.update({f"extra_{i}": resolve_input(config, p) for i, p in enumerate(spec.extra_tsv)})
    final = artifact_path(config, "dictionary")
    with write_artifact(final, "0.03", config, ["data.dictionary"], inputs) as out:
        out.metrics.update(build_dictionary(config, out.path))
    return final


def dictionary_headline(metrics: dict[str, Any]) -> str:
    """0.03's line in the run report."""
    return f"{metrics.get('pairs', 0):,} pairs ({metrics.get('per_source')})"
