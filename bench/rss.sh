#!/bin/bash
# Training's peak RSS and time against three allocator remedies (issue 16): 200 steps on the 19,347 rows,
# all-MiniLM-L6-v2, max length 128, fp32, two runs each. Each variant is a patched copy of this checkout
# in /tmp (a worktree of the committed HEAD); the checkout itself is not touched.
#   baseline  as it is
#   pad8      every batch padded to a multiple of 8 (as pad_to_multiple_of=8 does): fewer distinct shapes
#   trim      malloc_trim(0) after each evaluation
#   mmap4m    mallopt(M_MMAP_THRESHOLD, 4 MiB) at start (what MALLOC_MMAP_THRESHOLD_=4194304 sets from the environment)
#     M=path/to/model bench/rss.sh          (STEPS=2 EVERY=1 for a quick dry run)
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data/agnews_dev_train.csv}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XDG_CACHE_HOME=/tmp/rss-cache
patch() {  # file, old line, new line(s)
  python - "$@" <<'PY'
import sys; path, old, new = sys.argv[1:]; s = open(path).read()
assert old in s, f"{path}: {old!r} not found"; open(path, "w").write(s.replace(old, new, 1))
PY
}
for variant in baseline pad8 trim mmap4m; do
  d=/tmp/rss_$variant; rm -rf $d; git -C "$ROOT" worktree add -q --force --detach $d HEAD 2>/dev/null || cp -r "$ROOT" $d
  case $variant in
    pad8) patch $d/data.py "    longest = max(len(s) for s in sequences)
" "    longest = -(-max(len(s) for s in sequences) // 8) * 8
" ;;
    trim) patch $d/train.py "                        progress.after_evaluation(step, val_loss, val_acc, bad_evals)
" "                        progress.after_evaluation(step, val_loss, val_acc, bad_evals)
                        __import__('ctypes').CDLL('libc.so.6').malloc_trim(0)
" ;;
    mmap4m) patch $d/train.py "def main(argv=None):
" "def main(argv=None):
    __import__('ctypes').CDLL('libc.so.6').mallopt(-3, 4 * 2**20)
" ;;
  esac
  for rep in 1 2; do
    (cd $d && /usr/bin/time -f "%e s wall, peak RSS %M KiB" python train.py --model "$M" \
      --data "$DATA" --out /tmp/rss_out_$variant --max-length 128 --max-steps ${STEPS:-200} --eval-every ${EVERY:-50} \
      --precision fp32 2>&1 | grep -E "peak RSS|s training" | sed "s/^/$variant run $rep: /")
  done
  git -C "$ROOT" worktree remove --force $d 2>/dev/null || rm -rf $d
done
