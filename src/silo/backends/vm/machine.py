"""One QEMU microVM and its virtiofsd: the argv, the read-only host view, the processes.

QEMU runs ``-M microvm`` (virtio-mmio, no PCI, no legacy devices, qboot) with
``-nodefaults -no-user-config``, QEMU's own seccomp sandbox with everything denied that
can be, the agent's virtio-serial port and QMP each on a socketpair (no path to find or
race for), and the guest's console in a log file. virtiofsd exports a directory that
exists only in its own mount namespace: the skeleton root with the host's system
directories bound read-only onto it -- the same view the process level binds, never `/`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import subprocess
from collections.abc import Callable, Sequence

from silo.model import plan as p
from silo.model.errors import SiloError
from silo.sys import kernel as sysk
from silo.sys.cgroups_common import write_file

QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
PR_SET_PDEATHSIG = 1
VM_OVERHEAD = 384 << 20  # QEMU's and virtiofsd's own memory beside the guest's (in the VM's cgroup)
VM_PIDS = 512  # QEMU's vCPU and I/O threads, virtiofsd's thread pool (64) and the supervisor
VIEW_PARENT = "/tmp"  # in virtiofsd's own mount namespace only
VIEW = "/tmp/view"
JAIL_ROOT = "/tmp/jail"  # in QEMU's own mount namespace only
JAIL_KERNEL = "/vm/kernel"  # the files as QEMU sees them in its jail
JAIL_INITRAMFS = "/vm/initramfs"
# The CPU under TCG: x86-64-v2 (what Debian's binaries and common wheels such as
# NumPy's may assume), no more. `max` added AVX-512 and more: larger FPU state for
# every context switch and more for the kernel to set up, ~0.3 s of a cold run's
# median here (1.84 s against 1.53 s, 15 runs each, interleaved); AVX and XSAVE on
# qemu64 hung the guest's boot under QEMU 7.2.
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"
# Kernel options that shorten a boot under TCG: no hardware to probe, no checks to run.
CMDLINE = ("console=ttyS0 quiet loglevel=1 panic=-1 reboot=t i8042.noaux i8042.nomux i8042.nopnp "
           "i8042.dumbkbd noreplace-smp cryptomgr.notests rcupdate.rcu_expedited=1 "
           "mitigations=off audit=0 random.trust_cpu=on nokaslr lsm=capability 8250.nr_uarts=1 pci=off "
           "tsc=reliable no_timer_check nowatchdog")

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def tsc_khz() -> int | None:
    """The host's TSC rate in kHz: under TCG the guest's TSC runs at it, and the guest's
    own calibration against the emulated PIT fails now and then (the boot then hangs)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags, mhz = "", ""
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = line.split(":", 1)[1]
                if flags and mhz:
                    break
    except OSError:
        return None
    if " constant_tsc" not in flags or not mhz:
        return None
    return int(float(mhz) * 1000)


