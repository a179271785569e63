"""Per-phase wall-clock timings of a job, recorded in its metadata and --json output."""
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

from .errors import Interrupted


class PhaseTimer:
    """Times named phases; remembers which phase is running so errors can name it.

    `on_enter` is told each phase as it starts (the job writes it where
    `vmloader status` can read it)."""

    def __init__(self, on_enter: Callable[[str], None] = lambda name: None) -> None:
        self.seconds: Dict[str, float] = {}
        self.current: Optional[str] = None
        self.on_enter = on_enter

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        self.on_enter(name)
        started = time.monotonic()
        try:
            yield
        except Interrupted as stop:         # raised wherever the signal landed: name the phase it stopped
            stop.phase = stop.phase or name
            raise
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 3)
            self.current = previous

    def to_dict(self) -> dict:
        return dict(self.seconds)
