"""Per-row times of a property run (the JSON-lines rows of --attnbench-results), slowest first,
with the sum per implementation: where one implementation's GPU verification spends its time."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows.sort(key=lambda r: -r["duration_s"])
    per_impl: dict[str, float] = defaultdict(float)
    for r in rows:
        per_impl[f"{r['variant']}/{r['impl']}"] += r["duration_s"]
    statuses = ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in sorted({r["status"] for r in rows}))
    print(f"{len(rows)} rows ({statuses}); seconds summed over workers: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_impl.items(), key=lambda kv: -kv[1])))
    for r in rows:
        print(f"{r['duration_s']:8.1f} s  {r['status']:5}  {r['variant']}/{r['impl']}  {r['property']}  "
              f"{' '.join(r['reason'].split())[:140]}")


if __name__ == "__main__":
    main(sys.argv[1])
