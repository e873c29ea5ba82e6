#!/usr/bin/env bash
# The GPU measurements of issue 4, in one device call (about 7 minutes on one H100):
#   1. the packed (variable-length) encoder against the padded one on HuBERT-Large, on the GPU;
#   2. asr.bench: transformers' Trainer with the model card's recipe, our path with the card's batch of 4, and our
#      best configuration (one process, so the ratios compare runs of the same process);
#   3. asr.evaluate: decoding throughput, the card's eval batching against our fast settings;
#   4. asr.bench: the best configuration with one switch changed per row (ablations), and a sync count;
#   5. asr.data.bench: loader throughput per worker on 16 cores, if time is left.
# All arms use random-init HuBERT-Large (conf/model/hubert_large.yaml's architecture, no download) on 8 h of
# synthetic 16 kHz FLAC with LibriSpeech train-clean-100's duration profile.
#
# Run scripts/gpu_wheels.sh here first, then from the repo root with the device tool: command
# "bash scripts/gpu_bench.sh", carry [".whl"] (the wheels of
# hydra-core, omegaconf, antlr4-python3-runtime, soundfile, cffi, pycparser, ... that the GPU image lacks).
# Results: $OUT/log.txt, $OUT/bench_main.json, $OUT/bench_ablation.json, $OUT/evaluate_*.json,
# $OUT/profile-best.txt, $OUT/packed_check.txt, $OUT/data_loader.json. BUDGET (seconds, default 540) caps the whole script: each stage
# gets at most what is left, so a hang cannot eat the session's device time. EXTRA (overrides appended to every
# asr.bench, asr.evaluate and asr.data.bench command), BENCH_EXTRA (asr.bench only), BEST and CORPUS are for a dry
# run on CPU with a tiny model (see docs/performance.md).
set -euo pipefail
export OUT=${OUT:-/tmp/gpu-bench-out}
BUDGET=${BUDGET:-540}
EXTRA=${EXTRA:-}
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ASR_CACHE=${ASR_CACHE:-/tmp/asr-cache}
RUNS=/tmp/asr-runs
mkdir -p "$RUNS"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() {  # stage NAME MAX_SECONDS COMMAND...: run with a timeout of min(MAX, time left - 10); never abort the script
  local name=$1 max=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 10 < max ? limit - 10 : max ))
  if (( limit < 20 )); then echo "### $name: skipped, ${limit}s left"; return 0; fi
  echo "### $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  local rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" || rc=$?
  echo "### $name: exit $rc after $(( $(date +%s) - START ))s"
  return 0
}

