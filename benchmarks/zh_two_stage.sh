#!/usr/bin/env bash
# Two-stage check on Chinese (issue 6), sized for one GPU call (~5 minutes on one H200):
#   (a) pretrain a character-level Chinese BERT (MLM + NSP) on zh.txt.gz for ~ZH_PRETRAIN_SECONDS,
#   (b) fine-tune it on sentiment_zh, and
#   (c) fine-tune the same config + tokenizer from random weights (--random-init), with the same
#       hyper-parameters, at each learning rate of ZH_LRS;
# then write the dev accuracies and their differences to $OUT/zh_summary.{md,json}, plus a tarball of
# the logs and metrics ($OUT/zh_two_stage.tar.gz). Every step has its own time limit, each capped by
# what is left of ZH_TOTAL_SECONDS, so one hang cannot cost the rest.
#
#   bash benchmarks/zh_two_stage.sh gpu_data/zh.txt.gz [gpu_data/sentiment_zh]
#
# The pretraining step count is calibrated on the machine: a 100-step run first measures the
# throughput (and pays the one-time costs: tokenizer, tokenised shards, Triton compilation, all
# cached for the main run), then the main run gets the steps that fill ZH_PRETRAIN_SECONDS, with its
# full warm-up/decay schedule. If the main run is cut by its time limit, the last checkpoint it saved
# (a quarter of the run apart) is fine-tuned and the summary says which step that was.
#
# Pretrain on the GPU, fine-tune on the CPU (the fine-tuning grid over seeds costs CPU time, not device
# time): ZH_EXPORT=1 ZH_LRS="" brings the model back as $OUT/zh_model.tar.gz (bf16 weights, tokenizer,
# config, metrics); then, on the CPU, benchmarks/zh_grid.py fine-tunes both arms over lrs x seeds.
#
# Shrink everything for a CPU smoke test, e.g.:
#   OUT=/tmp/zh ZH_DEVICE=cpu ZH_PRECISION=fp32 ZH_SIZE=micro ZH_BATCH=8 ZH_SEQ=64 ZH_CAL_STEPS=4 \
#   ZH_PRETRAIN_SECONDS=10 ZH_FT_EPOCHS=1 ZH_MAX_TRAIN=64 ZH_MAX_EVAL=64 bash benchmarks/zh_two_stage.sh small.txt.gz
set -u
ZH_CORPUS=${1:?usage: zh_two_stage.sh ZH_TXT_GZ [SENTIMENT_ZH_DIR]}
ZH_DATA=${2:-$(dirname "$ZH_CORPUS")/sentiment_zh}
OUT=${OUT:-$PWD/benchmarks/results/zh-two-stage-latest}
PY=${PY:-python3}
ZH_DEVICE=${ZH_DEVICE:-cuda}
ZH_PRECISION=${ZH_PRECISION:-bf16}
ZH_SIZE=${ZH_SIZE:-small}                 # 512 hidden, 4 layers, 8 heads (fastbert/config.py SIZES)
ZH_SEQ=${ZH_SEQ:-128}
ZH_BATCH=${ZH_BATCH:-256}
ZH_PRETRAIN_LR=${ZH_PRETRAIN_LR:-5e-4}
ZH_PRETRAIN_SECONDS=${ZH_PRETRAIN_SECONDS:-120}
ZH_CAL_STEPS=${ZH_CAL_STEPS:-100}          # > one epoch of the zh corpus at batch 256 (91 steps)
ZH_MAX_STEPS=${ZH_MAX_STEPS:-20000}
ZH_STEPS=${ZH_STEPS:-}                    # set to skip the calibration
ZH_FALLBACK_STEPS=${ZH_FALLBACK_STEPS:-3000}  # if the calibration fails
ZH_FT_EPOCHS=${ZH_FT_EPOCHS:-3}
ZH_FT_BATCH=${ZH_FT_BATCH:-32}
ZH_LRS=${ZH_LRS-"1e-4 2e-4"}              # each run for both arms, the first pair first; "" = none
ZH_MAX_TRAIN=${ZH_MAX_TRAIN:-}
ZH_MAX_EVAL=${ZH_MAX_EVAL:-}
ZH_TOTAL_SECONDS=${ZH_TOTAL_SECONDS:-330}
# extra `fastbert pretrain` flags for both pretraining runs, e.g. --cuda-graphs (PLAN=zh sets it: on the
# H200 the graphed loop kept 0.93 of the bare step against the eager loop's 0.5); if the calibration
# fails with them, it runs again without them and so does the main run
ZH_PRETRAIN_FLAGS=${ZH_PRETRAIN_FLAGS-}
read -r -a EXTRA <<< "$ZH_PRETRAIN_FLAGS"
T_CAL=${T_CAL:-150} T_FT=${T_FT:-90}
FB=("$PY" -m fastbert.cli)                # the fastbert command of this very Python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true

