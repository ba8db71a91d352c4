"""``with`` for the runtime's resources: a class that frees itself by ``close()`` (or, for frame
sources, cv2's ``release()``) inherits ``Closing`` (``Releasing``) instead of restating
``__enter__``/``__exit__``."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class Closing:
    """``with obj: ...`` calls ``obj.close()`` on the way out, whatever happened inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Releasing(Closing):
    """A frame source: ``release()`` (cv2's name) frees it; ``close()`` and ``with`` do the same."""

    def release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.release()
