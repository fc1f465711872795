"""Lists inside error and warning messages: the first few items, then how many more, the same way everywhere.

Such a list comes from a model (thousands of layers) or from a file (anything at all), so it is capped: the
message stays readable, and a hostile adapter file cannot make it megabytes long.
"""

from typing import Iterable

#: How many items a message writes out; the rest are counted.
SHOWN = 12


def listing(items: Iterable, *, separator: str = ", ") -> str:
    """str() of each item joined by `separator`, at most SHOWN of them, then "... (N more)"; "none" for no
    items. The order is the caller's: sort first where it means nothing."""
    items = [str(item) for item in items]
    if not items:
        return "none"
    more = len(items) - SHOWN
    return separator.join(items[:SHOWN]) + (f"{separator}... ({more} more)" if more > 0 else "")
