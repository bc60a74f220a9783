#!/usr/bin/env bash
# GPU check for a lent GPU machine (one or more CUDA GPUs): one short script, no network, no pip installs.
# It runs on the machine's torch as it is (the lent machines: PyTorch 2.11 + CUDA 13).
#
#   1. the CUDA-only tests:      python3 -m pytest -m cuda tests/unit tests/e2e   (the quick in-process ones
#                                first, so a cut-off loses the slow end-to-end ones; tests/e2e/test_cuda.py, the
#                                trainer in an NCCL group of one; the fused-SGD skipped-step test; the stream
#                                pipeline's --decode gpu (nvjpeg) against CPU decoding and a --decode gpu run)
#   2. unpack CIFAR-10 (JPEG):   .gpu_data/cifar10-jpeg.tar.gz -> .gpu_data/cifar10-jpeg
#   3. the fast recipe, timed:   python3 train.py --config configs/fast94.toml --dataset imagefolder ...
#   4. airbench's own code:     benchmarks/airbench_reference.py (the `airbench` 0.1.8 package, unchanged,
#                                fp16) on the same data: the accuracy the fast recipe is measured against
#   5. a table: test / result / seconds, then the recipe's and airbench's accuracy, train_seconds, images/s
#
# Time budget, worst case (every step at its limit, plus the seconds `timeout -k` allows to stop):
#   all (default): preflight 50, tests 270+15, unpack 30, recipe 100+10, airbench 70+10, table 12 = 567 s
#   tests:         preflight 50, tests 480+15, table 12                                           = 557 s
#   train:         preflight 50, unpack 30, recipe 250+10, airbench 200+10, table 12              = 562 s
# so one call of 600 s holds either the whole check or one part. The parts are the two-call way when a
# step needs more than its share: `gpu_check.sh tests`, then `gpu_check.sh train` (steps 2-4); each
# keeps its results in runs/gpu_check, and the table shows both parts' results.
# A pytest cut off at its limit fails the check (its JUnit file then lists only the tests that ran).
#
# Output: logs, the JUnit XML, the recipe's summary.json, airbench.json and gpu_check.json in
# runs/gpu_check, copied to $OUT when OUT is set.
#
# On a GPU machine that gets a copy of the working tree (not the shared data beside it):
#   here, once per checkout:   bash tools/gpu_check.sh --prepare
#       (copies ../shared/data/cifar10-jpeg.tar.gz, 19 MB, into .gpu_data/, downloads the airbench
#        0.1.8 source (pure Python) beside it, and git-ignores that folder through .git/info/exclude, so
#        it travels only when carried and is never committed)
#   there:                     bash tools/gpu_check.sh [all|tests|train]   (with .gpu_data carried)
#   and read the table at the end of its output.
# Without .gpu_data it still runs the tests and says the recipe was skipped for want of data.
# A dry run of the script's steps on a machine without a GPU (the CUDA tests then skip):
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_RECIPE_ARGS="--max-steps 2 --tta 0" GPU_CHECK_AIRBENCH_ARGS="--epochs 0.05" \
#     PYTHON=.venv/bin/python bash tools/gpu_check.sh
#
# Python: the machine's python3 with torch + CUDA, pytest, pytest-timeout, torchvision, tqdm, pyyaml,
# matplotlib, pillow (wandb is not needed: --wandb disabled never imports it). PYTHON=... picks another.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="$root/.gpu_data/cifar10-jpeg.tar.gz"

