"""A vm workspace's machine: the process silod tracks as the workspace's init.

silod starts ``python -I -m silo.backends.vm.workspace`` with a SOCK_SEQPACKET control
socket as fd 3 (silo.daemon.runtime). Over it, each message is one ``marshal``-ed
tuple (silod is the same trusted uid; the guest never reaches this socket)::

    silod -> here                               here -> silod
    ("plan", WIRE) [+ tap fd]  first: the      ("ready",)  booted, identity given
    machine to boot, its network's tap
    ("exec", ID, argv, env, cwd, uid, gid,      ("failed", CLASS, MESSAGE)  it did not boot
     tty, rows, cols) + stdin/out/err fds       ("started", ID, PID) [+ pty master fd]
    ("signal", ID, SIG)                         ("error", ID, CLASS, MESSAGE)  not started
    ("stop", GRACE_MS)                          ("exit", ID, CODE)
                                                ("memory", {...})  every MEMORY_POLL s
                                                ("down", BROKEN, REASON)  then it exits

It boots the machine as a one-shot run does (silo.backends.vm.supervisor), gives the
guest the workspace's identity (its hostname, a machine-id it keeps across boots), and
then runs every exec on a channel of its own, relaying its stdio -- or, with a tty, the
host end of a pty pair whose master goes to the caller (the guest's pty does the line
discipline; the host's is raw, and its window size is passed on when the caller
changes it). ``stop`` asks the agent to end every process (SIGTERM, the grace, SIGKILL),
sync the disk and power off.

How the machine ended decides what silod records: a stop, or the guest powering itself
off, is ``down`` and not broken; QEMU or virtiofsd dying, the guest's kernel dying
(the agent is its PID 1: a panic, a reset) or the protocol breaking is broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import socket
import sys
import tty as ttymod
from typing import Any

from qemu.qmp import QMPError

from silo.agent import protocol as P
from silo.backends.vm import supervisor as sup
from silo.model import plan as p

CONTROL_FD = 3
MEMORY_POLL = 2  # seconds between the guest's memory statistics (virtio-balloon)
BALLOON = "/machine/peripheral/balloon"
# virtio-balloon's statistics as QEMU names them -> as silo reports them
GUEST_STATS = {"stat-total-memory": "total", "stat-available-memory": "available", "stat-free-memory": "free",
               "stat-disk-caches": "caches"}
STOP_EXTRA = 20.0  # seconds past the grace for the guest to sync and power off


def _send(ctl: socket.socket, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
    with contextlib.suppress(OSError):
        if fds:
            socket.send_fds(ctl, [marshal.dumps(message)], fds)
        else:
            ctl.send(marshal.dumps(message))


class Workspace(sup.Run):
    def __init__(self, plan: p.Plan, ctl: socket.socket, net_fd: int = -1) -> None:
        super().__init__(plan, (0, 1, 2), ctl.fileno(), net_fd=net_fd)
        self.ctl = ctl
        self.ready = False
        self.stopping = False
        self.by_id: dict[int, sup.Job] = {}  # silod's exec ids -> their jobs
        self.down_sent = False
        self.agent_gone = False

    # reporting ----------------------------------------------------------------------

    def report(self, cls: str, message: str) -> None:
        if not self.ready:
            _send(self.ctl, ("failed", cls, message))
        else:
            self.down(True, message)

    def down(self, broken: bool, reason: str) -> None:
        if not self.down_sent:
            self.down_sent = True
            _send(self.ctl, ("down", broken, reason))

    # jobs ---------------------------------------------------------------------------

    def end_job(self, job: sup.Job, code: int) -> None:
        super().end_job(job, code)
        if job.ident is not None and self.by_id.pop(job.ident, None) is not None:
            if job.error is not None and not job.started.done():
                code, text = job.error
                _send(self.ctl, ("error", job.ident, sup.ERROR_CLASSES.get(code, "InternalError"), text))
            else:
                _send(self.ctl, ("exit", job.ident, code))
        for fd in {*job.stdio, *((job.master,) if job.master is not None else ())}:
            with contextlib.suppress(OSError):
                os.close(fd)
        job.master = None

    def on_started(self, job: sup.Job) -> None:
        if job.ident not in self.by_id or job.started.cancelled():
            return
        master, job.master = job.master, None
        _send(self.ctl, ("started", job.ident, job.started.result()), [master] if master is not None else None)
        if master is not None:
            os.close(master)

    def start_exec(self, message: tuple[Any, ...], fds: list[int]) -> None:
        _, ident, argv, env, cwd, uid, gid, tty, rows, cols = message
        channel = self.next_channel
        self.next_channel += 1
        slave = master = None
        if tty:
            master, slave = os.openpty()
            ttymod.setraw(slave)  # the guest's pty does the line discipline
            sup.set_winsize(slave, int(rows), int(cols))
            for fd in fds:
                os.close(fd)
            fds = []
        job = sup.Job(channel, (fds[0], fds[1], fds[2]) if fds else (-1, -1, -1), slave)
        job.winsize = (int(rows), int(cols))
        job.ident, job.master = int(ident), master
        self.by_id[job.ident] = job
        job.started.add_done_callback(lambda _: self.on_started(job))
        try:
            command = sup.Command(argv, env, cwd, uid, gid, self.vm.hostname)
            self.start_job(job, command, bool(tty))
        except (ValueError, TypeError) as e:
            job.error = (125, f"bad exec request: {e}")
            self.end_job(job, 125)

    async def report_memory(self) -> None:
        """The guest's memory as its balloon driver reports it (the guest's word: numbers,
        checked as such) and the balloon's size, sent to silod every MEMORY_POLL seconds."""
        qmp = self.qmp_client
        if qmp is None:
            return
        with contextlib.suppress(QMPError, OSError):
            await qmp.execute("qom-set", {"path": BALLOON, "property": "guest-stats-polling-interval",
                                          "value": MEMORY_POLL})
        while True:
            try:
                stats = await qmp.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
                balloon = await qmp.execute("query-balloon")
            except (QMPError, OSError):
                return
            _send(self.ctl, ("memory", memory_report(stats, balloon)))
            await asyncio.sleep(MEMORY_POLL)

    # control ------------------------------------------------------------------------

    def on_control(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.ctl, 1 << 20, 3)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:  # silod is gone: so is its workspace
            asyncio.get_running_loop().remove_reader(self.ctl.fileno())
            self.down(True, "silod hung up")
            assert self.exit_code is not None
            if not self.exit_code.done():
                self.exit_code.set_result(125)
            return
        try:
            message = marshal.loads(data)  # noqa: S302 - silod, the same uid
            kind = message[0]
            if kind == "exec" and len(fds) == 3:
                self.start_exec(message, fds)
                fds = []
            elif kind == "signal":
                job = self.by_id.get(int(message[1]))
                if job is not None:
                    self.signal_job(job, int(message[2]))
            elif kind == "stop":
                self.stop(int(message[1]))
        except (ValueError, TypeError, IndexError, EOFError, OSError) as e:
            sys.stderr.write(f"silo vm workspace: bad control message: {e}\n")
        finally:
            for fd in fds:
                os.close(fd)

    def stop(self, grace_ms: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(OSError):
            self.send(P.shutdown(grace_ms))
        asyncio.get_running_loop().call_later(grace_ms / 1000 + STOP_EXTRA, self.give_up)

    def give_up(self) -> None:
        self.down(False, "stopped (the guest did not power off in time: QEMU was killed)")
        assert self.exit_code is not None
        if not self.exit_code.done():
            self.exit_code.set_result(0)

    # the machine's end ----------------------------------------------------------------

    def on_agent_gone(self) -> None:
        self.agent_gone = True
        asyncio.get_running_loop().create_task(self.machine_ended())

    def _on_virtiofsd_exit(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        # QEMU's death ends virtiofsd too, often before its port's EOF reaches us: give
        # that a moment, so the cause is named, not the consequence.
        loop.remove_reader(fd)
        loop.call_later(0.5, self._virtiofsd_gone)

    def _virtiofsd_gone(self) -> None:
        if not self.agent_gone:
            self._fail("the VM's file server (virtiofsd) stopped")

    async def machine_ended(self) -> None:
        """The agent's port closed: QEMU ended. Why decides whether it is broken."""
        qemu = self.procs[-1]
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(None, qemu.wait, 3)
        if not self.stopping and not self.shutdown_reasons and self.events is not None:
            # QEMU's SHUTDOWN event may still be on its way
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.events), 1)
        reasons = self.shutdown_reasons
        if self.stopping or "host-qmp-quit" in reasons:
            self.down(False, "stopped")
            code = 0
        elif reasons == ["guest-shutdown"]:
            self.down(False, "the guest powered itself off")
            code = 0
        elif reasons:
            self.down(True, f"the guest's kernel stopped ({', '.join(reasons)}): it panicked or rebooted")
            code = 125
        else:
            status = qemu.returncode
            how = f"killed by signal {-status}" if status is not None and status < 0 else f"exit {status}"
            self.down(True, f"QEMU stopped ({how})")
            code = 125
        for job in list(self.jobs.values()):
            self.end_job(job, 125 if code else 137)
        assert self.exit_code is not None
        if not self.exit_code.done():
            self.exit_code.set_result(code)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, 10_000)
        if not await self.start_machine():
            return 125
        vm = self.vm
        self.give_identity(vm.hostname, vm.machine_id or os.urandom(16).hex(), self.plan.process.uid,
                           self.plan.process.gid)
        self.next_channel = sup.CHANNEL
        self.ready = True
        _send(self.ctl, ("ready",))
        # The socket stays blocking: reads happen only once it is readable, and sends
        # wait for room rather than drop a message.
        loop.add_reader(self.ctl.fileno(), self.on_control)
        tasks = [loop.create_task(self.poll_winsizes()), loop.create_task(self.report_memory())]
        assert self.exit_code is not None
        try:
            return await self.exit_code
        finally:
            for task in tasks:
                task.cancel()


