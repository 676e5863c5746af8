"""Budget arithmetic and field validation shared by every policy.

Lengths reach these functions as Python ints, SymInts (inside a compiled
graph's fake implementation), sympy expressions (``kvfx.explain``'s memory
formulas) or int64 tensors (one count per batch row, for padded batches), so
every function here stays guard-free and works on all four.
"""

from __future__ import annotations

import math
from fractions import Fraction

import sympy
import torch

Budget = float | int


def fail(policy: str, field: str, value, allowed: str) -> None:
    raise ValueError(f"{policy}.{field}={value!r} is invalid: {field} must be {allowed}")


def named_rule(rule, policy: str, **fields):
    """Build a keep or fold rule from a preset's fields; a bad field is reported under the preset's name."""
    try:
        return rule(**fields)
    except ValueError as err:
        raise ValueError(str(err).replace(f"{rule.__name__}.", f"{policy}.", 1)) from None


def check_int(policy: str, field: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        fail(policy, field, value, f"an int >= {lo}")


def check_fraction(policy: str, field: str, value, lo_open: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 < value <= 1 if lo_open else 0 <= value <= 1):
        fail(policy, field, value, "a fraction in (0, 1]" if lo_open else "a fraction in [0, 1]")


def check_budget(policy: str, budget) -> None:
    """A budget is a fraction of the prompt in (0, 1] or a token count >= 1."""
    allowed = "a fraction of the prompt in (0, 1] (float) or a token count >= 1 (int)"
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        fail(policy, "budget", budget, allowed)
    if isinstance(budget, float) and not (0.0 < budget <= 1.0 and math.isfinite(budget)):
        fail(policy, "budget", budget, allowed)
    if isinstance(budget, int) and budget < 1:
        fail(policy, "budget", budget, allowed)


def smin(a, b):
    """min() that stays guard-free on SymInts, symbolic on sympy expressions
    and elementwise on tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return torch.sym_min(a, b)


def smax(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return torch.sym_max(a, b)


def as_fraction(x: float | int) -> Fraction:
    return Fraction(x).limit_denominator(10_000)


def ceil_linear(slope: Fraction, length, offset: Fraction = Fraction(0)):
    """ceil(slope * length - offset) in integer arithmetic: a float product or
    ``math.ceil`` would specialise a symbolic length and recompile."""
    den = slope.denominator * offset.denominator
    a, c = slope.numerator * offset.denominator, offset.numerator * slope.denominator
    return (a * length - c + den - 1) // den


def cdiv(a, b):
    """ceil(a / b) for ints, SymInts, sympy expressions and tensors, guard-free."""
    return (a + b - 1) // b


def budget_tokens(budget: Budget, length):
    """Tokens a budget allows for a prompt of ``length``."""
    if isinstance(budget, int):
        return budget
    return ceil_linear(as_fraction(budget), length)
