"""Cycles of the whole chip's micro-ops, as ``hdl.chip.ChipTop`` takes them (docs/chip.md,
"Cycles"). One function per micro-op, of the op's sizes and the architecture: ``lanes`` (values
a vector unit takes per cycle) and ``positions`` (KV positions the attention engine takes per
cycle, all heads at once).

The chip's sequencer (``backends/maskrom/sequencer.py``) and ``tapeout estimate``
(``backends/maskrom/rowchip.py``) count their cycles with these functions, and
``tests/test_chip_rtl.py`` holds the RTL's cycle counter to them, so the three agree by
construction and by measurement. Each is the micro-op's FSM state(s) in ``hdl/chip.py``: the
chunks it issues, plus its unit's pipeline latency (``hdl/vector.py``).
"""
from __future__ import annotations

from tapeout.compiler.golden.fixed import mx_block

from .rowserial import stage_cycles
from .vector import Activation, ArgmaxTree, AttentionEngine, MxQuant, NormUnit

__all__ = ["steps", "embed", "elementwise", "rope", "act", "norm", "mx", "linear", "attention_fixed",
           "ATTENTION_PASSES", "attention", "argmax"]

ATTENTION_PASSES = 3      # scores, exp, P.V: each takes ceil(attended / positions) cycles


def steps(n: int, lanes: int) -> int:
    """Chunks of ``lanes`` values that ``n`` values take."""
    return -(-int(n) // max(1, int(lanes)))


def embed(width: int, lanes: int) -> int:
    """The token's row of the embedding ROM, a chunk per cycle, one cycle of ROM read latency."""
    return steps(width, lanes) + 1


def elementwise(n: int, lanes: int, table: bool = False) -> int:
    """Add, Sub or Mul of ``n`` values (``table``: the second operand is a ROM row, read a cycle ahead)."""
    return steps(n, lanes) + 1 + int(table)


def rope(n: int, lanes: int) -> int:
    """Rope on ``n`` values: operands registered a cycle ahead, then the 2-stage lanes."""
    return steps(n, lanes) + 1 + 2


def act(n: int, kind: str, lanes: int) -> int:
    """SiLU/GELU (gated or not) of ``n`` values."""
    return steps(n, lanes) + Activation.latency(kind)


def norm(d: int, kind: str, lanes: int) -> int:
    """RMSNorm/LayerNorm of one vector of ``d``: its passes, then the outputs."""
    L = max(1, min(int(lanes), int(d)))
    return steps(d, L) + NormUnit.latency(d, kind, L)


def mx(blocks: int, block: int, lanes: int) -> int:
    """MXINT quantisation of ``blocks`` blocks of ``block`` values, ``lanes // block`` a cycle."""
    return steps(blocks, max(1, int(lanes) // int(block))) + MxQuant.LATENCY


def linear(in_dim: int, rows: int, lanes: int, *, chains: int, chain_tiles: int, cols: int) -> int:
    """A fabric stage: its input's MXINT blocks (golden's block for ``in_dim``), the start
    cycle, then the row-serial stage of ``rows`` rows (the stacked rows of the linears that
    read this input)."""
    block = mx_block(in_dim)
    return (mx(in_dim // block, block, lanes) + 1
            + stage_cycles(rows, in_dim, chains=chains, chain_tiles=chain_tiles, cols=cols))


def attention_fixed(heads: int, kv_heads: int, d: int, lanes: int) -> int:
    """The cycles of an attention op that do not grow with the positions attended: the MXINT
    of the token's k, v and q blocks, the start pulse, the engine's fixed cycles."""
    B = mx_block(d)                          # the MXINT block of a head (golden's)
    nb = d // B
    return mx(2 * kv_heads * nb + heads * nb, B, lanes) + 1 + AttentionEngine.cycles(0, 1)


def attention(attended: int, heads: int, kv_heads: int, d: int, lanes: int, positions: int) -> int:
    """One attention op over ``attended`` cached positions (the token's own included)."""
    return attention_fixed(heads, kv_heads, d, lanes) + ATTENTION_PASSES * steps(attended, positions)


def argmax(n: int, lanes: int) -> int:
    """The next token: ``n`` logits through an argmax tree a chunk per cycle, then the done cycle."""
    return steps(n, lanes) + ArgmaxTree.LATENCY + 1
