"""The daemon: one running "kernel" of a machine, serving its filesystem over FUSE.

Life of a daemon (`Daemon.run`):

1. check the mount point, boot the kernel on the machine (creating its arena on first
   use), obtain the filesystem from it (`_open_filesystem`), ``finish_boot``;
2. mount with pyfuse3 and serve, in one trio loop, the FUSE requests and the control
   socket; tell whoever started us that the mount is live (`Readiness`);
3. stop on ``guestfs umount`` (control op ``umount``), SIGTERM / SIGINT / SIGHUP, or an
   external ``umount`` / ``fusermount3 -u``; then unmount and hand the filesystem over
   into the arena (`_close_kernel`), so that the next ``guestfs mount`` finds it;
4. or, on ``guestfs kexec`` (control op ``kexec``): quiesce, serialize, finalize, unmount,
   poison, and exec the next kernel image in this process (`_op_kexec`, `_exec`).

`start_background` runs the daemon detached (``guestfs mount`` without ``-f``): a new
session, output to ``<machine dir>/<machine>.log``, and a pipe on which the daemon
reports success or the reason it failed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from guestfs import control, handover
from guestfs import kexec as gkexec
from guestfs.errors import FsError
from guestfs.filesystem import Filesystem
from guestfs.fuse_ops import AdapterConfig, Operations, RequestGate, hooks_enabled
from kho_backend import boot as kboot
from kho_backend import machine as kmachine
from kho_backend.boot import Kernel
from kho_backend.cmdline import Cmdline
from kho_backend.errors import BootError, HandoverError, KexecError, MachineError

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 1 << 30
FSTYPE = "fuse.guestfs"
FSNAME_PREFIX = "guestfs-"
READY_TIMEOUT = 300.0  # seconds; creating and booting a large arena takes a while
EXIT_TIMEOUT = 30.0  # seconds a daemon that failed to start gets to exit
MNT_DETACH = 2
QUIESCE_TIMEOUT = 60.0  # seconds; a quiesce that takes longer aborts the kexec


class StartError(Exception):
    """The daemon could not start; the message says why, as a sentence for the user."""


# --- mount options -------------------------------------------------------------------

# Options passed to the kernel as they are (generic mount flags libfuse understands).
_PASSTHROUGH = frozenset({"suid", "nosuid", "dev", "nodev", "exec", "noexec",
                          "atime", "noatime", "diratime", "nodiratime", "relatime",
                          "norelatime", "strictatime", "nostrictatime", "sync", "async",
                          "dirsync"})


@dataclass(frozen=True)
class MountOptions:
    """What ``-o`` asked for. ``default_permissions`` is always on."""

    allow_other: bool = False
    read_only: bool = False
    flags: tuple[str, ...] = ()  # from _PASSTHROUGH, in the order given

    @classmethod
    def parse(cls, text: str) -> MountOptions:
        """Parse a comma-separated ``-o`` list; `ValueError` names an unknown option."""
        allow_other = read_only = False
        flags: list[str] = []
        for opt in filter(None, (o.strip() for o in text.split(","))):
            if opt == "allow_other":
                allow_other = True
            elif opt in ("ro", "rw"):
                read_only = opt == "ro"
            elif opt in _PASSTHROUGH:
                flags.append(opt)
            elif opt != "default_permissions":
                raise ValueError(
                    f"unknown mount option {opt!r}; supported: allow_other, ro, rw, "
                    f"default_permissions, {', '.join(sorted(_PASSTHROUGH))}")
        return cls(allow_other, read_only, tuple(flags))

    def text(self) -> str:
        """The ``-o`` text that parses back into these options."""
        opts = (["allow_other"] if self.allow_other else []) + ["ro" if self.read_only else "rw"]
        return ",".join(opts + list(self.flags))

    def fuse_options(self, machine: str, *, debug: bool = False) -> set[str]:
        """The option set for `pyfuse3.init`."""
        opts = {"default_permissions", f"fsname={FSNAME_PREFIX}{machine}", "subtype=guestfs",
                "ro" if self.read_only else "rw", *self.flags}
        if self.allow_other:
            opts.add("allow_other")
        if debug:
            opts.add("debug")
        return opts


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """Everything a daemon needs to boot and mount."""

    machine: str
    mountpoint: Path
    memory: int | None = None  # only used when the arena is created
    nodes: int | None = None   # likewise
    options: MountOptions = field(default_factory=MountOptions)
    format: bool = False
    debug: bool = False

    def argv(self, ready_fd: int | None = None) -> list[str]:
        """A command line that runs this daemon in the foreground (also the image kexec
        execs); with `ready_fd` it reports readiness on that inherited descriptor."""
        argv = [sys.executable, "-m", "guestfs.cli", "mount", "-f",
                "--machine", self.machine, "-o", self.options.text()]
        if ready_fd is not None:
            argv += ["--ready-fd", str(ready_fd)]
        if self.memory is not None:
            argv += ["--memory", str(self.memory)]
        if self.nodes is not None:
            argv += ["--nodes", str(self.nodes)]
        if self.format:
            argv.append("--format")
        if self.debug:
            argv.append("-d")
        return argv + [os.fspath(self.mountpoint)]


def machine_dir() -> Path:
    """The folder holding arenas, logs and control sockets."""
    return kmachine.machine_dir()


def log_path(machine: str) -> Path:
    """The daemon's log file when it runs in the background."""
    return machine_dir() / f"{machine}.log"


