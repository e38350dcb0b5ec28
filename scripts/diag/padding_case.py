"""Replay the padding property's body on fixed specs and padding lengths (fifth session: local/flex
failed on fp16, GQA, D=64, Dv=192). Prints, per case, ok with the worst ratio, or the failure.

    python3 scripts/diag/padding_case.py [variant/impl] [spec indices, e.g. 0,2]
"""

import sys

import torch

from attnbench.properties.test_masking import check_padding_appended
from attnbench.registry import registry
from attnbench.spec import Spec

dev = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = [Spec(Hq=4, Hkv=2, Sq=1, D=64, Dv=192, dtype="float16", device=dev, window=(1, 0)),
         Spec(Hq=4, Hkv=2, Sq=1, D=64, Dv=64, dtype="float16", device=dev, window=(1, 0)),
         Spec(Hq=4, Hkv=4, Sq=1, D=64, Dv=192, dtype="float16", device=dev, window=(1, 0)),
         Spec(Hq=4, Hkv=2, Sq=1, D=64, Dv=192, dtype="float16", device=dev),
         Spec(Hq=4, Hkv=2, Sq=3, D=64, Dv=192, dtype="float16", device=dev, window=(1, 0))]


def main(argv: list[str]) -> None:
    names = argv[:1] or (["local/flex", "dense/flex"] if dev == "cuda" else ["local/flex_eager"])
    specs = [SPECS[int(i)] for i in argv[1].split(",")] if len(argv) > 1 else SPECS
    for name in names:
        impl = registry().get(name)
        for spec in specs:
            for P in (1, 2, 3, 8, 17):
                ratios: list[float] = []
                try:
                    check_padding_appended(impl, spec, P, ratios.append)
                    res = f"ok (worst ratio {max(ratios, default=0):.3g})"
                except Exception as exc:
                    res = f"FAIL {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                print(f"{name} P={P} {spec.short()}: {res}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
