"""Run lm-evaluation-harness itself on a local task folder and dump what it saw and said.

This file runs *inside the harness's own environment* (`make parity` builds `.venv-lmeval`), by
path, so it imports only the standard library and `lm_eval`: never `kormedgemma`, whose copy of
the harness's rules it exists to check. `kormedgemma.evaluation.parity` writes the task folder, starts this
script, and compares its JSON with the project's evaluator question by question.

Generation time is the harness's `HFLM.generate_until` alone (wrapped, not re-implemented), so
the speed comparison excludes model loading and task building on both sides.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def record_requests(include_path: str, tasks: list[str], out: str) -> int:
    """The harness's requests for every document of `tasks`, 0-shot, with no model: a recording
    LM answers every log-likelihood request with 0 and keeps its (context, continuation)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    seen: dict[str, dict[int, dict]] = {}

    class Recorder(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            for r in requests:
                doc = seen.setdefault(r.task_name, {}).setdefault(r.doc_id, {"context": r.args[0], "continuations": []})
                doc["continuations"].append(r.args[1])
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    manager = TaskManager(include_path=include_path, include_defaults=False)
    simple_evaluate(model=Recorder(), tasks=tasks, num_fewshot=0, task_manager=manager, bootstrap_iters=0)
    rows = {task: [docs[k] for k in sorted(docs)] for task, docs in seen.items()}
    Path(out).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def score_planted(include_path: str, task: str, planted: str, out: str) -> int:
    """The task's own answer filter and exact-match metric (its YAML's settings) on planted
    outputs: what the harness would score each output as, with no model."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=include_path, include_defaults=False).load([task])
    found = [t for t in _leaves(loaded["tasks"])]
    config = found[0].config
    metric = dict(config.metric_list[0])
    kwargs = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation") if k in metric}
    sys.path.insert(0, include_path)
    import utils  # the task's own filter module, copied unchanged

    rows = json.loads(Path(planted).read_text(encoding="utf-8"))
    parsed = [r[0] for r in utils.ExtractChoiceFilter().apply([[row["output"]] for row in rows], [{}] * len(rows))]
    scored = [{"parsed": p, "v3": bool(exact_match_hf_evaluate([p], [row["gold"]], **kwargs)["exact_match"]),
               "v2": bool(exact_match_hf_evaluate([row["output"]], [row["gold"]], **kwargs)["exact_match"])}
              for p, row in zip(parsed, rows)]
    Path(out).write_text(json.dumps({"metric": {k: str(v) for k, v in kwargs.items()}, "rows": scored},
                                    ensure_ascii=False), encoding="utf-8")
    return 0


def _leaves(tree):
    for value in (tree.values() if isinstance(tree, dict) else tree):
        if isinstance(value, (dict, list)):
            yield from _leaves(value)
        else:
            yield value


def main(argv: list[str]) -> int:
    if argv and argv[0] == "planted":
        parser = argparse.ArgumentParser(description="score planted outputs with the task's filter and metric")
        parser.add_argument("--include-path", required=True)
        parser.add_argument("--task", required=True)
        parser.add_argument("--planted", required=True)
        parser.add_argument("--out", required=True)
        args = parser.parse_args(argv[1:])
        return score_planted(args.include_path, args.task, args.planted, args.out)
    if argv and argv[0] == "requests":
        parser = argparse.ArgumentParser(description="record the harness's requests, no model")
        parser.add_argument("--include-path", required=True)
        parser.add_argument("--tasks", required=True)
        parser.add_argument("--out", required=True)
        args = parser.parse_args(argv[1:])
        return record_requests(args.include_path, args.tasks.split(","), args.out)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--include-path", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--shots", type=int, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    timing = {"generate_seconds": 0.0, "requests": 0}
    generate_until = model.generate_until

    def timed(requests, *rest, **kwargs):
        started = time.perf_counter()
        out = generate_until(requests, *rest, **kwargs)
        timing["generate_seconds"] += time.perf_counter() - started
        timing["requests"] += len(requests)
        return out

    model.generate_until = timed
    manager = TaskManager(include_path=args.include_path, include_defaults=False)
    results = simple_evaluate(model=model, tasks=args.tasks.split(","), num_fewshot=args.shots, limit=args.limit,
                              task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = {task: [{"doc_id": s["doc_id"], "question": s["doc"]["question"], "target": s["target"],
                       "prompt": s["arguments"][0][0], "gen_kwargs": s["arguments"][0][1],
                       "raw": s["resps"][0][0], "parsed": s["filtered_resps"][0], "filter": s["filter"],
                       "exact_match": s["exact_match"]} for s in rows]
               for task, rows in results["samples"].items()}
    dump = {"lm_eval_version": getattr(lm_eval, "__version__", None), "results": results["results"],
            "versions": results.get("versions"), "config": {k: str(v) for k, v in results.get("config", {}).items()},
            "samples": samples, "args": vars(args), **timing}
    Path(args.out).write_text(json.dumps(dump, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
