"""Small formatting rules shared by the console, the report and W&B, so they always agree."""

from __future__ import annotations


def is_number(v) -> bool:
    """An int or float that is not a bool (JSON round-trips make bools look like ints)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    s = int(round(max(0.0, seconds)))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def class_names(classes, n: int) -> list[str]:
    """n display names: the run's class names, the index where a name is missing."""
    classes = list(classes or []) if isinstance(classes, (list, tuple)) else []
    return [str(classes[i]) if i < len(classes) else str(i) for i in range(n)]


def console_text(text) -> str:
    """Text for the console and tables: control characters (terminal escapes, newlines) shown as
    escapes, so a name cannot rewrite the screen or break a table; JSON keeps the exact text."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def display_names(classes, n: int) -> list[str]:
    """class_names, made safe for the console."""
    return [console_text(name) for name in class_names(classes, n)]


def percent(value, width: int = 7) -> str:
    """A fraction as a percentage; n/a where there is none (a class without test images)."""
    return f"{100 * value:{width}.2f}%" if is_number(value) else f"{'n/a':>{width + 1}}"
