"""vmloader: run each batch job in its own VM.

This package root must stay stdlib-only and import nothing: the in-guest
agent (vmloader.agent) and the shared wire protocol (vmloader.protocol) are
copied into guest images and run under whatever Python 3 the guest has.
"""

__version__ = "0.1.0"
