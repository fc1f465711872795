"""Regular expressions from configs (target_modules, exclude_modules, rank/alpha_pattern keys), matched with a
time bound.

A pattern in an adapter_config.json is whatever its author wrote, and Python's `re` takes exponential time on
some patterns with nested repetition: `(.*.*.*.*.*.*.*.*.*.*.*.*)*Z` against a module path hung loading for
over a minute. The `regex` package reads the same syntax (its VERSION0 is `re`'s), needs no backtracking for
many such patterns, and stops any match at a timeout. A module path is a few dozen characters, which an
ordinary pattern matches in microseconds, so MATCH_SECONDS per path is a bound no real pattern comes near;
a pattern that reaches it is refused with a ValueError naming the field, the pattern and where it came from.
"""

import functools
from typing import Optional

import regex

#: Time one pattern may take to match one module path.
MATCH_SECONDS = 0.25


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str):
    return regex.compile(pattern)


def _origin(field: str, pattern: str, source: Optional[str]) -> str:
    shown = repr(pattern) if len(pattern) <= 80 else repr(pattern[:77]) + "..."
    return f"{field} {shown}" + (f" from {source}" if source else "")


def _compile(pattern: str, *, field: str, shown: str, source: Optional[str]):
    try:
        return _compiled(pattern)
    except regex.error as err:
        raise ValueError(f"{_origin(field, shown, source)} is not a valid regular expression: {err}") from None


def check_pattern(pattern: str, *, field: str, source: Optional[str] = None) -> None:
    """ValueError when `pattern` is not a valid regular expression, for PEFT's rank_pattern rule as well."""
    _compile(pattern, field=field, shown=pattern, source=source)
    _compile(_suffix_rule(pattern), field=field, shown=pattern, source=source)


def _suffix_rule(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _match(pattern: str, text: str, *, full: bool, field: str, shown: str, source: Optional[str]) -> bool:
    compiled = _compile(pattern, field=field, shown=shown, source=source)
    try:
        found = (compiled.fullmatch if full else compiled.match)(text, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise ValueError(f"{_origin(field, shown, source)} took more than {MATCH_SECONDS} s to match the module "
                         f"path {text!r}: a pattern with nested repetition (such as (a|aa)*) can take exponential "
                         "time; write it without repeating a repetition") from None
    return found is not None


def full_match(pattern: str, text: str, *, field: str, source: Optional[str] = None) -> bool:
    """Whether `pattern` matches the whole of `text` (PEFT's rule for a target_modules string)."""
    return _match(pattern, text, full=True, field=field, shown=pattern, source=source)


def suffix_match(key: str, text: str, *, field: str, source: Optional[str] = None) -> bool:
    """Whether `key` matches the end of `text`, after a dot or as the whole of it (PEFT's rank_pattern rule)."""
    return _match(_suffix_rule(key), text, full=False, field=field, shown=key, source=source)
