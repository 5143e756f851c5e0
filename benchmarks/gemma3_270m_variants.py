"""Several runs of one profile side by side, each to a chosen notebook, sharing what they can.

    python benchmarks/gemma3_270m_variants.py --root ROOT [--profile gemma3_270m] [--config YAML] \
        [--set KEY=VALUE ...] [--to 3.07] [--parallel 3] [--branch 5.01:5.02 --branch 6.01:6.02] \
        --variant method --variant "baseline:tokenizer.expand=false,staged.stage6.max_steps=300" \
        --variant "method_short:staged.stage1.max_steps=50,staged.stage2.max_steps=50" \
        --variant "method_k25:data.preprocess.korean_train_share=0.25"

Issue 26's tuning questions (stage lengths, corpus size) are answered by runs that differ in a few
settings; on a GPU session of 30 minutes they must not each redo phases 0-2 (6.5 minutes at 270M,
mostly CPU). Each variant runs `python -m kormedgemma run` under ROOT/<name> (its log in
ROOT/<name>.log) with --set KEY=VALUE for all variants and its own settings. A variant whose
settings other than `staged.*` equal an earlier variant's links every artifact made before 3.01
from it (once that one's 2.02 has sealed the initialised model) and trains only its stages; any
other variant links the base model (0.00) from the first variant and builds the rest. Use a fresh
ROOT: on a reused one a variant may link a source's old artifacts before the source rebuilds them.
`core.artifacts.link_upstream` links, the runner skips what is fresh. ROOT/variants.json records
each variant's settings, exit status and seconds. `NAME@TO` stops that variant at TO instead of
--to (e.g. `method@2.02`: the full corpus's phases 0-2 for the init ablation and the speed benchmark
beside variants trained further).

`--branch FROM:TO` (repeatable) runs, once a variant has reached --to, each range as its own
`kormedgemma run --from FROM --to TO` at the same time (logs ROOT/<name>.<FROM>.log): after 4.01,
5.01, 5.02 and 6.01-6.02 read nothing the others make, so on a GPU with room for them the method's
path ends in the longest branch's time instead of the sum (5.01 332 s, 5.02 43 s, 6.01-6.02 ~280 s
on the 270M). Branches that would read each other's outputs are refused before anything runs. Each
branch's `artifacts_growth_gb` in its run's state counts what the others wrote meanwhile (one root),
and branches do not count against --parallel.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Variant:
    name: str
    settings: dict[str, str]
    to: str = ""  # its own last notebook (NAME@TO), else --to
    source: Optional["Variant"] = None  # where its upstream artifacts come from
    before: str = ""  # link artifacts made before this step
    done: threading.Event = field(default_factory=threading.Event)
    rc: Optional[int] = None


def parse_variant(text: str) -> Variant:
    head, _, rest = text.partition(":")
    name, _, to = head.partition("@")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item.strip())  # values hold no commas
    if not name.strip() or "/" in name:
        raise SystemExit(f"--variant {text!r}: NAME[@TO][:KEY=VALUE,...], NAME a folder name")
    if to:
        known_step(to.strip(), f"--variant {text!r}")
    return Variant(name.strip(), {k.strip(): v.strip() for k, v in settings.items()}, to.strip())


def known_step(step: str, where: str) -> None:
    """A notebook id of the pipeline, or the command stops naming where it was given."""
    from kormedgemma.pipeline.steps import step_by_id

    try:
        step_by_id(step)
    except Exception as error:
        raise SystemExit(f"{where}: {error}") from None


def upstream_settings(variant: Variant) -> dict[str, str]:
    """The settings phases 0-2 read: everything but the stages'."""
    return {k: v for k, v in variant.settings.items() if not k.startswith("staged.")}


def plan(variants: list[Variant], to: str = "3.07") -> None:
    """Which variant each one shares upstream artifacts with, and from which step on it builds:
    phases 0-2 from the first earlier variant whose other settings are the same and which makes
    them (runs to 2.02 or further: its own @TO, else `to`), else the base model from the first
    variant (unless its own base differs)."""
    for index, variant in enumerate(variants):
        same = next((v for v in variants[:index] if upstream_settings(v) == upstream_settings(variant)
                     and (v.to or to) >= "2.02"), None)
        if same is not None:
            variant.source, variant.before = same, "3.01"
        elif index and not any(k.startswith("base.") for k in variant.settings):
            variant.source, variant.before = variants[0], "0.01"


def parse_branches(to: str, texts: list[str]) -> list[tuple[str, str]]:
    """FROM:TO ranges to run side by side after `to`: each must start after `to`, and no step of one
    may read what a step of another (or a step after `to` outside every branch) makes, since the
    branches run at the same time and nothing else runs."""
    from kormedgemma.core.artifacts import ARTIFACTS
    from kormedgemma.pipeline.steps import STEPS, select_steps

    if texts:
        known_step(to, f"--to {to!r}")
    ranges = []
    for text in texts:
        first, sep, last = text.partition(":")
        if not sep or not first or not last:
            raise SystemExit(f"--branch {text!r}: FROM:TO, two notebook ids (e.g. 5.01:5.02)")
        try:
            steps = select_steps(first, last)
        except Exception as error:  # an unknown id or a backwards range
            raise SystemExit(f"--branch {text!r}: {error}") from None
        if steps[0].id <= to:
            raise SystemExit(f"--branch {text!r} starts at or before --to {to}: branches run after it")
        ids = {s.id for s in steps}
        if any(ids & r[2] for r in ranges):
            raise SystemExit(f"--branch {text!r} overlaps another branch: each notebook runs once")
        ranges.append((first, last, ids))
    for first, last, ids in ranges:
        for step in STEPS:
            if step.id not in ids:
                continue
            for key in (*step.inputs, *step.tiny_only_inputs):
                producer = ARTIFACTS[key].producer
                if producer > to and producer not in ids:
                    where = ("another branch runs at the same time" if any(producer in r[2] for r in ranges)
                             else "no branch runs")
                    raise SystemExit(f"--branch {first}:{last}: {step.id} reads {key}, made by {producer}, which {where}")
    return [(first, last) for first, last, _ in ranges]


