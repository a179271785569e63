"""Debian's Squid as a caching proxy on loopback, for tests (sites put one in front of the repository)."""
import pwd
import subprocess
from pathlib import Path
from typing import Optional

from .nginx import free_port, wait_for_port

CONFIG = """http_port 127.0.0.1:{port}
pid_filename {prefix}/squid.pid
cache_effective_user proxy
cache_dir ufs {prefix}/cache 2000 16 256
cache_mem 32 MB
maximum_object_size 2 GB
maximum_object_size_in_memory 1 MB
access_log {prefix}/access.log squid
cache_log {prefix}/cache.log
cache_store_log none
coredump_dir {prefix}
http_access allow localhost
http_access deny all
refresh_pattern . 60 50% 1440
shutdown_lifetime 1 seconds
"""


class Squid:
    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self) -> "Squid":
        proxy = pwd.getpwnam("proxy")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "squid.conf"
        conf.write_text(CONFIG.format(port=self.port, prefix=self.prefix))
        subprocess.run(["chown", "-R", f"{proxy.pw_uid}:{proxy.pw_gid}", str(self.prefix)], check=True)
        subprocess.run(["squid", "-z", "-N", "-f", str(conf)], check=True, capture_output=True, timeout=60)
        self.proc = subprocess.Popen(["squid", "-N", "-f", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 20, f"squid (see {self.prefix}/cache.log)")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
