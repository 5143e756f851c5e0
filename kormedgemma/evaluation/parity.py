"""The evaluator against lm-evaluation-harness itself, question by question.

`python -m kormedgemma parity` (and `make parity`) runs both tools on the same model and the same
KorMedMCQA-schema folder: the harness from its own environment (`.venv-lmeval`, lm_eval 0.4.13)
on a local copy of *its installed* `kormedmcqa` task, whose YAML and answer filter are copied
unchanged except for where the data is; the project through `evaluation.korean.evaluate_mcqa`, the code
path notebooks 5.01 and 6.01 take. It compares, per question, the prompt, the raw (stop-cut)
output, the parsed answer and the score, and both tools' accuracies and generation speed.
"""
from __future__ import annotations

# The project modules this one uses are imported inside the functions that need them: at the top
# they would take its import from 0.04 s to 2.7 s (the lm_eval driver imports it) (measured; docs/ARCHITECTURE.md).
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

LM_EVAL_VERSION = "0.4.13"
TASK_PREFIX = "kormedmcqa_local_"
GROUP = "kormedmcqa_local"


def harness_task_source(python: str) -> Path:
    """The `kormedmcqa` task folder of the lm_eval installed for `python`."""
    code = ("import importlib.metadata as m, lm_eval, pathlib; "
            "print(m.version('lm_eval')); print(pathlib.Path(lm_eval.__file__).parent / 'tasks' / 'kormedmcqa')")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise RuntimeError(f"lm_eval is not importable with {python} ({detail.strip().splitlines()[-1:]}); "
                           f"run `make parity` (it builds .venv-lmeval with lm_eval=={LM_EVAL_VERSION})") from error
    version, folder = done.stdout.split()
    if version != LM_EVAL_VERSION:
        print(f"note: comparing against lm_eval {version}; the evaluator follows {LM_EVAL_VERSION}", file=sys.stderr)
    return Path(folder)


