"""User-facing errors: one actionable line, exit code 2 at the CLI."""
from __future__ import annotations


class TapeoutError(Exception):
    """Bad input or impossible options. ``str(err)`` is the one line shown to the user.

    Messages name the file, then the node and op where there is one, then what to do.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, node: str | None = None,
                 op: str | None = None) -> None:
        where = []
        if file:
            where.append(str(file))
        if node is not None:
            where.append(f"node {node!r}" + (f" ({op})" if op else ""))
        elif op:
            where.append(f"op {op}")
        self.file, self.node, self.op = file, node, op
        super().__init__((": ".join(where) + ": " if where else "") + message)


class UnsupportedOps(TapeoutError):
    """Every unsupported op of a model at once, so the user sees the whole list."""

    def __init__(self, file: str, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        first = ", ".join(f"{node!r} ({op}): {why}" for node, op, why in problems[:5])
        more = f" and {len(problems) - 5} more (see `tapeout inspect`)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} unsupported op(s): {first}{more}", file=file)
