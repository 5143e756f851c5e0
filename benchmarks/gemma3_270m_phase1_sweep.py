"""What the Korean vocabulary gains as the Korean corpus shrinks: phases 0-1 of the gemma3_270m
profile on the local data (benchmarks/gemma3_270m_local.yaml) at several
`data.preprocess.korean_train_share` values and `tokenizer.min_frequency` thresholds, on the CPU
(about 2 minutes a variant on 2 cores).

    python -m kormedgemma pubmedqa-local --out data/pubmedqa_local   # once
    python benchmarks/gemma3_270m_phase1_sweep.py --work /tmp/g270cpu \\
        --shares 1.0 0.5 0.25 --min-frequencies 20 10 5 \
        --out benchmarks/results/gemma3_270m_phase1_share_sweep_cpu.json

Each (share, threshold) is the pipeline's own run to 1.04 under <work>/s<share>-f<threshold>,
started by `benchmarks/gemma3_270m_variants.py`; one whose artifacts are fresh is only read again. Every share is run
at the first threshold, every threshold at the first share. The held-out Korean articles are the same at every
share, so the token saving is measured on the same 54 texts. This is the saving side of issue 26's
corpus-size question only: whether the expanded model's Korean bits/char catches up with plain
continued pretraining as the corpus grows needs the stages, on the GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variants(work: Path, variants: list[tuple[float, int]]) -> list[Path]:
    """Every (share, threshold) to 1.04 through the variants script (one at a time: phase 0 uses
    every core), which links the materialised base from the first instead of rebuilding it."""
    names = [f"s{share}-f{threshold}" for share, threshold in variants]
    command = [sys.executable, str(REPO / "benchmarks" / "gemma3_270m_variants.py"), "--root", str(work),
               "--to", "1.04", "--parallel", "1"]
    for name, (share, threshold) in zip(names, variants):
        command += ["--variant", f"{name}:data.preprocess.korean_train_share={share},tokenizer.min_frequency={threshold}"]
    subprocess.run(command, cwd=REPO, check=True)
    return [work.resolve() / name for name in names]


def figures(root: Path, share: float, min_frequency: int) -> dict:
    def metrics(folder: str) -> dict:
        return json.loads((root / folder / "manifest.json").read_text(encoding="utf-8"))["metrics"]

    korean, merged = metrics("data/processed/korean"), metrics("models/tokenizer/merged")
    return {"korean_train_share": share, "min_frequency": min_frequency, "train_documents": korean["train"]["docs"],
            "train_chars": korean["train"]["chars"], "new_pieces": merged["new_pieces"],
            "new_ids_used_on_valid": merged["new_ids_used_on_texts"],
            "korean_tokens_per_char_base": merged["korean_tokens_per_char_before"],
            "korean_tokens_per_char_merged": merged["korean_tokens_per_char_after"],
            "korean_token_reduction": merged["korean_reduction"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--min-frequencies", type=int, nargs="+", default=[20])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    variants = [(share, args.min_frequencies[0]) for share in args.shares]
    variants += [(args.shares[0], threshold) for threshold in args.min_frequencies[1:]]
    rows = [figures(root, share, threshold)
            for root, (share, threshold) in zip(run_variants(args.work, variants), variants)]
    result = {"note": "phases 0-1 of gemma3_270m on benchmarks/gemma3_270m_local.yaml (kowiki_medical); "
                      "token saving on the same 54 held-out Korean articles",
              "command": "python benchmarks/gemma3_270m_phase1_sweep.py --work <dir> --shares "
                         + " ".join(str(s) for s in args.shares) + " --min-frequencies "
                         + " ".join(str(f) for f in args.min_frequencies),
              "variants": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
