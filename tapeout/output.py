"""Atomic, deterministic output folders with a ``manifest.json`` of sha256 hashes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tapeout.compiler.errors import TapeoutError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_file_atomic(path: str | os.PathLike, write):
    """Write one output file via a hidden sibling and a rename: ``write(tmp_path)`` fills it and
    its result is returned. A failure or an interruption leaves the old file (or nothing), never
    a partial one."""
    path = Path(path)
    if path.is_dir():
        raise TapeoutError("is a folder; give a file name", file=str(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
    except OSError as e:
        raise TapeoutError(f"cannot write here: {e.strerror or e}", file=str(path)) from None
    try:
        result = write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` key: any edit
    of the manifest (an option, a hash) is seen as damage."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(dumps_json(body).encode("utf-8")).hexdigest()


class OutputFolder:
    """Collects artifacts in a hidden sibling folder; ``commit`` swaps it into place.

    An exception inside the ``with`` block removes the temporary folder, so an interrupted or
    failed compile never leaves a folder that looks complete. An existing ``out`` is replaced
    only if it is an earlier tapeout output (it has a manifest.json) or empty.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise TapeoutError("output path exists and is not a folder", file=str(self.out))
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST).is_file():
            raise TapeoutError("output folder exists, is not empty and holds no manifest.json; "
                               "refusing to replace it (choose another -o)", file=str(self.out))
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            self.tmp.chmod(0o755)
        except OSError as e:
            raise TapeoutError(f"cannot create the output folder here: {e.strerror or e} (choose another -o)",
                               file=str(self.out)) from None
        self.files: list[str] = []

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel not in self.files:
            self.files.append(rel)
        return p

    def write_text(self, rel: str, text: str) -> Path:
        p = self.path(rel)
        p.write_text(text, encoding="utf-8")
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_text(rel, dumps_json(obj))

    def write_bytes(self, rel: str, data: bytes) -> Path:
        p = self.path(rel)
        p.write_bytes(data)
        return p

    def write_npy(self, rel: str, array: Any) -> Path:
        """A numpy array in .npy format (no pickles)."""
        import numpy as np
        p = self.path(rel)
        with open(p, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
        return p

    def commit(self, manifest: dict[str, Any]) -> Path:
        artifacts = {rel: {"sha256": sha256_file(self.tmp / rel), "bytes": (self.tmp / rel).stat().st_size}
                     for rel in sorted(self.files)}
        manifest = dict(manifest, artifacts=artifacts)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (self.tmp / MANIFEST).write_text(dumps_json(manifest), encoding="utf-8")
        old = None
        import signal
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:                            # the swap is not interrupted between its two renames
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            self.discard()


def input_hashes(model: Path) -> dict[str, str]:
    """sha256 of the model file and of every external data file beside it that it names."""
    import onnx
    hashes = {model.name: sha256_file(model)}
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - the importer already validated it
        return hashes
    locations = set()
    for init in proto.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                locations.add(e.value)
    for loc in sorted(locations):
        hashes[loc] = sha256_file(model.parent / loc)
    return hashes
