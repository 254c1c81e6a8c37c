"""One-line messages for recipe mistakes: unknown keys with the closest valid name, and
pydantic validation errors rewritten as ``field = VALUE (type) is invalid: expectation; fix``.

The recipe schema is a tree of pydantic models (``Recipe`` -> ``ModelConfig``, ``DataConfig``
-> ``TokenizerConfig`` ...). Both the error rewriting and the ``--set`` path check walk that
tree by field name, so a dotted path such as ``data.tokenizer.vocab_size`` means the same thing
in a YAML file, on the command line and in an error message.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from longctx.errors import LongctxError

_MAX_VALUE_CHARS = 60
_SCALAR_TAGS = frozenset({"int", "float", "str", "bool", "none"})


def _unwrap(annotation: Any) -> Any:
    """The model class or ``dict``/``list`` behind an annotation (through Optional, unions,
    Annotated); ``None`` for a plain value such as an int or a Literal."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            inner = _unwrap(member)
            if inner is not None:
                return inner
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation in (dict, list, tuple) or origin in (dict, list, tuple):
        return origin or annotation
    return None


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _child(model: type[BaseModel], name: str) -> Any:
    """What field ``name`` of ``model`` holds: a model class, a container type or None."""
    return _unwrap(model.model_fields[name].annotation)


def _dotted(parts: Sequence[Any]) -> str:
    return ".".join(str(p) for p in parts)


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field of the schema tree as a path tuple, parents before their children."""
    paths = []
    for name in model.model_fields:
        path = (*prefix, name)
        paths.append(path)
        child = _child(model, name)
        if _is_model(child):
            paths.extend(field_paths(child, path))
    return paths


def unknown_key_message(root: type[BaseModel], path: Sequence[str]) -> str:
    """``unknown key 'trainer.lrr'; did you mean 'trainer.lr'?``

    Candidates, in order: a close spelling among the siblings; the same name elsewhere in the
    tree (``trainer.seq_len`` -> ``data.seq_len``); a close spelling anywhere. Without any, the
    message lists the valid keys at that level.
    """
    *parent, name = [str(p) for p in path]
    siblings = list(_model_at(root, parent).model_fields)
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        guess = _dotted([*parent, close[0]])
    else:
        everywhere = {_dotted(p): p[-1] for p in field_paths(root)}
        same_name = [full for full, last in everywhere.items() if last == name]
        anywhere = difflib.get_close_matches(name, list(everywhere.values()), n=1, cutoff=0.75)
        matches = same_name or [full for full, last in everywhere.items() if last in anywhere]
        guess = matches[0] if matches else None
    where = _dotted(path)
    if guess is not None:
        return f"unknown key '{where}'; did you mean '{guess}'?"
    level = f"under '{_dotted(parent)}'" if parent else "at the top level"
    return f"unknown key '{where}'; valid keys {level}: {', '.join(siblings)}"


def _model_at(root: type[BaseModel], parts: Sequence[str]) -> type[BaseModel]:
    model = root
    for part in parts:
        model = _child(model, part)
    return model


def check_key_path(root: type[BaseModel], path: Sequence[str]) -> None:
    """Raise a one-line ``LongctxError`` unless ``path`` names a field of the schema (or a key
    inside a free-form dict field such as ``model.rope_scaling.factor``)."""
    model: Any = root
    for depth, part in enumerate(path):
        if not _is_model(model):
            if model is dict:
                return  # free-form mapping: any key below it is the owner's to validate
            raise LongctxError(
                f"'{_dotted(path)}' goes below '{_dotted(path[:depth])}', which is a single "
                f"value, not a section; set '{_dotted(path[:depth])}' itself"
            )
        if part not in model.model_fields:
            raise LongctxError(unknown_key_message(root, path[: depth + 1]))
        model = _child(model, part)


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union an error belongs to (``int``, ``constrained-int``,
    ``literal['auto']``, ``dict[str,any]``, ``function-after[...]``) and marks an invalid mapping
    key with ``[key]``; none of these are keys the user wrote."""
    return isinstance(part, str) and (
        part in _SCALAR_TAGS or "[" in part or part.startswith(("constrained-", "function-"))
    )


def _field_loc(root: type[BaseModel], loc: Sequence[Any], extra: bool) -> list[Any]:
    """An error location as the user wrote it: field names, container keys and indices. At a
    model level a name that is not a field is the unknown key itself when ``extra`` (the error
    is extra_forbidden) and a union tag otherwise."""
    kept: list[Any] = []
    node: Any = root
    for part in loc:
        if _is_model(node) and part in node.model_fields:
            kept.append(part)
            node = _child(node, part)
            continue
        if (_is_model(node) and not extra) or _is_union_tag(part):
            continue
        kept.append(part)
        node = None
    return kept


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _closest_literal(error: dict[str, Any]) -> str:
    """``; did you mean 'llama'?`` for a Literal mismatch whose input is a near miss."""
    allowed = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
    close = difflib.get_close_matches(str(error["input"]), allowed, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def validation_error_line(root: type[BaseModel], error: ValidationError) -> str:
    """The first problem of ``error`` as one line naming the field, the value and the fix.

    Errors of one union field (``dp: int | 'auto'``) come as one error per member; their
    expectations are joined with "or".
    """
    errors = error.errors()
    first = errors[0]
    kind = first["type"]
    loc = _field_loc(root, first["loc"], extra=kind == "extra_forbidden")
    where = _dotted(loc)
    if kind == "extra_forbidden":
        return unknown_key_message(root, loc)
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return (
            f"{_dotted(loc[:-1])} = {_show(first['input'])} is invalid: expected an item at "
            f"index {loc[-1]}; give all the items"
        )
    if kind == "missing":
        return f"missing required key '{where}'; add it to the recipe"
    if kind in ("value_error", "assertion_error"):
        # a validator's own message (a LongctxError keeps its text) after pydantic's prefix
        message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return f"{where}: {message}" if where else message
    if "[key]" in first["loc"]:
        problem = _lower_first(first["msg"])
        return (
            f"{_dotted(loc[:-1])} has an invalid key {first['input']!r}: {problem}"
            f"{_closest_literal(first)}"
        )
    expected = [
        _lower_first(e["msg"]) for e in errors if _field_loc(root, e["loc"], extra=False) == loc
    ]
    hint = _closest_literal(first) if kind == "literal_error" else ""
    # --set replaces a whole list or tuple, so the fix names the field, not one of its items
    items_at = [i for i, part in enumerate(loc) if isinstance(part, int)]
    settable = _dotted(loc[: items_at[0]] if items_at else loc)
    return (
        f"{where} = {_show(first['input'])} is invalid: {' or '.join(expected)}{hint}; "
        f"fix it in the recipe or with --set {settable}=VALUE"
    )


def single_line(message: str) -> str:
    """Collapse whitespace runs so that every user-facing message is exactly one line."""
    return " ".join(message.split())
