"""The agent's request handling: exec with live streaming (pipes or a pty), TCP
streams to guest ports, file transfer, shutdown."""
import errno
import fcntl
import os
import pty
import pwd
import queue
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time

from .. import __version__
from .. import protocol as P

HEARTBEAT_INTERVAL = 1.0
DRAIN_AFTER_EXIT = 2.0       # a daemon holding the pipes must not delay EXIT longer than this
DEFAULT_USER = "vmloader"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message):
    sys.stderr.write("vmloader-agent: %s\n" % message)
    sys.stderr.flush()


def sysrq_poweroff():
    """Power off without any userland tool: minimal guests have neither poweroff nor ctypes."""
    os.sync()
    with open("/proc/sysrq-trigger", "w") as handle:
        handle.write("o")


RNDADDENTROPY = 0x40085203      # _IOW('R', 0x03, int[2]): credit entropy to the input pool
RNDRESEEDCRNG = 0x5207          # _IO('R', 0x07): reseed the crng now (Linux >= 4.17)
MACHINE_ID_FILES = ("etc/machine-id", "var/lib/dbus/machine-id")


class Identity(object):
    """What makes a guest its own machine; `root` and the system calls are replaceable for tests."""

    def __init__(self, root="/", ioctl=fcntl.ioctl, settime=None, sethostname=socket.sethostname):
        self.root = root
        self.ioctl = ioctl
        self.settime = settime if settime is not None else (
            lambda ns: time.clock_settime(time.CLOCK_REALTIME, ns / 1e9))
        self.sethostname = sethostname

    def apply(self, entropy, hostname, machine_id, time_ns):
        """Every step is tried; returns what failed (empty: all done)."""
        failed = []
        for what, step, arg in (("reseed the random generator", self.reseed, entropy),
                                ("set the clock", self.settime, time_ns),
                                ("set the hostname", self.set_hostname, hostname),
                                ("set the machine-id", self.set_machine_id, machine_id)):
            if not arg:
                continue
            try:
                step(arg)
            except (OSError, ValueError) as exc:
                failed.append("%s (%s)" % (what, exc))
        return failed

    def reseed(self, entropy):
        request = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fd = os.open(os.path.join(self.root, "dev/urandom"), os.O_WRONLY)
        try:
            self.ioctl(fd, RNDADDENTROPY, request)
            self.ioctl(fd, RNDRESEEDCRNG, 0)
        finally:
            os.close(fd)

    def set_hostname(self, hostname):
        if not hostname.replace("-", "").isalnum() or len(hostname) > 63:
            raise ValueError("bad hostname %r" % hostname)
        self.sethostname(hostname)
        self._replace("etc/hostname", hostname + "\n")

    def set_machine_id(self, machine_id):
        if len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id):
            raise ValueError("bad machine-id")
        for name in MACHINE_ID_FILES:
            if name == MACHINE_ID_FILES[0] or os.path.exists(os.path.join(self.root, name)):
                self._replace(name, machine_id + "\n")

    def _replace(self, name, text):
        path = os.path.join(self.root, name)
        if os.path.islink(path):
            os.unlink(path)
        tmp = path + ".vmloader-tmp"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o444 if "machine-id" in name else 0o644)
        os.rename(tmp, path)


class Channel(object):
    """Serializes frame writes from the agent's threads."""

    def __init__(self, transport):
        self.transport = transport
        self.lock = threading.Lock()

    def send(self, type_, request_id, payload=b""):
        frame = P.encode(type_, request_id, payload)
        with self.lock:
            self.transport.write(frame)

    def reply(self, request_id, message):
        """Send one control message (a protocol.Message)."""
        self.send(message.TYPE, request_id, message.to_payload())