def memory_report(stats: object, balloon: object) -> dict[str, int]:
    """Bytes: the guest's ``total``/``available``/``free``/``caches`` (left out when the
    guest has not reported them) and ``balloon``, the RAM the guest may use now."""
    out: dict[str, int] = {}
    values = stats.get("stats") if isinstance(stats, dict) else None
    if isinstance(values, dict):
        for qemu_name, name in GUEST_STATS.items():
            value = values.get(qemu_name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 50:
                out[name] = value
    actual = balloon.get("actual") if isinstance(balloon, dict) else None
    if isinstance(actual, int) and not isinstance(actual, bool) and actual >= 0:
        out["balloon"] = actual
    return out


def main() -> int:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with silod
    if os.getppid() == 1:
        return 125
    ctl = socket.socket(fileno=CONTROL_FD)
    data, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 1)
    if not data:
        return 125
    try:
        _, wire = marshal.loads(data)  # noqa: S302 - silod, the same uid
        plan = p.Plan.from_wire(wire)
    except (ValueError, TypeError, EOFError) as e:
        _send(ctl, ("failed", "InternalError", f"bad plan from silod: {e}"))
        return 125
    w = Workspace(plan, ctl, fds[0] if fds else -1)
    try:
        return asyncio.run(w.main())
    except Exception as e:
        w.report("InternalError", f"the VM's supervisor failed: {type(e).__name__}: {e}")
        return 125
    finally:
        w.cleanup()


if __name__ == "__main__":
    sys.exit(main())
