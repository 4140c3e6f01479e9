#!/usr/bin/env bash
# docs/finetuning.md, as written: two corpora with their own classes, each fine-tuned from the
# default model (--init default) and trained from whisper-base alone (--init none), scored on
# speakers the default model never trained on. Prints the table of the doc.
#
#   bash benchmarks/finetune_walkthrough.sh [DATA_DIR] [OUT_DIR]
#
# RAVDESS: its 8 classes (calm included). Test: actors 04, 09, 16, 17, 18, 19 (the default model's
# dev and test actors: never trained on); dev: actors 03 and 10; train: the other 12.
# BAVED: its 3 levels (low, neutral, high). Test: the 7 speakers outside the default model's
# training set; dev: 4 of the others; train: the other 19.
set -euo pipefail
data="${1:-../shared/data}"
out="${2:-runs/finetune}"
mkdir -p data "$out"
SECONDS=0

serval data prepare ravdess "$data/ravdess" -o data/ravdess8.csv --keep-labels --overwrite \
  --dev-speakers ravdess-03 ravdess-10 \
  --test-speakers ravdess-04 ravdess-09 ravdess-16 ravdess-17 ravdess-18 ravdess-19
serval data prepare baved "$data/baved" -o data/baved3.csv --keep-labels --overwrite \
  --dev-speakers baved-2 baved-7 baved-8 baved-13 \
  --test-speakers baved-3 baved-17 baved-29 baved-38 baved-42 baved-45 baved-54

for init in default none; do
  serval train configs/finetune-cpu.yaml --init "$init" --overwrite \
    --set 'labels=[neutral, calm, happy, sad, angry, fearful, disgusted, surprised]' \
    --set out_dir="$out/ravdess-$init"
  serval train configs/finetune-cpu.yaml --init "$init" --overwrite \
    --set 'labels=[low, neutral, high]' \
    --set data.train=data/baved3.csv --set data.dev=data/baved3.csv --set data.test=data/baved3.csv \
    --set out_dir="$out/baved-$init"
done

echo "walkthrough: ${SECONDS} s; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| corpus (classes) | start | test clips | test UAR | test accuracy |")
print("| --- | --- | --- | --- | --- |")
for corpus, classes in (("ravdess", 8), ("baved", 3)):
    for init in ("default", "none"):
        test = json.loads((out / f"{corpus}-{init}" / "final.json").read_text())["test"]
        start = "default model" if init == "default" else "whisper-base (from scratch)"
        print(f"| {corpus} ({classes}) | {start} | {test['n']} | {100 * test['uar']:.1f} | {100 * test['accuracy']:.1f} |")
EOF
