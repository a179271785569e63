"""`vmloader repo serve` on a loopback port, as tests start and stop it."""
import subprocess
import sys
from pathlib import Path

from .conftest import next_line
from .nginx import free_port


class RepoServer:
    """`vmloader repo serve DIR` on a loopback port; stop() and start() again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "RepoServer":
        self.proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "repo", "serve",
                                      str(self.root), "--bind", f"127.0.0.1:{self.port}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert "serving" in next_line(self.proc, 120)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
