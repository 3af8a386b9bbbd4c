"""Checks of values at the boundary (configs, CLI arguments, function arguments), and the parser of axis sizes
("data=2,fsdp=4"): each raises ValueError naming the field and the value. Plain Python with no imports, so that
every package's configuration (model, mesh, train, serve, scaling) can use it; bools are not numbers here."""

from __future__ import annotations

_KINDS = {0: "non-negative", 1: "positive"}
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters (a request can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


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


def is_power_of_two(value: object) -> bool:
    """Whether `value` is an integer 1, 2, 4, 8, ... (a bool is not)."""
    return is_int(value) and value > 0 and value & (value - 1) == 0


def check_ints(prefix: str, owner: object, names: tuple[str, ...], minimum: int = 1) -> None:
    """`check_int` on each attribute `names` of `owner`, named `<prefix><name>` (e.g. "train.steps")."""
    for name in names:
        check_int(f"{prefix}{name}", getattr(owner, name), minimum)


def check_number(name: str, value: object, strict: bool = True) -> None:
    """Refuse anything but a number > 0 ("a positive number"; `strict=False`: >= 0, "a non-negative number").
    NaN is refused too."""
    if not is_number(value) or not (value > 0 if strict else value >= 0):
        raise ValueError(f"{name} must be a {_KINDS[int(strict)]} number, got {value!r}")


def check_numbers(prefix: str, owner: object, names: tuple[str, ...], strict: bool = True) -> None:
    """`check_number` on each attribute `names` of `owner`, named `<prefix><name>` (e.g. "train.lr")."""
    for name in names:
        check_number(f"{prefix}{name}", getattr(owner, name), strict)


def check_float32(name: str, value: object, note: str = "") -> None:
    """Refuse anything but a number that is finite in float32 (|value| <= FLOAT32_MAX; NaN and inf are refused):
    `<name> must be a number, got <value!r>` or `<name> must be a finite number<note>, got <value!r>`."""
    if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not abs(value) <= FLOAT32_MAX:  # NaN fails this too
        raise ValueError(f"{name} must be a finite number{note}, got {value!r}")


def interval_problem(name: str, value: float, low: float, high: float, *, open_low: bool = False,
                     open_high: bool = False, show=repr) -> str | None:
    """Why the number `value` is outside the interval from `low` to `high` (`open_low`, `open_high`: that end
    excluded), as `<name> must be in (0, 1], got <show(value)>`; None when it is inside. NaN is outside."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if above and below:
        return None
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return f"{name} must be in {interval}, got {show(value)}"


def check_interval(name: str, value: float, low: float, high: float, *, open_low: bool = False,
                   open_high: bool = False) -> None:
    """Refuse a number outside the interval (`interval_problem`'s message)."""
    problem = interval_problem(name, value, low, high, open_low=open_low, open_high=open_high)
    if problem:
        raise ValueError(problem)


def check_power_of_two(name: str, value: object, minimum: int = 1) -> None:
    """Refuse anything but a power of two >= `minimum`: `<name> must be a power of two[ >= minimum], got ...`."""
    if not is_power_of_two(value) or value < minimum:
        at_least = f" >= {minimum}" if minimum > 1 else ""
        raise ValueError(f"{name} must be a power of two{at_least}, got {value!r}")


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
