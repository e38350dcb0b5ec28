#!/usr/bin/env bash
# FlashAttention-4's wheel set for a GPU host without network (CPython 3.12, manylinux x86_64).
#
# On a machine with network:
#   scripts/fa4_wheels.sh download DIR
#       pip-downloads the set into DIR/wheels, splits wheels over PART_MIB (default 45 MiB) into
#       parts, and packs parts and small wheels into carry folders DIR/carry/1, DIR/carry/2, ...
#       of at most BUNDLE_MIB (default 55 MiB) each, every folder with the manifests
#       (WHEELS.sha256 for whole wheels, PARTS.sha256 for parts). Carry one folder per call
#       where a copy is size-limited (the device tool: 64 MiB a call, tree included).
# On the GPU host:
#   scripts/fa4_wheels.sh stash FOLDER      copy a carried folder into $FA4_PARTS (/tmp/fa4parts)
#   scripts/fa4_wheels.sh install [TARGET]  reassemble and verify every wheel from $FA4_PARTS,
#       then pip install --no-index --no-deps --target TARGET (default /tmp/fa4site)
#   eval "$(scripts/fa4_wheels.sh env [TARGET])"   PYTHONPATH for it: TARGET and
#       TARGET/nvidia_cutlass_dsl/dsl_packages (pip --target does not run the package's .pth)
# The host must already have torch, einops, typing-extensions, cuda-bindings and protobuf (the
# CUDA image does); flash-attn-4 needs nothing else outside this set.
set -euo pipefail

WHEELS=(
    flash-attn-4==4.0.0b36
    nvidia-cutlass-dsl==4.8.1
    nvidia-cutlass-dsl-libs-base==4.8.1
    nvidia-cutlass-dsl-libs-core==4.8.1
    nvidia-cutlass-dsl-libs-cu13==4.8.1
    apache-tvm-ffi==0.1.15.post2
    torch-c-dlpack-ext==0.1.5
    quack-kernels==0.6.5
)
PART_MIB=${PART_MIB:-45}
BUNDLE_MIB=${BUNDLE_MIB:-55}
FA4_PARTS=${FA4_PARTS:-/tmp/fa4parts}
TARGET_DEFAULT=/tmp/fa4site
PYTHON=${PYTHON:-python3}

die() { echo "fa4_wheels: $*" >&2; exit 2; }

download() {
    local dir=${1:?usage: fa4_wheels.sh download DIR}
    mkdir -p "$dir/wheels"
    local platforms=()
    # pip matches manylinux_2_N exactly: offer the tags these wheels are published under
    for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir/wheels" "${WHEELS[@]}"
    [ "$(ls "$dir/wheels"/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || die "expected ${#WHEELS[@]} wheels in $dir/wheels"
    rm -rf "$dir/carry" "$dir/parts" && mkdir -p "$dir/parts"
    (cd "$dir/wheels" && sha256sum -- *.whl >"../parts/WHEELS.sha256")
    local limit=$((PART_MIB << 20))
    for whl in "$dir"/wheels/*.whl; do
        if [ "$(stat -c %s "$whl")" -gt "$limit" ]; then
            split -b "${PART_MIB}M" -d -a 2 "$whl" "$dir/parts/$(basename "$whl").part-"
        else
            cp "$whl" "$dir/parts/"
        fi
    done
    (cd "$dir/parts" && sha256sum -- *.part-* *.whl 2>/dev/null >PARTS.sha256)
    # pack the files, largest first, into folders of at most BUNDLE_MIB
    local bundle=1 used=0 cap=$((BUNDLE_MIB << 20))
    mkdir -p "$dir/carry/1"
    while read -r size name; do
        if [ $((used + size)) -gt "$cap" ] && [ "$used" -gt 0 ]; then
            bundle=$((bundle + 1)); used=0; mkdir -p "$dir/carry/$bundle"
        fi
        mv "$dir/parts/$name" "$dir/carry/$bundle/"
        used=$((used + size))
    done < <(cd "$dir/parts" && for f in *.part-* *.whl; do [ -e "$f" ] && echo "$(stat -c %s "$f") $f"; done | sort -rn)
    for b in "$dir"/carry/*/; do cp "$dir/parts/WHEELS.sha256" "$dir/parts/PARTS.sha256" "$b"; done
    rm -rf "$dir/parts"
    du -b -s "$dir/wheels" "$dir"/carry/* | awk '{printf "%10.1f MiB  %s\n", $1 / 1048576, $2}'
    echo "carry each folder of $dir/carry in its own call: scripts/fa4_wheels.sh stash FOLDER; then install"
}

stash() {
    local from=${1:?usage: fa4_wheels.sh stash FOLDER}
    [ -f "$from/PARTS.sha256" ] || die "$from: no PARTS.sha256 (not a carry folder of fa4_wheels.sh download)"
    mkdir -p "$FA4_PARTS"
    cp -f "$from"/* "$FA4_PARTS/"
    echo "stashed $(ls "$from" | grep -vc sha256) files from $from in $FA4_PARTS"
}

install() {
    local target=${1:-$TARGET_DEFAULT}
    [ -f "$FA4_PARTS/PARTS.sha256" ] || die "$FA4_PARTS: no PARTS.sha256: stash the carry folders first"
    local missing
    missing=$(cd "$FA4_PARTS" && awk '{print $2}' PARTS.sha256 | while read -r f; do [ -e "$f" ] || echo "$f"; done)
    [ -z "$missing" ] || die "parts not stashed yet (carry their folder and stash it): $(echo $missing)"
    (cd "$FA4_PARTS" && sha256sum --quiet -c PARTS.sha256) || die "a part in $FA4_PARTS fails its sha256"
    local whl_dir="$FA4_PARTS/whl"
    rm -rf "$whl_dir" && mkdir -p "$whl_dir"
    while read -r _ name; do
        if [ -e "$FA4_PARTS/$name" ]; then
            cp "$FA4_PARTS/$name" "$whl_dir/"
        else
            cat "$FA4_PARTS/$name".part-* >"$whl_dir/$name"
        fi
    done <"$FA4_PARTS/WHEELS.sha256"
    (cd "$whl_dir" && sha256sum --quiet -c "$FA4_PARTS/WHEELS.sha256") || die "a reassembled wheel fails its sha256"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
        "$whl_dir"/*.whl
    echo "installed $(ls "$whl_dir" | wc -l) wheels into $target"
    env_line "$target"
}

env_line() {
    local target=${1:-$TARGET_DEFAULT}
    echo "export PYTHONPATH=$target:$target/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    download) download "${2:-}" ;;
    stash) stash "${2:-}" ;;
    install) install "${2:-}" ;;
    env) env_line "${2:-}" ;;
    *) die "usage: fa4_wheels.sh download DIR | stash FOLDER | install [TARGET] | env [TARGET]" ;;
esac
