"""Checks of values at the boundary (configs, CLI arguments, function arguments), and the parser of axis sizes
("data=2,fsdp=4"): each raises ValueError naming the field and the value. Plain Python with no imports, so that
every package's configuration (model, mesh, train, serve, scaling) can use it; bools are not numbers here."""

from __future__ import annotations

_KINDS = {0: "non-negative", 1: "positive"}


def is_int(value: object) -> bool:
    """Whether `value` is an integer (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether `value` is an int or a float (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int = 1, note: str = "") -> None:
    """Refuse anything but an integer >= `minimum` (1: "a positive integer", 0: "a non-negative integer"):
    `<name> must be a positive integer<note>, got <value!r>`."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be a {_KINDS[minimum]} integer{note}, got {value!r}")


def check_ints(prefix: str, owner: object, names: tuple[str, ...], minimum: int = 1) -> None:
    """`check_int` on each attribute `names` of `owner`, named `<prefix><name>` (e.g. "train.steps")."""
    for name in names:
        check_int(f"{prefix}{name}", getattr(owner, name), minimum)


def check_number(name: str, value: object, strict: bool = True) -> None:
    """Refuse anything but a number > 0 ("a positive number"; `strict=False`: >= 0, "a non-negative number").
    NaN is refused too."""
    if not is_number(value) or not (value > 0 if strict else value >= 0):
        raise ValueError(f"{name} must be a {_KINDS[int(strict)]} number, got {value!r}")


def check_one_of(name: str, value: object, choices: tuple) -> None:
    """Refuse a value that is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Refuse anything but True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_axis_sizes(text: str, axes: tuple[str, ...], what: str = "mesh") -> dict[str, int]:
    """"data=2,fsdp=2" -> {"data": 2, "fsdp": 2}, each name one of `axes`; errors name the bad part."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"{what} part {part!r} is not of the form axis=size")
        if name not in axes:
            raise ValueError(f"{what} part {part!r}: unknown axis {name!r}; axes are {', '.join(axes)}")
        if name in sizes:
            raise ValueError(f"{what} part {part!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"{what} part {part!r}: size {value!r} is not an integer") from None
    return sizes
