#!/usr/bin/env bash
# Everything that needs a GPU, in one run, within a time limit: the GPU benchmarks (BENCHMARKS.md's "On a GPU"),
# the tests that need CUDA with the parity tests on the GPU, then the bundled model's training: the CNN teacher,
# and three ViTs at once from it (the bundled recipe, a wider MLP, and no teacher for comparison).
#
#     bench/gpu.sh OUT [SECONDS] [DATA_DIR]
#
# OUT gets the logs, BENCHMARKS.md and one tarball of the trained models (each a Hub folder with its model card
# and training curve). SECONDS (default 560) bounds the whole run: the ViTs get what is left after the rest, and
# the tests run beside them. For a dry run without a GPU, TRAIN_ARGS="--subset 2000" and GPU_TESTS="tests/x.py"
# shrink the work.
set -u
out=$(realpath -m "${1:?usage: bench/gpu.sh OUT [SECONDS] [DATA_DIR]}")
budget=${2:-560}
data=${3:-/usr/share/datasets/fashion-mnist}
extra=${TRAIN_ARGS:-}
tests=${GPU_TESTS:-tests/test_runtime.py tests/test_parity.py tests/test_precision.py}
start=$(date +%s)
mkdir -p "$out" /tmp/vit-gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
left() { echo $((budget - ($(date +%s) - start))); }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, timm, transformers; print(torch.__version__, timm.__version__, transformers.__version__, torch.cuda.get_device_name(0))"

echo "== benchmarks ($(left) s left)"
timeout 150 python3 bench/bench.py --gpu >"$out/bench.log" 2>&1; echo "bench exit $?"
cp BENCHMARKS.md BENCHMARKS-gpu.json "$out/" 2>/dev/null

echo "== teacher ($(left) s left)"
# shellcheck disable=SC2086
python3 -m vit_demo train --epochs 0 --teacher-epochs 60 --minutes 1.25 --save-teacher /tmp/vit-gpu/teacher.pt \
    --data-dir "$data" $extra >"$out/teacher.log" 2>&1; echo "teacher exit $?"
grep -h "test accuracy" "$out/teacher.log"

minutes=$(python3 -c "print(round(max(0.5, ($(left) - 60) / 60), 2))")
echo "== three ViTs at once, $minutes min each, and the tests beside them ($(left) s left)"
pids=()
for spec in "bundled:" "mlp512:--mlp-dim 512" "noteacher:--teacher-epochs 0"; do
    name=${spec%%:*}
    teacher_arg="--teacher /tmp/vit-gpu/teacher.pt"
    [[ $name == noteacher ]] && teacher_arg=""
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=4 python3 -m vit_demo train ${spec#*:} $teacher_arg --minutes "$minutes" --data-dir "$data" $extra \
        --out "/tmp/vit-gpu/$name" >"$out/train-$name.log" 2>&1 &
    pids+=($!)
done
# shellcheck disable=SC2086
OMP_NUM_THREADS=8 timeout $(( $(left) > 90 ? $(left) - 30 : 60 )) python3 -m pytest -p no:cacheprovider -q -rs $tests >"$out/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$out/tests.log"
for pid in "${pids[@]}"; do wait "$pid"; echo "train exit $?"; done
grep -h "test accuracy" "$out"/train-*.log
(cd /tmp/vit-gpu && tar czf "$out/models.tar.gz" --exclude teacher.pt .)
echo "== done in $(( $(date +%s) - start )) s"
