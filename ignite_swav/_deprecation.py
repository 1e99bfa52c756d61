"""Old names kept for one release after 1.0's renaming, each with a ``DeprecationWarning`` naming the new one."""

from __future__ import annotations

import warnings
from typing import Any

#: the release that removes the names deprecated in 1.0
REMOVED_IN = "1.1"


def warn_renamed(old: str, new: str) -> None:
    """Warn, at the caller's caller, that ``old`` is now ``new``."""
    warnings.warn(
        f"{old} is now {new}; the old name goes in ignite-swav {REMOVED_IN}", DeprecationWarning, stacklevel=3
    )


def renamed_method(old: str, new: str) -> Any:
    """A method ``old`` of a class that calls its method ``new``, with the warning."""

    def alias(self: Any, *args: Any, **kwargs: Any) -> Any:
        warn_renamed(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}")
        return getattr(self, new)(*args, **kwargs)

    alias.__name__ = old
    alias.__doc__ = f"Deprecated name of :meth:`{new}` (removed in {REMOVED_IN})."
    return alias
