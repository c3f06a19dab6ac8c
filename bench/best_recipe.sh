#!/usr/bin/env bash
# The best recipe we measured under the course's 1M trainable parameters, as one command (README:
# "The budget, spent where it learns"): PiSSA on the four attention projections, the largest rank whose
# adapters and the new head fit 1,000,000 (RoBERTa-base: r=5, alpha 10, 962,308 trainable), lr 1e-3
# constant, 3 epochs, the best of the three epoch-end validations kept.
#   MODEL=roberta-base DATA=ag_news OUT=best bench/best_recipe.sh [more train.py flags, e.g. --label-names ...]
# MODEL, DATA and OUT default to roberta-base, ag_news and best; extra arguments go on to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(type -P python || type -P python3)}
exec "$PYTHON" train.py --model "${MODEL:-roberta-base}" --data "${DATA:-ag_news}" --out "${OUT:-best}" \
    --targets query key value attention.output.dense --init pissa --r auto --max-trainable 1000000 \
    --lr 1e-3 --schedule constant --epochs 3 --eval-every 0 "$@"
