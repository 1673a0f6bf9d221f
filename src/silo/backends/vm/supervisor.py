"""A one-shot VM run: the process the spawner tracks in place of a sandbox's init.

It boots the machine (silo.backends.vm.machine), waits for the agent's hello, gives the
guest its identity (hostname, machine-id, an RNG seed), asks it to run the command,
relays stdio and forwarded signals, and exits with the command's exit code.

Errors go to ``err_fd`` in the process level's wire form (``error CLASS MESSAGE``), so
the spawner reports them the same way. QEMU and virtiofsd die with it (parent-death
signal), so a SIGKILL from the spawner (timeout, client gone) leaves nothing running.

Every byte from the guest is untrusted: frames are bounded and checked
(silo.agent.protocol), exit codes are range-checked, and nothing the guest sends is
used as a host path.

A pooled VM (``warm``) boots before anybody asks for it, runs a warm-up command
(:data:`WARMUP_SCRIPT`), says ``ready`` on ``err_fd`` and waits there for its run --
``marshal`` of (argv, env, cwd, uid, gid, hostname) with three stdio fds -- answers
``taken`` and goes on as above. It runs that one command and ends with it: a pooled VM
is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import marshal
import mmap
import os
import signal
import socket
import struct
import termios
import tty as ttymod
from collections.abc import Sequence
from typing import Any

from qemu.qmp import QMPClient, QMPError

from silo.agent import protocol as P
from silo.backends.vm import disk, machine
from silo.model import plan as p
from silo.model import users
from silo.model.errors import SiloError

_libc = ctypes.CDLL(None, use_errno=True)

FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
BOOT_TIMEOUT = float(os.environ.get("SILO_VM_BOOT_TIMEOUT", "60"))  # to the agent's hello; TCG under load is slow
CHANNEL = 1
WARMUP = 2  # a pooled VM's warm-up command, before it says ready
# Run once in a pooled VM before it is handed out, so the run's exec finds the dynamic
# linker, libc and the shell in the guest's page cache, and /etc already copied up for
# the identity files (under TCG a first exec through virtio-fs costs ~0.3 s, a warm one
# ~45 ms). It runs before any run's command: nothing of a user's touches it.
WARMUP_SCRIPT = (b": >>/etc/hosts; : >>/etc/hostname; : >>/etc/machine-id; "
                 b"/usr/bin/env true; exec /bin/sh -c :")
PATH_ENV = b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ERROR_CLASSES = {127: "CommandNotFound", 126: "CommandNotExecutable"}  # an agent's ERROR code -> SiloError class
READY = b"ready"
TAKEN = b"taken"


class BootFailed(Exception):
    pass


def _report(err_fd: int, cls: str, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(err_fd, f"error {cls} {message}".encode()[:60000])


def _console_tail(fd: int) -> str:
    with contextlib.suppress(OSError):
        size = os.fstat(fd).st_size
        data = os.pread(fd, 2000, max(0, size - 2000)).decode("utf-8", "replace")
        lines = [line.strip() for line in data.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""
    return ""


WINSIZE_POLL = 0.25  # how often a tty command's window size is looked at
_WINSIZE = struct.Struct("HHHH")


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = _WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


class Command:
    """What one run asks of the guest: from the plan, or from the hand-over of a pooled VM."""

    def __init__(self, argv: Sequence[str], env: Sequence[tuple[str, str]], cwd: str, uid: int, gid: int,
                 hostname: str, rlimits: tuple[tuple[str, int, int], ...] = ()) -> None:
        self.argv = [os.fsencode(a) for a in argv]
        self.env = [os.fsencode(f"{k}={v}") for k, v in env]
        self.cwd = os.fsencode(cwd)
        self.uid, self.gid, self.hostname = int(uid), int(gid), str(hostname)
        self.rlimits = rlimits

    @classmethod
    def of(cls, plan: p.Plan) -> Command:
        proc = plan.process
        assert plan.vm is not None
        return cls(proc.argv, proc.env, proc.cwd, proc.uid, proc.gid, plan.vm.hostname, proc.rlimits)

    @classmethod
    def from_handover(cls, data: bytes) -> Command:
        """The spawner's hand-over message (same uid: trusted, but checked for shape)."""
        argv, env, cwd, uid, gid, hostname = marshal.loads(data)  # noqa: S302 - our own spawner
        return cls(argv, env, cwd, uid, gid, hostname)


