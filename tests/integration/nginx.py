"""A stock nginx from Debian serving a repository directory on loopback, for tests."""
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

CONFIG = """daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
    }}
}}
"""


def wait_for_port(port: int, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    def __init__(self, root: Path, prefix: Path, rate: Optional[str] = None):
        self.root, self.prefix, self.rate = root, prefix, rate
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self) -> "Nginx":
        self.prefix.mkdir(parents=True, exist_ok=True)
        limit = f"limit_rate {self.rate};" if self.rate else ""
        conf = self.prefix / "nginx.conf"
        conf.write_text(CONFIG.format(prefix=self.prefix, port=self.port, root=self.root, limit=limit))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.prefix)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 10, f"nginx (see {self.prefix}/error.log)")
        return self

    def stop(self) -> None:
        """Stop the nginx we started (by its pid; SIGTERM is nginx's fast shutdown)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def requests_for(self, suffix: str) -> list:
        if not self.access_log.exists():
            return []
        return [line for line in self.access_log.read_text().splitlines() if f" {suffix}" in line
                or f"{suffix} HTTP" in line]
