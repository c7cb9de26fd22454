"""The two small vocabularies of the op rules: factor kinds and partial modes.

Both are ``enum.StrEnum``: a member equals (and hashes as) its string, so rules, caches
keyed on factor kinds and the JSON output are unchanged, while a misspelt kind fails where
the rule is built instead of silently meaning "pass".

>>> FactorKind.SUM == "sum", FactorKind("replicate").is_reduction
(True, False)
>>> PartialMode.UNARY_MAX.op, PartialMode.SAME_SUM.shape, PartialMode("unary_any").op
('max', 'same', None)
"""
from __future__ import annotations

import enum


class FactorKind(enum.StrEnum):
    """What splitting one factor of an op's iteration space over a mesh axis means.

    - ``PASS``: operands and results carrying the factor are split alike;
    - ``SUM`` / ``MAX`` / ``MIN``: a reduction factor; a split leaves the result partial
      (``P(sum)``...) over that axis;
    - ``REPLICATE``: must not be split (a sort axis, a sliced or padded dim, ...).
    """
    PASS = "pass"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    REPLICATE = "replicate"

    @property
    def is_reduction(self) -> bool:
        return self in REDUCTION_KINDS


#: Factor kinds that leave a partial result when split (the partial's op is the kind's value).
REDUCTION_KINDS = frozenset({FactorKind.SUM, FactorKind.MAX, FactorKind.MIN})


class PartialMode(enum.StrEnum):
    """Which partial operands an op maps to a partial result of the same kind
    (``ops.partial_passes`` reads it):

    - ``NONE``: no operand may be partial;
    - ``UNARY_ANY``: operand 0 only, any op (reshape, transpose, ...);
    - ``UNARY_SUM`` / ``UNARY_MAX`` / ``UNARY_MIN``: operand 0 only, that op (neg: sum);
    - ``SAME_SUM``: every operand partial alike, sum (add, sub);
    - ``SAME_MAX`` / ``SAME_MIN``: the partial operands alike with that op, the others not
      partial (``max(P(max), B)`` is ``P(max)``);
    - ``ONE_SUM``: exactly one operand partial, sum (mul, dot_general);
    - ``FIRST_SUM``: operand 0 only, sum (div).
    """
    NONE = "none"
    UNARY_ANY = "unary_any"
    UNARY_SUM = "unary_sum"
    UNARY_MAX = "unary_max"
    UNARY_MIN = "unary_min"
    SAME_SUM = "same_sum"
    SAME_MAX = "same_max"
    SAME_MIN = "same_min"
    ONE_SUM = "one_sum"
    FIRST_SUM = "first_sum"

    @property
    def shape(self) -> str:
        """Which operands may be partial: ``none``, ``unary``, ``same``, ``one`` or ``first``."""
        return self.value.split("_", 1)[0]

    @property
    def op(self) -> str | None:
        """The reduction op the mode passes on (``"sum"``, ``"max"``, ``"min"``); None for
        ``NONE`` and ``UNARY_ANY``."""
        tail = self.value.split("_", 1)[-1]
        return tail if tail in REDUCTION_KINDS else None
