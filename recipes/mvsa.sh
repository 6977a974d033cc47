#!/usr/bin/env bash
# The MVSA recipe, raw data to an ensemble that predicts new posts, chosen by 5-fold
# cross-validation (bench/quality.py) and never by one split:
#
#   bash recipes/mvsa.sh DATA_DIR OUT_DIR
#   bash OUT_DIR/predict.sh NEW_DIR predictions.txt
#
# Four views of each post are extracted once (text: all-mpnet-base-v2 and all-MiniLM-L6-v2,
# each on the raw and the normalised tweet; image: EfficientNet-Lite0 with MPNet, Lite2 with
# MiniLM; the VADER/emoji lexicon with all), then a late and a GMU head are trained on each
# view under 5-fold cross-validation and refit on every label, and their probabilities are
# averaged. The recipe prints the ensemble's out-of-fold estimate, which is what to expect on
# unseen posts (README, "Quality on MVSA": accuracy 0.743, macro-F1 0.636 on mvsa-lab5).
# 37 minutes on a 2-core CPU with the test suite running beside it.
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
for needed in "$M/all-mpnet-base-v2/config.json" "$M/all-MiniLM-L6-v2/config.json" "$M/tf_efficientnet_lite0.pth" \
              "$M/tf_efficientnet_lite2.pth"; do
  [ -e "$needed" ] || { echo "error: $needed missing; run bash ../shared/models/setup-offline-models.sh" >&2; exit 2; }
done
mkdir -p "$OUT"

# view name, text model, text normalisation, image model
VIEWS=(
  "mpnet-lite0 all-mpnet-base-v2 none tf_efficientnet_lite0"
  "mpnet-tweet-lite0 all-mpnet-base-v2 tweet tf_efficientnet_lite0"
  "minilm-lite2 all-MiniLM-L6-v2 none tf_efficientnet_lite2"
  "minilm-tweet-lite2 all-MiniLM-L6-v2 tweet tf_efficientnet_lite2"
)
RUNS=()
for view in "${VIEWS[@]}"; do
  read -r name text normalise image <<< "$view"
  "$MSA" extract --data "$DATA" --cache "$OUT/cache-$name" --modalities text,image,lexicon \
    --text-model "$M/$text" --text-normalise "$normalise" \
    --image-model "timm:$image" --image-weights "$M/$image.pth"
  for fusion in late gmu; do
    "$MSA" train-head --cache "$OUT/cache-$name" --fusion "$fusion" --folds 5 --refit --out "$OUT/$fusion-$name"
    RUNS+=("$OUT/$fusion-$name")
  done
done

FIRST="${RUNS[0]}"
OTHERS="$(IFS=,; echo "${RUNS[*]:1}")"
echo "5-fold cross-validated estimate of the ensemble (out-of-fold predictions of every labelled post):"
"$MSA" evaluate --run "$FIRST" --ensemble "$OTHERS" --out "$OUT/evaluation"
cat > "$OUT/predict.sh" <<EOF
#!/usr/bin/env bash
# bash $OUT/predict.sh NEW_DATA_DIR OUT_FILE: the ensemble's predictions for new posts
set -euo pipefail
"$MSA" predict --run "$FIRST" --ensemble "$OTHERS" --data "\$1" --split all --out "\$2"
EOF
echo "predict new posts: bash $OUT/predict.sh NEW_DATA_DIR predictions.txt"
