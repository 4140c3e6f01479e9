#!/usr/bin/env bash
# The merged manifest of the 8 labelled corpora under ../shared/data: runs/default/all.csv.
#
#   bash benchmarks/prepare_all.sh [--overwrite] [DATA_DIR] [OUT_DIR]
#
# Speaker-disjoint splits, seed 0. Dev gets at least 4 speakers where the corpus has them
# (--min-dev-speakers 4), so each corpus's dev score is judged on more than one or two voices:
#   ravdess 14/4/2 speakers (train/dev/test), emodb 2/4/0, ased 48/6/6, tess 2/0/0,
#   turev 1/4/0, tava 9/4/1, baved 23/4/3, nemo 3/4/0.
# EmoDB (6 speakers), TurEV-DB (5) and nEMO (7) have no test split: 4 dev speakers leave too few to
# hold out a third set. TESS has 2 speakers, too few for any held-out split: all of it is
# train (it brings disgusted and surprised clips), and it has no dev score of its own.
set -euo pipefail
overwrite=()
if [[ "${1:-}" == "--overwrite" ]]; then overwrite=(--overwrite); shift; fi
data="${1:-../shared/data}"
out="${2:-runs/default}"
mkdir -p "$out"
prepare() {  # corpus, extra options...
  local corpus="$1"; shift
  python -m serval data prepare "$corpus" "$data/$corpus" -o "$out/$corpus.csv" \
    --seed 0 --min-dev-speakers 4 "$@" "${overwrite[@]}"
}
prepare ravdess --calm neutral
prepare emodb --test-fraction 0
prepare ased
prepare tess
prepare turev --test-fraction 0
prepare tava
prepare baved
prepare nemo --test-fraction 0
if [[ -e "$out/all.csv" && ${#overwrite[@]} -gt 0 ]]; then rm "$out/all.csv"; fi
python -m serval data merge "$out"/{ravdess,emodb,ased,tess,turev,tava,baved,nemo}.csv -o "$out/all.csv"
python -m serval data check "$out/all.csv"