class Execution(object):
    """One running command: its process, its output pumps and its stdin feed."""

    def __init__(self, channel, request_id, proc):
        self.channel = channel
        self.request_id = request_id
        self.proc = proc
        self.closed = threading.Event()      # set once EXIT was sent: pumps stop sending
        self.pumps = [self._start_pump(fd, type_) for fd, type_ in self._outputs()]
        threading.Thread(target=self._finish, daemon=True).start()

    def _outputs(self):
        return [(self.proc.stdout.fileno(), P.STDOUT), (self.proc.stderr.fileno(), P.STDERR)]

    def _start_pump(self, fd, type_):
        thread = threading.Thread(target=self._pump, args=(fd, type_), daemon=True)
        thread.start()
        return thread

    def _pump(self, fd, type_):
        while not self.closed.is_set():
            try:
                data = os.read(fd, P.DATA_CHUNK)
            except OSError:
                break
            if not data or self.closed.is_set():
                break
            self.channel.send(type_, self.request_id, data)

    def _finish(self):
        status = self.proc.wait()
        deadline = time.time() + DRAIN_AFTER_EXIT
        for pump in self.pumps:
            pump.join(max(0.0, deadline - time.time()))
        self.closed.set()
        result = P.Exit(signal=-status) if status < 0 else P.Exit(code=status)
        try:
            self.channel.reply(self.request_id, result)
        except OSError:
            pass                               # the host is gone (the VM is being stopped)
        self._close_outputs()

    def _close_outputs(self):
        for pipe in (self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass

    def write_stdin(self, data):
        try:
            if data is None:
                self.proc.stdin.close()
            else:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (OSError, ValueError):
            pass                               # the command stopped reading: drop its input

    def kill(self, signum):
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            pass

    def resize(self, rows, cols):
        raise ValueError("RESIZE for a command that has no terminal")


class PtyExecution(Execution):
    """A command on a pseudo-terminal (interactive shells): one output, line editing and
    Ctrl-C by the guest's tty layer, window size changes passed on."""

    def __init__(self, channel, request_id, proc, master):
        self.master = master
        Execution.__init__(self, channel, request_id, proc)

    def _outputs(self):
        return [(self.master, P.STDOUT)]

    def _close_outputs(self):
        try:
            os.close(self.master)
        except OSError:
            pass

    def write_stdin(self, data):
        if data is None:
            return                             # end of the host's input: the shell decides (exit, ^D)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.master, view):]
        except OSError:
            pass

    def resize(self, rows, cols):
        set_window_size(self.master, rows, cols)


def set_window_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


class Stream(object):
    """A TCP connection to a guest port, relayed like a command: STDIN in, STDOUT out, EXIT at its end."""

    def __init__(self, channel, request_id, sock):
        self.channel = channel
        self.request_id = request_id
        self.sock = sock
        self.closed = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            while True:
                data = self.sock.recv(P.DATA_CHUNK)
                if not data:
                    break
                self.channel.send(P.STDOUT, self.request_id, data)
        except OSError:
            pass
        self.closed.set()
        try:
            self.channel.reply(self.request_id, P.Exit(code=0))
        except OSError:
            pass                               # the host is gone (the VM is being stopped)
        finally:
            self.sock.close()

    def write_stdin(self, data):
        try:
            if data is None:
                self.sock.shutdown(socket.SHUT_WR)
            else:
                self.sock.sendall(data)
        except OSError:
            pass

    def kill(self, signum):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def resize(self, rows, cols):
        raise ValueError("RESIZE for a TCP stream")


def catchable_signals():
    """Every signal a process may set a disposition for (3.6 has no signal.valid_signals)."""
    return [n for n in range(1, signal.NSIG) if n not in (signal.SIGKILL, signal.SIGSTOP)]


def reset_signals():
    """Default dispositions and an empty mask for a command about to exec: an agent started with
    signals ignored (by a non-interactive shell, cloud-init, a service manager) must not hand that
    on, or Ctrl-C in `snapshot shell` is lost (a shell cannot trap what was ignored at its start).
    Handlers reset themselves on exec; only ignored signals and the mask survive it."""
    for signum in catchable_signals():
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass                                   # reserved by the C library (32, 33)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def login_shell(entry):
    """An interactive shell for `snapshot shell`: bash where there is one (line editing), else the user's."""
    if os.path.exists("/bin/bash"):
        return ["/bin/bash", "-l"]
    shell = entry.pw_shell if entry is not None and entry.pw_shell else "/bin/sh"
    return [shell, "-l"]


class Agent(object):
    def __init__(self, transport, workdir="/work", lookup_user=pwd.getpwnam,
                 poweroff=sysrq_poweroff, default_user=DEFAULT_USER, identity=None):
        self.channel = Channel(transport)
        self.reader = P.FrameReader(transport.read)
        self.workdir = workdir
        self.lookup_user = lookup_user
        self.poweroff = poweroff
        self.default_user = default_user
        self.identity = identity if identity is not None else Identity()
        self.execs = {}
        self.uploads = {}
        self.stdin_queues = {}
        self.cancelled = set()

    def info(self):
        # "busy": requests still running from an earlier host connection (a VM resumed
        # from a memory snapshot): their late output must not look like a protocol error.
        busy = sorted(rid for rid, e in list(self.execs.items()) if not e.closed.is_set())
        return P.Hello(P.PROTOCOL_VERSION, agent=__version__, python=sys.version.split()[0],
                       kernel=os.uname().release, hostname=socket.gethostname(), pid=os.getpid(),
                       features=P.FEATURES, busy=busy,
                       # how a stock image got this agent (adopt.sh says): qemu-guest-agent, cloud-init
                       delivery=os.environ.get("VMLOADER_AGENT_DELIVERY") or None)

    def serve(self):
        threading.Thread(target=self._heartbeat, daemon=True).start()
        threading.Thread(target=self._hello, daemon=True).start()
        while True:
            try:
                frame = self.reader.read_frame(resync=True)
            except (P.ChannelClosed, OSError):
                return
            except P.ProtocolError as exc:
                log("dropping a bad frame: %s" % exc)
                continue
            try:
                self.handle(frame)
            except Exception as exc:   # one bad request must not take the agent down
                if not self._report(frame.request_id, exc):
                    return

    def _report(self, request_id, exc):
        """Tell the host a request failed; False when the channel itself is gone."""
        try:
            self.channel.reply(request_id, P.Error("%s: %s" % (type(exc).__name__, exc)))
            return True
        except OSError:
            return False

    def _hello(self):
        # Blocks on a virtio port until the host connects: hence its own thread.
        try:
            self.channel.reply(0, self.info())
        except OSError:
            pass

    def _heartbeat(self):
        while True:
            try:
                self.channel.send(P.HEARTBEAT, 0)
            except OSError:
                return                         # channel gone: serve() notices and returns
            time.sleep(HEARTBEAT_INTERVAL)

    def handle(self, frame):
        handler = {
            P.HELLO: lambda f: self.channel.reply(0, self.info()),
            P.EXEC: self.on_exec, P.STDIN: self.on_stdin, P.STDIN_EOF: self.on_stdin,
            P.KILL: self.on_kill, P.RESIZE: self.on_resize, P.CONNECT: self.on_connect, P.PUT: self.on_put, P.PUT_DATA: self.on_put_data,
            P.PUT_END: self.on_put_end, P.GET: self.on_get, P.LIST: self.on_list,
            P.SHUTDOWN: self.on_shutdown, P.IDENTITY: self.on_identity,
        }.get(frame.type)
        if handler is None:
            raise ValueError("unexpected %s frame" % P.name_of(frame.type))
        handler(frame)

    # -- exec ---------------------------------------------------------------
    def _identity(self, user):
        if user == "root" and os.geteuid() != 0:
            return None                        # tests run unprivileged: stay who we are
        return self.lookup_user(user)

    def _environment(self, entry, extra):
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        if entry is not None:
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
        env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def _preexec(self, entry, controlling_tty=False):
        def demote():
            reset_signals()
            os.setsid()
            if controlling_tty:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)      # Ctrl-C in the pty reaches the command
            if entry is not None and os.geteuid() == 0:
                os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
        return demote

    def on_exec(self, frame):
        req = P.Exec.from_payload(frame.payload)
        try:
            entry = self._identity(req.user or self.default_user)
        except KeyError:
            raise ValueError("no such guest user %r" % req.user)
        argv = login_shell(entry) if req.shell else req.argv
        if not argv:
            raise ValueError("EXEC needs a non-empty argv list of strings")
        cwd = req.cwd or self.workdir
        if not os.path.isdir(cwd):
            os.makedirs(cwd)
        env = self._environment(entry, req.env)
        terminal = req.pty
        master = None
        try:
            if terminal is not None:
                env["TERM"] = terminal.term
                master, slave = pty.openpty()
                set_window_size(slave, terminal.rows, terminal.cols)
                try:
                    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                            preexec_fn=self._preexec(entry, controlling_tty=True),
                                            close_fds=True)
                finally:
                    os.close(slave)
            else:
                proc = subprocess.Popen(argv, cwd=cwd, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        preexec_fn=self._preexec(entry), close_fds=True)
        except OSError as exc:
            if master is not None:
                os.close(master)
            kind = "not_found" if exc.errno == errno.ENOENT else (
                "not_executable" if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM)
                else "spawn_failed")
            message = "%s: %s" % (argv[0], exc.strerror)
            self.channel.reply(frame.request_id, P.Exit(error=kind, message=message))
            return
        if master is not None:
            self.execs[frame.request_id] = PtyExecution(self.channel, frame.request_id, proc, master)
        else:
            self.execs[frame.request_id] = Execution(self.channel, frame.request_id, proc)
        self._start_stdin_feeder(frame.request_id)

    def on_resize(self, frame):
        execution = self.execs.get(frame.request_id)
        if execution is not None:
            req = P.Resize.from_payload(frame.payload)
            execution.resize(req.rows or 24, req.cols or 80)

    def on_connect(self, frame):
        port = P.Connect.from_payload(frame.payload).port
        if not 0 < port < 65536:
            raise ValueError("CONNECT needs a TCP port number")
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError as exc:
            self.channel.reply(frame.request_id, P.Exit(
                error="connect_failed", message="127.0.0.1:%d in the guest: %s" % (port, exc)))
            return
        sock.settimeout(None)
        self.execs[frame.request_id] = Stream(self.channel, frame.request_id, sock)
        self._start_stdin_feeder(frame.request_id)

    def _start_stdin_feeder(self, request_id):
        # Feeding stdin on its own thread keeps the reader free for KILL even when
        # the command does not read its input.
        feed = queue.Queue()
        self.stdin_queues[request_id] = feed

        def run():
            execution = self.execs[request_id]
            while True:
                data = feed.get()
                execution.write_stdin(data)
                if data is None:
                    return
        threading.Thread(target=run, daemon=True).start()

    def on_stdin(self, frame):
        feed = self.stdin_queues.get(frame.request_id)
        if feed is not None:
            feed.put(frame.payload if frame.type == P.STDIN else None)

    def on_kill(self, frame):
        self.cancelled.add(frame.request_id)       # stops a file download in flight
        execution = self.execs.get(frame.request_id)
        if execution is not None:
            execution.kill(P.Kill.from_payload(frame.payload).signal)

    # -- files --------------------------------------------------------------
    def _path(self, path):
        return path if os.path.isabs(path) else os.path.join(self.workdir, path)

    def on_put(self, frame):
        req = P.Put.from_payload(frame.payload)
        target = self._path(req.path)
        parent = os.path.dirname(target)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent)
        tmp = target + ".vmloader-part"
        handle = open(tmp, "wb")
        self.uploads[frame.request_id] = (handle, tmp, target, req)

    def on_put_data(self, frame):
        self.uploads[frame.request_id][0].write(frame.payload)

    def on_put_end(self, frame):
        handle, tmp, target, req = self.uploads.pop(frame.request_id)
        handle.close()
        os.chmod(tmp, req.mode)
        entry = self._identity(req.user or self.default_user)
        if entry is not None and os.geteuid() == 0:
            os.chown(tmp, entry.pw_uid, entry.pw_gid)
        os.rename(tmp, target)
        self.channel.reply(frame.request_id, P.PutDone(os.path.getsize(target)))

    def on_get(self, frame):
        path = self._path(P.Get.from_payload(frame.payload).path)
        mode = os.stat(path).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):
            raise ValueError("%s is not a file (a FIFO, socket or directory): not copied" % path)
        handle = open(path, "rb")
        threading.Thread(target=self._send_file, args=(frame.request_id, handle), daemon=True).start()

    def on_list(self, frame):
        """Entries of one directory (not followed through symlinks), for collecting new outputs."""
        path = self._path(P.ListDir.from_payload(frame.payload).path)
        entries = []
        for name in sorted(os.listdir(path)):
            st = os.lstat(os.path.join(path, name))
            kind = ("file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                    else "link" if stat.S_ISLNK(st.st_mode) else "other")
            entries.append(P.DirEntry(name, kind, st.st_size, st.st_mtime_ns))
        self.channel.reply(frame.request_id, P.Listing(entries))

    def _send_file(self, request_id, handle):
        size = 0
        try:
            with handle:
                for block in iter(lambda: handle.read(P.DATA_CHUNK), b""):
                    if request_id in self.cancelled:
                        return
                    self.channel.send(P.GET_DATA, request_id, block)
                    size += len(block)
            self.channel.reply(request_id, P.GetEnd(size))
        except OSError as exc:
            log("file download %d stopped: %s" % (request_id, exc))

    # -- identity -----------------------------------------------------------
    def on_identity(self, frame):
        """A VM restored from a warm state is a clone: reseed, new names, the host's clock."""
        req = P.Identity.from_payload(frame.payload)
        failed = self.identity.apply(req.entropy, req.hostname, req.machine_id, req.time_ns)
        if failed:
            raise OSError("could not " + "; ".join(failed))
        # On the console too: a restored guest prints nothing of its own boot into this job's log.
        log("this VM is now %s" % req.hostname)
        self.channel.reply(frame.request_id, P.IdentityDone(socket.gethostname()))

    # -- shutdown -----------------------------------------------------------
    def on_shutdown(self, frame):
        P.Shutdown.from_payload(frame.payload)
        os.sync()
        self.channel.reply(frame.request_id, P.ShutdownDone())
        time.sleep(0.2)        # let the acknowledgement leave before the power goes
        self.poweroff()
