"""Wall time of the default test tier (`make test`) on a fresh clone, for two revisions.

    python benchmarks/test_time.py [--ref REV] [--rev REV] [--repeat 1]

For each revision: a fresh ``git clone`` (no ``.cache``: the tiny models are exported and the
Verilator builds made from scratch, as on CI), the package of that revision installed beside
it (benchmarks/_ref.py; the venv's dependencies are reused, so the installs are not timed),
then ``pytest -q -n 2`` with ``OPENBLAS_NUM_THREADS=1 CI=true``, exactly what ``make test``
runs. Prints wall seconds and the pass counts side by side. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ref  # noqa: E402


def run(rev: str) -> tuple[float, str]:
    py, env, _, sha = _ref.ref_env(rev)
    shutil.rmtree(Path(env["PYTHONPATH"]) / ".cache", ignore_errors=True)      # the Verilator cache
    clone = Path(tempfile.mkdtemp(prefix=f"tapeout-tt-{sha[:8]}-"))
    try:
        subprocess.run(["git", "clone", "--quiet", str(_ref.REPO), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", sha], check=True)
        env = {**env, "OPENBLAS_NUM_THREADS": "1", "CI": "true"}
        t0 = time.perf_counter()
        # -P: the clone's own tapeout/ folder (the CLI sources) must not shadow the installed package
        p = subprocess.run([py, "-P", "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"], cwd=clone, env=env,
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
        tail = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode:
            tail = f"FAILED (exit {p.returncode}): {tail}"
        return dt, re.sub(r"=+", "", tail).strip()
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD~1", help="the 'before' revision")
    ap.add_argument("--rev", default="HEAD", help="the 'after' revision (committed)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"default test tier on a fresh clone, {os.cpu_count()} cores, median of {args.repeat}")
    print(f"{'revision':24s} {'wall s':>8s}   result")
    rows = {}
    for rev in (args.ref, args.rev):
        runs = [run(rev) for _ in range(args.repeat)]
        rows[rev] = statistics.median(r[0] for r in runs)
        print(f"{rev + ' (' + _ref.resolve(rev)[:8] + ')':24s} {rows[rev]:8.1f}   {runs[-1][1]}", flush=True)
    print(f"ratio after/before: {rows[args.rev] / rows[args.ref]:.2f}")


if __name__ == "__main__":
    main()
