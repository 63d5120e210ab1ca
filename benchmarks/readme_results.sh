#!/usr/bin/env bash
# The README's results tables: methods side by side on every labelled set in ../shared/data (held-out
# sets first), one table per set in $OUT/<set>/results.md + plots, then the pooled held-out table and
# Dice-vs-clicks plot ($OUT/pooled_heldout.md, $OUT/pooled_heldout_dice_vs_clicks.png).
#   benchmarks/readme_results.sh [OUT=benchmarks/results] [MAX_SLICES=5] [METHODS=base,shipped]
# Environment: ONLY="set1 set2" runs only those sets; CLICKS (default 12) clicks per session;
# STORE (default $OUT/embeddings) keeps image embeddings so later runs and methods encode nothing again;
# EXTRA: more scripts/evaluate.py options (e.g. "--inference respect_clicks=false").
# (Results already in OUT are appended to: run it again with other METHODS to add columns.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
SLICES=${2:-5}
METHODS=${3:-base,shipped}
CLICKS=${CLICKS:-12}
STORE=${STORE:-$OUT/embeddings}
D=../shared/data
PY=.venv/bin/python
ONLY=${ONLY:-}
HELD=()
run() {
  name=$1; shift
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  $PY scripts/evaluate.py "$@" --methods "$METHODS" --max-slices "$SLICES" --max-clicks "$CLICKS" \
      --embedding-store "$STORE" ${EXTRA:-} --append --out "$OUT/$name"
}
held() { HELD+=("$OUT/$1/results.json"); run "$@"; }

# held out from the shipped click adapter's training and checkpoint selection
held brats_flair_heldout $D/mr_brats2015 --image-name flair.nii.gz --label-name label.nii.gz \
    --merge-labels whole_tumour --no-3d --reference "expert labels (BraTS 2015), held out"
held ct_lesion_heldout $D/ct_lesion_deeplesion --reference "DeepLesion-derived labels (MedSAM2), held out"
held mr_hippocampus_val $D/mr_hippocampus_msd --image-name image.nii.gz --label-name label.nii.gz \
    --cases 'validation_hippocampus_[01]*' --no-3d --reference "manual (MSD), validation part"
held us_fetal_head_val $D/us_fetal_head_hc18/label2image_test.json --no-3d --reference "manual (HC18), validation part"
held cmr_lv_val $D/cmr_lv_sunnybrook/label2image_test.json --no-3d --reference "manual (Sunnybrook), validation part"
held mr_ms_lesions_val $D/mr_ms_lesions --image-name flair.nii.gz --label-name label.nii.gz --cases patient07 \
    --no-3d --reference "expert consensus, validation part (patient07)"
held mr_spine_sct_t1 $D/mr_spine_sct --image-name t1.nii.gz --label-name t1_label.nii.gz \
    --reference "manual, validation part"
held ct2d_amos_test $D/ct2d_amos_totalseg/label2image_test.json --no-3d \
    --reference "dataset labels (AMOS/TotalSegmentator), validation part"
# in the training mix (sample-data): the product's own demo scan
run ct_spleen_msd $D/ct_spleen_msd --image-name image.nii.gz --label-name label.nii.gz \
    --reference "manual (MSD), in training (sample-data)"
# TotalSegmentator output as reference: agreement, not accuracy
ORGANS=liver,spleen,kidney_left,kidney_right,stomach,aorta,pancreas
run ct_abdomen_totalseg $D/ct_abdomen_totalseg --image-name image.nii.gz --label-name label_totalsegmentator.nii.gz \
    --structures $ORGANS --reference "TotalSegmentator output (agreement, not ground truth), in training"
run mr_abdomen_totalseg $D/mr_abdomen_totalseg --image-name image.nii.gz --label-name label_totalsegmentator.nii.gz \
    --structures $ORGANS --reference "TotalSegmentator output (agreement, not ground truth), in training"
for f in "$OUT"/*/results.md; do cat "$f"; echo; done > "$OUT/README_tables.md"
if [[ ${#HELD[@]} -gt 0 ]]; then
  existing=()
  for f in "${HELD[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
  $PY benchmarks/pool_results.py "${existing[@]}" --plot "$OUT/pooled_heldout_dice_vs_clicks.png" \
      > "$OUT/pooled_heldout.md"
  cat "$OUT/pooled_heldout.md"
fi
echo "wrote $OUT/README_tables.md"
