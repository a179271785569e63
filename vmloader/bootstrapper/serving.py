"""How vmloader's servers (`repo serve`, `cache serve`) stop on SIGTERM, SIGINT or SIGHUP.

The CLI turns those signals into an exception (stopsignals.py), which suits a job: its
cleanup runs on the way out. A server's loop is the wrong place for it: raised while the loop
dispatches a request it would end the server mid-request with its socket and files as they
were (and while that exception was an Exception, socketserver's `except Exception` printed it
as a failed request and served on with the signals ignored: `repo serve` outlived a test's
`terminate()`). Here a signal only asks the loop to end, from a thread of its own
(`shutdown()` waits for the loop, so the loop's thread cannot call it), and the loop ends at
its next poll, between requests.
"""
import signal
import socketserver
import threading
from typing import Callable, Optional

from .stopsignals import STOP_SIGNALS


def serve_until_signalled(server: socketserver.BaseServer,
                          ready: Callable[[], None] = lambda: None) -> Optional[str]:
    """Serve until SIGTERM, SIGINT or SIGHUP (call from the main thread). `ready` runs once those
    signals would stop the server, so a banner printed there promises a server that a SIGTERM
    ends (printed before, a signal sent on seeing it met the CLI's handler instead). Returns the
    signal's name, or None when the loop ended otherwise (another thread's `server.shutdown()`);
    the previous handlers are back either way."""
    received: list = []

    def on_signal(signum, _frame) -> None:
        if not received:
            received.append(signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, name="vmloader-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        ready()
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else None
