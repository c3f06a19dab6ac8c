#!/usr/bin/env bash
# Training's peak RSS and time against three allocator remedies (issue 16): STEPS steps (200) of
# all-MiniLM-L6-v2 on DATA, max length 128, fp32, two runs each. Each variant runs a patched copy
# of this checkout's product files (its *.py, as they are now) in a temporary folder; the checkout
# is not touched.
#   baseline  as it is
#   pad8      every batch padded to a multiple of 8 (as train.py pads on a GPU): fewer shapes
#   trim      malloc_trim(0) after each evaluation
#   mmap4m    mallopt(M_MMAP_THRESHOLD, 4 MiB) at start (what MALLOC_MMAP_THRESHOLD_=4194304 sets)
# usage: MODEL=DIR DATA=train.csv bench/rss.sh [more train.py flags]   (PYTHON may be set)
#   a dry run: STEPS=1 EVERY=1 REPS=1 bench/rss.sh --limit 200 --val-size 32
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${MODEL:-${M:?set MODEL to a model folder, e.g. all-MiniLM-L6-v2}}
DATA=${DATA:?set DATA to a text,label CSV, e.g. agnews_dev_train.csv}
PY=${PYTHON:-$(type -P python || type -P python3)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
patch() {  # FILE ANCHOR sub|after TEXT: ANCHOR becomes TEXT, or TEXT is a line after ANCHOR's
  "$PY" - "$@" <<'PY'
import sys
path, anchor, how, text = sys.argv[1:]
lines = open(path).read().split("\n")
at = next((i for i, line in enumerate(lines) if anchor in line), None)
assert at is not None, f"{path}: no line holds {anchor!r}: update bench/rss.sh"
if how == "sub":
    lines[at] = lines[at].replace(anchor, text)
else:  # indented as the line after ANCHOR's would be
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, indent + ("    " if lines[at].rstrip().endswith(":") else "") + text)
compile("\n".join(lines), path, "exec")  # a patch that breaks the file stops here
open(path, "w").write("\n".join(lines))
PY
}
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT
for variant in baseline pad8 trim mmap4m; do
  d=$TMP/$variant; mkdir -p "$d"; cp "$ROOT"/*.py "$d"/
  case $variant in
    pad8) patch "$d/train.py" '1 if args.device.type == "cpu" else 16 if args.compile else 8' \
            sub "8" ;;  # micro_batches' multiple, on the CPU too
    trim) patch "$d/train.py" "bad_evals = from_main_process(bad_evals, args)" after \
            "__import__('ctypes').CDLL('libc.so.6').malloc_trim(0)" ;;  # after each evaluation
    mmap4m) patch "$d/train.py" "def main(argv=None):" after \
              "__import__('ctypes').CDLL('libc.so.6').mallopt(-3, 4 * 2**20)" ;;
  esac
  for rep in $(seq "${REPS:-2}"); do
    (cd "$d" && /usr/bin/time -f "%e s wall, peak RSS %M KiB" "$PY" train.py --model "$MODEL" \
      --data "$DATA" --out "$TMP/out_$variant" --max-length 128 --max-steps "${STEPS:-200}" \
      --eval-every "${EVERY:-50}" --precision fp32 "$@" 2>&1 | grep -E "peak RSS|s training" \
      | sed "s/^/$variant run $rep: /")
  done
  rm -rf "$d" "$TMP/out_$variant"
done
