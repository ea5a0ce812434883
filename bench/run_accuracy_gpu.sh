#!/usr/bin/env bash
# The accuracy pipeline of docs/RESULTS.md on one GPU, from a backbone folder:
#   [continue training the backbone TRAIN_MIN minutes] -> task documents -> harvest ->
#   label -> train the Memory Indexer (with its threshold sweep) -> pick the threshold
#   -> `flashmemory eval --workers` grid, stopped at DEADLINE_S (finished cells kept).
# Usage (repo root): OUT=runs/acc BB=vllm_flashmemory/assets/backbone bash bench/run_accuracy_gpu.sh
#   The defaults reproduce the committed Memory Indexer (backbone_meta.json, memory_indexer)
#   and the grid of docs/RESULTS.md: window 1024 and chunk 32 tokens at every length.
#   INDEXER=DIR skips harvest/label/train and evaluates with that Memory Indexer.
#   THRESHOLD=x fixes the threshold; otherwise the lowest swept threshold whose held-out
#   chunk resident fraction (historical chunks, at EVAL_CHUNK) in the longest context
#   bucket is <= TARGET_RESIDENT (metrics.calibrate_threshold, as `flashmemory train`
#   calibrates the checkpoint); with INDEXER=DIR, eval's default (DIR's calibration).
#   EVAL=0 stops once the Memory Indexer is trained (OUT/indexer.tgz).
#   INDEXER_ARGS="--negatives-per-positive 0" adds `flashmemory train` flags;
#   LABELS=attention (default) harvests with --attention and labels with --source
#   attention, LABELS=indexer from the native indexer's logits (the paper's Eq. 7);
#   LABEL_ARGS adds `flashmemory label` flags (default: the first CSA layer, top-p 0.3).
#   EVAL_ARGS (default "--local-window-tokens 1024 --chunk-tokens 32") fixes the window
#   and chunk in tokens at every length (the paper's protocol divided by 8).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/accuracy}; BB=${BB:?set BB to a backbone folder}
DEVICE=${DEVICE:-cuda}; TRAIN_MIN=${TRAIN_MIN:-0}; DEADLINE_S=${DEADLINE_S:-570}
DOC_TASKS=${DOC_TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multivalue,niah_multiquery,vt,no_context}
# DOCS="PROMPT:N,...": N documents per task whose context + question is exactly PROMPT
# tokens, one harvest per PROMPT, all training one indexer. Each is harvested from
# PROMPT - 1: the first query is the prompt's last token, where LSA refreshes at the end
# of prefill, and its window is the answer (offline/labels.py).
DOCS=${DOCS:-4096:80,16384:16}; DOC_SEED=${DOC_SEED:-0}
# Harvest processes side by side (the tiny backbone is launch-bound, not GPU-bound) and
# an optional time box in seconds: documents finished by then are labelled and used.
HARVEST_WORKERS=${HARVEST_WORKERS:-10}; HARVEST_S=${HARVEST_S:-0}
EVAL_CHUNK=${EVAL_CHUNK:-32}; TARGET_RESIDENT=${TARGET_RESIDENT:-${RESIDENT_TARGET:-0.1}}  # RESIDENT_TARGET: its old name
LABELS=${LABELS:-attention}; LABEL_ARGS=${LABEL_ARGS---layers 0 --min-votes 1 --top-p 0.3}
EVAL_ARGS=${EVAL_ARGS---local-window-tokens 1024 --chunk-tokens 32}
TASKS=${TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe,no_context}
LENGTHS=${LENGTHS:-8k,16k,32k}; METHODS=${METHODS:-full,lsa,recency,random,oracle,quest}
N=${N:-16}; WORKERS=${WORKERS:-11}; WORK=${WORK:-/tmp/acc}; T0=$(date +%s)
CLI="bash scripts/gpu_cli.sh"
mkdir -p "$OUT" "$WORK"
$CLI --help > /dev/null || exit 1  # installs the task-data wheels into /tmp/site
if [ "$TRAIN_MIN" != 0 ]; then
  $CLI train-backbone --init "$BB" --out "$WORK/backbone" --minutes "$TRAIN_MIN" \
    --device "$DEVICE" ${TRAIN_ARGS:-} > "$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log"; exit 1; }
  grep '"probe"' "$WORK/train.log" | tail -2 | cut -c1-600
  BB=$WORK/backbone
  (cd "$BB" && split -b 15M model.safetensors "$OUT/backbone.safetensors.part")
  cp "$BB/training_log.jsonl" "$OUT/"
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -z "${INDEXER:-}" ]; then
  HARVESTS=()
  for spec in ${DOCS//,/ }; do
    PROMPT=${spec%%:*}; DOC_N=${spec##*:}; DOC_LEN=$((PROMPT + 64)); H=$WORK/harvest_$PROMPT
    for task in ${DOC_TASKS//,/ }; do  # one generator per task, side by side
      python3 scripts/task_documents.py --tasks "$task" --length "$DOC_LEN" --n "$DOC_N" \
        --seed "$DOC_SEED" --prompt-tokens "$PROMPT" --out "$WORK/docs${PROMPT}_$task.jsonl" > /dev/null &
    done
    wait
    cat "$WORK"/docs${PROMPT}_*.jsonl > "$WORK/docs$PROMPT.jsonl"
    echo "$(wc -l < "$WORK/docs$PROMPT.jsonl") documents of $PROMPT tokens at $(( $(date +%s) - T0 )) s"
    HARVEST_CMD=($CLI harvest --model "$BB" --out "$H" --documents "$WORK/docs$PROMPT.jsonl"
      --tokens "$DOC_LEN" --prompt-tokens $((PROMPT - 1)) --device "$DEVICE" --max-chunk-tokens 4096
      --workers "$HARVEST_WORKERS" --no-progress)
    [ "$LABELS" = attention ] && HARVEST_CMD+=(--attention)
    if [ "$HARVEST_S" != 0 ]; then timeout "$HARVEST_S" "${HARVEST_CMD[@]}" | tail -1
    else "${HARVEST_CMD[@]}" | tail -1; fi
    $CLI label "$H" --source "$LABELS" $LABEL_ARGS | tail -1
    HARVESTS+=("$H")
  done
  echo "harvest done at $(( $(date +%s) - T0 )) s"
  $CLI train "${HARVESTS[@]}" --out-dir "$WORK/train" --chunk-tokens "$EVAL_CHUNK" \
    --epochs "${EPOCHS:-10}" --init native --lr 1e-3 --target-resident "$TARGET_RESIDENT" \
    --device "$DEVICE" ${INDEXER_ARGS:-} \
    --no-progress | tail -32
  [ -f "$WORK/train/metrics.json" ] || { echo "no Memory Indexer was trained"; exit 1; }
  tar -C "$WORK" -czf "$OUT/indexer.tgz" train/indexer train/metrics.json
  INDEXER=$WORK/train/indexer
  echo "indexer ready at $(( $(date +%s) - T0 )) s"
  [ "${EVAL:-1}" = 0 ] && exit 0
fi
if [ -z "${THRESHOLD:-}" ] && [ -f "$(dirname "$INDEXER")/metrics.json" ]; then
  # trained by this run: calibrate at TARGET_RESIDENT (a given checkpoint is left to
  # eval, whose default is the checkpoint's own calibration)
  THRESHOLD=$(python3 - "$(dirname "$INDEXER")/metrics.json" "$TARGET_RESIDENT" <<'PY'
import json, sys
from vllm_flashmemory.offline.metrics import calibrate_threshold
sweep = json.load(open(sys.argv[1]))["threshold_sweep"]
calibration = calibrate_threshold(sweep, float(sys.argv[2]))
print(calibration["threshold"] if calibration else max(r["threshold"] for r in sweep))
PY
)
fi
echo "threshold ${THRESHOLD:-(eval's default: the checkpoint's calibration, else 0.5)}"
LEFT=$(( DEADLINE_S - ($(date +%s) - T0) ))
# The eval writes one log per worker beside its results file; kept in WORK, they do
# not crowd OUT (the lent GPU returns at most 8 files from it: 11 worker logs once
# pushed a trained backbone out). A grid already in OUT is resumed.
[ -f "$OUT/grid.json" ] && cp "$OUT/grid.json" "$WORK/grid.json"
timeout "$LEFT" $CLI eval --model "$BB" --indexer "$INDEXER" --tasks "$TASKS" \
  --lengths "$LENGTHS" --methods "$METHODS" --n "$N" ${THRESHOLD:+--threshold "$THRESHOLD"} \
  --prefill-chunk-tokens 512 $EVAL_ARGS --workers "$WORKERS" --json "$WORK/grid.json" --device "$DEVICE" --no-progress 2>&1 | tail -40
EVAL_RC=${PIPESTATUS[0]}
cp "$WORK/grid.json" "$OUT/grid.json" 2>/dev/null
echo "eval exit $EVAL_RC at $(( $(date +%s) - T0 )) s"
