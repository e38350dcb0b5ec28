#!/usr/bin/env bash
# Carry compiled kernels from one GPU session to the next (they persist on a warm machine only).
#   on the GPU host:  scripts/gpu/cache.sh pack      -> $OUT/gpucache.tgz: FA4's CuTe cache (a few MB;
#                     Triton's cache is hundreds of MB, over the 64 MiB a call carries, so it stays)
#   here:             scripts/gpu/cache.sh unpack FILE -> .gpucache/gpucache.tgz (git-ignored, kept packed:
#                     4 MB against 14 MB unpacked, so it fits beside a .fa4 folder in one 64 MiB carry);
#                     carry ".gpucache" in the next call and scripts/gpu/env.sh unpacks it into place.
# FA4 keys its cache by its sources, Python and cutlass versions, so a stale carried cache is ignored.
set -euo pipefail
case "${1:-}" in
    pack)
        root=${XDG_CACHE_HOME:-$HOME/.cache}
        tar -C "$root" -czf "${OUT:?}/gpucache.tgz" attnbench/compiled/cute
        du -h "$OUT/gpucache.tgz" ;;
    unpack)
        rm -rf .gpucache && mkdir -p .gpucache
        cp "${2:?archive}" .gpucache/gpucache.tgz && chmod u+w .gpucache/gpucache.tgz
        du -sh .gpucache ;;
    *) echo "usage: scripts/gpu/cache.sh pack | unpack FILE" >&2; exit 2 ;;
esac
