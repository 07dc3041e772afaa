"""Load YAML into frozen dataclasses, rejecting unknown keys, with errors that name file, key and value.

Every user-facing file (chip catalog, calibration, workloads) goes through :func:`read_yaml` and
:func:`build`, so that a typo always gets the same kind of message::

    workloads/x.yaml: model.base_emb_dimm: unknown key (did you mean 'base_emb_dim'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from tpusim.errors import TpusimError


_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing, unreadable or non-regular file, or bad YAML, is a
    :class:`TpusimError` naming the file (see :func:`tpusim.safeio.read_text`)."""
    from tpusim.safeio import read_text

    text = read_text(path, what="YAML text")
    try:
        # libyaml's parser when PyYAML has it: the same constructor and resolver (the same values), 10x
        # faster (MaxText's base.yml, read by every run: 6 ms instead of 64). Any error is reported by the
        # pure-Python parser, so the message stays the same whichever parser found it.
        if _FAST_LOADER is not None:
            try:
                return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 (a SafeLoader)
            except yaml.YAMLError:
                pass
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TpusimError(f"not valid YAML{where}: {problem}", source=str(path)) from None
    except RecursionError:
        # PyYAML composes nested collections recursively; a document nested ~1,000 deep exhausts
        # Python's stack. No tpusim file nests more than 3 deep.
        raise TpusimError("not a tpusim file: nested too deeply", source=str(path)) from None


def unknown_key_reason(key: str, known: typing.Iterable[str]) -> str:
    """'unknown key' with a suggestion of the closest known key, if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


def check_keys(data: Mapping[str, Any], known: typing.Iterable[str], *, source: str | None, prefix: str) -> None:
    known = list(known)
    for key in data:
        if key not in known:
            raise TpusimError(unknown_key_reason(str(key), known), source=source, key=_join(prefix, str(key)))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def build(cls: type, data: Any, *, source: str | None = None, prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data`` (a mapping from YAML), checking every field.

    Unknown keys, missing required keys and values of the wrong type raise :class:`TpusimError` with
    ``source`` and the dotted key. Nested dataclasses, ``tuple[T, ...]``, ``T | None`` and
    ``Literal[...]`` fields are supported. Numbers are accepted for float fields (YAML reads ``1e9`` as
    a string; we accept that too).
    """
    if not isinstance(data, Mapping):
        raise TpusimError(f"expected a mapping, got {_describe(data)}", source=source, key=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, source=source, prefix=prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TpusimError("required key is missing", source=source, key=key)
            continue
        kwargs[name] = convert(hints[name], data[name], source=source, key=key)
    try:
        return cls(**kwargs)
    except TpusimError as e:
        raise e.within(source) if source else e
    except (TypeError, ValueError) as e:
        raise TpusimError(str(e), source=source, key=prefix or None) from None


def convert(hint: Any, value: Any, *, source: str | None, key: str) -> Any:
    """Convert one YAML value to the type ``hint``, or raise naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, source=source, key=key)
            except TpusimError as e:
                errors.append(e.reason)
        raise TpusimError(errors[0] if len(errors) == 1 else f"{value!r} matches none of the allowed types",
                          source=source, key=key)
    if origin is typing.Literal:
        if value not in args:
            raise TpusimError(f"{value!r} is not one of {', '.join(map(repr, args))}", source=source, key=key)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TpusimError(f"expected a list, got {_describe(value)}", source=source, key=key)
        item = args[0]
        return tuple(convert(item, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TpusimError(f"expected a mapping, got {_describe(value)}", source=source, key=key)
        kt, vt = args
        return {convert(kt, k, source=source, key=key): convert(vt, v, source=source, key=_join(key, str(k)))
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source=source, prefix=key)
    if hint is bool:
        if not isinstance(value, bool):
            raise TpusimError(f"expected true or false, got {_describe(value)}", source=source, key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise TpusimError(f"expected an integer, got {_describe(value)}", source=source, key=key)
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TpusimError(f"expected a number, got {_describe(value)}", source=source, key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TpusimError(f"expected a string, got {_describe(value)}", source=source, key=key)
        return value
    raise TypeError(f"tpusim.config cannot convert to {hint!r}")  # a bug in our dataclasses, not user input


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)
