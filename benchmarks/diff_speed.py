"""`tapeout diff` speed and memory on two SmolLM2-135M chips (issue 5: <= 10 s, bounded memory).

    python benchmarks/diff_speed.py CHIP_A CHIP_B [--repeat 3]

CHIP_A/CHIP_B: `tapeout compile --target maskrom` folders (e.g. SmolLM2 and its fine-tune,
models/smollm2_finetune.py). Each run is a fresh `tapeout diff --json` process; wall time and
peak RSS are medians, printed beside the layer sizes so the memory bound can be judged.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    times, peaks, result = [], [], None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "tapeout", "diff", args.a, args.b, "--json"], check=True,
                             capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        times.append(time.perf_counter() - t0)
        peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        result = json.loads(out.stdout)
    size = sum((Path(p) / "layers" / f).stat().st_size for p in (args.a, args.b) for f in ("V_CODE.bin", "V_FINE.bin"))
    print(f"chips: {Path(args.a).name} vs {Path(args.b).name}; via layers {size / 2**20:.0f} MiB in total; "
          f"{result['tiles']} tiles, {result['total_vias']:,} via sites")
    print(f"{'step':30s} {'median s':>9s} {'peak RSS MiB':>13s}")
    print(f"{'tapeout diff --json':30s} {statistics.median(times):9.2f} {max(peaks):13.0f}   target <= 10 s")
    print(f"changed: {100 * result['fraction']:.2f}% of vias; {result['tiles_untouched']} of {result['tiles']} "
          "tiles untouched")


if __name__ == "__main__":
    main()
