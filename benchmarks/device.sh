#!/usr/bin/env bash
# The GPU check of issue 30, one prepared script for the device machine (an H100/H200 with PyTorch and no
# package registry; /work/.library/device/README.md), sized for one 10-minute call:
#   1. bench-speed on nnunet-3d-fullres (every method), then --against-nnunet (medadapt's step against
#      nnU-Net's, full and dgst);
#   2. a short fp16 finetune (dgst, 5 shots) from the built-in foundation on a synthetic target cohort;
#   3. the rest of the call: the unfinished grid whose foundation is committed (fseft-cpu, then medseqft), its
#      new cell records brought back as a tarball to unpack under benchmarks/ and commit.
#
#   bash benchmarks/device.sh fetch    # here: the wheels of benchmarks/device-wheels.txt into .whl/ (ignored)
#   bash benchmarks/device.sh check    # here, on the CPU: a fresh venv holding only what the device image has,
#                                      # the wheels installed --no-deps, every step at a tiny size
#   bash benchmarks/device.sh run      # there: device run, carry [".whl"]; results under $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/benchmarks/device-wheels.txt
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# what the device image holds that medadapt uses (KINDS.md), installed into the check's venv from the index
IMAGE="numpy scipy matplotlib pyyaml tqdm scikit-image scikit-learn pandas seaborn einops tifffile requests
       pillow packaging msgpack httpx rich threadpoolctl typing-extensions py-cpuinfo timm"

fetch() {  # the wheel list for Python $2 (x.y) into folder $1
    local dir=$1 version=$2
    mkdir -p "$dir"
    grep -v '^#' "$WHEELS" | grep . | while read -r spec; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
            $PLATFORMS --platform any -d "$dir" "$spec" 2>/dev/null \
            || python3 -m pip wheel -q --no-deps -w "$dir" "$spec"  # a pure-Python package published as sdist only
    done
}

install() {  # the wheels of folder $3 and medadapt itself, --no-deps, into $1; prints the PYTHONPATH to use
    local site=$1 py=$2 wheels=$3
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl >&2
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" . >&2
    echo "$site:$ROOT/benchmarks/device-stubs"
}

steps() {  # $1 python, $2 out folder, $3 size: full (the device) or tiny (the check)
    local py=$1 out=$2 size=$3 preset=nnunet-3d-fullres iters=20 cases=10 epochs=2 its=25
    if [ "$size" = tiny ]; then preset=cpu-tiny; iters=1; cases=6; epochs=1; its=1; fi
    "$py" -c "import torch, platform; print(platform.python_version(), torch.__version__, torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee "$out/env.txt"
    command -v nvidia-smi >/dev/null && nvidia-smi >> "$out/env.txt" || true
    "$py" -m medadapt bench-speed --preset $preset --iterations $iters --warmup 1 --json > "$out/speed.json"
    "$py" -m medadapt bench-speed --preset $preset --iterations $iters --warmup 1 --json --against-nnunet \
        > "$out/speed-nnunet.json"
    local tmp; tmp=$(mktemp -d)
    "$py" -m medadapt synth hn-center-b --out "$tmp/tgt" --cases $cases --downsample 1 2 2 --quiet
    "$py" -m medadapt finetune --model synth-hn-lymph-nodes --data "$tmp/tgt" --out "$tmp/ft" --method dgst \
        --shots 4 --epochs $epochs --iterations-per-epoch $its --precision fp16 --quiet
    cp "$tmp/ft/run.json" "$out/finetune-fp16.json"
}

grid() {  # the first unfinished grid with a committed foundation, until $2 seconds from now; new records to $1
    local py=$1 out=$2 seconds=$3 g
    for g in fseft-cpu medseqft; do
        [ -f "benchmarks/$g/grid.json" ] && git ls-files --error-unmatch "benchmarks/$g/grid.json" >/dev/null 2>&1 \
            || continue
        "$py" -m medadapt bench $g --workdir "benchmarks/$g" --list | tail -1 | grep -q "^\([0-9]*\)/\1 " && continue
        timeout --signal=INT "$seconds" "$py" -m medadapt bench $g --workdir "benchmarks/$g" --quiet || true
        git status --porcelain --untracked-files=all "benchmarks/$g" | awk '{print $2}' > "$out/new-records.txt"
        [ -s "$out/new-records.txt" ] && tar czf "$out/records-$g.tgz" -T "$out/new-records.txt"
        return 0
    done
    echo "no unfinished grid with a committed foundation" > "$out/new-records.txt"
}

case "${1:-}" in
fetch)  # the device's Python is 3.12 (KINDS.md)
    fetch .whl 3.12
    du -sh .whl ;;
check)  # the same list for this machine's Python, into a fresh venv that holds only the image's packages
    [ -x .devenv/bin/python ] || python3 -m venv .devenv
    .devenv/bin/pip install -q "torch==2.13.0" $IMAGE
    wheels=$(mktemp -d)
    fetch "$wheels" "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    site=$(mktemp -d)
    export PYTHONPATH; PYTHONPATH=$(install "$site" .devenv/bin/python "$wheels")
    out=$(mktemp -d)
    steps .devenv/bin/python "$out" tiny
    echo "device.sh check: every step ran with only the image's packages and the carried wheels ($out)" ;;
run)
    start=$(date +%s)
    out=${OUT:?run it through the device tool, which sets OUT}
    export PYTHONPATH; PYTHONPATH=$(install /tmp/site python3 .whl)
    PYTHONUNBUFFERED=1 steps python3 "$out" full 2>&1 | tee "$out/steps.log"
    left=$(( 560 - ($(date +%s) - start) ))
    [ "$left" -gt 60 ] && grid python3 "$out" "$left" ;;
*)
    sed -n '2,15p' "$0"; exit 2 ;;
esac