def handover(argv: tuple[str, ...], env: tuple[tuple[str, str], ...], cwd: str, uid: int, gid: int,
             hostname: str) -> bytes:
    """The message the spawner sends a pooled VM (see the module's docstring)."""
    return marshal.dumps((tuple(argv), tuple(env), cwd, uid, gid, hostname))


class Job:
    """One command in the guest: its channel, the host's ends of its stdio (or of its pty)."""

    def __init__(self, channel: int, stdio: tuple[int, int, int], slave: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.channel = channel
        self.stdio = stdio if slave is None else (slave, slave, slave)
        self.slave = slave  # a tty command's host pty end (its master went to the caller)
        self.winsize = (0, 0)
        self.started: asyncio.Future[int] = loop.create_future()  # the guest pid
        self.exit: asyncio.Future[int] = loop.create_future()
        self.error: tuple[int, str] | None = None  # the agent's ERROR, when it could not start it
        self.pending_signals: list[int] = []
        self.reading = False
        self.stdin_task: asyncio.Task[None] | None = None
        self.ident: int | None = None  # a workspace's exec: silod's id for it
        self.master: int | None = None  # a workspace's tty exec: the pty master, until sent to silod


class Run:
    def __init__(self, plan: p.Plan, stdio: tuple[int, int, int], err_fd: int, warm: bool = False,
                 net_fd: int = -1) -> None:
        assert plan.vm is not None
        self.plan = plan
        self.vm = plan.vm
        self.stdio = stdio
        self.err_fd = err_fd
        self.warm = warm
        self.reader = P.Reader()
        self.jobs: dict[int, Job] = {}
        self.next_channel = CHANNEL
        self.exit_code: asyncio.Future[int] | None = None  # the run's end (or the machine's, for a workspace)
        self.hello: asyncio.Future[None] | None = None
        self.procs: list[Any] = []
        self.agent: socket.socket | None = None
        self.console = -1
        self.vfs_log = -1
        self.fds: list[int] = []
        self.net_fd = net_fd  # the tap of the sandbox's network (silo.net.keeper), -1: no NIC
        # What QEMU is given and we close once it has them: the tap, the disks, the disk
        # key's and a locked RAM's memfds.
        self.qemu_fds: list[int] = [net_fd] if net_fd >= 0 else []
        self.warmed: asyncio.Future[None] | None = None
        self.shutdown_reasons: list[str] = []  # QEMU's SHUTDOWN events: why the machine ended
        self.early_signals: list[int] = []  # forwarded before the run's command was sent
        self.events: asyncio.Task[None] | None = None  # watch_events
        self.qmp_client: QMPClient | None = None
        self.ram: mmap.mmap | None = None  # a diskless guest's RAM, locked (_locked_ram)

    # lifecycle ------------------------------------------------------------------

    def boot(self) -> None:
        # virtio-fs: virtiofsd accepts on a listening socket at an abstract address (no
        # file); QEMU gets the connected end. Agent and QMP: socketpairs. Console: a memfd.
        # Disks: opened here (QEMU's jail has no path to them).
        disk_fds: list[int] = []
        for i, path in enumerate(self.vm.disks):
            top = i == len(self.vm.disks) - 1
            flags = os.O_RDWR if top and self.vm.disk_writable else os.O_RDONLY
            disk_fds.append(os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW))
            self.qemu_fds.append(disk_fds[-1])
        encrypted = [disk.is_encrypted(fd) for fd in disk_fds]
        key_fd = self._disk_key() if any(encrypted) else -1
        if key_fd >= 0:
            self.qemu_fds.append(key_fd)
        ram_fd = self._locked_ram() if self.vm.mem_lock else -1
        if ram_fd >= 0:
            self.qemu_fds.append(ram_fd)  # the mapping stays
        # an image root has no host view to serve: a placeholder QEMU is not told of
        vfs = socket.socket(socket.AF_UNIX) if self.vm.image else self._serve(machine.start_virtiofsd)
        vols = self._serve(machine.start_volumes) if self.vm.volumes else None
        self.console = os.memfd_create("silo-vm-console", os.MFD_CLOEXEC)
        host_agent, guest_agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_qmp, guest_qmp = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.agent, self.qmp = host_agent, host_qmp
        keep = (guest_agent.fileno(), guest_qmp.fileno(), vfs.fileno(), self.console, *self.qemu_fds,
                *([vols.fileno()] if vols is not None else []))
        argv = machine.qemu_argv(self.vm, agent_fd=keep[0], qmp_fd=keep[1], vfs_fd=keep[2], console_fd=keep[3],
                                 disk_fds=disk_fds, net_fd=self.net_fd,
                                 encrypted=encrypted, key_fd=key_fd, ram_fd=ram_fd,
                                 vols_fd=vols.fileno() if vols is not None else -1)
        self.procs.append(machine.start_qemu(self.vm, argv, keep, self.console))
        for s in (guest_agent, guest_qmp, vfs, *([vols] if vols is not None else [])):
            s.close()
        for fd in self.qemu_fds:  # QEMU holds them now
            os.close(fd)
        self.qemu_fds.clear()

    def _serve(self, start: Any) -> socket.socket:
        """A virtiofsd (``start``: machine.start_virtiofsd's signature) accepting on a
        listening socket at an abstract address (no file); QEMU gets the connected end,
        returned. Its messages go to one log (the console's tail names a failure)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(f"\0silo-vm-{os.getpid()}-{os.urandom(6).hex()}")
            listener.listen(1)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(listener.getsockname())
            if self.vfs_log < 0:
                self.vfs_log = os.memfd_create("silo-vm-virtiofsd", os.MFD_CLOEXEC)
            self.procs.append(start(self.vm, listener.fileno(), self.vfs_log))
        finally:
            listener.close()
        return conn

    def _disk_key(self) -> int:
        """The daemon's disk key in a memfd for QEMU (whose jail has no path to it)."""
        if not self.vm.disk_key:
            raise SiloError("the workspace's disk is encrypted, and no key was given for it: "
                            "it was made by another daemon (its key stays there)")
        try:
            with open(self.vm.disk_key, "rb") as f:
                key = f.read(4096)
        except OSError as e:
            raise SiloError(f"cannot read the disk key {self.vm.disk_key}: {e.strerror}: "
                            "an encrypted disk cannot be opened without it") from None
        fd = os.memfd_create("silo-disk-key", os.MFD_CLOEXEC)
        os.write(fd, key)
        return fd

    def _locked_ram(self) -> int:
        """The guest's RAM as a memfd, mapped here and locked (root may lock any amount):
        a page locked through one mapping is never swapped out, whoever else maps it."""
        size = self.vm.memory << 20
        fd = os.memfd_create("silo-vm-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
            if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
                err = ctypes.get_errno()
                raise SiloError(f"cannot lock the guest's {self.vm.memory} MiB of RAM: {os.strerror(err)}: "
                                "give it less --memory, or drop diskless")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def cleanup(self) -> None:
        if os.environ.get("SILO_VM_DEBUG") and self.console >= 0:
            with contextlib.suppress(OSError):
                os.write(2, os.pread(self.console, 1 << 20, 0))
        # QEMU first, then the virtiofsds: one killed while QEMU still held its socket
        # left its forked sandbox to the host's init, a zombie for a while
        for proc in reversed(self.procs):
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for fd in self.fds + self.qemu_fds:
            os.close(fd)

    # the agent ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.agent is not None
        self.agent.setblocking(True)
        self.agent.sendall(data)

    def on_agent(self) -> None:
        assert self.agent is not None
        try:
            data = self.agent.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.agent.fileno())
            self.on_agent_gone()
            return
        try:
            frames = self.reader.feed(data)
            for kind, channel, payload in frames:
                self.on_frame(kind, channel, payload)
        except P.ProtocolError as e:
            self._fail(f"the VM's agent broke the protocol: {e}")

    def on_agent_gone(self) -> None:
        self._fail("the VM stopped before the command ended")

    def on_frame(self, kind: int, channel: int, payload: bytes) -> None:
        assert self.hello is not None
        if kind == P.HELLO:
            version, _ = P.hello(payload)
            if version != P.VERSION:
                raise P.ProtocolError(f"agent protocol version {version}, expected {P.VERSION}")
            if not self.hello.done():
                self.hello.set_result(None)
            return
        if kind == P.ERROR and channel == 0:
            _, text = P.error(payload)
            self._fail(f"the VM's agent failed: {text}")
            return
        if channel == WARMUP and self.warmed is not None:
            if kind in (P.EXIT, P.ERROR) and not self.warmed.done():
                self.warmed.set_result(None)  # how it ended does not matter
            return
        job = self.jobs.get(channel)
        if job is None:
            if CHANNEL <= channel < self.next_channel:
                return  # a command that ended: the agent sends nothing after its EXIT
            raise P.ProtocolError(f"a frame for unknown channel {channel}")
        if kind in (P.STDOUT, P.STDERR):
            fd = job.stdio[1] if kind == P.STDOUT else job.stdio[2]
            with contextlib.suppress(OSError):
                _write_all(fd, payload)
        elif kind == P.STARTED:
            pid = P.started(payload)
            if not job.started.done():
                job.started.set_result(pid)
            for sig in job.pending_signals:
                self.send(P.signal_request(channel, sig))
            job.pending_signals.clear()
        elif kind == P.EXIT:
            self.end_job(job, P.exit_code(payload))
        elif kind == P.ERROR:
            code, text = P.error(payload)
            job.error = (code, text)
            self.end_job(job, code)
        elif kind == P.CLOSE:
            P.closed_stream(payload)
        else:
            raise P.ProtocolError(f"unexpected frame kind {kind} from the guest")

    def end_job(self, job: Job, code: int) -> None:
        loop = asyncio.get_running_loop()
        self.jobs.pop(job.channel, None)
        if job.reading:
            loop.remove_reader(job.stdio[0])
            job.reading = False
        if job.stdin_task is not None:
            job.stdin_task.cancel()
        if not job.exit.done():
            job.exit.set_result(code)

    def _on_virtiofsd_exit(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        loop.remove_reader(fd)
        self._fail("the VM's file server (virtiofsd) stopped")

    def report(self, cls: str, message: str) -> None:
        _report(self.err_fd, cls, message)

    def _fail(self, why: str) -> None:
        assert self.exit_code is not None and self.hello is not None
        tail = _console_tail(self.console) or _console_tail(self.vfs_log)
        self.report("InternalError", why + (f" (console: {tail})" if tail else ""))
        if not self.hello.done():
            self.hello.set_exception(BootFailed(why))
            self.hello.exception()  # retrieved: nobody may be waiting for it yet
        for job in list(self.jobs.values()):
            self.end_job(job, 125)
        if not self.exit_code.done():
            self.exit_code.set_result(125)

    # a command's stdio --------------------------------------------------------------

    async def poll_winsizes(self) -> None:
        """Pass a tty command's window size on when its caller changes it (on the pty's
        master: only a controlling process would get SIGWINCH, so it is polled)."""
        while True:
            await asyncio.sleep(WINSIZE_POLL)
            for job in list(self.jobs.values()):
                if job.slave is None or not job.started.done():
                    continue
                with contextlib.suppress(OSError):
                    size = get_winsize(job.slave)
                    if size != job.winsize:
                        job.winsize = size
                        self.send(P.winsize(job.channel, *size))

    def give_identity(self, hostname: str, machine_id: str, uid: int, gid: int) -> None:
        """The guest's identity (hostname, machine-id, a fresh RNG seed) and, in a
        host-root guest (a root of the caller's keeps its own), the user database for ``uid`` and
        its home."""
        self.send(P.identity(hostname.encode(), machine_id.encode(), os.urandom(64)))
        if not (self.vm.image or self.vm.own_root):
            self.send(P.users(uid, gid, users.passwd(uid, gid), users.group(uid, gid)))

    def start_job(self, job: Job, command: Command, tty: bool = False) -> None:
        """Ask the agent to run ``command`` on ``job``'s channel and feed it ``job``'s stdin."""
        loop = asyncio.get_running_loop()
        self.jobs[job.channel] = job
        rows, cols = job.winsize
        self.send(P.exec_request(job.channel, command.argv, command.env, command.cwd, command.uid, command.gid,
                                 tty, rows, cols, command.rlimits))
        try:
            loop.add_reader(job.stdio[0], self.on_stdin, job)
            job.reading = True
        except PermissionError:
            # A regular file or /dev/null: epoll refuses it, and reading never blocks.
            job.stdin_task = loop.create_task(self.copy_file_stdin(job))
        except OSError:
            self.send(P.close_stdin(job.channel))

    def on_stdin(self, job: Job) -> None:
        try:
            data = os.read(job.stdio[0], P.CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(P.frame(P.STDIN, job.channel, data))
        else:
            asyncio.get_running_loop().remove_reader(job.stdio[0])
            job.reading = False
            if job.slave is None:  # a pty's end of input is the command's own ^D
                self.send(P.close_stdin(job.channel))

    async def copy_file_stdin(self, job: Job) -> None:
        while True:
            try:
                data = os.read(job.stdio[0], P.CHUNK)
            except OSError:
                data = b""
            if not data:
                self.send(P.close_stdin(job.channel))
                return
            self.send(P.frame(P.STDIN, job.channel, data))
            await asyncio.sleep(0)

    def signal_job(self, job: Job, sig: int) -> None:
        if job.started.done():
            self.send(P.signal_request(job.channel, sig))
        else:
            job.pending_signals.append(sig)

    def on_signal(self, sig: int) -> None:
        job = self.jobs.get(CHANNEL)
        if job is not None:
            self.signal_job(job, sig)
        else:
            self.early_signals.append(sig)

    # the machine ----------------------------------------------------------------------

    async def start_machine(self) -> bool:
        """Boot and wait for the agent's hello; False (reported) if the VM failed."""
        loop = asyncio.get_running_loop()
        self.exit_code = loop.create_future()
        self.hello = loop.create_future()
        self.boot()
        assert self.agent is not None
        self.agent.setblocking(False)
        loop.add_reader(self.agent.fileno(), self.on_agent)
        # QEMU's end shows as the agent's EOF; virtiofsd's would only show as the
        # guest's file errors: watch it.
        for server in self.procs[:-1]:  # the virtiofsds; QEMU is last
            vfs = os.pidfd_open(server.pid)
            self.fds.append(vfs)
            loop.add_reader(vfs, self._on_virtiofsd_exit, loop, vfs)
        # QMP answers once QEMU has built the machine.
        qmp = QMPClient("silo")
        try:
            await asyncio.wait_for(qmp.connect(self.qmp), 30)
        except (TimeoutError, OSError, QMPError) as e:
            self._fail(f"QEMU did not start ({e or 'no QMP greeting'})")
            return False
        self.qmp_client = qmp
        self.events = loop.create_task(self.watch_events(qmp))
        try:
            await asyncio.wait_for(asyncio.shield(self.hello), BOOT_TIMEOUT)
        except TimeoutError:
            self._fail(f"the VM did not start within {BOOT_TIMEOUT:.0f} s")
            return False
        except BootFailed:
            return False
        return True

    async def watch_events(self, qmp: QMPClient) -> None:
        """Note why QEMU ends (guest-shutdown: the guest powered off; guest-reset or
        guest-panic: its kernel died, the agent with it -- PID 1 -- or it rebooted)."""
        with contextlib.suppress(QMPError, OSError, asyncio.CancelledError):
            async for event in qmp.events:
                if event["event"] == "SHUTDOWN":
                    data = event.get("data")
                    self.shutdown_reasons.append(str(data.get("reason", "")) if isinstance(data, dict) else "")

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in FORWARD:
            loop.add_signal_handler(sig, self.on_signal, sig)
        if not await self.start_machine():
            return 125
        assert self.exit_code is not None
        if self.warm:
            self.warmed = loop.create_future()
            self.send(P.exec_request(WARMUP, [b"/bin/sh", b"-c", WARMUP_SCRIPT], [PATH_ENV], b"/", 0, 0,
                                     False, 0, 0))
            self.send(P.close_stdin(WARMUP))
            try:
                await asyncio.wait_for(asyncio.shield(self.warmed), BOOT_TIMEOUT)
            except TimeoutError:
                self._fail("the VM's warm-up did not end")
                return 125
            if self.exit_code.done():
                return 125  # the VM failed meanwhile
            command = await self.wait_for_run()
            if command is None:
                return self.exit_code.result() if self.exit_code.done() else 0  # 0: the spawner hung up
        else:
            command = Command.of(self.plan)
        self.give_identity(command.hostname, os.urandom(16).hex(), command.uid, command.gid)
        tty = self.plan.process.tty
        job = Job(CHANNEL, self.stdio, await self.caller_pty() if tty else None)
        job.winsize = get_winsize(job.slave) if job.slave is not None else self.plan.process.winsize
        job.pending_signals = self.early_signals
        self.next_channel = CHANNEL + 1
        self.start_job(job, command, tty)
        winsizes = loop.create_task(self.poll_winsizes()) if tty else None
        await asyncio.wait([job.exit, self.exit_code], return_when=asyncio.FIRST_COMPLETED)
        if winsizes is not None:
            winsizes.cancel()
        if job.exit.done():
            if job.error is not None:
                code, text = job.error
                self.report(ERROR_CLASSES.get(code, "InternalError"), text)
            return job.exit.result()
        return self.exit_code.result()

    async def caller_pty(self) -> int:
        """``-t``: a host pty pair whose master goes to the caller (the spawner passes it
        to the client, as a process-level sandbox's own pty master); the slave, set raw
        (the guest's pty does the line discipline), is ours. The client copies its
        window size onto the master as soon as it has it: wait briefly for that."""
        master, slave = os.openpty()
        ttymod.setraw(slave)
        rows, cols = self.plan.process.winsize
        if rows and cols:
            set_winsize(slave, rows, cols)
        try:
            with socket.socket(fileno=os.dup(self.err_fd)) as err:
                socket.send_fds(err, [b"pty"], [master])
        finally:
            os.close(master)
        for _ in range(30):
            if get_winsize(slave) != (0, 0):
                break
            await asyncio.sleep(0.01)
        self.fds.append(slave)
        return slave

    async def wait_for_run(self) -> Command | None:
        """A pooled VM: say ready, take the run the spawner hands over (its stdio becomes
        ours), acknowledge it. None when the spawner hung up first."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=os.dup(self.err_fd))
        try:
            sock.send(READY)
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.err_fd, _resolve, readable)
            assert self.exit_code is not None
            try:
                either: list[asyncio.Future[Any]] = [readable, self.exit_code]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(self.err_fd)
            if self.exit_code.done():
                return None  # the VM failed while it waited (QEMU or virtiofsd died)
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
            if not data or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                return None
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            try:
                command = Command.from_handover(data)
            except (ValueError, TypeError, EOFError):
                return None  # not taken: the spawner starts the run cold
            sock.send(TAKEN)
            return command
        finally:
            sock.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[n:]


def run(plan: p.Plan, stdio: tuple[int, int, int], err_fd: int, warm: bool = False, net_fd: int = -1) -> int:
    """Run ``plan``'s command in a fresh VM; the exit code (125: silo failed, reported on ``err_fd``).
    ``warm``: boot first, then wait for the command on ``err_fd`` (a pooled VM); stdio
    must then be 0, 1 and 2, which the hand-over replaces. ``net_fd``: the tap of the
    run's network (its keeper's), the guest's NIC."""
    r = Run(plan, stdio, err_fd, warm, net_fd)
    try:
        return asyncio.run(r.main())
    except SiloError as e:
        _report(err_fd, type(e).__name__, str(e))
        return 125
    except (OSError, BootFailed) as e:
        _report(err_fd, "InternalError", f"cannot start the VM: {e}")
        return 125
    except Exception as e:  # a bug of ours: named, not a silent 125
        _report(err_fd, "InternalError", f"the VM's supervisor failed: {type(e).__name__}: {e}")
        return 125
    finally:
        r.cleanup()
