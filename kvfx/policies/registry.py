"""How policies reach kvfx's custom ops, and how text becomes a policy.

A custom op's arguments are tensors, numbers and strings, so the rewrite
passes each policy as a *key* of an interned registry and the op looks the
very object up again (``policy_of``): a user's own subclass, with any fields,
works like a preset. The key of a shipped preset whose fields are literals is
its ``repr``, so Inductor's on-disk cache can reuse its compiled graphs in a
later process (the text determines the policy); any other policy gets a key
unique to this process, so no cached graph can ever run with another policy.

``parse_policy`` turns command-line text into a policy without ``eval``.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os
from typing import Any

#: every Policy subclass, by class name (shipped ones win a name clash)
POLICY_CLASSES: dict[str, type] = {}
#: the shipped presets (``kvfx.PRESETS``)
PRESETS: dict[str, type] = {}
#: every shipped policy class: the presets and ``Compose``
SHIPPED: dict[str, type] = {}
#: keep and fold rules, and other classes a policy's fields may name in text
RULES: dict[str, type] = {}

_BY_KEY: dict[str, Any] = {}
_KEY_OF: dict[Any, str] = {}
_SERIAL = itertools.count()
_PROCESS = f"{os.getpid():x}.{id(_BY_KEY):x}"


def register_class(cls: type) -> None:
    """Called for every Policy subclass as it is defined."""
    if cls.__name__ not in SHIPPED:
        POLICY_CLASSES[cls.__name__] = cls


def shipped(cls: type) -> type:
    """Mark a policy class as kvfx's own (its name wins a clash with a user's class)."""
    SHIPPED[cls.__name__] = POLICY_CLASSES[cls.__name__] = cls
    return cls


def preset(cls: type) -> type:
    """Mark a class as a shipped preset (``kvfx.PRESETS``, the command line)."""
    PRESETS[cls.__name__] = cls
    return shipped(cls)


def rule(cls: type) -> type:
    RULES[cls.__name__] = cls
    return cls


def _is_literal(policy) -> bool:
    """Whether ``repr(policy)`` parses back to an equal policy of the same class."""
    try:
        again = parse_policy(repr(policy), shipped_only=True)
    except (ValueError, TypeError):
        return False
    return type(again) is type(policy) and again == policy


def key_of(policy) -> str:
    """The registry key of ``policy``, interning it (equal policies share a key)."""
    try:
        key = _KEY_OF.get(policy)
    except TypeError:  # unhashable fields: keyed by identity
        key = next((k for k, p in _BY_KEY.items() if p is policy), None)
        hashable = False
    else:
        hashable = True
    if key is None:
        key = repr(policy) if _is_literal(policy) else f"{repr(policy)}@{_PROCESS}#{next(_SERIAL)}"
        _BY_KEY[key] = policy
        if hashable:
            _KEY_OF[policy] = key
    return key


def policy_of(key: str):
    """The policy a custom op was given. A literal preset's key that this process
    has not interned (a graph Inductor cached in another process) is parsed."""
    policy = _BY_KEY.get(key)
    if policy is None:
        if "@" in key:
            raise KeyError(f"kvfx: policy key {key!r} belongs to another process: this compiled graph cannot run here")
        policy = _BY_KEY[key] = parse_policy(key, shipped_only=True)
    return policy


# -- text -------------------------------------------------------------------

def _evaluate(node: ast.AST, text: str, shipped_only: bool):
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        classes = {**(SHIPPED if shipped_only else POLICY_CLASSES), **RULES}
        if name not in classes:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"policy {name!r} is unknown; presets are: {known}")
        if any(kw.arg is None for kw in node.keywords):
            raise ValueError(f"policy {text!r}: **kwargs are not allowed")
        args = [_evaluate(a, text, shipped_only) for a in node.args]
        kwargs = {kw.arg: _evaluate(kw.value, text, shipped_only) for kw in node.keywords}
        cls = classes[name]
        try:
            return cls(*args, **kwargs)
        except TypeError as err:
            fields = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
            raise ValueError(f"policy {text!r}: {err}; {name} takes: {fields}") from None
    if isinstance(node, (ast.Tuple, ast.List)):
        items = tuple(_evaluate(e, text, shipped_only) for e in node.elts)
        return items if isinstance(node, ast.Tuple) else list(items)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"policy {text!r}: arguments must be literals (numbers, strings) or presets") from None


def parse_policy(text: str, *, shipped_only: bool = False):
    """Parse ``"SnapKV(budget=0.25, window=16)"`` or
    ``"ChunkKV(budget=0.3, scorer=KNorm())"`` without eval: only policy and
    rule classes called with literal arguments are accepted."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"policy {text!r} is not of the form Preset(name=value, ...): {err.msg}") from None
    if not isinstance(tree, (ast.Name, ast.Call)) or isinstance(tree, ast.Call) and not isinstance(tree.func, ast.Name):
        raise ValueError(f"policy {text!r} is not of the form Preset(name=value, ...)")
    name = tree.id if isinstance(tree, ast.Name) else tree.func.id
    if name not in (SHIPPED if shipped_only else POLICY_CLASSES):
        raise ValueError(f"policy {name!r} is unknown; presets are: {', '.join(sorted(PRESETS))}")
    return _evaluate(tree, text, shipped_only)