if [ "${1:-}" = "--prepare" ]; then
  src="${CIFAR_ARCHIVE:-$root/../shared/data/cifar10-jpeg.tar.gz}"
  [ -f "$src" ] || { echo "gpu_check --prepare: $src not found" >&2; exit 2; }
  mkdir -p "$root/.gpu_data"
  cp -f "$src" "$archive" && chmod u+w "$archive"
  exclude="$(git -C "$root" rev-parse --git-path info/exclude 2>/dev/null || echo "$root/.git/info/exclude")"
  case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/.gpu_data/" "$exclude" 2>/dev/null || echo "/.gpu_data/" >> "$exclude"
  "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: airbench==0.1.8 -d "$root/.gpu_data" \
    && tar -xzf "$root/.gpu_data/airbench-0.1.8.tar.gz" -C "$root/.gpu_data" \
    || echo "gpu_check --prepare: airbench 0.1.8 not downloaded; step 4 will be skipped"
  echo "prepared: $archive ($(du -h "$archive" | cut -f1)); /.gpu_data/ is ignored via $exclude"
  echo 'now run bash tools/gpu_check.sh on the GPU machine, with .gpu_data copied along'
  exit 0
fi

part="${1:-all}"
case "$part" in all|tests|train) ;; *) echo "usage: gpu_check.sh [--prepare | all | tests | train]" >&2; exit 2 ;; esac
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }
if [ "$part" = all ]; then lim_tests=270 lim_recipe=100 lim_airbench=70; else lim_tests=480 lim_recipe=250 lim_airbench=200; fi

cd "$root"
PY="${PYTHON:-python3}"
out="$root/runs/gpu_check"  # kept between calls: `tests` and `train` each add their part
mkdir -p "$out"
if want tests; then rm -f "$out"/cuda_tests.* "$out"/tests.status; fi
if want train; then rm -f "$out"/fast94* "$out"/airbench.json "$out"/train.status; fi
data_dir="${GPU_CHECK_DATA_DIR:-$root/.gpu_data/cifar10-jpeg}"
runs="$(mktemp -d -t gpu_check_runs.XXXXXX)"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true PYTHONDONTWRITEBYTECODE=1
t_all=$(date +%s)

echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname), repo $root"
if ! timeout -k 5 45 "$PY" - <<'EOF'
import os
import sys
try:
    import torch
except Exception as e:
    print(f"gpu_check: {sys.executable} cannot import torch ({e}); this machine's python3 should hold it "
          "(/opt/torch/.venv/bin/python3): set PYTHON=... to one that does. Nothing can be pip-installed here.")
    sys.exit(3)
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}: NO GPU, dry run on the CPU (GPU_CHECK_ALLOW_CPU=1)")
    sys.exit(0)
if not torch.cuda.is_available():
    print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda={torch.version.cuda}); "
          "run this on the lent GPU machine")
    sys.exit(3)
p = torch.cuda.get_device_properties(0)
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}), "
      f"bf16 in hardware {torch.cuda.is_bf16_supported(including_emulation=False)}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
missing = []
for mod in ("pytest", "pytest_timeout", "torchvision", "yaml", "tqdm", "PIL", "matplotlib", "numpy"):
    try:
        __import__(mod)
    except Exception:
        missing.append(mod)
if missing:
    print(f"gpu_check: warning: not importable here: {', '.join(missing)} (install them, or bring "
          "them as wheels)")
EOF
then
  echo "gpu_check: ABORTED (no usable torch + CUDA)"; exit 3
fi
timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

# 1. the CUDA tests ------------------------------------------------------------------------------------
if want tests; then
  echo "== 1. CUDA tests: $PY -m pytest -m cuda tests/unit tests/e2e"
  t0=$(date +%s)
  # SIGINT at the limit: pytest stops like on Ctrl-C and still writes the JUnit XML of the tests it ran
  timeout -s INT -k 15 "$lim_tests" "$PY" -m pytest -m cuda tests/unit tests/e2e -q -ra -p no:cacheprovider --timeout 150 \
    --continue-on-collection-errors \
    --junitxml="$out/cuda_tests.xml" --basetemp="$runs/pytest" 2>&1 | tee "$out/cuda_tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
  tests_s=$(( $(date +%s) - t0 ))
  echo "   pytest exit $tests_rc after ${tests_s}s"
  echo "tests_rc=$tests_rc tests_s=$tests_s" > "$out/tests.status"