R=$(mktemp -d /tmp/zh_two_stage.XXXX)
mkdir -p "$OUT" "$R/logs"
START=$SECONDS
left() { echo $((ZH_TOTAL_SECONDS - (SECONDS - START))); }
cap() { local l; l=$(left); if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi; }
bundle() {
  tar czf "$OUT/zh_two_stage.tar.gz" -C "$R" logs $(cd "$R" && ls -d pretrain/metrics.jsonl pretrain/loss_curve.png \
      pretrain/run_args.json pretrain/config.json ft-*/metrics.json 2>/dev/null) 2>/dev/null
}
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs to $R/logs/NAME.log
  local name=$1 limit; limit=$(cap "$2"); shift 2
  if [ "$limit" -lt 5 ]; then echo "$name skipped: no time left" | tee -a "$R/logs/steps.txt"; return 124; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$R/logs/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$R/logs/$name.log"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$R/logs/steps.txt"
  bundle
  return $rc
}

for f in "$ZH_CORPUS" "$ZH_DATA/train.jsonl" "$ZH_DATA/dev.jsonl"; do
  [ -f "$f" ] || { echo "zh_two_stage: missing $f" >&2; exit 2; }
done
$PY -c "import fastbert.kernels" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  > "$R/logs/install.log" 2>&1 || echo "editable install failed (see logs/install.log)"
{ date -u; $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$R/logs/env.txt" 2>&1
cat "$R/logs/env.txt"

COMMON=(--corpus "$ZH_CORPUS" --config "$ZH_SIZE" --seq-len "$ZH_SEQ" --batch-size "$ZH_BATCH"
        --lr "$ZH_PRETRAIN_LR" --precision "$ZH_PRECISION" --device "$ZH_DEVICE" --cache-dir "$R/cache" --no-progress)

# (a0) calibration: throughput, and every one-time cost paid before the timed run
STEPS=$ZH_STEPS
if [ -z "$STEPS" ]; then
  step calibrate "$T_CAL" "${FB[@]}" pretrain "${COMMON[@]}" "${EXTRA[@]}" --tokenizer chinese --steps "$ZH_CAL_STEPS" \
    --eval-every 0 --save-every "$ZH_CAL_STEPS" --out "$R/cal"
  if [ $? -ne 0 ] && [ ${#EXTRA[@]} -gt 0 ]; then
    echo "calibration failed with $ZH_PRETRAIN_FLAGS (logs/calibrate-with-flags.log); again without" \
      | tee -a "$R/logs/steps.txt"
    mv "$R/logs/calibrate.log" "$R/logs/calibrate-with-flags.log"; rm -rf "$R/cal"; EXTRA=()
    step calibrate "$T_CAL" "${FB[@]}" pretrain "${COMMON[@]}" --tokenizer chinese --steps "$ZH_CAL_STEPS" \
      --eval-every 0 --save-every "$ZH_CAL_STEPS" --out "$R/cal"
  fi
  STEPS=$($PY - "$R/cal" "$R/logs/calibrate.log" "$ZH_PRETRAIN_SECONDS" "$ZH_BATCH" "$ZH_MAX_STEPS" \
          2>>"$R/logs/steps.txt" <<'EOF'
import json, re, sys
run, log, seconds, batch, cap = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
# Real tokens/s over the logged windows after the first (which holds the compilation); the windows
# hold equal step counts, so the overall rate is their harmonic mean. With the default 100 steps the
# windows cross one epoch boundary, where the next epoch's examples are cut (seconds of CPU work).
rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
tps = len(rates) / sum(1.0 / r for r in rates)
m = re.search(r"corpus: (\d+) documents, ([\d,]+) tokens; (\d+) training documents \((\d+) examples per epoch",
              open(log).read())
# real tokens per example: the training documents' tokens over the examples cut from them, + [CLS] [SEP] [SEP]
per_example = (int(m[2].replace(",", "")) * int(m[3]) / int(m[1]) / int(m[4]) + 3) if m else 0.7 * 128
steps = int(seconds * tps / (batch * per_example))
print(max(20, min(cap, steps // 10 * 10)))
print(f"calibration: {tps:,.0f} real tokens/s, ~{per_example:.0f} real tokens per example -> {steps} steps "
      f"for {seconds:.0f} s", file=sys.stderr)
EOF
  ) || STEPS=""
  if [ -z "$STEPS" ]; then
    STEPS=${ZH_FALLBACK_STEPS:-3000}
    echo "calibration failed (see logs/calibrate.log); pretraining $STEPS steps" | tee -a "$R/logs/steps.txt"
  fi
fi
echo "pretraining steps: $STEPS" | tee -a "$R/logs/steps.txt"
TOK=chinese; [ -f "$R/cal/tokenizer.json" ] && TOK="$R/cal"   # the calibration's vocabulary: shards stay cached

# (a) the timed pretraining run; checkpoints every quarter, so a run cut short still leaves one
step pretrain $((ZH_PRETRAIN_SECONDS * 3 / 2 + 60)) "${FB[@]}" pretrain "${COMMON[@]}" "${EXTRA[@]}" --tokenizer "$TOK" \
  --steps "$STEPS" --save-every $(( (STEPS + 3) / 4 )) --out "$R/pretrain"
LATEST=$(cat "$R/pretrain/checkpoints/latest" 2>/dev/null)
if [ -z "$LATEST" ]; then
  echo "no pretraining checkpoint was saved; nothing to fine-tune" | tee -a "$R/logs/steps.txt"
  cat "$R/logs/steps.txt"; bundle; exit 1
fi
echo "pretrained checkpoint: $LATEST of $STEPS steps" | tee -a "$R/logs/steps.txt"
# The finished run's model sits in the run folder; a run cut short has it only in its last checkpoint.
MODEL="$R/pretrain"; [ -f "$MODEL/model.safetensors" ] || MODEL="$R/pretrain/checkpoints/$LATEST"

# (a1) optional: bring the pretrained model back (ZH_EXPORT=1) so that CPU sessions can fine-tune it
# over many seeds: $OUT/zh_model.tar.gz (or ZH_EXPORT_PATH), floating weights in bf16 (mini: ~10 MB; the device tool
# returns files of at most 16 MiB), with its tokenizer, config, metrics and run arguments.
if [ "${ZH_EXPORT:-0}" = 1 ]; then
  $PY - "$MODEL" "$R/pretrain" "${ZH_EXPORT_PATH:-$OUT/zh_model.tar.gz}" <<'EXPORT' 2>&1 | tee -a "$R/logs/steps.txt"
import os, shutil, sys, tarfile, tempfile
import torch
from safetensors.torch import load_file, save_file
model, run, dest = sys.argv[1:4]
stage = os.path.join(tempfile.mkdtemp(), "zh_model")
os.mkdir(stage)
state = load_file(os.path.join(model, "model.safetensors"))
save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
          os.path.join(stage, "model.safetensors"), metadata={"format": "pt"})
for src, names in ((model, ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "vocab.txt")), (run, ("metrics.jsonl", "run_args.json", "loss_curve.png"))):
    for name in names:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), stage)
with tarfile.open(dest, "w:gz") as tar:
    tar.add(stage, arcname="zh_model")
size = os.path.getsize(dest)
print(f"export: {dest} {size / 2**20:.1f} MiB (bf16 weights of {os.path.basename(os.path.normpath(model))})"
      + ("" if size < 16 << 20 else " -- over the device tool's 16 MiB per file: it will not come back"))
EXPORT
fi

summary() {
  $PY - "$R" "$OUT" "$ZH_SIZE" "$STEPS" "$LATEST" "$ZH_LRS" <<'EOF'
import json, os, sys
R, out, size, steps, latest, lrs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6].split()
def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
rows = [json.loads(l) for l in open(f"{R}/pretrain/metrics.jsonl")] if os.path.exists(f"{R}/pretrain/metrics.jsonl") else []
evals = [r for r in rows if "mlm_accuracy" in r]
args = load(f"{R}/pretrain/run_args.json") or {}
cfg = load(f"{R}/pretrain/config.json") or {}
pre = {"size": size, "steps_planned": steps, "checkpoint": latest, "steps_done": int(latest.split("-")[-1]),
       "batch_size": args.get("batch_size"), "seq_len": args.get("seq_len"), "lr": args.get("lr"),
       "precision": args.get("precision"), "vocab_size": cfg.get("vocab_size"),
       "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
       "last_tokens_per_s": rows[-1]["tokens_per_s"] if rows else None,
       "final_train_mlm_loss": rows[-1]["mlm_loss"] if rows else None,
       "heldout_mlm_accuracy": evals[-1]["mlm_accuracy"] if evals else None,
       "heldout_nsp_accuracy": evals[-1].get("nsp_accuracy") if evals else None,
       "heldout_curve": [(r["step"], round(r["mlm_accuracy"], 4)) for r in evals]}
arms = []
for lr in lrs:
    p, r = load(f"{R}/ft-pretrained-{lr}/metrics.json"), load(f"{R}/ft-random-{lr}/metrics.json")
    row = {"lr": lr}
    for name, m in (("pretrained", p), ("random", r)):
        if m:
            row[name] = {"dev_accuracy": m["dev"]["accuracy"], "best_epoch": m["best_epoch"],
                         "epoch_accuracies": [h["accuracy"] for h in m["history"]],
                         "train_seconds": m["train_seconds"], "device": m.get("device_name"),
                         "precision": m.get("precision")}
    if p and r:
        row["difference"] = round(p["dev"]["accuracy"] - r["dev"]["accuracy"], 4)
    arms.append(row)
ab = load(f"{R}/ft-transformers/metrics.json")
res = {"pretraining": pre, "finetune": arms}
lines = ["# zh two-stage check: pretrained vs random init on sentiment_zh", "",
         f"Pretraining: {size} ({pre['hidden_size']} hidden, {pre['num_hidden_layers']} layers, vocab "
         f"{pre['vocab_size']}), character level, seq {pre['seq_len']}, batch {pre['batch_size']}, lr {pre['lr']}, "
         f"{pre['precision']}; {pre['steps_done']} of {steps} steps; held-out MLM accuracy "
         f"{fmt(pre['heldout_mlm_accuracy'])}, NSP accuracy {fmt(pre['heldout_nsp_accuracy'])}; "
         f"last {fmt(pre['last_tokens_per_s'], '.0f')} real tokens/s.", "",
         "| fine-tune lr | pretrained dev acc | random-init dev acc | difference | epochs (pre / random) |",
         "|---|---|---|---|---|"]
for a in arms:
    pa, ra = a.get("pretrained", {}), a.get("random", {})
    lines.append(f"| {a['lr']} | {pa.get('dev_accuracy', '-')} | {ra.get('dev_accuracy', '-')} | "
                 f"{a.get('difference', '-')} | {pa.get('epoch_accuracies', '-')} / {ra.get('epoch_accuracies', '-')} |")
done = [a for a in arms if "difference" in a]
if done:
    bp = max(a["pretrained"]["dev_accuracy"] for a in done)
    br = max(a["random"]["dev_accuracy"] for a in done)
    res["best_of_grid"] = {"pretrained": bp, "random": br, "difference": round(bp - br, 4)}
    lines += ["", f"Best over the same lr grid, each arm: pretrained {bp:.4f}, random {br:.4f}, "
                  f"difference {bp - br:+.4f} (dev accuracy of the best epoch; the dev set also picks the "
                  f"epoch and the lr, alike for both arms)."]
if ab and arms and arms[0].get("pretrained"):
    fb_s = arms[0]["pretrained"]["train_seconds"]
    res["transformers_arm"] = {"lr": lrs[0], "dev_accuracy": ab["dev"]["accuracy"], "train_seconds": ab["train_seconds"],
                               "speedup_vs_transformers": round(ab["train_seconds"] / max(fb_s, 1e-9), 3)}
    lines += ["", f"Same fine-tuning on transformers (pretrained, lr {lrs[0]}): dev accuracy "
                  f"{ab['dev']['accuracy']:.4f}, {ab['train_seconds']} s of training vs fastbert {fb_s} s "
                  f"(ratio {ab['train_seconds'] / max(fb_s, 1e-9):.2f})."]
if arms:
    lines += ["", f"Fine-tuning: classify, {arms[0].get('pretrained', arms[0].get('random', {})).get('device', '?')}; "
                  "same seed, epochs, batch, max length 128 and lr for both arms; the random arm keeps the "
                  "pretrained run's config and tokenizer (fastbert finetune --random-init)."]
else:
    lines += ["", "No fine-tuning in this run (ZH_LRS empty)."]
json.dump(res, open(f"{out}/zh_summary.json", "w"), indent=1)
open(f"{out}/zh_summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

FT=(--task classify --model "$MODEL" --train "$ZH_DATA/train.jsonl" --dev "$ZH_DATA/dev.jsonl"
    --epochs "$ZH_FT_EPOCHS" --batch-size "$ZH_FT_BATCH" --max-length 128 --seed 42
    --device "$ZH_DEVICE" --no-progress)
[ -n "$ZH_MAX_TRAIN" ] && FT+=(--max-train-examples "$ZH_MAX_TRAIN")
[ -n "$ZH_MAX_EVAL" ] && FT+=(--max-eval-examples "$ZH_MAX_EVAL")
for lr in $ZH_LRS; do
  step "ft-pretrained-$lr" "$T_FT" "${FB[@]}" finetune "${FT[@]}" --lr "$lr" --out "$R/ft-pretrained-$lr"
  step "ft-random-$lr" "$T_FT" "${FB[@]}" finetune "${FT[@]}" --lr "$lr" --random-init --out "$R/ft-random-$lr"
  summary > /dev/null 2>&1
done
# (d) optional: the first pretrained fine-tuning again on transformers, for a GPU speed ratio
if [ "${ZH_AB:-0}" = 1 ] && [ -n "${ZH_LRS// /}" ]; then
  set -- $ZH_LRS
  step ft-transformers "$T_FT" "${FB[@]}" finetune "${FT[@]}" --lr "$1" --impl transformers --out "$R/ft-transformers"
fi
echo "=== steps"; cat "$R/logs/steps.txt"
echo "=== summary"; summary || echo "summary failed"
bundle
[ "${ZH_KEEP:-0}" = 1 ] && echo "run folders kept in $R" || rm -rf "$R"
