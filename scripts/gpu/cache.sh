#!/usr/bin/env bash
# Carry compiled kernels from one GPU session to the next (they persist on a warm machine only).
#   on the GPU host:  scripts/gpu/cache.sh pack      -> $OUT/gpucache.tgz: FA4's CuTe cache (a few MB;
#                     Triton's cache is hundreds of MB, over the 64 MiB a call carries, so it stays)
#   here:             scripts/gpu/cache.sh unpack FILE -> .gpucache/attnbench/compiled/ (git-ignored);
#                     carry ".gpucache" in the next call and scripts/gpu/env.sh copies it into place.
# FA4 keys its cache by its sources, Python and cutlass versions, so a stale carried cache is ignored.
set -euo pipefail
case "${1:-}" in
    pack)
        root=${XDG_CACHE_HOME:-$HOME/.cache}
        tar -C "$root" -czf "${OUT:?}/gpucache.tgz" attnbench/compiled/cute
        du -h "$OUT/gpucache.tgz" ;;
    unpack)
        mkdir -p .gpucache
        tar -C .gpucache -xzf "${2:?archive}"
        du -sh .gpucache ;;
    *) echo "usage: scripts/gpu/cache.sh pack | unpack FILE" >&2; exit 2 ;;
esac