if [[ -z "${SKIP_WHEELS:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "### wheel install failed"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 - <<'EOF' || true
import os, torch, transformers, lightning, hydra, soundfile
print(f"torch {torch.__version__} cuda {torch.version.cuda} | transformers {transformers.__version__} | "
      f"lightning {lightning.__version__} | hydra {hydra.__version__} | soundfile {soundfile.__version__} | "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'} | {os.cpu_count()} CPUs")
EOF

# 1. Packed vs padded HuBERT-Large on the GPU: logits (bf16 flash varlen and the fp32 fallback) and a train step.
stage packed_check 90 python3 - <<'EOF'
import os, sys, torch
if not torch.cuda.is_available():
    sys.exit("no GPU: packed check skipped")
from asr.bench import ARCHITECTURES
from asr.data.text import CharTokenizer
from asr.model import SpeechRecognizer

out = []
torch.manual_seed(0)
config = {**ARCHITECTURES["facebook/hubert-large-ll60k"], "attention_dropout": 0.0, "layerdrop": 0.0,
          "hidden_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0, "final_dropout": 0.0,
          "mask_time_prob": 0.05}
with torch.device("cuda"):
    module = SpeechRecognizer(tokenizer=CharTokenizer(), optimizer=None, config=config, packed=True).eval()
lengths = [16000 * 14, 16000 * 9 + 123, 16000 * 3]
audio = torch.zeros(3, max(lengths), device="cuda")
mask = torch.zeros(3, max(lengths), dtype=torch.bool, device="cuda")
for k, n in enumerate(lengths):
    audio[k, :n], mask[k, :n] = torch.randn(n, device="cuda"), True
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
for name, dtype in (("bf16 autocast (flash varlen)", torch.bfloat16), ("fp32 (per-utterance SDPA)", None)):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        packed, frames = module(audio, mask)
        padded = module.backbone(audio, attention_mask=mask).logits
    diffs = [(packed[k, :n].float().log_softmax(-1) - padded[k, :n].float().log_softmax(-1)).abs().max().item()
             for k, n in enumerate(frames.tolist())]
    out.append(f"{name}: max |log-prob difference| per utterance {['%.2e' % d for d in diffs]}")
module.train()
batch = {"labels": torch.randint(5, 32, (3, 40), device="cuda"), "label_lengths": torch.tensor([40, 30, 20], device="cuda")}
with torch.autocast("cuda", dtype=torch.bfloat16):
    logits, frames = module(audio, mask)
    loss = module.ctc_loss(logits, frames, batch)
loss.backward()
norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], 1e9)
out.append(f"bf16 packed train step: loss {loss.item():.3f}, grad norm {norm.item():.3f} (finite: {bool(torch.isfinite(norm))})")
print("\n".join(out))
open(os.path.join(os.environ["OUT"], "packed_check.txt"), "w").write("\n".join(out) + "\n")
EOF

BEST=${BEST:-"trainer.precision=bf16-mixed data.batch_size=null data.max_batch_seconds=800 optimizer.fused=true model.packed=true model.compile=layers data.num_workers=8"}

# 2. The headline: HF Trainer (card recipe) vs ours with the card's batch of 4 (16-mixed, our default switches) vs
# our best without and with torch.compile.
stage bench_main 240 python3 -m asr.bench hydra.run.dir=$RUNS/main bench.baseline=hf_trainer \
  bench.warmup_steps=6 bench.steps=20 bench.hf.num_workers=6 data.batch_size=4 data.num_workers=6 \
  "+bench.variants.best_eager=\"$BEST model.compile=null\"" "+bench.variants.best=\"$BEST bench.profile_steps=2\"" \
  $EXTRA $BENCH_EXTRA
cp $RUNS/main/bench.json "$OUT/bench_main.json" 2>/dev/null || true
cp $RUNS/main/profile-best.txt "$OUT/profile-best.txt" 2>/dev/null || true

# 3. Decoding throughput on the 8 h corpus: the card's eval batching (8 utterances, fp16, padded) and ours.
CORPUS=${CORPUS:-$ASR_CACHE/bench/h8-t0-s0-x1}
EVAL="evaluate.random_init=true data.root=$CORPUS data.test_splits=[train-clean-100] evaluate.progress_bar=false"
# shellcheck disable=SC2086
stage evaluate_card 75 python3 -m asr.evaluate hydra.run.dir=$RUNS/eval_card $EVAL data.eval_batch_size=8 \
  data.num_workers=6 $EXTRA
cp $RUNS/eval_card/evaluate.json "$OUT/evaluate_card.json" 2>/dev/null || true
# shellcheck disable=SC2086
stage evaluate_fast 75 python3 -m asr.evaluate hydra.run.dir=$RUNS/eval_fast $EVAL data.eval_batch_size=null \
  data.eval_max_batch_seconds=1600 trainer.precision=bf16-mixed model.packed=true data.num_workers=8 $EXTRA
cp $RUNS/eval_fast/evaluate.json "$OUT/evaluate_fast.json" 2>/dev/null || true

# 4. Ablations (they get the time that is left, less a minute for stage 5): the best configuration ("ours" here), then one switch changed per row.
# shellcheck disable=SC2086
stage bench_ablation $(( $(left) - 75 < 300 ? $(left) - 75 : 300 )) python3 -m asr.bench hydra.run.dir=$RUNS/ablation bench.warmup_steps=4 bench.steps=10 $BEST \
  '+bench.variants.no_compile="model.compile=null"' \
  '+bench.variants.padded_sdpa="model.packed=false"' \
  '+bench.variants.sync_count="bench.sync_debug=true bench.steps=4"' \
  '+bench.variants.sync_count_padded="bench.sync_debug=true bench.steps=4 model.packed=false model.device_specaugment=false model.sync_free_logging=false"' \
  '+bench.variants.host_specaugment="model.device_specaugment=false"' \
  '+bench.variants.per_step_logging="model.sync_free_logging=false"' \
  '+bench.variants.unfused_adamw="optimizer.fused=null"' \
  '+bench.variants.fp16="trainer.precision=16-mixed optimizer.fused=null"' \
  '+bench.variants.workers_2="data.num_workers=2"' \
  '+bench.variants.batch_1200s="data.max_batch_seconds=1200"' $EXTRA $BENCH_EXTRA
cp $RUNS/ablation/bench.json "$OUT/bench_ablation.json" 2>/dev/null || true

# 5. The data loader on 16 cores (issue 3's per-worker target; the 2-core CI machine cannot show it): the same
# FLAC files, 200 s batches, against plain decoding in one loop.
# shellcheck disable=SC2086
stage data_loader 50 python3 -m asr.data.bench --workers 0,4,8 --seconds 4 --rounds 2 --long-files 0 \
  --synthetic-hours 10 --json "$OUT/data_loader.json" data.root=$CORPUS data/source=folder \
  "data.train_splits=[train-clean-100]" "data.val_splits=[]" "data.test_splits=[]" data.batch_size=null \
  data.max_batch_seconds=200 $EXTRA

python3 - <<'EOF' || true
import json, os
out = os.environ["OUT"]
for name in ("bench_main", "bench_ablation"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"{name}: no results"); continue
    arms = json.load(open(path))["arms"]
    print(f"\n{name}")
    for arm, r in arms.items():
        if "error" in r:
            print(f"  {arm:<20} FAILED {r['error'][:150]}"); continue
        print(f"  {arm:<20} {r['audio_seconds_per_second']:8.1f} audio-s/s  step {r['step_time_ms']:7.1f} ms  "
              f"{r['audio_seconds_per_step']:6.1f} s/step  peak {r.get('peak_memory_gib', 0):5.1f} GiB  "
              f"MFU {100 * (r.get('mfu') or 0):4.1f}%  x HF {r.get('ratio_to_hf_trainer') or 0:5.2f}"
              + (f"  syncs/step {r['syncs_per_step']:.1f} {r.get('sync_sites')}" if "syncs_per_step" in r else ""))
for name in ("evaluate_card", "evaluate_fast"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        r = json.load(open(path))
        print(f"{name}: {r['audio_seconds_per_second']:.0f} audio-s/s "
              f"({r.get('audio_seconds_per_second_after_warmup', 0):.0f} after warm-up), WER {r['wer']}")
path = os.path.join(out, "data_loader.json")
if os.path.exists(path):
    loader = json.load(open(path))["loader"]["corpus"]
    print("data loader, 200 s batches, against plain decoding: " + ", ".join(
        f"{k} {v['ratio']:.2f} ({v['per_worker']:.2f} per worker)" for k, v in loader.items() if k.startswith("workers=")))
EOF
echo "### done in $(( $(date +%s) - START ))s"
