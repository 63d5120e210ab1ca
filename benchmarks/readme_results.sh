#!/usr/bin/env bash
# The README's results tables: base LiteMedSAM against the shipped click adapter on every labelled set
# in ../shared/data (held-out sets first), then one table per set in $OUT/<set>/results.md + plots.
#   benchmarks/readme_results.sh [OUT=benchmarks/results] [MAX_SLICES=5] [METHODS=base,shipped]
# (METHODS=shipped with results already in OUT appends to them; ONLY="set1 set2" runs only those sets.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
SLICES=${2:-5}
METHODS=${3:-base,shipped}
D=../shared/data
PY=.venv/bin/python
ONLY=${ONLY:-}
run() {
  name=$1; shift
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  $PY scripts/evaluate.py "$@" --methods "$METHODS" --max-slices "$SLICES" --append --out "$OUT/$name"
}

# held out from the click adapter's training
run brats_flair_heldout $D/mr_brats2015 --image-name flair.nii.gz --label-name label.nii.gz \
    --merge-labels whole_tumour --no-3d --reference "expert labels (BraTS 2015), held out"
run ct_lesion_heldout $D/ct_lesion_deeplesion --reference "DeepLesion-derived labels (MedSAM2), held out"
# shippable sets: manual labels; in the training mix unless said otherwise
run ct_spleen_msd $D/ct_spleen_msd --image-name image.nii.gz --label-name label.nii.gz \
    --reference "manual (MSD), in training (sample-data)"
run mr_spine_sct_t1 $D/mr_spine_sct --image-name t1.nii.gz --label-name t1_label.nii.gz \
    --reference "manual, not in training (validation)"
run ct2d_amos_test $D/ct2d_amos_totalseg/label2image_test.json --no-3d \
    --reference "dataset labels (AMOS/TotalSegmentator), not in training (validation)"
# TotalSegmentator output as reference: agreement, not accuracy
ORGANS=liver,spleen,kidney_left,kidney_right,stomach,aorta,pancreas
run ct_abdomen_totalseg $D/ct_abdomen_totalseg --image-name image.nii.gz --label-name label_totalsegmentator.nii.gz \
    --structures $ORGANS --reference "TotalSegmentator output (agreement, not ground truth), in training"
run mr_abdomen_totalseg $D/mr_abdomen_totalseg --image-name image.nii.gz --label-name label_totalsegmentator.nii.gz \
    --structures $ORGANS --reference "TotalSegmentator output (agreement, not ground truth), in training"
for f in "$OUT"/*/results.md; do cat "$f"; echo; done > "$OUT/README_tables.md"
echo "wrote $OUT/README_tables.md"