def hub_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one split file in the Hub dataset's schema, which the harness's template reads
    (`answer` 1–5): read with pandas (every field a string, nothing turned into NaN) or `json`,
    not with the project's reader, so a reader bug cannot hide on both sides. GitHub CSV copies
    write the answer as a letter; that is the only change."""
    if path.suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        rows = frame.to_dict("records")
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fields = ("question", "A", "B", "C", "D", "E")
    out = []
    for row in rows:
        answer = row.get("answer")
        if isinstance(answer, str) and answer.strip().upper() in list("ABCDE"):
            answer = "ABCDE".index(answer.strip().upper()) + 1
        out.append({**{k: row.get(k) for k in fields}, "answer": int(answer)})
    return out


def build_local_task(source: Path, data: Path, out: Path, subsets: Sequence[str]) -> list[str]:
    """Copy the harness's task (template, answer filter, group) into `out`, each subset pointed at
    its `test` and `fewshot` rows written as JSONL in the Hub schema. Returns the task names."""
    from kormedgemma.data.sources import find_mcqa_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(source / "_template_yaml", out / "_template_yaml")
    shutil.copy(source / "utils.py", out / "utils.py")
    tasks = []
    for subset in subsets:
        files = {split: find_mcqa_file(data / subset, split) for split in ("test", "fewshot")}
        missing = [split for split, path in files.items() if path is None]
        if missing:
            raise FileNotFoundError(f"{data / subset}: no {' or '.join(missing)} file for the harness's task")
        written = {}
        for split, path in files.items():
            written[split] = out / "data" / subset / f"{split}.jsonl"
            written[split].parent.mkdir(parents=True, exist_ok=True)
            written[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hub_rows(path)),
                                      encoding="utf-8")
        task = TASK_PREFIX + subset
        lines = ["include: _template_yaml", f"task: {task}", "dataset_path: json", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {json.dumps(str(path.resolve()))}" for split, path in written.items()]
        (out / f"{subset}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tasks.append(task)
    group = (source / "_kormedmcqa.yaml").read_text(encoding="utf-8")
    group = re.sub(r"^group: kormedmcqa$", f"group: {GROUP}", group, flags=re.M)
    group = re.sub(r"^task:\n(  - .*\n)+", "task:\n" + "".join(f"  - {t}\n" for t in tasks), group, flags=re.M)
    (out / "_group.yaml").write_text(group, encoding="utf-8")
    return tasks


def run_harness(python: str, model: str, include: Path, tasks: Sequence[str], shots: int, limit: int,
                batch_size: int, device: str, dtype: str, out: Path, reuse: bool = False) -> dict[str, Any]:
    """The harness's dump for these settings; with `reuse`, an earlier dump made with the very
    same settings (and the same task files) is read instead of running the harness again."""
    driver = Path(__file__).with_name("harness_driver.py")
    command = [python, str(driver), "--model", model, "--include-path", str(include), "--tasks", ",".join(tasks),
               "--shots", str(shots), "--limit", str(limit), "--batch-size", str(batch_size), "--device", device,
               "--dtype", dtype, "--out", str(out)]
    if reuse and out.is_file():
        earlier = json.loads(out.read_text(encoding="utf-8"))
        settings = {"model": model, "include_path": str(include), "tasks": ",".join(tasks), "shots": shots,
                    "limit": limit, "batch_size": batch_size, "device": device, "dtype": dtype, "out": str(out)}
        if earlier.get("args") == settings:
            print(f"reusing the harness's {shots}-shot run from {out}", file=sys.stderr)
            return earlier
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text(encoding="utf-8"))


def compare(harness: dict[str, Any], prompts: dict[str, list[str]], predictions: Sequence[dict[str, Any]],
            subsets: Sequence[str]) -> dict[str, Any]:
    """Per question: prompt, raw output, parsed answer, score; per subset and overall: both
    accuracies. A difference is listed with both values."""
    ours = {s: [p for p in predictions if p["subject"] == s] for s in subsets}
    fields = ("question", "prompt", "raw_output", "parsed", "correct")
    counts = {f: 0 for f in fields}
    differences: list[dict[str, Any]] = []
    table: dict[str, dict[str, Any]] = {}
    for subset in subsets:
        theirs = sorted(harness["samples"][TASK_PREFIX + subset], key=lambda s: s["doc_id"])
        mine = ours[subset]
        if len(theirs) != len(mine):
            raise ValueError(f"{subset}: the harness scored {len(theirs)} questions, the project {len(mine)}")
        for k, (h, p) in enumerate(zip(theirs, mine)):
            pairs = {"question": (h["question"], p["question"]), "prompt": (h["prompt"], prompts[subset][k]),
                     "raw_output": (h["raw"], p["raw_output"]), "parsed": (h["parsed"], p["prediction"]),
                     "correct": (bool(h["exact_match"]), p["prediction"] == p["gold"])}
            for name, (a, b) in pairs.items():
                if a != b:
                    counts[name] += 1
                    differences.append({"subset": subset, "index": k, "field": name, "harness": a, "project": b})
        harness_correct = sum(bool(h["exact_match"]) for h in theirs)
        table[subset] = {"n": len(mine), "harness": round(harness_correct / len(theirs), 4),
                         "project": round(sum(p["prediction"] == p["gold"] for p in mine) / len(mine), 4)}
    n = sum(t["n"] for t in table.values())
    overall = {"n": n, "harness": round(sum(t["harness"] * t["n"] for t in table.values()) / n, 4),
               "project": round(sum(t["project"] * t["n"] for t in table.values()) / n, 4)}
    group = harness["results"].get(GROUP, {}).get("exact_match,extract_answer")
    return {"subsets": table, "overall": overall, "harness_group_score": group, "differing": counts,
            "differences": differences}


def run_parity(model_ref: str, data_dir: Path, out_file: Path, *, python: str, shots: Sequence[int] = (0, 5),
               questions: int = 25, subsets: Optional[Sequence[str]] = None, batch_size: int = 8,
               device: Optional[str] = None, dtype: Optional[str] = None, work: Optional[Path] = None,
               reuse_harness: bool = False) -> dict[str, Any]:
    """Both tools, each shot count; the comparison and the speed written to `out_file` (JSON). The
    harness's task folder and raw dumps go to `work` (default `runs/parity/`)."""
    import platform

    import torch

    from kormedgemma.core.io import write_json
    from kormedgemma.data.kormedmcqa import build_prompt, read_mcqa_folder
    from kormedgemma.evaluation.korean import MAX_GEN_TOKS, TASK_VERSION, evaluate_mcqa
    from kormedgemma.modeling.base_model import load_for_eval

    data_dir = Path(data_dir).resolve()
    data = read_mcqa_folder(data_dir, subsets=subsets, max_questions=questions)
    names = list(data.test)
    if work is None:
        from kormedgemma.core.config import repo_root

        work = repo_root() / "runs" / "parity"
    source = harness_task_source(python)
    build_local_task(source, data_dir, work / "task", names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_for_eval(model_ref, device=device, dtype=dtype)
    runs = []
    for k in shots:
        harness = run_harness(python, str(model_ref), work / "task", [GROUP], k, questions, batch_size, device,
                              dtype, work / f"harness_{k}shot.json", reuse=reuse_harness)
        prompts = {s: [build_prompt(row, data.fewshot.get(s, []), k) for row in data.test[s]] for s in names}
        results, predictions = evaluate_mcqa(model, tokenizer, data, shots=k, batch_size=batch_size,
                                             max_new_tokens=MAX_GEN_TOKS, progress=True)
        comparison = compare(harness, prompts, predictions, names)
        count = data.questions
        speed = {"harness_seconds": round(harness["generate_seconds"], 2), "project_seconds": results["seconds"],
                 "harness_questions_per_second": round(count / harness["generate_seconds"], 3),
                 "project_questions_per_second": results["questions_per_second"]}
        speed["speedup"] = round(speed["project_questions_per_second"] / speed["harness_questions_per_second"], 3)
        runs.append({"shots": k, "questions": count, "truncated_prompts": results["overall"]["truncated"],
                     "exact_match_v2_project": results["overall"]["exact_match_v2"], **comparison, "speed": speed})
        print(summary_line(runs[-1]), flush=True)
    result = {"model": str(model_ref), "data": str(data_dir), "subsets": names, "questions_per_subset": questions,
              "lm_eval_version": harness.get("lm_eval_version"), "task_version": TASK_VERSION,
              "harness_task_versions": harness.get("versions"), "max_gen_toks": MAX_GEN_TOKS,
              "batch_size": batch_size, "device": device, "dtype": dtype,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
                  f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
              "torch_threads": torch.get_num_threads(), "runs": runs,
              "planted_outputs": planted_check(python, work / "task", TASK_PREFIX + names[0], work),
              "english_prompts": english_prompt_check(python, work)}
    planted = result["planted_outputs"]
    print(f"planted outputs: {planted['differing']} of {planted['outputs']} scored differently")
    for name, check in result["english_prompts"].items():
        print(f"English {name} ({check['harness_task']}): prompt equal {check['prompt_equal']}, "
              f"continuations equal {check['continuations_equal']}")
    write_json(out_file, result)
    return result


def summary_line(run: dict[str, Any]) -> str:
    d, s = run["differing"], run["speed"]
    return (f"{run['shots']}-shot, {run['questions']} questions: differing prompts {d['prompt']}, raw outputs "
            f"{d['raw_output']}, answers {d['parsed']}, scores {d['correct']}; accuracy harness "
            f"{run['overall']['harness']:.4f} / project {run['overall']['project']:.4f}; "
            f"{s['harness_questions_per_second']} vs {s['project_questions_per_second']} questions/s "
            f"(x{s['speedup']}); {run['truncated_prompts']} prompts truncated")


# --------------------------------------------------------------------------- planted outputs
# Outputs a model could write (after the stop-sequence cut), with their gold letters: formats
# the cascade must read, ones it must not, and strings where exact match's normalisation bites.
PLANTED = [("C", "C"), (" c", "C"), ("정답： C", "C"), ("정답: B", "B"), ("정답은 D 입니다", "D"), ("답은 E", "E"),
           ("A와 B 중에서 B", "B"), ("(B)", "B"), ("B\x00", "B"), ("B \x00", "B"), ("b\n", "B"), ("E!", "E"),
           ("ABCDE", "A"), ("정답:A", "A"), ("정답 : a", "A"), ("C가 아니라 D", "D"), ("", "A"), ("모르겠다", "C"),
           ("A", "B"), ("x A y", "A"), ("A：", "A"), ("Ｃ", "C"), ("c)", "C"), ("B와 C", "C"), ("정답은 B입니다", "B"),
           ("1", "A")]


def planted_check(python: str, include: Path, task: str, work: Path) -> dict[str, Any]:
    """Each planted output scored by the harness's own filter and metric and by `data/kormedmcqa.py`."""
    from kormedgemma.data.kormedmcqa import exact_match, extract_choice

    source = work / "planted.json"
    source.write_text(json.dumps([{"output": o, "gold": g} for o, g in PLANTED], ensure_ascii=False), encoding="utf-8")
    out = work / "planted_scored.json"
    subprocess.run([python, str(Path(__file__).with_name("harness_driver.py")), "planted", "--include-path",
                    str(include), "--task", task, "--planted", str(source), "--out", str(out)], check=True,
                   env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    theirs = json.loads(out.read_text(encoding="utf-8"))["rows"]
    rows = []
    for (output, gold), h in zip(PLANTED, theirs):
        mine = {"parsed": extract_choice(output), "v3": extract_choice(output) == gold, "v2": exact_match(output, gold)}
        rows.append({"output": output, "gold": gold, "harness": h, "project": mine, "equal": h == mine})
    return {"outputs": len(rows), "differing": sum(not r["equal"] for r in rows), "rows": rows}


# --------------------------------------------------------------------------- English prompts
# One known row per benchmark, in the schema of the dataset the harness's task reads, and the
# same content in the schema of the dataset `english.py` reads from the Hub (PubMedQA's differ).
# Padding spaces and two abstract sections exercise the harness's strip and join.
ENGLISH_ROWS: dict[str, dict[str, Any]] = {
    "medqa": {"harness": {"id": "k1", "sent1": "A 54-year-old man has crushing chest pain. Which enzyme rises first?",
                          "sent2": "", "ending0": "Troponin I", "ending1": "CK-MB", "ending2": "LDH",
                          "ending3": "Myoglobin", "label": 3}},
    "mmlu_medical": {"harness": {"question": " Which nerve innervates the diaphragm? ", "subject": "anatomy",
                                 "choices": ["Vagus", "Phrenic", "Intercostal", "Accessory"], "answer": 1}},
    "pubmedqa": {"harness": {"QUESTION": "Does exercise lower blood pressure?",
                             "CONTEXTS": ["Adults with hypertension were randomised.", "Systolic pressure fell."],
                             "final_decision": "yes", "LABELS": ["METHODS", "RESULTS"], "YEAR": "2020"},
                 "hub": {"question": "Does exercise lower blood pressure?",
                         "context": {"contexts": ["Adults with hypertension were randomised.",
                                                  "Systolic pressure fell."]}, "final_decision": "yes"}},
}
_HARNESS_TASKS = {"medqa": ("medqa", "medqa.yaml", "medqa_4options"), "pubmedqa": ("pubmedqa", "pubmedqa.yaml", "pubmedqa"),
                  "mmlu_medical": ("mmlu/default", "mmlu_anatomy.yaml", "mmlu_anatomy")}


def _point_at(yaml_text: str, data: Path, task: str) -> str:
    """A harness task YAML with its dataset replaced by local JSONL files (every split it names)."""
    lines = [line for line in yaml_text.splitlines()
             if not re.match(r'^"?(dataset_path|dataset_name|task|tag)"?\s*:', line)]
    files = "".join(f"    {split}: {json.dumps(str(data))}\n" for split in ("train", "validation", "test", "dev"))
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}"
            + "\n".join(lines) + "\n")


