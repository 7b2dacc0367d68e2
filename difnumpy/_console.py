"""What a long run says and hears on the console: the compile notice and the Ctrl-C guard."""
from __future__ import annotations

import signal
import threading
from typing import Callable

__all__ = ["COMPILE_MESSAGE", "CompileNotice", "SigintGuard"]

#: Said once (on stderr, with the progress bar on) when numba starts compiling kernels: a cold cache.
COMPILE_MESSAGE = "compiling kernels (first run only) ..."


class SigintGuard:
    """First SIGINT sets a flag (stop after the current step); a second one raises at once.

    Only installs a handler in the main thread (signals are delivered there); elsewhere it is
    inert and a KeyboardInterrupt propagates as usual.
    """

    def __init__(self, on_first: Callable[[], None] | None = None):
        self.requested = False
        self._old = None
        self._on_first = on_first

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._old or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first is not None:
            self._on_first()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class CompileNotice:
    """Says ``COMPILE_MESSAGE`` once when numba starts compiling a kernel (a cold cache: the first run).

    Uses numba's event API (``"numba:compile"`` is broadcast on a cache miss only, so a warm cache
    prints nothing); inert where that API is missing.
    """

    def __init__(self, say: Callable[[str], None]):
        self.say, self.said, self._ev, self._listener = say, False, None, None

    def __enter__(self):
        try:
            from numba.core import event as ev
        except ImportError:  # pragma: no cover
            return self
        notice = self

        class _Listener(ev.Listener):
            def on_start(self, event):
                if not notice.said:
                    notice.said = True
                    notice.say(COMPILE_MESSAGE)

            def on_end(self, event):
                pass

        self._ev, self._listener = ev, _Listener()
        ev.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        if self._ev is not None:
            self._ev.unregister("numba:compile", self._listener)
        return False
