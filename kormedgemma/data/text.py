"""Text normalisation and splitting shared by every phase that reads raw text.

These sit below the phases: phase 0 cleans with them, phase 4's leakage check and the
evaluator's prompts compare text normalised the same way, so the rules live in one place.
"""
from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_WHITESPACE = re.compile(r"\s+")
# A sentence ends at . ! ? or their full-width forms (also "다." in Korean prose), followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def normalize_text(text: str) -> str:
    """NFC, no control or zero-width characters, single spaces, trimmed lines, ≤ 2 newlines."""
    text = unicodedata.normalize("NFC", text)
    text = _ZERO_WIDTH.sub("", _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n")))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def hangul_ratio(text: str) -> float:
    """Share of non-space characters that are Hangul (syllables or jamo)."""
    chars = _WHITESPACE.sub("", text)
    return len(HANGUL.findall(chars)) / len(chars) if chars else 0.0


def split_document(text: str, max_chars: int, min_chars: int = 0) -> list[str]:
    """Pieces of at most `max_chars`, cut at paragraph, then line, then sentence boundaries.

    A long Wikipedia article (an enzyme, an addiction) is among the most useful text of the
    corpus; dropping it for its length loses exactly that. Pieces are packed greedily up to
    `max_chars`; a piece still shorter than `min_chars` joins a neighbour when the two fit, so
    the later length filter does not throw away the end of an article. Only a single sentence
    longer than `max_chars` (a table flattened into one line) is cut mid-text, at a space where
    one is near. No text is lost: the pieces hold every non-space character of the input, in order.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be ≥ 1 (got {max_chars})")
    if len(text) <= max_chars:
        return [text] if text else []
    units = _units(text, max_chars)
    pieces: list[str] = []
    current = ""
    for unit, separator in units:
        candidate = current + unit
        if current and len(candidate.rstrip()) > max_chars:
            pieces.append(current.strip())
            current = ""
            candidate = unit
        current = candidate + separator
    if current.strip():
        pieces.append(current.strip())
    return _merge_short(pieces, max_chars, min_chars)


def _units(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(unit, separator after it): paragraphs, split further only where one exceeds max_chars."""
    units: list[tuple[str, str]] = []
    for paragraph, para_sep in _split_keep(text, "\n\n"):
        if len(paragraph) <= max_chars:
            units.append((paragraph, para_sep))
            continue
        lines = _split_keep(paragraph, "\n")
        for index, (line, line_sep) in enumerate(lines):
            separator = line_sep if index < len(lines) - 1 else para_sep
            if len(line) <= max_chars:
                units.append((line, separator))
                continue
            sentences = _split_sentences(line)
            for s_index, (sentence, s_sep) in enumerate(sentences):
                s_separator = s_sep if s_index < len(sentences) - 1 else separator
                if len(sentence) <= max_chars:
                    units.append((sentence, s_separator))
                else:
                    chunks = _hard_cut(sentence, max_chars)
                    units.extend((chunk, "") for chunk in chunks[:-1])
                    units.append((chunks[-1], s_separator))
    return units


def _split_keep(text: str, separator: str) -> list[tuple[str, str]]:
    parts = text.split(separator)
    return [(part, separator if i < len(parts) - 1 else "") for i, part in enumerate(parts)]


def _split_sentences(line: str) -> list[tuple[str, str]]:
    result, start = [], 0
    for match in _SENTENCE_END.finditer(line):
        result.append((line[start:match.start()], match.group()))
        start = match.end()
    result.append((line[start:], ""))
    return [(s, sep) for s, sep in result if s] or [(line, "")]


def _hard_cut(sentence: str, max_chars: int) -> list[str]:
    chunks = []
    while len(sentence) > max_chars:
        cut = sentence.rfind(" ", max_chars // 2, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        chunks.append(sentence[:cut])
        sentence = sentence[cut:]
    chunks.append(sentence)
    return chunks


def _merge_short(pieces: list[str], max_chars: int, min_chars: int) -> list[str]:
    if min_chars <= 0 or len(pieces) < 2:
        return pieces
    merged: list[str] = []
    for piece in pieces:
        if merged and (len(piece) < min_chars or len(merged[-1]) < min_chars) \
                and len(merged[-1]) + 2 + len(piece) <= max_chars:
            merged[-1] = merged[-1] + "\n\n" + piece
        else:
            merged.append(piece)
    return merged