def english_prompt_check(python: str, work: Path) -> dict[str, Any]:
    """The harness's 0-shot context and continuations for each known row, next to `english.py`'s."""
    from kormedgemma.evaluation.english import BENCHMARKS, prompt_and_choices

    source = harness_task_source(python).parent
    folder = work / "english_tasks"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tasks = []
    for name, (sub, yaml_name, task) in _HARNESS_TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text(json.dumps(ENGLISH_ROWS[name]["harness"], ensure_ascii=False) + "\n", encoding="utf-8")
        for helper in (source / sub).glob("*.py"):
            if not helper.name.startswith("_"):
                shutil.copy(helper, folder / helper.name)
        text = (source / sub / yaml_name).read_text(encoding="utf-8")
        if name == "mmlu_medical":
            text = text.replace('"include": "_default_template_yaml"', '"include": "_mmlu_template_yaml"')
            template = (source / sub / "_default_template_yaml").read_text(encoding="utf-8")
            (folder / "_mmlu_template_yaml").write_text(
                "\n".join(line for line in template.splitlines() if not line.startswith("dataset_path")) + "\n",
                encoding="utf-8")
        (folder / f"{name}_local.yaml").write_text(_point_at(text, data, f"local_{task}"), encoding="utf-8")
        tasks.append(f"local_{task}")
    out = folder / "requests.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([python, str(Path(__file__).with_name("harness_driver.py")), "requests", "--include-path",
                    str(folder), "--tasks", ",".join(tasks), "--out", str(out)], check=True, env=env)
    recorded = json.loads(out.read_text(encoding="utf-8"))
    checks = {}
    for (name, (_, _, task)), local in zip(_HARNESS_TASKS.items(), tasks):
        known = ENGLISH_ROWS[name]
        subject = known["harness"].get("subject")
        row = BENCHMARKS[name].convert(known.get("hub", known["harness"]), subject)
        prompt, continuations = prompt_and_choices(name, row)
        theirs = recorded[local][0]
        checks[name] = {"harness_task": task, "prompt_equal": prompt == theirs["context"],
                        "continuations_equal": continuations == theirs["continuations"],
                        "harness": theirs, "project": {"context": prompt, "continuations": continuations}}
    return checks
