"""Dataclass-validated config sections: every key checked, unknown keys rejected by name."""

import dataclasses
from typing import Any, Mapping, Type, TypeVar

T = TypeVar('T')


def from_mapping(cls: Type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``data`` (e.g. a YAML section), naming unknown or missing keys."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f'{section}: unknown key(s) {unknown}; valid keys are {sorted(fields)}.')
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f'{section}: missing required key(s) {missing}.')
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{section}: {err}') from err