def control_path(machine: str) -> Path:
    """The control socket of `machine`'s daemon."""
    return control.socket_path(machine_dir(), machine)


# --- the mount table -------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo that matters to us."""

    mountpoint: Path
    fstype: str
    source: str

    @property
    def machine(self) -> str | None:
        """The machine name if this is a guestfs mount."""
        if self.fstype == FSTYPE and self.source.startswith(FSNAME_PREFIX):
            return self.source[len(FSNAME_PREFIX):]
        return None


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts() -> list[MountEntry]:
    """The mount table of this process's mount namespace."""
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            entries.append(MountEntry(Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return entries


def mount_at(path: Path) -> MountEntry | None:
    """The topmost mount whose mount point is `path` (symlinks resolved)."""
    path = Path(os.path.realpath(path))
    found = [m for m in mounts() if m.mountpoint == path]
    return found[-1] if found else None


def mount_of_machine(machine: str) -> MountEntry | None:
    """Where `machine` is mounted, if anywhere."""
    found = [m for m in mounts() if m.machine == machine]
    return found[-1] if found else None


# --- system calls the standard library lacks (through ctypes, which drops the GIL) --------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str, path: Path) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))


def umount2(path: Path, flags: int = 0) -> None:
    """umount2(2). Blocks while the kernel writes back dirty pages: never call it from
    the thread that serves FUSE requests."""
    _check(_libc.umount2(os.fsencode(path), flags), "umount", path)


def syncfs(target: Path | int) -> None:
    """syncfs(2) of the filesystem at a path or an open descriptor (pyfuse3.syncfs keeps
    the GIL, which would deadlock a daemon calling it on its own mount). Opening the
    mount root sends OPENDIR: a caller that has frozen the gate passes a descriptor
    opened before the freeze."""
    if isinstance(target, int):
        _check(_libc.syncfs(target), "syncfs", Path(f"/proc/self/fd/{target}"))
        return
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


# --- readiness ---------------------------------------------------------------------------


class Readiness:
    """Tells the process that started the daemon whether the mount is live.

    One JSON line on an inherited pipe: ``{"ok": true, "pid": N}`` or
    ``{"ok": false, "error": MESSAGE}``. Without a pipe (``-f`` from a terminal) the
    news goes to the log only.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ok(self) -> None:
        self._send({"ok": True, "pid": os.getpid()})

    def fail(self, message: str) -> None:
        self._send({"ok": False, "error": message})

    def _send(self, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, json.dumps(message).encode() + b"\n")
        except OSError as e:  # the starter gave up waiting; nothing to tell
            log.warning("could not report readiness: %s", e)
        finally:
            os.close(self._fd)
            self._fd = None


# --- the daemon ----------------------------------------------------------------------


def check_mountpoint(path: Path) -> None:
    """Refuse a mount point that is missing, not a directory, or already a guestfs mount."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StartError(f"mount point {path} does not exist.") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StartError(f"{path} is a mount whose daemon is gone; "
                             f"run 'guestfs umount {path}' first.") from None
        raise StartError(f"cannot use mount point {path}: {e.strerror}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartError(f"mount point {path} is not a directory.")
    entry = mount_at(path)
    if entry is not None and entry.machine is not None:
        raise StartError(f"{path} is already a guestfs mount (machine {entry.machine}).")


class Daemon:
    """One kernel of a machine, mounted and serving."""

    def __init__(self, config: DaemonConfig, readiness: Readiness) -> None:
        self.config = config
        self.mountpoint = Path(os.path.realpath(config.mountpoint))
        self.readiness = readiness
        self.gate = RequestGate()
        self.kernel: Kernel | None = None
        self.fs: Filesystem | None = None
        self.started_ns = 0
        self.last_blackout: dict[str, Any] | None = None
        self._mounted = False
        self._exec_next = False      # set once a kexec has handed over: exec, not stop
        self._poison = False
        self._unmounted_at = 0
        self._detached = False       # our own lazy unmount ran: never unmount by path again
        self._handover_failed = False
        # kexec, kexec-load/-unload and umount change what the daemon is: one at a time.
        self._exclusive = trio.Lock()
        self._restore_ns = 0
        self._mount_started = 0
        self.control_ops: dict[str, control.OpHandler] = {
            "status": self._op_status,
            "check": self._op_check,
            "extents": self._op_extents,
            "umount": self._op_umount,
            "kexec": self._op_kexec,
            "kexec-load": self._op_kexec_load,
            "kexec-unload": self._op_kexec_unload,
        }

    def run(self) -> int:
        """Boot, mount, serve until asked to stop; the process exit code."""
        try:
            self._start()
        except (StartError, MachineError) as e:
            message = str(e)
            if isinstance(e, (HandoverError, BootError)) and not self.config.format:
                message += (" The arena is left as it was ('guestfs kho dump' shows it); "
                            "to discard it and start an empty filesystem, mount with --format.")
            log.error("%s", message)
            self.readiness.fail(message)
            self._close_kernel()
            return 1
        except Exception as e:
            log.exception("start failed")
            self.readiness.fail(f"start failed: {e!r}")
            self._close_kernel()
            return 1
        try:
            trio.run(self._serve)
        finally:
            self._unmount()
            if self._exec_next:
                self._exec()      # returns only if the exec failed
            self._close_kernel()
        log.info("stopped")
        return 1 if self._handover_failed else 0

    # --- start ------------------------------------------------------------------

    def _start(self) -> None:
        check_mountpoint(self.mountpoint)
        self.started_ns = time.monotonic_ns()
        started_wall = time.time_ns()
        self.kernel = self._boot()
        t0 = time.perf_counter_ns()
        self.fs = self._open_filesystem(self.kernel)
        metadata = self.kernel.kho_in.metadata if self.kernel.kho_in else None
        released = self.kernel.finish_boot()
        self._restore_ns = gkexec.elapsed_ns(t0)     # with finish_boot's release
        if metadata is not None:
            log.info("exec from: %s (count %d); released %d unclaimed preserved pages",
                     metadata.previous_release, metadata.kexec_count, released)
        self._mount(on_init=lambda: self._mounted_after_kexec(metadata, started_wall))

    def _boot(self) -> Kernel:
        cfg = self.config
        memory = cfg.memory
        if memory is None and not kmachine.machine_exists(cfg.machine):
            memory = DEFAULT_MEMORY
        log.info("booting machine %s", cfg.machine)
        return kboot.boot(cfg.machine, memory=memory, nodes=cfg.nodes or 1,
                          create=True, format=cfg.format)

    def _open_filesystem(self, kernel: Kernel) -> Filesystem:
        """The filesystem handed over to this kernel, or a fresh one on a machine that
        has none; registered with KHO so that the next kexec or unmount hands it over."""
        fs = handover.restore(kernel)
        if fs is None:
            fs = Filesystem(kernel)
        else:
            log.info("restored filesystem %s: generation %d, %d inodes", fs.sb.uuid,
                     fs.sb.generation, len(fs.inodes))
        kernel.kho.register(handover.GuestfsHandover(fs))
        return fs

    def _mounted_after_kexec(self, metadata, started_wall: int) -> None:
        """The new mount answers: if a kexec booted us, that ends its blackout."""
        if metadata is None or not metadata.exec_time_ns:
            return
        blackout = gkexec.Blackout.measure(metadata, started_wall, self.kernel,
                                           self._restore_ns, gkexec.elapsed_ns(self._mount_started))
        self.last_blackout = blackout.as_dict()
        log.info("kexec blackout %.1f ms:\n%s", blackout.total_ms, blackout.table())

    def _mount(self, on_init: Callable[[], None] | None = None) -> None:
        assert self.fs is not None
        ops = Operations(self.fs, self.gate, AdapterConfig(read_only=self.config.options.read_only))
        ops.on_init = on_init
        self._mount_started = time.perf_counter_ns()
        options = self.config.options.fuse_options(self.config.machine, debug=self.config.debug)
        log.info("mounting at %s with %s", self.mountpoint, ",".join(sorted(options)))
        try:
            pyfuse3.init(ops, os.fspath(self.mountpoint), options)
        except RuntimeError as e:
            raise StartError(f"cannot mount at {self.mountpoint}: {e}.") from None
        self._mounted = True

    # --- serve ------------------------------------------------------------------

    async def _serve(self) -> None:
        server = control.ControlServer(control_path(self.config.machine), self.control_ops)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            nursery.start_soon(self._watch_signals)
            self.readiness.ok()
            log.info("serving %s at %s (pid %d)", self.config.machine, self.mountpoint, os.getpid())
            # Returns when the session ends: unmounted from outside, by _op_umount, or
            # pyfuse3.terminate() after a signal.
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                await self._detach()
                return

    async def _detach(self) -> None:
        """Stop even while clients hold files open: flush, lazy unmount, end the session."""
        # syncfs first, while we still serve: the kernel's dirty pages come through us.
        for call in (lambda: syncfs(self.mountpoint), lambda: umount2(self.mountpoint, MNT_DETACH)):
            try:
                await trio.to_thread.run_sync(call)
            except OSError as e:
                log.warning("%s", e)
        pyfuse3.terminate()

    # --- control ops --------------------------------------------------------------

    async def _op_status(self, request: control.Message) -> control.Message:
        return self.status()

    async def _op_check(self, request: control.Message) -> control.Message:
        # The core's fsck of the live filesystem; between two requests it is consistent.
        assert self.fs is not None
        return {"problems": self.fs.check()}

    async def _op_extents(self, request: control.Message) -> control.Message:
        """The physical extents of a file, by its path inside the mount (filefrag)."""
        assert self.fs is not None
        inode = self.fs.get(1)
        try:
            for part in Path(str(request.get("path", ""))).parts:
                inode = self.fs.lookup(inode.ino, os.fsencode(part))
        except FsError as e:
            raise control.ControlError(f"{request.get('path')}: {e}") from None
        extents = inode.pages.extents() if inode.pages is not None else []
        return {"ino": inode.ino, "size": inode.size,
                "extents": [list(e) for e in extents]}

    def _claim(self) -> None:
        """Refuse a state-changing request while another one is under way."""
        if self._exclusive.locked() or self._exec_next:
            raise control.ControlError("another kexec or unmount of this machine is under way")

    async def _op_umount(self, request: control.Message) -> control.Message:
        self._claim()
        async with self._exclusive:
            return await self._umount()

    async def _umount(self) -> control.Message:
        # A plain (not lazy) unmount, as umount(8): refused while files are open. It
        # runs in a thread because the kernel writes dirty pages back through us first.
        try:
            await trio.to_thread.run_sync(umount2, self.mountpoint)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise control.ControlError(
                    f"{self.mountpoint} is busy: files are open there or it is some "
                    f"process's working directory.") from None
            raise control.ControlError(str(e)) from None
        return {"pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        """What ``guestfs status`` shows of a running daemon."""
        assert self.fs is not None and self.kernel is not None
        kernel, st = self.kernel, self.fs.statfs()
        npages = kernel.arena.npages
        return {
            "machine": self.config.machine,
            "pid": os.getpid(),
            "mountpoint": os.fspath(self.mountpoint),
            "options": self.config.options.text(),
            "generation": self.fs.sb.generation,
            "uuid": self.fs.sb.uuid,
            "arena": {
                "path": os.fspath(kernel.arena.path),
                "size": kernel.arena.size,
                "nodes": kernel.arena.nodes,
                "pages": npages,
                "used_pages": npages - kernel.pages.free_pages(movable=True),
                "free_pages": kernel.pages.free_pages(),
            },
            "inodes": {"used": st.f_files - st.f_ffree, "free": st.f_ffree},
            "uptime_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 3),
            "boot_timings_ns": dict(kernel.boot_timings),
            "last_blackout": self.last_blackout,
        }

    # --- stop ---------------------------------------------------------------------

    def _unmount(self) -> None:
        if self._mounted:
            # Lazy unmount if still mounted (e.g. the loop ended on an error); a no-op
            # when the kernel already ended the session. After our own detach the path
            # may hold another mount by now: then only the session is closed.
            pyfuse3.close(unmount=not self._detached)
            self._mounted = False

    def _close_kernel(self) -> None:
        """Hand the filesystem over into the arena (as an unmount does) and close the
        kernel. Without a filesystem (a boot that failed or a handover that was refused)
        nothing is written, so the arena stays as it was for `guestfs kho dump`."""
        if self.kernel is None:
            return
        if self.fs is not None and not self.kernel.kho.finalized:
            try:
                self.kernel.kexec.prepare({})
                log.info("handed the filesystem over into the arena")
            except KexecError as e:
                self._handover_failed = True
                log.error("could not hand the filesystem over: %s; its files cannot be "
                          "recovered by the next mount", e)
        self.kernel.shutdown()
        self.kernel = None

    # --- kexec ----------------------------------------------------------------------

    async def _op_kexec_load(self, request: control.Message) -> control.Message:
        """Stage the next kernel (like ``kexec -l``): this daemon's own image."""
        self._claim()
        async with self._exclusive:
            return self._load(request)

    def _load(self, request: control.Message) -> control.Message:
        assert self.kernel is not None
        cmdline = str(request.get("cmdline", ""))
        try:
            if not Cmdline.parse(cmdline).kho:
                # That kernel could never hand over: its unmount would lose every file.
                raise control.ControlError("refusing a next kernel with kho=off: it could "
                                           "not hand the filesystem over again")
            self.kernel.kexec.load(self._next_image(), cmdline)
        except (KexecError, MachineError) as e:
            raise control.ControlError(str(e)) from None
        return {"loaded": True, "cmdline": cmdline}

    async def _op_kexec_unload(self, request: control.Message) -> control.Message:
        assert self.kernel is not None
        self._claim()
        self.kernel.kexec.unload()
        return {"loaded": False}

    def _next_image(self) -> list[str]:
        # The same daemon, mounting the same machine at the same place with the same
        # options; never --format, and the arena already exists.
        return dataclasses.replace(self.config, format=False, memory=None, nodes=None).argv()

    async def _op_kexec(self, request: control.Message) -> control.Message:
        """Quiesce, hand over, unmount; `run` then poisons and execs the next kernel.

        Any failure up to and including the unmount aborts: the filesystem serves as
        before and the reply names the phase. Refused while other processes use the
        mount (checked again once requests are held), unless ``force``.
        """
        self._claim()
        async with self._exclusive:
            return await self._kexec(request)

    async def _kexec(self, request: control.Message) -> control.Message:
        assert self.kernel is not None
        fault = request.get("fail_phase") if hooks_enabled() else None
        force = bool(request.get("force"))
        if not force:
            await self._refuse_if_busy()
        if self.kernel.kexec.loaded is None or "cmdline" in request:
            self._load(request)
        phases: dict[str, int] = {}
        root_fd = await trio.to_thread.run_sync(os.open, self.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await self._kexec_hand_over(phases, root_fd, fault, force)
        except Exception as e:
            # Whatever failed, the kexec is over: the gate must open again, or every
            # client of the mount would wait forever.
            self.gate.thaw()
            if not isinstance(e, (KexecError, gkexec.InjectedFault, control.ControlError)):
                log.exception("kexec failed")
            phase = getattr(e, "phase", None) or fault or "quiesce"
            reason = str(e).rstrip(".")
            raise control.ControlError(f"kexec aborted in phase {phase}: {reason}. "
                                       f"The filesystem serves as before.") from None
        finally:
            os.close(root_fd)      # not awaited: this must happen even when cancelled
        self._exec_next = True
        self._poison = bool(request.get("poison")) or self.kernel.cmdline.kho_poison
        # The handover is done: requests still waiting would change what was handed over.
        self.gate.shut()
        # A process still holding a file (--force) keeps the detached mount's connection
        # alive, so the session would never end by itself: end it; `run` then execs.
        pyfuse3.terminate()
        return {"pid": os.getpid(), "kexec_count": self.kernel.kexec.metadata.kexec_count}

    async def _refuse_if_busy(self) -> None:
        # In a worker thread: reading another process's maps can wait on its mmap lock,
        # which one of its threads faulting on this mount may hold.
        busy = await trio.to_thread.run_sync(gkexec.holders, self.mountpoint, os.getpid())
        if busy:
            raise control.ControlError(
                f"{self.mountpoint} is busy: in use by pid {gkexec.describe_holders(busy)}; "
                f"close those files or use --force (those processes then see errors).")

    async def _kexec_hand_over(self, phases: dict[str, int], root_fd: int,
                               fault: str | None, force: bool) -> None:
        t0 = time.perf_counter_ns()
        try:
            with trio.fail_after(QUIESCE_TIMEOUT):
                await gkexec.quiesce(self.gate, root_fd, syncfs)
        except trio.TooSlowError:
            raise KexecError(f"requests did not drain within {QUIESCE_TIMEOUT:.0f} s",
                             "quiesce") from None
        if fault == "quiesce":
            raise gkexec.InjectedFault("injected failure in quiesce")
        if not force:
            await self._refuse_if_busy()      # someone may have opened a file meanwhile
        phases["quiesce"] = gkexec.elapsed_ns(t0)
        with gkexec.inject_fault(self.kernel, fault):
            self.kernel.kexec.prepare(phases)
        t0 = time.perf_counter_ns()
        try:
            if fault == "unmount":
                raise gkexec.InjectedFault("injected failure in unmount")
            await trio.to_thread.run_sync(umount2, self.mountpoint, MNT_DETACH)
        except BaseException as e:
            self.kernel.kexec.abort()
            if isinstance(e, OSError):
                raise KexecError(f"cannot unmount {self.mountpoint}: {e.strerror}.",
                                 "unmount") from e
            raise
        self._detached = True
        self._unmounted_at = time.perf_counter_ns()
        # From here the kexec is committed: a failure to record a timing is only logged.
        try:
            self.kernel.kexec.record_phase("unmount", self._unmounted_at - t0)
        except MachineError:
            log.exception("could not record the unmount phase")

    def _exec(self) -> None:
        """Poison (if asked) and exec the next kernel; on failure log why and return,
        and the filesystem is handed over as by an unmount."""
        assert self.kernel is not None
        kexec = self.kernel.kexec
        try:
            # Leaving the FUSE loop and closing the session, between unmount and poison.
            kexec.record_phase("teardown", gkexec.elapsed_ns(self._unmounted_at))
            if self._poison:
                kexec.poison()
            log.info("kexec: exec %s", " ".join(kexec.loaded.argv))
            kexec.exec()
        except Exception as e:
            log.exception("kexec failed at exec: %s; the filesystem stays in the arena for "
                          "the next 'guestfs mount'", e)


# --- starting in the background ------------------------------------------------------------


def run_foreground(config: DaemonConfig, ready_fd: int | None = None) -> int:
    """Run the daemon in this process; returns the exit code."""
    return Daemon(config, Readiness(ready_fd)).run()


def start_background(config: DaemonConfig,
                     progress: Callable[[str], None] = lambda msg: None) -> int:
    """Start the daemon detached and return its PID once the mount is live.

    Raises `StartError` with the daemon's reason (or the tail of its log) otherwise.
    """
    log_file = log_path(config.machine)
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(config.argv(ready_fd=write_fd), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, pass_fds=(write_fd,),
                                start_new_session=True)
    os.close(write_fd)  # so that the daemon's exit shows as end-of-file
    try:
        reply = _await_readiness(read_fd, progress, log_file)
    finally:
        os.close(read_fd)
    if reply is None or not reply.get("ok"):
        # Wait for the failed daemon, so that its machine lock is free when we return.
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        if reply is None:
            raise StartError(f"the daemon ended (exit status {code}) before the mount was "
                             f"live.{_log_tail(log_file)}")
        raise StartError(str(reply.get("error")))
    _check_live(Path(config.mountpoint))
    return proc.pid


def _await_readiness(fd: int, progress: Callable[[str], None],
                     log_file: Path) -> dict[str, Any] | None:
    """The daemon's readiness message, or None if it ended without one."""
    deadline = time.monotonic() + READY_TIMEOUT
    data, told = b"", False
    with open(fd, "rb", buffering=0, closefd=False) as pipe:
        while True:
            if not select.select([pipe], [], [], 1.0)[0]:
                if time.monotonic() > deadline:
                    raise StartError(f"the daemon did not mount within {READY_TIMEOUT:.0f} s; "
                                     f"see {log_file}.")
                if not told:
                    progress("waiting for the daemon to boot and mount…")
                    told = True
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def _check_live(mountpoint: Path) -> None:
    # A stat served by the daemon, on a device other than the parent directory's.
    if os.stat(mountpoint).st_dev == os.stat(mountpoint.resolve().parent).st_dev:
        raise StartError(f"the daemon reported success but {mountpoint} is not mounted.")


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" Last lines of {path}:\n  " + "\n  ".join(tail) if tail else ""
