#!/usr/bin/env bash
# Speed of all-layer LoRA against aletheia's layer selections, side by side, on one GPU.
#
#   scripts/gpu_bench.sh [OUT_DIR]            # default OUT_DIR: runs/gpu-bench-<date>-<time>
#
# Runs `aletheia-lora bench` on random weights with the real shapes of Llama-3.1-8B and then
# Qwen2.5-1.5B (bf16, batch 4 x 1024 tokens, LoRA r=16, top_pct 50, every arm with and
# without gradient checkpointing) and prints each markdown table. About 3-4 minutes on one
# H200 (the larger shape takes most of it); each shape writes OUT_DIR/<preset>/bench.{json,md,png}.
#
# Environment overrides (defaults in brackets):
#   PRESETS     shapes to run, space-separated      [llama-3.1-8b qwen2.5-1.5b]
#   PRESET      run this one shape only (wins over PRESETS)
#   NUM_LAYERS  build this many blocks per shape    [the published count]
#   BATCH_SIZE [4]  SEQ_LEN [1024]  STEPS [5]  WARMUP [2]  ROUNDS [3]  R [16]  TOP_PCT [50]
#   DTYPE       bf16 | fp16 | fp32                  [bf16 on a GPU, fp32 on a CPU]
#   CHECKPOINTING  both | on | off                  [both]
#   PYTHON      interpreter with torch/transformers/peft  [.venv/bin/python if present, else python3]
#   EXTRA_ARGS  more `aletheia-lora bench` flags, e.g. "--device cuda:1"
#
# On a CPU, for a quick check of the script itself:
#   PRESET=smollm2-135m NUM_LAYERS=4 SEQ_LEN=64 STEPS=2 scripts/gpu_bench.sh /tmp/bench-check
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

OUT="${1:-$ROOT/runs/gpu-bench-$(date +%Y%m%d-%H%M%S)}"
PRESETS="${PRESET:-${PRESETS:-llama-3.1-8b qwen2.5-1.5b}}"

"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}; " + (f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
      else "no GPU visible: running on the CPU (use small overrides, see the script header)"))
PY

for preset in $PRESETS; do
    args=(--random_init "$preset" --batch_size "${BATCH_SIZE:-4}" --seq_len "${SEQ_LEN:-1024}"
          --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" --rounds "${ROUNDS:-3}" --r "${R:-16}"
          --top_pct "${TOP_PCT:-50}" --gradient_checkpointing "${CHECKPOINTING:-both}"
          --output_dir "$OUT/$preset" --overwrite_output_dir)
    [[ -n "${NUM_LAYERS:-}" ]] && args+=(--num_layers "$NUM_LAYERS")
    [[ -n "${DTYPE:-}" ]] && args+=(--dtype "$DTYPE")
    # shellcheck disable=SC2206  # EXTRA_ARGS is meant to be split into words
    [[ -n "${EXTRA_ARGS:-}" ]] && args+=($EXTRA_ARGS)
    echo
    echo "=== $preset ==="
    start=$SECONDS
    "$PYTHON" -m aletheia_lora bench "${args[@]}"
    echo "($preset: $((SECONDS - start)) s)"
done

echo
echo "=== all tables ==="
for preset in $PRESETS; do
    echo
    cat "$OUT/$preset/bench.md"
done
