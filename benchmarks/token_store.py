"""Step 1.04 at scale: the token store from ≥ 1 GB of Korean, and a stage's start-up against the
text path it replaced.

Inputs, built here as sealed artifacts under a scratch `paths.root` (so the project's own steps
run on them unchanged):
- a merged tokenizer: a Gemma-form SentencePiece BPE (byte fallback, no dummy prefix) of
  `--vocab` pieces trained on the real Korean Wikipedia medical articles in ../shared/data,
  converted to the fast tokenizer by `base_model.hf_tokenizer_from_sentencepiece`;
- processed corpora in phase 0's layout: Korean documents of 1,000–20,000 characters recombined
  from the articles' paragraphs, 95 % train / 5 % valid, in 64 MB shards; English from the
  bundled sample text (the 10 % replay share).

Measured, each in a fresh subprocess with its peak RSS (ru_maxrss):
- `token_store.token_store_artifact` (1.04) on the whole corpus: MB/s, tokens, size on disk;
- stage start-up now: `training.stage.stage_data` at the `a5000` stage shape (seq 2048), reading the store;
- stage start-up before this store (the code at e551cc5, read from git): `read_texts` +
  `tokenizer.encode` one text at a time + `packing.build_blocks` as Python int lists, on the
  smaller `--old-mb` prefixes (the whole corpus would take tens of GB of Python ints).

    .venv/bin/python benchmarks/token_store.py                 # ~1 GB
    .venv/bin/python benchmarks/token_store.py --mb 64 --old-mb 32

Writes benchmarks/results/token_store.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared/data"
KOWIKI = SHARED / "kowiki_medical/kowiki_medical.jsonl"
OLD_COMMIT = "e551cc5"  # the last commit whose stages tokenized text themselves
SHARD_BYTES = 64_000_000


def config_for(root: Path):
    from kormedgemma.core.config import load_config

    return load_config("a5000", {"paths.root": str(root)})


def build_inputs(root: Path, megabytes: float, vocab: int, seed: int = 0) -> dict:
    """Sealed merged_tokenizer, korean and english artifacts under `root`."""
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.io import write_jsonl
    from kormedgemma.core.manifest import write_artifact
    from kormedgemma.modeling.base_model import hf_tokenizer_from_sentencepiece, save_tokenizer, train_base_sentencepiece

    config = config_for(root)
    articles = [json.loads(line)["text"] for line in KOWIKI.open(encoding="utf-8")]
    paragraphs = [p for a in articles for p in a.split("\n") if p.strip()]
    started = time.perf_counter()
    with write_artifact(artifact_path(config, "merged_tokenizer"), "1.03", config, [], {}) as out:
        text_file = root / "tokenizer_corpus.txt"
        text_file.write_text("\n".join(paragraphs), encoding="utf-8")
        sp_model = train_base_sentencepiece(text_file, root / "sp", vocab)
        save_tokenizer(hf_tokenizer_from_sentencepiece(sp_model), out.path)
    tokenizer_seconds = time.perf_counter() - started

    rng = random.Random(seed)
    korean = artifact_path(config, "korean")
    with write_artifact(korean, "0.04", config, [], {}) as out:
        handles, written, shard = {}, {"train": 0, "valid": 0}, {"train": 0, "valid": 0}
        total = 0
        while total < megabytes * 1e6:
            target, parts, size = rng.randint(1000, 20000), [], 0
            while size < target:
                parts.append(rng.choice(paragraphs))
                size += len(parts[-1]) + 1
            line = json.dumps({"text": "\n".join(parts)[:20000], "source": "kowiki-recombined"},
                              ensure_ascii=False).encode() + b"\n"
            split = "valid" if rng.random() < 0.05 else "train"
            if split not in handles or written[split] >= SHARD_BYTES:
                if split in handles:
                    handles[split].close()
                    shard[split] += 1
                (out.path / split).mkdir(exist_ok=True)
                handles[split], written[split] = open(out.path / split / f"{shard[split]:05d}.jsonl", "wb"), 0
            handles[split].write(line)
            written[split] += len(line)
            total += len(line)
        for handle in handles.values():
            handle.close()
    sentences = [line for line in (ROOT / "data/samples/english_medical.txt").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    with write_artifact(artifact_path(config, "english"), "0.04", config, [], {}) as out:
        for split, count in (("train", 20000), ("valid", 500)):
            write_jsonl(out.path / split / "00000.jsonl",
                        ({"text": " ".join(rng.sample(sentences, 8)), "source": "sample"} for _ in range(count)))
    return {"tokenizer_vocab": vocab, "tokenizer_train_seconds": round(tokenizer_seconds, 1),
            "korean_mb": round(sum(p.stat().st_size for p in korean.rglob("*.jsonl")) / 1e6, 1)}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child_build(root: str) -> dict:
    from kormedgemma.data.token_store import token_store_artifact

    config = config_for(Path(root))
    started = time.perf_counter()
    store = token_store_artifact(config, progress=False)
    seconds = time.perf_counter() - started
    folder = Path(root) / "data/tokens"
    megabytes = sum(p["megabytes"] for p in store["parts"].values())
    return {"seconds": round(seconds, 1), "tokenize_seconds": store["seconds"], "input_mb": round(megabytes, 1),
            "mb_per_second": round(megabytes / store["seconds"], 2),
            "tokens": sum(p["tokens"] for p in store["parts"].values()),
            "documents": sum(p["docs"] for p in store["parts"].values()),
            "disk_mb": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1),
            "parts": store["parts"], "peak_rss_mb": peak_rss_mb()}


def child_stage_now(root: str) -> dict:
    from transformers import AutoTokenizer

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.training.stage import stage_config, stage_data

    config = config_for(Path(root))
    spec = stage_config(config, 1)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    data = stage_data(config, tokenizer, spec, seed=0)
    first = data.train[[0, 1]]  # the first micro-batch's blocks, read from the memory map
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "blocks": len(data.train), "seq_len": spec.seq_len,
            "english_share": round(data.english_share, 4), "first_batch_shape": list(first.shape),
            "peak_rss_mb": peak_rss_mb()}


def child_stage_before(root: str, megabytes: str) -> dict:
    """The start-up of a stage at e551cc5: the old modules, loaded from git, on a prefix of the corpus."""
    import importlib.util
    import tempfile

    from transformers import AutoTokenizer

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.data.readers import iter_split
    from kormedgemma.training.stage import stage_config

    old = Path(tempfile.mkdtemp()) / "packing_e551cc5.py"
    old.write_text(subprocess.run(["git", "show", f"{OLD_COMMIT}:kormedgemma/packing.py"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout, encoding="utf-8")
    spec_module = importlib.util.spec_from_file_location("packing_e551cc5", old)
    packing = importlib.util.module_from_spec(spec_module)
    spec_module.loader.exec_module(packing)

    config = config_for(Path(root))
    spec = stage_config(config, 1)
    budget = float(megabytes) * 1e6

    def prefix(corpus: str, split: str) -> list[str]:  # what read_texts(train.jsonl) returned
        texts, size = [], 0
        for text in iter_split(artifact_path(config, corpus), split):
            if size >= budget:
                break
            texts.append(text)
            size += len(text.encode("utf-8"))
        return texts

    korean, english = prefix("korean", "train"), prefix("english", "train")
    korean_mb = sum(len(t.encode("utf-8")) for t in korean) / 1e6
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    packed = packing.build_blocks(tokenizer, korean, english, spec.seq_len, spec.english_replay_fraction, 0)
    seconds = time.perf_counter() - started
    return {"korean_mb": round(korean_mb, 1), "seconds": round(seconds, 1), "blocks": len(packed),
            "mb_per_second": round(korean_mb / seconds, 2), "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1100.0, help="Korean corpus size (MB of JSONL)")
    parser.add_argument("--old-mb", default="64,256", help="corpus prefixes for the old start-up path")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--scratch", default="/tmp/kormedgemma_token_store_bench")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/token_store.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"build": child_build, "now": child_stage_now, "before": child_stage_before}[kind](*rest)
        print(json.dumps(result))
        return
    if not KOWIKI.is_file():
        raise SystemExit(f"{KOWIKI} not found: this benchmark builds its corpus from the real articles")

    root = Path(args.scratch)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    inputs = build_inputs(root, args.mb, args.vocab)
    print(json.dumps({"inputs": inputs}), flush=True)
    build = run_child("build", str(root))
    print(json.dumps({"build": {k: v for k, v in build.items() if k != "parts"}}), flush=True)
    now = run_child("now", str(root))
    print(json.dumps({"stage_startup_now": now}), flush=True)
    before = []
    for megabytes in args.old_mb.split(","):
        before.append(run_child("before", str(root), megabytes))
        print(json.dumps({"stage_startup_before": before[-1]}), flush=True)
    shutil.rmtree(root, ignore_errors=True)

    slowest = min(before, key=lambda r: r["mb_per_second"]) if before else None
    report = {"benchmark": "token_store", "command": "python benchmarks/token_store.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count()}, "inputs": inputs, "build": build,
              "stage_startup_now": now, "stage_startup_before": before,
              "before_extrapolated_to_corpus_seconds": round(inputs["korean_mb"] / slowest["mb_per_second"], 1)
              if slowest else None}
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
