#!/usr/bin/env bash
# Issue 15's GPU checks as one command for the device tool (no GPU session has run it yet):
#   here:  bash scripts/device_prepare.sh
#   then:  run(command="bash scripts/device_checks.sh", carry=[".device"], timeout_s=580)
# or only some steps: bash scripts/device_checks.sh bench teachers. The steps, each under its own
# time limit (seconds; a step that runs out gets SIGTERM, which kd answers by saving its state):
#   test      60   the CUDA-only tests (pytest -m cuda): a stopped GPU run resumes bit for bit; dropout on CUDA
#   bench     100  scripts/bench.py on the GPU in fp32 and in bf16: seconds per epoch, their ratio
#   parity    140  scripts/precision_parity.py on the GPU: test errors of 3 seeds, fp32 against bf16
#                  (jobs 6 at a time, so its seconds are not timings: bench's are)
#   teachers  240  kd train-teacher -m seed=0,1,2 (the default recipe), 3 jobs side by side
# What comes back under $OUT: summary.txt (each step's exit code, time and last lines),
# results.tgz (every run's metrics.json, reports and logs), bench-fp32.json, bench-bf16.json and
# each teacher's checkpoint.pt as teacher-seed<k>.pt.
# A rehearsal on this CPU machine: KD_SMOKE=1 OUT=/tmp/device-out bash scripts/device_checks.sh
# (device cpu, 1,000 images, 1 epoch, 3x the time limits: it checks the script, not the numbers).
# Python runs with -P: the repo's own kd_cli folder (no conf/ inside) must not shadow the install.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device}
WORK=/tmp/kd-device
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
device=cuda smoke_kd="" smoke_bench="" scale=1
if [ -n "${KD_SMOKE:-}" ]; then
    device=cpu smoke_kd="data.train_limit=1000 epochs=1" smoke_bench="--limit 1000 --repeats 1" scale=3
fi

# kd and its Hydra packages beside the machine's own torch; MNIST unpacked where kd reads it
python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .device/wheels/*.whl || exit 1
export PYTHONPATH="$WORK/site" PATH="$WORK/site/bin:$PATH" KD_DATA_ROOT="$WORK/data"
mkdir -p "$WORK/data/MNIST/raw"
for f in .device/mnist/*.gz; do gunzip -c "$f" > "$WORK/data/MNIST/raw/$(basename "$f" .gz)"; done
{ date -u; nvidia-smi -L 2>&1; python3 -P -c "import torch, kd_cli; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'kd_cli from', kd_cli.__file__)"; } > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log it, note the outcome
    local name=$1 limit=$(($2 * scale)) t0=$SECONDS rc
    shift 2
    timeout -s TERM -k 30 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    { echo; echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit): $*"; tail -n 4 "$WORK/$name.log"; } >> "$OUT/summary.txt"
}

for s in ${*:-test bench parity teachers}; do
    case $s in
    test) step test 60 python3 -P -m pytest -q -m cuda tests/test_resume.py tests/test_models.py ;;
    bench)
        step bench-fp32 50 python3 -P scripts/bench.py --device $device $smoke_bench --json "$OUT/bench-fp32.json"
        step bench-bf16 50 python3 -P scripts/bench.py --device $device $smoke_bench --precision bf16 --json "$OUT/bench-bf16.json" ;;
    parity) step parity 140 python3 -P scripts/precision_parity.py --out "$WORK/precision" \
            --extra "device=$device hydra/launcher=joblib hydra.launcher.n_jobs=6 $smoke_kd" ;;
    teachers)
        step teachers 240 kd train-teacher -m seed=0,1,2 device=$device hydra/launcher=joblib hydra.launcher.n_jobs=3 \
            $smoke_kd hydra.sweep.dir="$WORK/teachers"
        step teachers-report 30 kd report "$WORK/teachers"
        for ckpt in "$WORK"/teachers/*/checkpoint.pt; do  # job folders: <num>_<overrides>, seed=<k> among them
            [ -f "$ckpt" ] && cp "$ckpt" "$OUT/teacher-seed$(dirname "$ckpt" | sed 's/.*seed=\([0-9]*\).*/\1/').pt"
        done ;;
    *) echo "unknown step $s (test, bench, parity, teachers)" >> "$OUT/summary.txt" ;;
    esac
done
tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' --exclude=site --exclude=data .
cat "$OUT/summary.txt"