def depth(variant: Variant) -> int:
    return 0 if variant.source is None else 1 + depth(variant.source)


def config_for(args: argparse.Namespace, variant: Variant):
    from kormedgemma.core.config import load_config, parse_overrides

    overrides = {**parse_overrides(args.overrides), **parse_overrides([f"{k}={v}" for k, v in variant.settings.items()]),
                 "paths.root": str(args.root / variant.name)}
    return load_config(args.profile, overrides=overrides, config_file=args.config_file or None)


def wait_for(args: argparse.Namespace, variant: Variant) -> bool:
    """Until the source has sealed what this variant links (or has failed)."""
    from kormedgemma.core.artifacts import ARTIFACTS, artifact_path

    key = "initialized_model" if variant.before == "3.01" else "base_model"
    assert ARTIFACTS[key].producer < variant.before
    manifest = artifact_path(config_for(args, variant.source), key) / "manifest.json"
    while not manifest.is_file():
        if variant.source.done.is_set():
            return manifest.is_file()
        time.sleep(5)
    return True


def run_variant(args: argparse.Namespace, variant: Variant) -> dict:
    from kormedgemma.core.artifacts import link_upstream

    started = time.time()
    log = args.root / f"{variant.name}.log"
    try:
        if variant.source is not None:
            if not wait_for(args, variant):
                log.write_text(f"{variant.source.name} failed before making what {variant.name} shares\n", encoding="utf-8")
                variant.rc = 3
                return summary(variant, started)
            link_upstream(config_for(args, variant.source), config_for(args, variant), variant.before)
        with open(log, "w", encoding="utf-8") as handle:
            variant.rc = subprocess.run(run_command(args, variant, "--to", variant.to or args.to), cwd=REPO,
                                        stdout=handle, stderr=subprocess.STDOUT).returncode
        if variant.rc == 0 and getattr(args, "branches", None) and variant.to in ("", args.to):
            variant.rc = run_branches(args, variant)
    except Exception as error:  # a bad setting or a failed link: this variant fails, the others go on
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{variant.name} could not start: {type(error).__name__}: {error}\n")
        variant.rc = 4
    finally:
        variant.done.set()
    return summary(variant, started)


def run_command(args: argparse.Namespace, variant: Variant, *selection: str) -> list[str]:
    command = [sys.executable, "-m", "kormedgemma", "run", "--profile", args.profile, *selection]
    command += ["--config", args.config_file] if args.config_file else []
    for item in [*args.overrides, *(f"{k}={v}" for k, v in variant.settings.items()),
                 f"paths.root={args.root / variant.name}"]:
        command += ["--set", item]
    return command


def run_branches(args: argparse.Namespace, variant: Variant) -> int:
    """Every --branch of this variant at once; the worst exit status."""
    running = []
    try:
        for first, last in args.branches:
            with open(args.root / f"{variant.name}.{first}.log", "w", encoding="utf-8") as handle:
                # the child holds its own copy of the file: ours can close at once
                running.append(subprocess.Popen(run_command(args, variant, "--from", first, "--to", last), cwd=REPO,
                                                stdout=handle, stderr=subprocess.STDOUT))
    except BaseException:
        for process in running:  # none left running behind a branch that could not start
            process.kill()
        raise
    return max((process.wait() for process in running), key=abs)


def summary(variant: Variant, started: float) -> dict:
    return {"name": variant.name, "settings": variant.settings, "rc": variant.rc,
            "shares": None if variant.source is None else {"from": variant.source.name, "before": variant.before},
            "to": variant.to or None, "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--profile", default="gemma3_270m")
    parser.add_argument("--config", dest="config_file", default=str(REPO / "benchmarks/gemma3_270m_local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME[:KEY=VALUE,...]")
    parser.add_argument("--to", default="3.07", help="last notebook of every variant")
    parser.add_argument("--parallel", type=int, default=3, help="variants running at once")
    parser.add_argument("--branch", action="append", default=[], metavar="FROM:TO",
                        help="after --to, these ranges at the same time (e.g. 5.01:5.02 and 6.01:6.02 after 4.01)")
    args = parser.parse_args()
    args.branches = parse_branches(args.to, args.branch)
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in args.variant]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("two variants share a name")
    plan(variants, args.to)
    for variant in variants:
        shared = f"links what is made before {variant.before} from {variant.source.name}" if variant.source else "builds all"
        print(f"{variant.name}: {variant.settings or 'the profile as it is'}; {shared}", flush=True)
    # sources first: a variant waiting for its source holds a worker, so sources must never wait behind it
    order = sorted(variants, key=depth)
    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        results = list(pool.map(lambda v: run_variant(args, v), order))
    (args.root / "variants.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    for r in results:
        print(f"{r['name']}: exit {r['rc']} after {r['seconds']} s", flush=True)
    sys.exit(1 if any(r["rc"] != 0 for r in results) else 0)


if __name__ == "__main__":
    main()
