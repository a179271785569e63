"""How vmloader's servers (`repo serve`, `cache serve`) stop on SIGTERM, SIGINT or SIGHUP.

The CLI turns those signals into an exception (cli._stop_on_signals), which suits a job: its
cleanup runs on the way out. A socketserver loop swallows it: a signal that lands while the loop
accepts or dispatches a request raises inside `_handle_request_noblock`, whose `except
Exception` prints it as a failed request and serves on, and the handler has already set the
signals to be ignored, so the server outlives every later SIGTERM (seen: `repo serve` left
running after a test's `terminate()`). Here a signal only asks the loop to end, from a thread
of its own (`shutdown()` waits for the loop, so the loop's thread cannot call it), and the loop
ends at its next poll, between requests.
"""
import signal
import socketserver
import threading
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
