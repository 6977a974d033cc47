#!/usr/bin/env bash
# The documented MVSA recipe, raw data to a run that predicts new data:
#
#   bash recipes/mvsa.sh DATA_DIR OUT_DIR
#   msa predict --run OUT_DIR --data NEW_DIR --out predictions.txt
#
# all-mpnet-base-v2 with LoRA adapters (rank 8, every layer) and ImageNet EfficientNet-Lite0,
# a late-fusion head, fine-tuned end to end for 3 epochs (the best epoch by val macro-F1).
# Measured on the fixed val split of mvsa-lab5 (README, "Quality on MVSA"): accuracy 0.761,
# macro-F1 0.664, 4.4 min of training on a 2-core CPU with native bf16.
# Models from $MSA_OFFLINE_MODELS (default ~/.cache/msa/offline-models), assembled by
# ../shared/models/setup-offline-models.sh.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash recipes/mvsa.sh DATA_DIR OUT_DIR" >&2
  exit 2
fi
DATA="$1"
OUT="$2"
M="${MSA_OFFLINE_MODELS:-$HOME/.cache/msa/offline-models}"
MSA="${MSA:-msa}"
for needed in "$M/all-mpnet-base-v2/config.json" "$M/tf_efficientnet_lite0.pth"; do
  [ -e "$needed" ] || { echo "error: $needed missing; run bash ../shared/models/setup-offline-models.sh" >&2; exit 2; }
done
"$MSA" finetune --data "$DATA" --out "$OUT" \
  --text-model "$M/all-mpnet-base-v2" --lora-rank 8 --unfreeze-text-layers 0 \
  --image-model timm:tf_efficientnet_lite0 --image-weights "$M/tf_efficientnet_lite0.pth" --unfreeze-image-stages 0 \
  --fusion late --lr-encoder 3e-4 --lr-fusion 1e-3 --lr-head 1e-3 --epochs 3 --batch-size 32 --patience 2
