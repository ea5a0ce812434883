#!/usr/bin/env bash
# The accuracy pipeline of docs/RESULTS.md on one GPU, from a backbone folder:
#   [continue training the backbone TRAIN_MIN minutes] -> task documents -> harvest ->
#   label -> train the Memory Indexer -> `flashmemory eval` grid (stops at DEADLINE_S).
# Usage (repo root): OUT=runs/acc BB=vllm_flashmemory/assets/backbone bash bench/run_accuracy_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/accuracy}; BB=${BB:?set BB to a backbone folder}
DEVICE=${DEVICE:-cuda}; TRAIN_MIN=${TRAIN_MIN:-0}; DEADLINE_S=${DEADLINE_S:-570}
DOC_TASKS=${DOC_TASKS:-niah_single_1,niah_single_2,niah_multikey_1,niah_multikey_2,vt,no_context}
DOC_LEN=${DOC_LEN:-2048}; DOC_N=${DOC_N:-8}; PROMPT=${PROMPT:-1536}
TASKS=${TASKS:-niah_single_1,niah_single_2,niah_multikey_1,vt,no_context}
LENGTHS=${LENGTHS:-2k,4k}; METHODS=${METHODS:-full,lsa,recency,random,oracle10}; N=${N:-8}
WORK=${WORK:-/tmp/acc}; T0=$(date +%s)
CLI="bash scripts/gpu_cli.sh"
mkdir -p "$OUT" "$WORK"
if [ "$TRAIN_MIN" != 0 ]; then
  $CLI train-backbone --init "$BB" --out "$WORK/backbone" --minutes "$TRAIN_MIN" \
    --device "$DEVICE" ${TRAIN_ARGS:-} > "$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log"; exit 1; }
  grep '"probe"' "$WORK/train.log" | tail -2 | cut -c1-600
  BB=$WORK/backbone
  (cd "$BB" && split -b 15M model.safetensors "$OUT/backbone.safetensors.part")
  cp "$BB/training_log.jsonl" "$OUT/"
fi
export PYTHONPATH=/tmp/site:$PWD
python3 scripts/task_documents.py --tasks "$DOC_TASKS" --length "$DOC_LEN" --n "$DOC_N" --out "$WORK/docs.jsonl"
$CLI harvest --model "$BB" --out "$WORK/harvest" --documents "$WORK/docs.jsonl" \
  --tokens "$DOC_LEN" --prompt-tokens "$PROMPT" --device "$DEVICE" --no-progress
$CLI label "$WORK/harvest"
$CLI train "$WORK/harvest" --out-dir "$WORK/train" --no-progress | tail -5
tar -C "$WORK" -czf "$OUT/indexer.tgz" train/indexer train/metrics.json
echo "indexer ready at $(( $(date +%s) - T0 )) s"
LEFT=$(( DEADLINE_S - ($(date +%s) - T0) ))
timeout "$LEFT" $CLI eval --model "$BB" --indexer "$WORK/train/indexer" --tasks "$TASKS" \
  --lengths "$LENGTHS" --methods "$METHODS" --n "$N" --json "$OUT/grid.json" \
  --plot "$OUT/grid.png" --device "$DEVICE" --no-progress
echo "eval exit $? at $(( $(date +%s) - T0 )) s"
