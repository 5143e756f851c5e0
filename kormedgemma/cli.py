"""`python -m kormedgemma ...`: the library behind the notebooks, on the command line.

Every sub-command exits non-zero with a one-line reason on bad input (unknown profile, bad key,
missing artifact, failed notebook) instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from kormedgemma.core.config import parse_overrides


def build_parser() -> argparse.ArgumentParser:
    from kormedgemma.core.config import known_profiles

    parser = argparse.ArgumentParser(prog="python -m kormedgemma", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the pipeline notebooks headless (papermill)",
                              description="Run the notebooks in order; finished ones whose inputs and "
                                          "config are unchanged are skipped, so re-running resumes.")
    run.add_argument("--profile", default="tiny", help=f"config profile ({', '.join(known_profiles())})")
    run.add_argument("--from", dest="start", help="first notebook id to run (e.g. 0.02)")
    run.add_argument("--to", dest="stop", help="last notebook id to run (e.g. 0.04)")
    run.add_argument("--force", action="store_true", help="run even notebooks whose outputs are fresh")
    run.add_argument("--config", dest="config_file", help="YAML file of overrides")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key (repeatable), e.g. --set data.preprocess.seed=1")
    run.add_argument("--list", action="store_true", help="list the notebooks and exit")

    stats = commands.add_parser("tokenizer-stats", help="tokens per character of tokenizers on a text file (JSON)",
                                description="Print, as JSON, how many tokens each tokenizer spends per "
                                            "character of the text, and the change against the first.")
    stats.add_argument("--tokenizer", action="append", required=True, metavar="PATH_OR_HUB_ID",
                       help="a tokenizer folder or Hub id (repeat to compare; the first is the reference)")
    stats.add_argument("--text", required=True, help="a .txt file (one text a line) or .jsonl (field 'text')")
    stats.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")

    train = commands.add_parser(
        "train-stage", help="train one EEVE stage (phase 3), as its notebook does",
        description="Train stage N from the previous stage's output, resuming from the stage's newest "
                    "checkpoint. Runs as one process, or on several GPUs under `accelerate launch` "
                    "(DDP, or DeepSpeed ZeRO-2 with --config_file config/accelerate_zero2.yaml). "
                    "Stage 7 also writes models/staged_training/merged/.")
    train.add_argument("--stage", type=int, required=True, choices=range(1, 8), metavar="N", help="stage 1-7")
    train.add_argument("--profile", default="tiny", help=f"config profile ({', '.join(known_profiles())})")
    train.add_argument("--config", dest="config_file", help="YAML file of overrides")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key (repeatable), e.g. --set staged.stage1.max_steps=100")

    instruct = commands.add_parser(
        "train-instruct", help="instruction-tune on KorMedMCQA (phase 4), as notebook 4.01 does",
        description="LoRA on the merged stage-7 model, the best dev adapter merged into models/final/instruct/, "
                    "resuming from the newest checkpoint after a kill. Runs as one process, or on several GPUs "
                    "under `torchrun` / `accelerate launch` (answer tokens weighted equally across them).")
    instruct.add_argument("--profile", default="tiny", help=f"config profile ({', '.join(known_profiles())})")
    instruct.add_argument("--config", dest="config_file", help="YAML file of overrides")
    instruct.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override one config key (repeatable), e.g. --set instruct.max_steps=100")

    evaluate = commands.add_parser(
        "evaluate", help="KorMedMCQA accuracy of any model on any folder in its schema",
        description="Score a model folder or Hub id on <subset>/test.jsonl files (with <subset>/fewshot.jsonl for "
                    "k-shot) the way lm-evaluation-harness 0.4.13 scores its kormedmcqa task (v3.0: answer "
                    "extracted from up to 1024 generated tokens; v2.0 exact match beside it); writes results.json "
                    "and predictions.jsonl to --out. Bad rows are counted and listed, not fatal.")
    evaluate.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help="model folder or Hub id")
    evaluate.add_argument("--data", required=True, metavar="DIR", help="folder of <subset>/test.jsonl (+ fewshot.jsonl)")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="where results.json and predictions.jsonl go")
    evaluate.add_argument("--shots", type=int, default=0, help="few-shot examples from <subset>/fewshot.jsonl "
                                                                "(harness: 0 or 5; default 0)")
    evaluate.add_argument("--mode", default="generate", choices=("generate", "loglikelihood", "chat"),
                          help="generate: the harness task (default); loglikelihood: most likely letter; "
                               "chat: chat template + answer extraction (the project's own)")
    evaluate.add_argument("--subset", action="append", dest="subsets", metavar="NAME",
                          help="only this subset (repeatable; default: every folder with test.jsonl)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-new-tokens", type=int, default=1024,
                          help="generate mode (default 1024, the harness's max_gen_toks)")
    evaluate.add_argument("--chat-max-new-tokens", type=int, default=256, help="chat mode (default 256)")
    evaluate.add_argument("--max-questions", type=int, default=None, help="cap per subset")
    evaluate.add_argument("--max-length", type=int, default=None,
                          help="context length (default: the model's, as the harness resolves it); longer prompts "
                               "keep their last max-length - max-new-tokens tokens")
    evaluate.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    evaluate.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                          help="default: bfloat16 on GPU, float32 on CPU")

    parity = commands.add_parser(
        "parity", help="run lm-evaluation-harness and the evaluator on the same questions and compare them",
        description="Build a local copy of the installed harness's kormedmcqa task pointed at --data, run lm_eval "
                    "(from --lm-eval-python, e.g. .venv-lmeval/bin/python; `make parity` builds it) and the "
                    "project's evaluator on the same model and questions, and compare prompts, raw outputs, parsed "
                    "answers, scores and generation speed question by question.")
    parity.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID")
    parity.add_argument("--data", required=True, metavar="DIR", help="KorMedMCQA-schema folder (test + fewshot)")
    parity.add_argument("--out", required=True, metavar="FILE.json")
    parity.add_argument("--lm-eval-python", default=".venv-lmeval/bin/python", metavar="PYTHON")
    parity.add_argument("--shots", type=int, action="append", help="repeatable (default: 0 and 5)")
    parity.add_argument("--questions", type=int, default=25, help="first N test questions per subset (default 25)")
    parity.add_argument("--subset", action="append", dest="subsets", metavar="NAME")
    parity.add_argument("--batch-size", type=int, default=8)
    parity.add_argument("--device", default=None)
    parity.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parity.add_argument("--reuse-harness", action="store_true",
                        help="read the harness's earlier runs made with the same settings instead of rerunning it")

    standins = commands.add_parser(
        "build-standins", help="MedGemma-4B-shaped random model + Gemma 3-layout tokenizer, for rehearsals",
        description="Write OUT/tokenizer (262,144 SentencePiece pieces in Gemma 3's layout, from the Gemma 3 "
                    "tokenizer side files) and OUT/medgemma-4b (a random-weight model of MedGemma-4B's "
                    "configuration with that tokenizer, 8.6 GB) for rehearsing the a5000 run without the Hub.")
    standins.add_argument("--out", required=True, metavar="DIR")
    standins.add_argument("--side-files", default="../shared/data/gemma3_tokenizer_side_files", metavar="DIR")
    standins.add_argument("--korean", default="../shared/data/kowiki_medical/kowiki_medical.jsonl", metavar="JSONL",
                          help="Korean documents (field 'text'); every tenth trains the ordinary pieces")
    standins.add_argument("--dictionary", default="../shared/data/ko_en_medical_terms_kcd/kcd_ko_en.tsv",
                          metavar="TSV", help="English terms (its 'en' column) for English pieces")
    standins.add_argument("--english", action="append", metavar="TXT",
                          help="English plain text, one text a line (repeatable; default: the bundled sample)")
    standins.add_argument("--device", default=None, help="where the random weights are drawn (default: cuda if present)")
    standins.add_argument("--tokenizer-only", action="store_true")

    ablation = commands.add_parser(
        "init-ablation", help="bits per character at step 0 for every new-token initialisation (JSON + plot)",
        description="Over the init methods and the lm_head-row choices, write the new rows into the resized "
                    "model (2.01's models/resized/) and measure held-out Korean and English bits per character, "
                    "beside the base model: OUT/init_ablation.json and OUT/init_ablation.png.")
    ablation.add_argument("--profile", default="tiny")
    ablation.add_argument("--config", dest="config_file", help="YAML file of overrides")
    ablation.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ablation.add_argument("--methods", nargs="+", default=None, help="default: all")
    ablation.add_argument("--outputs", nargs="+", default=None, help="lm_head rows; default: all")
    ablation.add_argument("--max-texts", type=int, default=None, help="held-out texts per language")
    ablation.add_argument("--seq-len", type=int, default=None)
    ablation.add_argument("--stages", type=int, default=0, metavar="N",
                          help="also train every combination through stages 1..N (1-3; GPU at real size) with the "
                               "profile's stage settings and measure after each: OUT/variants/, "
                               "init_ablation_trained.png")
    ablation.add_argument("--keep-models", action="store_true", help="keep each trained variant's model folders")
    ablation.add_argument("--out", required=True, metavar="DIR")

    comparison = commands.add_parser(
        "compare", help="the method against plain continued pretraining, two finished runs side by side",
        description="Measure both runs' base, initialised, stage 1-7 and instruction-tuned models in held-out "
                    "Korean and English bits per character on the same texts, beside each run's phase 5 accuracies, "
                    "Korean tokens/char and training GPU time: OUT/comparison.json, comparison.md, comparison.png. "
                    "The method run is the profile under --method-root; the baseline is the same profile with "
                    "tokenizer.expand=false under --baseline-root.")
    comparison.add_argument("--profile", default="tiny")
    comparison.add_argument("--config", dest="config_file", help="YAML file of overrides (both runs)")
    comparison.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one config key for both runs")
    comparison.add_argument("--method-root", required=True, metavar="DIR", help="paths.root of the expanded run")
    comparison.add_argument("--baseline-root", required=True, metavar="DIR",
                            help="paths.root of the tokenizer.expand=false run")
    comparison.add_argument("--recorded", action="store_true",
                            help="no model loaded: the trajectories the stages recorded on their evaluation blocks "
                                 "(both runs need the same staged.stageN.eval_chars); runs on the CPU from a run's "
                                 "metrics and manifests alone")
    comparison.add_argument("--max-texts", type=int, default=None, help="held-out texts per language")
    comparison.add_argument("--seq-len", type=int, default=None)
    comparison.add_argument("--out", required=True, metavar="DIR")

    pubmedqa = commands.add_parser(
        "pubmedqa-local", help="PubMedQA's labelled set as local English text and the English benchmark",
        description="Write OUT/english/pubmedqa_abstracts.jsonl (the 500 non-test abstracts: English replay and "
                    "held-out text) and OUT/english_mcqa/pubmedqa.jsonl (the 500 official test questions) from "
                    "the authors' ori_pqal.json and test_ground_truth.json (benchmarks/gemma3_270m_local.yaml).")
    pubmedqa.add_argument("--src", default="../shared/data/pubmedqa", metavar="DIR")
    pubmedqa.add_argument("--out", required=True, metavar="DIR")

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible server for a model folder (vLLM on GPU, transformers on CPU)",
        description="Serve /v1/chat/completions and /v1/models. --backend vllm starts vLLM's own server "
                    "(from PATH or .venv-serve/, see `make serve-env`) and waits until it is healthy; "
                    "--backend transformers runs a small FastAPI server in this process. With an API key in "
                    "$KORMEDGEMMA_API_KEY (the variable deploy.api_key_env names) clients must send "
                    "'Authorization: Bearer <key>'; a host other than loopback is refused without one.")
    serve.add_argument("--model", required=True, metavar="DIR", help="model folder (e.g. models/final/korean_medgemma_awq)")
    serve.add_argument("--backend", choices=("vllm", "transformers"), default=None,
                       help="default: deploy.serve_backend of the profile")
    serve.add_argument("--host", default=None,
                       help="default: deploy.host (127.0.0.1); any other host needs an API key in the environment")
    serve.add_argument("--port", type=int, default=None, help="default: deploy.port (8000)")
    serve.add_argument("--profile", default="tiny", help="config profile whose deploy section is used")
    serve.add_argument("--config", dest="config_file", help="YAML file of overrides")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set deploy.max_model_len=4096")
    serve.add_argument("--device", default=None, help="transformers backend: cuda or cpu (default: cuda when present)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "tokenizer-stats":
            return _tokenizer_stats(args)
        if args.command == "train-stage":
            return _train_stage(args)
        if args.command == "train-instruct":
            return _train_instruct(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "parity":
            return _parity(args)
        if args.command == "build-standins":
            return _build_standins(args)
        if args.command == "init-ablation":
            return _init_ablation(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "pubmedqa-local":
            return _pubmedqa_local(args)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — the CLI's contract is one line, not a traceback
        import os

        from kormedgemma.core.errors import is_user_error

        if not is_user_error(exc) or os.environ.get("KORMEDGEMMA_DEBUG"):
            raise  # KORMEDGEMMA_DEBUG=1 shows the traceback behind a one-line error
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    from kormedgemma.pipeline.runner import run_pipeline
    from kormedgemma.pipeline.steps import STEPS

    if args.list:
        for step in STEPS:
            print(f"{step.id}  {step.notebook}  — {step.title}")
        return 0
    outcomes = run_pipeline(args.profile, args.start, args.stop, args.force, parse_overrides(args.overrides),
                            args.config_file)
    ran = sum(o.status == "ran" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(f"pipeline finished: {ran} ran, {skipped} skipped")
    return 0


def _tokenizer_stats(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoTokenizer

    from kormedgemma.core.hub import hub_access
    from kormedgemma.data.readers import read_texts
    from kormedgemma.vocab.tokenizer import efficiency_table

    texts = read_texts(args.text, args.field)
    if not texts:
        raise ValueError(f"{args.text} holds no text")
    tokenizers = {}
    for ref in args.tokenizer:
        try:
            with hub_access(f"tokenizer {ref}", "Pass a local tokenizer folder, or log in on a machine with network."):
                tokenizers[ref] = AutoTokenizer.from_pretrained(ref)
        except OSError as exc:  # not offline: a folder that holds no tokenizer
            raise ValueError(f"tokenizer {ref} could not be loaded: {str(exc).splitlines()[0]}") from None
    rows = efficiency_table(tokenizers, {args.text: texts})
    print(json.dumps({"text": args.text, "tokenizers": rows}, ensure_ascii=False, indent=2))
    return 0


def _train_stage(args: argparse.Namespace) -> int:
    import json
    import os

    from kormedgemma.core.config import load_config
    from kormedgemma.training.stage import merge_stages, train_stage

    config = load_config(args.profile, overrides=parse_overrides(args.overrides), config_file=args.config_file)
    metrics = train_stage(config, args.stage)
    if args.stage == 7 and os.environ.get("RANK", "0") == "0":
        merge_stages(config)
    if os.environ.get("RANK", "0") == "0":
        summary = {k: metrics[k] for k in ("stage", "steps", "first_loss", "last_loss", "tokens_per_second", "resumed_from")}
        print(json.dumps(summary))
    return 0


def _train_instruct(args: argparse.Namespace) -> int:
    import json
    import os

    from kormedgemma.core.config import load_config
    from kormedgemma.training.instruct import read_instruct_metrics, train_instruct

    config = load_config(args.profile, overrides=parse_overrides(args.overrides), config_file=args.config_file)
    train_instruct(config)
    if os.environ.get("RANK", "0") == "0":
        metrics = read_instruct_metrics(config)
        print(json.dumps({k: metrics[k] for k in ("steps", "best_step", "best_dev_loss", "first_loss", "last_loss",
                                                  "tokens_per_second", "resumed_from")}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kormedgemma.evaluation.korean import chance_warning, run_evaluation

    for name in ("shots", "batch_size", "max_new_tokens", "chat_max_new_tokens"):
        if getattr(args, name) < (0 if name == "shots" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ {0 if name == 'shots' else 1}")
    if args.max_questions is not None and args.max_questions < 1:
        raise ValueError("--max-questions must be ≥ 1")
    if args.max_length is not None and args.max_length <= args.max_new_tokens:
        raise ValueError(f"--max-length {args.max_length} leaves no room for a prompt after --max-new-tokens "
                         f"{args.max_new_tokens}")
    results = run_evaluation(args.model, Path(args.data), Path(args.out), shots=args.shots, mode=args.mode,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             chat_max_new_tokens=args.chat_max_new_tokens, max_questions=args.max_questions,
                             max_length=args.max_length, subsets=args.subsets, device=args.device,
                             dtype=args.dtype)
    table = {name: figures["accuracy"] for name, figures in results["subsets"].items()}
    print(json.dumps({"task": results["task"], "overall": results["overall"], "subsets": table,
                      "bad_rows": results["bad_row_count"], "out": args.out}, ensure_ascii=False))
    for warning in [chance_warning(results, args.model), *results.get("warnings", [])]:
        if warning:
            print(warning, file=sys.stderr)
    return 0


def _parity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kormedgemma.evaluation.parity import run_parity

    if args.questions < 1 or args.batch_size < 1:
        raise ValueError("--questions and --batch-size must be ≥ 1")
    result = run_parity(args.model, Path(args.data), Path(args.out), python=args.lm_eval_python,
                        shots=args.shots or [0, 5], questions=args.questions, subsets=args.subsets,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        reuse_harness=args.reuse_harness)
    print(f"wrote {args.out} ({len(result['runs'])} runs)")
    return 0


def _init_ablation(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kormedgemma.core.config import load_config
    from kormedgemma.core.io import write_json
    from kormedgemma.evaluation.ablation import METHODS, OUTPUT_ROWS, init_ablation, plot_ablation, plot_trained_ablation, trained_ablation
    from kormedgemma.evaluation.perplexity import read_run_heldout
    from kormedgemma.vocab.embeddings import wechsel_inputs_for

    if not 0 <= args.stages <= 3:
        raise ValueError(f"--stages {args.stages}: 0 (step 0 only) or 1-3 (EEVE's rows-only stages)")
    config = load_config(args.profile, overrides=parse_overrides(args.overrides), config_file=args.config_file)
    methods, outputs = args.methods or METHODS, args.outputs or OUTPUT_ROWS
    progress = sys.stderr.isatty()
    # the held-out texts and WECHSEL's word vectors once for both parts, not once each
    heldout = read_run_heldout(config, args.max_texts)
    wechsel = wechsel_inputs_for(config) if {"wechsel", "hybrid"} & set(methods) else None
    result = init_ablation(config, methods, outputs, args.max_texts, args.seq_len, progress, heldout, wechsel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stages:
        result["trained"] = trained_ablation(config, methods, outputs, args.stages, out / "variants", args.max_texts,
                                             args.seq_len, args.keep_models, progress, heldout, wechsel)
        base = result["rows"][0]
        for row in result["trained"]:
            for language in ("korean", "english"):
                key = f"{language}_bits_per_char"
                row[f"{language}_vs_base"] = round(row[key] / base[key] - 1, 4)
    write_json(out / "init_ablation.json", {**result, "profile": config.profile,
                                            "command": "python -m kormedgemma " + " ".join(sys.argv[1:])})
    plot_ablation(result, out / "init_ablation.png")
    if args.stages:
        plot_trained_ablation(result, out / "init_ablation_trained.png")
    for row in [*result["rows"], *result.get("trained", [])]:
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kormedgemma.core.config import load_config
    from kormedgemma.evaluation.compare import compare, report_lines, write_comparison

    for name in ("max_texts", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
    overrides = parse_overrides(args.overrides)
    method = load_config(args.profile, overrides={**overrides, "paths.root": args.method_root},
                         config_file=args.config_file)
    baseline = load_config(args.profile, overrides={**overrides, "paths.root": args.baseline_root,
                                                    "tokenizer.expand": False}, config_file=args.config_file)
    result = compare(method, baseline, args.max_texts, args.seq_len, progress=sys.stderr.isatty(),
                     recorded=args.recorded)
    write_comparison(result, Path(args.out), "python -m kormedgemma " + " ".join(sys.argv[1:]))
    print("\n".join(report_lines(result)))
    print(f"\nwrote {args.out}/comparison.json, comparison.md, comparison.png")
    return 0


def _pubmedqa_local(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kormedgemma.data.pubmedqa import write_local_pubmedqa

    print(json.dumps(write_local_pubmedqa(Path(args.src), Path(args.out))))
    return 0


def _build_standins(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kormedgemma.core.config import repo_root
    from kormedgemma.core.io import write_json
    from kormedgemma.pipeline.standin import build_standin_model, build_standin_tokenizer, standin_texts

    out = Path(args.out)
    texts = standin_texts(Path(args.korean), Path(args.dictionary) if args.dictionary else None,
                          [Path(p) for p in (args.english or [repo_root() / "data/samples/english_medical.txt"])])
    figures: dict = {"tokenizer": build_standin_tokenizer(Path(args.side_files), texts, out / "tokenizer")}
    print(json.dumps({"tokenizer": figures["tokenizer"]}), flush=True)
    if not args.tokenizer_only:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        figures["model"] = build_standin_model(out / "tokenizer", out / "medgemma-4b", device=device)
        print(json.dumps({"model": figures["model"]}), flush=True)
    write_json(out / "standins.json", figures)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kormedgemma.core.config import load_config
    from kormedgemma.deploy.serve import ServerProcess, require_key_for, serve_transformers, server_command, server_env

    config = load_config(args.profile, overrides=parse_overrides(args.overrides), config_file=args.config_file)
    deploy = config.deploy
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json there; run phase6_deployment/01_quantize_awq first "
                                "or point at a finished model folder")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ValueError("--port must be in 1..65535")
    backend = args.backend or deploy.serve_backend
    host, port = args.host or deploy.host, args.port or deploy.port
    # Refused here, before any model is loaded, when the host is reachable from outside and no key is set.
    key = require_key_for(host, deploy)
    access = f"API key required (from ${deploy.api_key_env})" if key else "no API key (loopback only)"
    if backend == "transformers":
        print(f"serving {model} as {deploy.served_model_name!r} at http://{host}:{port}/v1 (transformers backend, "
              f"{access}); Ctrl-C stops it", flush=True)
        serve_transformers(model, deploy, host, port, args.device)  # uvicorn handles Ctrl-C itself
        return 0
    command = server_command(model, deploy, backend, host, port, config.profile)
    print(f"starting ({access}): " + " ".join(command), flush=True)  # the key travels in the environment only
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    with ServerProcess(command, url, deploy.startup_timeout_s, Path("runs") / "serve" / "vllm.log",
                       env=server_env(deploy)) as server:
        print(f"healthy after {server.startup_s:.0f} s: {url}/v1 serves {deploy.served_model_name!r} "
              f"(log: runs/serve/vllm.log); Ctrl-C stops it", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            print("stopping the server", flush=True)
    return 0