def qemu_argv(vm: p.Vm, *, agent_fd: int, qmp_fd: int, vfs_fd: int, console_fd: int,
              extra_cmdline: str = "", disk_fds: Sequence[int] = (), net_fd: int = -1,
              encrypted: Sequence[bool] = (), key_fd: int = -1, ram_fd: int = -1, vols_fd: int = -1) -> list[str]:
    """QEMU's command line, naming the kernel and initramfs as QEMU sees them in its jail
    (:data:`JAIL_KERNEL`, :data:`JAIL_INITRAMFS`); ``disk_fds`` are ``vm.disks`` opened
    (silo.backends.vm.disk.blockdev_args, with ``encrypted`` and ``key_fd``); ``net_fd``
    the tap of the sandbox's network, if it has one (the guest's eth0, configured by the
    agent from ``silo.net=``); ``ram_fd`` a memfd for the guest's RAM (a locked one);
    ``vols_fd`` the volumes' virtiofsd (:func:`start_volumes`), whose export the agent
    binds onto the targets ``silo.vol=rw|ro,d|f,HEX`` name, in order."""
    from silo.backends.vm import disk
    from silo.model import network as net
    mem = f"{vm.memory}M"
    cmdline = CMDLINE
    if os.environ.get("SILO_VM_DEBUG"):
        cmdline = cmdline.replace("quiet loglevel=1", "loglevel=7") + " silo.debug"
    khz = tsc_khz() if vm.accel == "tcg" else None
    if khz:
        cmdline += f" tsc_early_khz={khz}"
    if disk_fds:
        cmdline += " silo.disk=" + ("rw" if vm.disk_writable else "ro")
    fs: list[str] = []
    if vm.image:  # the disk is the root: nothing of the host's is shared
        cmdline += " silo.root=disk"
    else:
        fs = ["-chardev", f"socket,id=vfs,fd={vfs_fd}", "-device", "vhost-user-fs-device,chardev=vfs,tag=host"]
    if vm.volumes:
        fs += ["-chardev", f"socket,id=vols,fd={vols_fd}", "-device", "vhost-user-fs-device,chardev=vols,tag=vols"]
        for _, target, readonly, is_dir in vm.volumes:
            cmdline += f" silo.vol={'ro' if readonly else 'rw'},{'d' if is_dir else 'f'},{target.encode().hex()}"
    nic: list[str] = []
    if net_fd >= 0:
        cmdline += (f" silo.net={net.VM_GUEST4}/{net.VM_PREFIX4},{net.VM_HOST4},"
                    f"{net.VM_GUEST6}/{net.VM_PREFIX6},{net.VM_HOST6}")
        # a locally administered MAC, the same for a workspace at each boot
        mac = ":".join(["02", *(f"{b:02x}" for b in bytes.fromhex((vm.machine_id or "0" * 32)[:10]))])
        nic = ["-netdev", f"tap,id=net0,fd={net_fd},vhost=off",
               "-device", f"virtio-net-device,netdev=net0,mac={mac}"]
    accel = "kvm" if vm.accel == "kvm" else "tcg,thread=multi"
    # virtio-fs needs the guest's RAM shareable with virtiofsd. A locked guest's RAM is a
    # memfd of the supervisor's, which it keeps mapped and mlock()ed (QEMU holds no
    # capability to lock memory); its pages are then never reported free (that would
    # punch holes the lock does not cover).
    if ram_fd >= 0:
        ram = f"memory-backend-file,id=mem,size={mem},mem-path=/dev/fd/{ram_fd},share=on"
    else:
        ram = f"memory-backend-memfd,id=mem,size={mem},share=on"
    reporting = "off" if ram_fd >= 0 else "on"
    return [
        QEMU, "-nodefaults", "-no-user-config", "-nographic",
        "-M", "microvm",
        "-accel", accel,
        "-cpu", "host" if vm.accel == "kvm" else TCG_CPU,
        "-smp", str(vm.cpus), "-m", mem,
        "-object", ram, "-numa", "node,memdev=mem",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", JAIL_KERNEL, "-initrd", JAIL_INITRAMFS,
        "-append", f"{cmdline} silo.rwsize={vm.rwsize} {extra_cmdline}".strip(),
        "-serial", f"file:/dev/fd/{console_fd}", "-no-reboot",
        *fs,
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,fd={agent_fd}",
        "-device", "virtserialport,chardev=agent,name=silo.agent",
        "-device", "virtio-rng-device",
        "-device", f"virtio-balloon-device,id=balloon,free-page-reporting={reporting}",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
        *disk.blockdev_args(disk_fds, vm.disk_writable, encrypted, key_fd),
        *nic,
    ]


def start_virtiofsd(vm: p.Vm, listen_fd: int, log: int) -> subprocess.Popen[bytes]:
    """virtiofsd serving the read-only view on the listening socket ``listen_fd``.

    The view exists only in virtiofsd's own mount namespace: a tmpfs over its /tmp, the
    skeleton bound read-only there, the system directories bound read-only onto it.
    Nothing is left on the host's file system, whatever kills us. Its messages go to
    ``log`` (it reports the guest's disconnect at every shutdown)."""

    def setup() -> None:  # in the child, before exec: its own mount namespace
        _die_with_parent()
        sysk.unshare(sysk.CLONE_NEWNS)
        sysk.mount(None, "/", None, sysk.MS_REC | sysk.MS_PRIVATE)
        # opened first: the tmpfs over /tmp hides a root directory below /tmp
        skeleton = os.open(vm.skeleton, os.O_PATH | os.O_CLOEXEC)
        sysk.mount("silo-view", VIEW_PARENT, "tmpfs", sysk.MS_NOSUID | sysk.MS_NODEV, "mode=0755,size=64k")
        os.mkdir(VIEW)
        sysk.bind_readonly(f"/proc/self/fd/{skeleton}", VIEW)
        for name, source in vm.binds:
            sysk.bind_readonly(source, os.path.join(VIEW, name))

    return _virtiofsd(listen_fd, log, setup, "the root view", "-o", "cache=always")


