"""silo's guest agent: PID 1 of a silo VM once the guest's init has built its root.

It speaks :mod:`protocol` with the host over the virtio-serial port ``silo.agent``: it runs
the commands the host asks for (pipes or a pty, signals, window size, exit codes), reaps
every orphan (it is PID 1), and powers the guest off when asked. It uses the guest's
own Python (the host's, read-only, under ``root = "host"``) with ``-I -S`` and only the
standard library, so it starts in a fraction of the guest's boot.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import sys
import termios

try:  # inside the guest the agent's directory is on sys.path, not the silo package
    from silo.agent import protocol as P
except ImportError:  # pragma: no cover - the guest's layout (python3 -I: no script dir on sys.path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol as P  # type: ignore[import-not-found, no-redef]

PORT_NAME = "silo.agent"
RB_POWER_OFF = 0x4321FEDC


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)):
        try:
            with open(f"{base}/{entry}/name") as f:
                if f.read().strip() == PORT_NAME:
                    return f"/dev/{entry}"
        except OSError:
            continue
    raise SystemExit(f"silo-agent: no virtio port named {PORT_NAME}")


class Job:
    def __init__(self, channel: int, pid: int, fds: dict[int, int], stdin: int) -> None:
        self.channel = channel
        self.pid = pid
        self.out = fds  # fd -> stream number (1 stdout, 2 stderr; a pty master is 1)
        self.stdin = stdin  # fd we write the host's stdin to, -1 once closed
        self.pending = bytearray()  # stdin not yet written
        self.stdin_eof = False
        self.status: int | None = None


class Agent:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = P.Reader()
        self.jobs: dict[int, Job] = {}  # by channel
        self.by_pid: dict[int, Job] = {}
        self.by_fd: dict[int, Job] = {}
        self.outq = bytearray()
        self.poll = select.poll()
        self.poll.register(port, select.POLLIN)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        self.poll.register(r, select.POLLIN)

    # output to the host ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.outq += data
        self.flush()

    def flush(self) -> None:
        while self.outq:
            try:
                n = os.write(self.port, self.outq[: 1 << 16])
            except BlockingIOError:
                break
            del self.outq[:n]
        self.poll.modify(self.port, select.POLLIN | (select.POLLOUT if self.outq else 0))

    def error(self, channel: int, text: str, code: int) -> None:
        self.send(P.message(P.ERROR, channel, {"message": text, "code": code}))

    # requests -----------------------------------------------------------------

    def handle(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == P.EXEC:
            self.exec(channel, P.decode(payload))
        elif kind == P.STDIN:
            job = self.jobs.get(channel)
            if job is not None and job.stdin >= 0:
                job.pending += payload
                self.write_stdin(job)
        elif kind == P.CLOSE:
            job = self.jobs.get(channel)
            if job is not None:
                job.stdin_eof = True
                self.write_stdin(job)
        elif kind == P.SIGNAL:
            job = self.jobs.get(channel)
            sig = P.field_int(P.decode(payload), "signal", 1, 64)
            if job is not None and job.status is None:
                try:
                    os.killpg(job.pid, sig)
                except OSError:
                    try:
                        os.kill(job.pid, sig)
                    except OSError:
                        pass
        elif kind == P.WINSIZE:
            job = self.jobs.get(channel)
            body = P.decode(payload)
            rows, cols = P.field_int(body, "rows", 0, 65535), P.field_int(body, "cols", 0, 65535)
            if job is not None:
                for fd in job.out:
                    try:
                        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                    except OSError:
                        pass
        elif kind == P.SHUTDOWN:
            self.power_off()

    def exec(self, channel: int, body: dict[str, object]) -> None:
        if channel == 0 or channel in self.jobs:
            self.error(channel, f"channel {channel} is in use", 125)
            return
        argv = body.get("argv")
        env = body.get("env")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            self.error(channel, "exec: argv is not a list of strings", 125)
            return
        if not (isinstance(env, list) and all(isinstance(e, str) and "=" in e for e in env)):
            self.error(channel, "exec: env is not a list of NAME=VALUE", 125)
            return
        cwd = P.field_str(body, "cwd")
        uid, gid = P.field_int(body, "uid", 0, 65535), P.field_int(body, "gid", 0, 65535)
        tty = body.get("tty") is True
        rows, cols = P.field_int(body, "rows", 0, 65535), P.field_int(body, "cols", 0, 65535)
        path = self.resolve(argv[0], env)
        if path is None:
            self.error(channel, f"{argv[0]}: command not found inside the VM", 127)
            return
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        if tty:
            master, slave = os.openpty()
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            child_fds = (slave, slave, slave)
            mine = {master: 1}
            stdin = master
        else:
            i_r, i_w = os.pipe2(os.O_CLOEXEC)
            o_r, o_w = os.pipe2(os.O_CLOEXEC)
            e_r, e_w = os.pipe2(os.O_CLOEXEC)
            child_fds = (i_r, o_w, e_w)
            mine = {o_r: 1, e_r: 2}
            stdin = i_w
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setsid()
                for target, fd in enumerate(child_fds):
                    os.dup2(fd, target)
                if tty:
                    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.chdir(cwd)
                os.execve(path, argv, dict(e.split("=", 1) for e in env))  # type: ignore[union-attr]
            except OSError as e:
                os.write(report_w, str(e.errno or errno.EIO).encode())
            os._exit(126)
        os.close(report_w)
        for fd in set(child_fds):
            os.close(fd)
        failed = os.read(report_r, 16)
        os.close(report_r)
        job = Job(channel, pid, mine, stdin)
        self.jobs[channel] = job
        self.by_pid[pid] = job
        if failed:
            code = int(failed)
            os.waitpid(pid, 0)
            del self.by_pid[pid]
            self.drop(job)
            self.error(channel, f"{argv[0]}: cannot execute inside the VM: {os.strerror(code)}",
                       127 if code == errno.ENOENT else 126)
            return
        for fd in mine:
            os.set_blocking(fd, False)
            self.by_fd[fd] = job
            self.poll.register(fd, select.POLLIN)
        if not tty:
            os.set_blocking(stdin, False)
        self.send(P.message(P.STARTED, channel, {"pid": pid}))

    @staticmethod
    def resolve(name: str, env: list[str]) -> str | None:
        if "/" in name:
            return name
        path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/local/bin:/usr/bin:/bin")
        for d in path.split(":"):
            candidate = os.path.join(d or ".", name)
            if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                return candidate
        return None

    def write_stdin(self, job: Job) -> None:
        if job.stdin < 0:
            return
        while job.pending:
            try:
                n = os.write(job.stdin, job.pending)
            except BlockingIOError:
                break  # retried on the next STDIN frame or at exit; a pipe holds 64 KiB
            except OSError:
                job.pending.clear()
                break
            del job.pending[:n]
        if job.stdin_eof and not job.pending and job.stdin not in job.out:
            os.close(job.stdin)
            job.stdin = -1

    def pump(self, fd: int) -> None:
        job = self.by_fd[fd]
        try:
            data = os.read(fd, P.CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's last writer is gone
            data = b""
        if data:
            self.send(P.frame(P.STDOUT if job.out[fd] == 1 else P.STDERR, job.channel, data))
            return
        self.poll.unregister(fd)
        del self.by_fd[fd]
        stream = job.out.pop(fd)
        os.close(fd)
        if fd == job.stdin:
            job.stdin = -1
        self.send(P.message(P.CLOSE, job.channel, {"stream": stream}))
        self.finish(job)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.by_pid.pop(pid, None)
            if job is not None:
                job.status = status
                self.finish(job)

    def finish(self, job: Job) -> None:
        """Report the exit once the command ended and its output is all sent."""
        if job.status is None or job.out:
            return
        status = job.status
        code = os.waitstatus_to_exitcode(status)
        self.send(P.message(P.EXIT, job.channel, {"code": 128 - code if code < 0 else code}))
        self.drop(job)

    def drop(self, job: Job) -> None:
        self.jobs.pop(job.channel, None)
        if job.stdin >= 0 and job.stdin not in job.out:
            os.close(job.stdin)
        job.stdin = -1

    def power_off(self) -> None:
        import ctypes

        os.sync()
        ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)
        os._exit(0)

    def serve(self) -> None:
        self.send(P.message(P.HELLO, 0, {"version": P.VERSION, "pid": os.getpid()}))
        while True:
            try:
                events = self.poll.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self.wake:
                    while True:
                        try:
                            if not os.read(self.wake, 64):
                                break
                        except BlockingIOError:
                            break
                    self.reap()
                elif fd == self.port:
                    if ev & select.POLLOUT:
                        self.flush()
                    if ev & (select.POLLIN | select.POLLHUP):
                        try:
                            data = os.read(self.port, 1 << 16)
                        except BlockingIOError:
                            continue
                        if not data:  # the host closed its end; virtio-serial reports HUP
                            self.poll.modify(self.port, select.POLLOUT if self.outq else 0)
                            continue
                        for kind, channel, payload in self.reader.feed(data):
                            try:
                                self.handle(kind, channel, payload)
                            except P.ProtocolError as e:
                                self.error(channel, f"protocol: {e}", 125)
                elif fd in self.by_fd:
                    self.pump(fd)


def main() -> None:
    port = os.open(find_port(), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    Agent(port).serve()


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # PID 1 must not just vanish: say why, then power off
        print(f"silo-agent: {e!r}", file=sys.stderr, flush=True)
        try:
            os.sync()
        finally:
            import ctypes

            ctypes.CDLL(None).reboot(RB_POWER_OFF)
