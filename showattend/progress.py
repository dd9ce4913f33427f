"""Progress reporting: a tqdm bar on a terminal, a short plain line every N seconds elsewhere.

tqdm redraws its bar with carriage returns; written into a redirected log (``2> train.log``,
a batch scheduler, CI) that becomes one enormous line per phase. :func:`progress_bar` draws the
bar only where it is seen live (a terminal, or a notebook, where tqdm.auto shows a widget) and
otherwise prints ``desc: n/total unit (pct%), rate, elapsed, ETA, postfix`` lines, at most one
every ``interval`` seconds, plus a closing line for phases that printed one or asked to stay.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

DEFAULT_INTERVAL = 60.0  # seconds between two lines in a log


def _interactive(stream: TextIO) -> bool:
    """A bar is useful here: the stream is a terminal, or we run inside a notebook kernel."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    import tqdm.auto  # noqa: F401 - imports tqdm.autonotebook quietly; it picks the front end
    from tqdm.std import tqdm as std_tqdm

    return sys.modules["tqdm.autonotebook"].tqdm is not std_tqdm  # the notebook widget


class LineProgress:
    """The subset of tqdm's interface this package uses, reporting as occasional plain lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True,
                 interval: float = DEFAULT_INTERVAL, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.leave = leave
        self.interval = interval
        self.file = file
        self._clock = clock
        self._start_n = initial
        self._t0 = self._last = clock()
        self._postfix = ""
        self._lines = 0
        self._closed = False

    # --- tqdm interface ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress has no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave or self._lines:  # short phases that were never reported stay silent
            self._emit(self._clock(), final=True)

    # --- lines ------------------------------------------------------------------------------
    def line(self, now: float | None = None, final: bool = False) -> str:
        """The report line as it would be printed now."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"{elapsed:.0f}s" + (" total" if final else ""))
        if not final and self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {(self.total - self.n) / rate:.0f}s")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        self._lines += 1
        print(self.line(now, final), file=self.file or sys.stderr, flush=True)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, leave: bool = True,
                 interval: float = DEFAULT_INTERVAL, file: TextIO | None = None) -> Any:
    """A tqdm bar where it is seen live, else a :class:`LineProgress`; nothing when disabled.

    Use it like tqdm: iterate over it, or ``update`` / ``set_postfix`` / ``close`` it.
    ``interval`` only matters without a terminal: the seconds between two report lines.
    """
    stream = file or sys.stderr
    if disable or _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                    disable=disable, leave=leave, file=file)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                        interval=interval, file=file)


def write(message: str, file: TextIO | None = None) -> None:
    """Print a line without breaking a bar being drawn (stdout by default, as tqdm.write)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=file)


__all__ = ["progress_bar", "write", "LineProgress", "DEFAULT_INTERVAL"]
