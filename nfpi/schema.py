"""The one config builder: frozen dataclasses checked against their own annotations.

Every configuration in ``nfpi`` (experiment sections, solver settings, classifier recipes, ...)
is a frozen dataclass deriving from :class:`Config`. At construction each field is checked
against its annotation, with the few conversions a JSON/YAML/Tune value needs:

- ``Literal[...]`` fields must hold one of their values (the allowed values are read from the
  annotation, never written a second time);
- ints are accepted for ``float`` fields (``lam=300`` is stored and logged as ``300.0``), never
  bools for numbers;
- lists become tuples for ``tuple[...]`` fields;
- nested dicts become nested configs (``Config`` subclasses), unknown keys rejected.

Then the class's :meth:`Config.validate` checks ranges and cross-field rules. Every error is a
:class:`~nfpi.errors.ConfigError` naming the dotted field path from the outermost config
(``prior.fpi.tol``), the value, and what is allowed::

    >>> from nfpi.prior import FPIConfig
    >>> FPIConfig.from_dict({"tol": -1})
    Traceback (most recent call last):
    ...
    nfpi.errors.ConfigError: config field 'tol' = -1 is invalid: a tolerance > 0
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from typing import Any, Literal, Self

from nfpi.errors import ConfigError

__all__ = ["Config", "check", "field_docs", "is_int", "is_number", "literal_values"]


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a valid count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(cond: bool, field: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` (``field``, ``value``, ``allowed``) unless ``cond``."""
    if not cond:
        raise ConfigError(field, value, allowed)


def literal_values(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` annotation (``()`` for any other hint)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# An entry of a docstring's ``Attributes:`` section: ``name: text`` or ``a, b: text``.
_ATTRIBUTE = re.compile(r"^(\s+)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)*):\s*(.*)$")
# A field line with a trailing comment: ``name: type = default  # text``.
_COMMENTED_FIELD = re.compile(r"^\s+([A-Za-z_]\w*)\s*:[^#]*#\s*(?:fmt:.*|noqa.*|(.+))$")


def _first_sentence(text: str, limit: int = 110) -> str:
    """``text`` on one line, up to its first full stop, at most ``limit`` characters."""
    text = " ".join(text.split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    if match:
        text = text[: match.start()]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """One line per documented field of the config class ``cls``: from its docstring's
    ``Attributes:`` section (Google style), else from the field's trailing ``# comment``."""
    docs: dict[str, list[str]] = {}
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Attributes:" in (line.strip() for line in lines):
        start = [line.strip() for line in lines].index("Attributes:") + 1
        indent, current = None, []
        for line in lines[start:]:
            if line.strip() and not line.startswith(" "):
                break  # the next section
            match = _ATTRIBUTE.match(line)
            if match and (indent is None or len(match[1]) == indent):
                indent = len(match[1])
                current = [n.strip() for n in match[2].split(",")]
                for name in current:
                    docs[name] = [match[3]]
            elif current and line.strip():
                for name in current:
                    docs[name].append(line.strip())
    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        source = []
    for line in source:
        match = _COMMENTED_FIELD.match(line)
        if match and match[2] and match[1] not in docs:
            docs[match[1]] = [match[2]]
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: _first_sentence(" ".join(v)) for k, v in docs.items() if k in names}


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """``value`` as annotated by ``hint``, or a ConfigError naming ``name``."""
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value, path=name)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # X | None: the one real type's message is the useful one
            raise errors[0]
        raise ConfigError(name, value, f"a value of type {_describe(hint)}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool) != any(
            isinstance(a, bool) for a in allowed if a == value
        ):
            raise ConfigError(name, value, f"one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, f"a list of values ({_describe(hint)})")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, name) for v in value)
        if len(args) != len(value):
            raise ConfigError(name, value, f"a list of {len(args)} values ({_describe(hint)})")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value, strict=True))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "a number")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not is_int(value):
            raise ConfigError(name, value, "an int")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "a string")
        return value
    return value


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__  # "int", not "<class 'int'>"
    # "nfpi.prior.objective.Objective | None" -> "Objective | None"
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", str(hint))


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every configuration: typed fields checked at construction (see the module).

    Subclasses are ``@dataclass(frozen=True)`` and put their range checks in :meth:`validate`,
    raising :class:`ConfigError` with the field's own name (the builder prefixes the path of a
    nested config).
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(hints[f.name], value, f.name)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks (the annotations are checked before this runs)."""

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: Any, path: str = "") -> Self:
        """Build from a (nested) dict, e.g. :meth:`to_dict`'s output or a Tune sample.

        Unknown keys are rejected with the known ones; every error names the dotted field,
        prefixed with ``path`` (the position of this config inside an outer one).
        """
        prefix = f"{path}." if path else ""
        if not isinstance(values, dict):
            raise ConfigError(path or cls.__name__, values, "a mapping of config keys")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]}", values[unknown[0]], f"unknown key; known: {sorted(known)}"
            )
        try:
            return cls(**values)
        except ConfigError as err:
            raise err.within(path) from None
        except TypeError as err:  # a required field is missing
            raise ConfigError(path or cls.__name__, values, str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (tuples stay tuples); :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (checked like a new config)."""
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in known:
                raise ConfigError(key, value, f"unknown key; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values (what is logged as MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = value

        walk("", self.to_dict())
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> Self:
        """A new config with dotted-key overrides applied (``{"prior.objective.lam": 300}``).

        A dict given for a nested config replaces only the keys it names; ``None`` clears an
        optional nested config, and a dict sets one that was ``None``.
        """
        nested = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node, cls = nested, type(self)
            for i, part in enumerate(parts[:-1]):
                sub = _nested_config_type(cls, part)
                if sub is None or not isinstance(node, dict):
                    raise ConfigError(
                        key, value, f"unknown config section {'.'.join(parts[: i + 1])!r}"
                    )
                if node.get(part) is None:
                    node[part] = {}
                node, cls = node[part], sub
            leaf = parts[-1]
            known = {f.name for f in dataclasses.fields(cls)}
            if leaf not in known:
                raise ConfigError(
                    key, value, f"unknown key; known in this section: {sorted(known)}"
                )
            if isinstance(node.get(leaf), dict) and isinstance(value, dict):
                node[leaf] = {**node[leaf], **value}
            else:
                node[leaf] = value
        return type(self).from_dict(nested)

    @classmethod
    def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, tuple[Any, ...], str]]:
        """Every leaf key: ``(dotted key, type, default, allowed values, description)`` (for
        ``--help`` and ``python -m nfpi config --keys``; the description is the field's line of
        :func:`field_docs`, ``""`` if it has none)."""
        rows: list[tuple[str, str, Any, tuple[Any, ...], str]] = []
        hints, docs = _hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            sub = _nested_config_type(cls, f.name)
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()  # type: ignore[misc]
                if f.default_factory is not dataclasses.MISSING
                else None
            )
            if sub is not None and not _is_optional(hint):
                rows += sub.describe(f"{prefix}{f.name}.")
                continue
            if isinstance(default, Config):
                default = default.to_dict()
            allowed = literal_values(hint) or next(
                (literal_values(a) for a in typing.get_args(hint) if literal_values(a)), ()
            )
            rows.append(
                (f"{prefix}{f.name}", _describe(hint), default, allowed, docs.get(f.name, ""))
            )
        return rows


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )


def _nested_config_type(cls: type, name: str) -> type[Config] | None:
    """The Config subclass annotating field ``name`` of ``cls`` (also inside ``X | None``)."""
    hint = _hints(cls).get(name)
    candidates = typing.get_args(hint) if _is_optional(hint) else (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, Config):
            return c
    return None
