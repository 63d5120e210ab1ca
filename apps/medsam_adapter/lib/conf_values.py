"""Values of the server's ``--conf`` options (MONAI Label passes them as strings), parsed once at start
with a message that names the option. Each caller raises its own error type (``error``) so that a bad
option fails the start as that layer's configuration error."""

from __future__ import annotations

import math


def _raw(conf: dict[str, str], key: str, default: object) -> str:
    """The option's text; a missing or empty option is its default."""
    value = str(conf.get(key, "")).strip()
    return value if value else str(default)


def conf_flag(conf: dict[str, str], key: str, default: bool, error: type[Exception] = ValueError) -> bool:
    """``true``/``1``/``yes``/``on`` or ``false``/``0``/``no``/``off`` (any case)."""
    value = _raw(conf, key, default).lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise error(f"--conf {key}: expected true or false, got {conf[key]!r}")


def conf_int(
    conf: dict[str, str], key: str, default: int, low: int, high: int, error: type[Exception] = ValueError
) -> int:
    """A whole number in ``[low, high]``."""
    raw = _raw(conf, key, default)
    try:
        value = int(raw)
    except ValueError:
        raise error(f"--conf {key}: expected a whole number, got {conf[key]!r}") from None
    if not low <= value <= high:
        raise error(f"--conf {key}: must be between {low} and {high}, got {value}")
    return value


def conf_float(
    conf: dict[str, str],
    key: str,
    default: float,
    low: float,
    error: type[Exception] = ValueError,
    above: bool = False,
) -> float:
    """A finite number at least ``low`` (``above``: greater than ``low``)."""
    raw = _raw(conf, key, default)
    try:
        value = float(raw)
    except ValueError:
        raise error(f"--conf {key}: expected a number, got {conf[key]!r}") from None
    if not math.isfinite(value) or value < low or (above and value == low):
        bound = f"above {low:g}" if above else f"of at least {low:g}"
        raise error(f"--conf {key}: must be a finite number {bound}, got {raw}")
    return value
