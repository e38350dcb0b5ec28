# Sourced by every scripts/gpu/*.sh: the environment of a GPU call on the device machine.
# FlashAttention-4 travels as wheel parts in two carry folders (.fa4/1, .fa4/2: scripts/fa4_wheels.sh
# download); each call stashes the folders it carries in /tmp/fa4parts, which lives as long as the
# machine stays warm, and installs into /tmp/fa4site once every part is there.
set -uo pipefail
export OUT=${OUT:-gpu-out} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$OUT"
export FA4_PARTS=/tmp/fa4parts FA4_SITE=/tmp/fa4site
# Compiled kernels (Triton, Inductor, FA4's CuTe) persist in attnbench's cache directory
# (attnbench.cache.compiler_env), reused by every process and by later calls on a warm machine;
# a folder .gpucache/ carried into the call (scripts/gpu/cache.sh: pack there, unpack here) seeds it.
if [ -f .gpucache/gpucache.tgz ]; then mkdir -p ~/.cache && tar -C ~/.cache -xzkf .gpucache/gpucache.tgz 2>/dev/null; fi
for folder in .fa4/*/; do
    [ -f "$folder/PARTS.sha256" ] && scripts/fa4_wheels.sh stash "$folder"
done
if [ ! -d "$FA4_SITE/flash_attn" ] && [ -f "$FA4_PARTS/PARTS.sha256" ]; then
    scripts/fa4_wheels.sh install "$FA4_SITE" >"$OUT/fa4_install.log" 2>&1 || true
    tail -n 3 "$OUT/fa4_install.log"
fi
if [ -d "$FA4_SITE/flash_attn" ]; then
    eval "$(scripts/fa4_wheels.sh env "$FA4_SITE")"
    echo "FA4: installed in $FA4_SITE"
else
    echo "FA4: NOT installed (carry .fa4/1 in one call and .fa4/2 in the next, within 30 s)"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
rm -f "$OUT/pip.log"
# the compilers' settings `attnbench` gives its processes, for the scripts that run python directly
eval "$(python3 -c "from attnbench.cache import compiler_env
for k, v in compiler_env('cuda').items(): print(f'export {k}={v}')")"
