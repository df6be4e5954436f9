"""Run another revision of tapeout beside the working tree, for before/after benchmarks.

``ref_env(rev)`` checks ``rev`` out into a git worktree under ``$TMPDIR/tapeout-ref-<sha>/src``,
installs it (no dependencies) into ``.../pkg`` and makes a bare venv ``.../venv`` that sees the
current venv's packages through a plain path entry (so the editable install of the working
tree, a ``.pth`` hook, is not loaded). ``python`` of that venv with the returned environment
runs the old revision. The checkout is cached per commit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def resolve(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          check=True, capture_output=True, text=True).stdout.strip()


def ref_env(rev: str) -> tuple[str, dict, Path, str]:
    """(python, environment running ``rev``, its source folder, full sha)."""
    sha = resolve(rev)
    root = Path(tempfile.gettempdir()) / f"tapeout-ref-{sha[:12]}"
    src, pkg = root / "src", root / "pkg"
    if not (pkg / ".done").exists():
        root.mkdir(parents=True, exist_ok=True)
        if not src.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(src), sha],
                           check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(pkg), str(src)], check=True, capture_output=True)
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        here = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        (site / "zz_deps.pth").write_text(here + "\n")
        (pkg / ".done").write_text(sha)
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    return str(root / "venv" / "bin" / "python"), env, src, sha


def current_env() -> dict:
    return {**os.environ}