def _virtiofsd(listen_fd: int, log: int, setup: Callable[[], None], what: str,
               *options: str) -> subprocess.Popen[bytes]:
    """virtiofsd exporting :data:`VIEW`, which ``setup`` builds in its child; ``what`` names
    the export in the error when that fails."""
    try:
        return subprocess.Popen(
            [VIRTIOFSD, f"--fd={listen_fd}", "-o", f"source={VIEW}", *options,
             "-o", "sandbox=namespace", "-o", "log_level=err", "-o", "no_xattr", "-o", "no_posix_lock",
             "-o", "no_flock"],
            preexec_fn=setup, pass_fds=(listen_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log, start_new_session=True)
    except subprocess.SubprocessError as e:  # setup failed in the child
        raise SiloError(f"cannot share {what} with the VM: {e}") from None
    except FileNotFoundError:
        raise SiloError(f"{VIRTIOFSD} is not installed: install Debian's qemu-system-common "
                        "(make install does)") from None


def start_volumes(vm: p.Vm, listen_fd: int, log: int) -> subprocess.Popen[bytes]:
    """virtiofsd serving the volumes on the listening socket ``listen_fd``: entries ``0``,
    ``1``, ... of a tmpfs in its own mount namespace, each the volume's source bound there
    (read-only for a ``:ro`` one).

    It runs as root of a user namespace mapping ids 0.. onto ``vm.volume_ids``, as a
    process-level sandbox's root is (SECURITY.md #16): what the guest's root writes is
    owned by the first id of that range, never by the host's root, and a host file owned
    by an id outside it is only what its mode allows others. (virtiofsd creates files
    as the guest's uid; as the host's root it would make root-owned files, set-uid ones
    included, in a host directory.) A short-lived child in the host's user namespace
    writes the maps (only a process there may map more than its own id)."""
    first, count = vm.volume_ids
    if not count:
        raise SiloError("volumes need the host's id range for sandboxes (/etc/subuid): none is configured")

    def setup() -> None:  # in the child, before exec
        _die_with_parent()
        sysk.unshare(sysk.CLONE_NEWNS)
        sysk.mount(None, "/", None, sysk.MS_REC | sysk.MS_PRIVATE)
        # opened first: the tmpfs over /tmp hides a source below /tmp
        sources = [os.open(source, os.O_PATH | os.O_CLOEXEC) for source, _, _, _ in vm.volumes]
        sysk.mount("silo-volumes", VIEW_PARENT, "tmpfs", sysk.MS_NOSUID | sysk.MS_NODEV, "mode=0755,size=64k")
        os.mkdir(VIEW)
        for i, (_, _, readonly, is_dir) in enumerate(vm.volumes):
            target = f"{VIEW}/{i}"
            if is_dir:
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            sysk.mount(f"/proc/self/fd/{sources[i]}", target, None, sysk.MS_BIND | sysk.MS_REC)
            if readonly:
                sysk.mount(None, target, None, sysk.MS_BIND | sysk.MS_REMOUNT | sysk.MS_RDONLY | sysk.MS_NOSUID
                           | sysk.MS_NODEV)
        unshared_r, unshared_w = os.pipe()
        mapped_r, mapped_w = os.pipe()
        helper = os.fork()
        if helper == 0:  # still in the host's user namespace: map the new one's ids
            code = 1
            try:
                os.close(unshared_w)
                os.close(mapped_r)
                if os.read(unshared_r, 1) == b"1":
                    target_pid = os.getppid()
                    for name in ("uid_map", "gid_map"):
                        write_file(f"/proc/{target_pid}/{name}", f"0 {first} {count}\n")
                    os.write(mapped_w, b"1")
                    code = 0
            finally:
                os._exit(code)
        os.close(unshared_r)
        os.close(mapped_w)
        sysk.unshare(sysk.CLONE_NEWUSER)
        os.write(unshared_w, b"1")
        mapped = os.read(mapped_r, 1)
        os.waitpid(helper, 0)
        if mapped != b"1":
            raise OSError(errno.EPERM, "cannot map the volumes' user namespace")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        _die_with_parent()  # the credential change cleared it

    # the host may change a volume while the guest runs: no long caching; raising the
    # fd limit needs CAP_SYS_RESOURCE of the initial user namespace
    return _virtiofsd(listen_fd, log, setup, "the volumes", "-o", "cache=auto", "--rlimit-nofile=0")


_SYS_PIVOT_ROOT = 155
_MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24


def _jail(vm: p.Vm, uid: int, gid: int, alive_r: int, alive_w: int) -> None:
    """In QEMU's child before exec (SECURITY.md #20), which is PID 1 of a new pid
    namespace (:func:`start_qemu`): new mount, network, IPC and UTS namespaces; a root
    holding only /usr (read-only), the kernel and initramfs (read-only), a fresh /proc
    and /dev with null, zero, urandom (and kvm for KVM); then an unprivileged uid with no
    capabilities and no_new_privs. ``alive_r`` reads EOF once the supervisor is gone."""
    _die_with_parent()
    sysk.unshare(sysk.CLONE_NEWNS | sysk.CLONE_NEWNET | sysk.CLONE_NEWIPC | sysk.CLONE_NEWUTS)
    os.close(alive_w)
    sysk.mount(None, "/", None, sysk.MS_REC | sysk.MS_PRIVATE)
    sysk.mount("silo-jail", VIEW_PARENT, "tmpfs", sysk.MS_NOSUID | sysk.MS_NODEV, "mode=0755,size=64k")
    root = JAIL_ROOT
    os.mkdir(root, 0o755)
    sysk.mount(root, root, None, sysk.MS_BIND)  # pivot_root wants a mount point
    for d in ("/usr", "/proc", "/dev", "/vm", "/tmp"):
        os.mkdir(root + d, 0o755)
    sysk.bind_readonly("/usr", root + "/usr")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host):
            os.mkdir(f"{root}/{name}", 0o755)
            sysk.bind_readonly(host, f"{root}/{name}")
    sysk.mount("proc", root + "/proc", "proc", sysk.MS_NOSUID | sysk.MS_NODEV | sysk.MS_NOEXEC)
    sysk.mount("silo-dev", root + "/dev", "tmpfs", sysk.MS_NOSUID | sysk.MS_NOEXEC, "mode=0755,size=64k")
    devices = ["null", "zero", "urandom", "random"] + (["kvm"] if vm.accel == "kvm" else [])
    for name in devices:
        with open(f"{root}/dev/{name}", "w"):
            pass
        sysk.mount(f"/dev/{name}", f"{root}/dev/{name}", None, sysk.MS_BIND)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    for source, target in ((vm.kernel, JAIL_KERNEL), (vm.initramfs, JAIL_INITRAMFS)):
        with open(root + target, "w"):
            pass
        sysk.bind_readonly(source, root + target)
    os.chdir(root)
    if _libc.syscall(_SYS_PIVOT_ROOT, b".", b".") < 0:
        raise OSError(ctypes.get_errno(), "pivot_root")
    if _libc.umount2(b".", _MNT_DETACH) < 0:
        raise OSError(ctypes.get_errno(), "umount2")
    os.chdir("/")
    for cap in range(64):  # the bounding set too: nothing to regain through an exec
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() != errno.EINVAL:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to non-root: every capability is gone
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # Set after the last change of credentials, which clears it; then make sure the
    # supervisor did not die before it was set.
    _die_with_parent()
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(1)
    os.close(alive_r)