fi

if want train; then
  # 2. the data ---------------------------------------------------------------------------------------
  echo "== 2. CIFAR-10 JPEG -> $data_dir"
  data_ok=0
  t0=$(date +%s)
  if [ -d "$data_dir/train" ] && [ -d "$data_dir/test" ]; then
    data_ok=1; echo "   already there"
  elif [ -f "$archive" ]; then
    mkdir -p "$data_dir" && timeout 30 tar -xzf "$archive" -C "$data_dir" && [ -d "$data_dir/train" ] && data_ok=1
    echo "   unpacked $(find "$data_dir" -name '*.jpg' | wc -l) images in $(( $(date +%s) - t0 ))s"
  else
    echo "   NO DATA: $archive is missing (run 'bash tools/gpu_check.sh --prepare' here and carry .gpu_data)"
  fi
  unpack_s=$(( $(date +%s) - t0 ))

  # 3. the fast recipe, timed -------------------------------------------------------------------------
  recipe_rc=skipped
  recipe_ms=0
  if [ "$data_ok" = 1 ]; then
    echo "== 3. fast recipe: train.py --config configs/fast94.toml --dataset imagefolder --data-dir $data_dir"
    t0=$(date +%s%N)
    timeout -k 10 "$lim_recipe" "$PY" train.py --config configs/fast94.toml --dataset imagefolder --data-dir "$data_dir" \
      --wandb disabled --no-progress --out "$runs/fast94" ${GPU_CHECK_RECIPE_ARGS:-} 2>&1 | tee "$out/fast94.log" | tail -25
    recipe_rc=${PIPESTATUS[0]}
    recipe_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    cp "$runs/fast94/summary.json" "$out/fast94_summary.json" 2>/dev/null || true
  fi

  # 4. airbench's own code on the same data ----------------------------------------------------------
  airbench_rc=skipped
  airbench_src="$root/.gpu_data/airbench-0.1.8"
  if [ "$data_ok" = 1 ] && [ -d "$airbench_src/airbench" ]; then
    echo "== 4. airbench 0.1.8 train94 (unchanged) on $data_dir"
    PYTHONPATH="$airbench_src${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$lim_airbench" "$PY" benchmarks/airbench_reference.py \
      --data-dir "$data_dir" --cache-dir "$runs/airbench" --json "$out/airbench.json" ${GPU_CHECK_AIRBENCH_ARGS:-} 2>&1 | tail -5
    airbench_rc=${PIPESTATUS[0]}
  else
    echo "== 4. airbench reference skipped (no data, or no $airbench_src: run --prepare here)"
  fi
  echo "data_ok=$data_ok unpack_s=$unpack_s recipe_rc=$recipe_rc recipe_ms=$recipe_ms airbench_rc=$airbench_rc" \
    > "$out/train.status"
fi

# 5. the table (this call's parts, and an earlier call's other part) -----------------------------------
tests_rc=not-run tests_s=0 data_ok=0 unpack_s=0 recipe_rc=not-run recipe_ms=0 airbench_rc=not-run
for f in "$out/tests.status" "$out/train.status"; do
  # shellcheck disable=SC1090
  [ -f "$f" ] && . "$f"
done
timeout -k 2 10 "$PY" "$root/tools/gpu_check.py" --airbench "$out/airbench.json" --airbench-rc "$airbench_rc" \
  --junit "$out/cuda_tests.xml" --tests-rc "$tests_rc" --tests-seconds "$tests_s" \
  --unpack-seconds "$unpack_s" --data-ok "$data_ok" --recipe-rc "$recipe_rc" --recipe-ms "$recipe_ms" \
  --summary "$out/fast94_summary.json" --json "$out/gpu_check.json" --total-seconds "$(( $(date +%s) - t_all ))"
rc=$?
rm -rf "$runs"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -f "$out"/* "$OUT"/ 2>/dev/null; fi
exit $rc
