#!/bin/bash
# ft.sh NAME MODEL_DIR LR [extra...]: the zh_two_stage.sh fine-tuning recipe, one thread
name=$1; model=$2; lr=$3; shift 3
D=/work/shared/data/sentiment_zh
OMP_NUM_THREADS=1 python -m fastbert.cli finetune --task classify --model "$model" --train $D/train.jsonl --dev $D/dev.jsonl \
  --epochs 3 --batch-size 32 --max-length 128 --seed 42 --device cpu --no-progress --lr "$lr" --out /tmp/zh2/ft/$name "$@" \
  > /tmp/zh2/logs/$name.log 2>&1
echo "$name rc=$?" >> /tmp/zh2/logs/steps.txt
