"""Dataclass-validated config sections: every key checked by name and type, unknown keys rejected with the
nearest valid name and their full path (``stages[3].search.generatoins``)."""

import collections.abc
import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping, Type, TypeVar

T = TypeVar('T')


def nearest(name: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ''


def check_keys(data: Mapping[str, Any], valid, section: str) -> None:
    """Reject keys of ``data`` not in ``valid``, each named by its full path with the nearest valid name."""
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        raise ValueError('; '.join(f'{section}.{k}: unknown key{nearest(k, valid)}' for k in unknown)
                         + f'. Valid keys of {section}: {sorted(valid)}.')


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's annotation (the shapes YAML can express; others pass)."""
    if hint is Any or isinstance(hint, TypeVar):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes))  # OmegaConf too
    if hint is dict or origin in (dict, typing.Mapping):
        return isinstance(value, Mapping)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return 'null'
    return getattr(typing.get_origin(hint) or hint, '__name__', str(hint))


def from_mapping(cls: Type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``data`` (e.g. a YAML section), naming unknown, missing or mistyped keys."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, fields, section)
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f'{section}: missing required key(s) {missing}.')
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: skip the type check, construction still validates
        hints = {}
    for key, value in data.items():
        if key in hints and not _type_ok(value, hints[key]):
            raise ValueError(f'{section}.{key}: expected {_type_name(hints[key])}, got {type(value).__name__} '
                             f'{value!r}.')
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{section}: {err}') from err