def start_qemu(vm: p.Vm, argv: Sequence[str], keep: Sequence[int], log: int) -> subprocess.Popen[bytes]:
    """QEMU, jailed (:func:`_jail`; the vm level runs only as root, see the planner).

    It is PID 1 of a pid namespace of its own and still our child: we unshare the pid
    namespace for our next child only, start it, and go back. (A fork in between, in
    the namespace as its PID 1, cost a Python process of ~8 MiB per VM.)"""
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)  # EOF in the child once we are gone

    def setup() -> None:
        _jail(vm, vm.jail_id, vm.jail_id, alive_r, alive_w)

    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sysk.unshare(sysk.CLONE_NEWPID)
        try:
            return subprocess.Popen(list(argv), pass_fds=tuple(keep), preexec_fn=setup,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            sysk.setns(own, sysk.CLONE_NEWPID)  # our later children stay beside us
    except subprocess.SubprocessError as e:  # _jail failed in the child
        raise SiloError(f"cannot jail QEMU: {e}") from None
    except FileNotFoundError:
        raise SiloError(f"{QEMU} is not installed: install Debian's qemu-system-x86 (make install does)") from None
    finally:
        os.close(own)
        os.close(alive_r)
        os.close(alive_w)  # the supervisor's end: QEMU holds none of ours
