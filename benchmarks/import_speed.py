"""Import + fusion time and peak memory of tapeout vs onnxruntime session creation.

    python benchmarks/import_speed.py [MODEL.onnx] [--repeat N]

Default model: SmolLM2-135M (models/smollm2.py exports it). Each measurement runs in a fresh
subprocess so peak RSS (ru_maxrss) belongs to that step alone; the table shows medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TAPEOUT = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from tapeout.compiler.frontend import import_graph, fuse
t1 = time.perf_counter()
g, _ = import_graph(sys.argv[1])
t2 = time.perf_counter()
fuse(g)
t3 = time.perf_counter()
from tapeout.compiler.structure import parameter_count
print(json.dumps({"import_s": t2 - t1, "fuse_s": t3 - t2, "total_s": t3 - t1,
                  "weight_bytes": parameter_count(g)[1],
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

ORT = r"""
import json, resource, sys, time
import onnxruntime as ort
t1 = time.perf_counter()
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
print(json.dumps({"total_s": t2 - t1, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(code: str, model: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        sys.path.insert(0, str(REPO / "models"))
        import smollm2
        model = smollm2.export()
    runs_t = [measure(TAPEOUT, model) for _ in range(args.repeat)]
    runs_o = [measure(ORT, model) for _ in range(args.repeat)]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    wb = runs_t[0]["weight_bytes"] / 2**20
    t_tap, t_ort = med(runs_t, "total_s"), med(runs_o, "total_s")
    r_tap, r_ort = med(runs_t, "rss_mib"), med(runs_o, "rss_mib")
    print(f"model: {model.name}  weights: {wb:.1f} MiB  runs: {args.repeat} (medians)")
    print(f"{'step':38s} {'time s':>8s} {'peak RSS MiB':>13s} {'RSS/weights':>12s}")
    print(f"{'tapeout import (load+bind+shapes)':38s} {med(runs_t, 'import_s'):8.2f}")
    print(f"{'tapeout fusion passes':38s} {med(runs_t, 'fuse_s'):8.2f}")
    print(f"{'tapeout import + fusion':38s} {t_tap:8.2f} {r_tap:13.0f} {r_tap / wb:12.2f}")
    print(f"{'onnxruntime InferenceSession()':38s} {t_ort:8.2f} {r_ort:13.0f} {r_ort / wb:12.2f}")
    print(f"ratio tapeout/onnxruntime: time {t_tap / t_ort:.2f}x, peak RSS {r_tap / r_ort:.2f}x")


if __name__ == "__main__":
    main()
