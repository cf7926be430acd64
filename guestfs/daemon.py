"""The daemon: one running "kernel" of a machine, serving its filesystem over FUSE.

Life of a daemon (`Daemon.run`):

1. check the mount point, boot the kernel on the machine (creating its arena on first
   use), obtain the filesystem from it (`_open_filesystem`), ``finish_boot``;
2. mount with pyfuse3 and serve, in one trio loop, the FUSE requests and the control
   socket; tell whoever started us that the mount is live (`Readiness`);
3. stop on ``guestfs umount`` (control op ``umount``) or SIGTERM / SIGINT / SIGHUP:
   quiesce, hand the filesystem over into the arena, and only then unmount
   (`_hand_over`), so that the next ``guestfs mount`` finds it and a failure leaves the
   mount serving; after an external ``umount`` / ``fusermount3 -u`` the handover comes
   after the unmount (`_close_kernel`), and if it fails the daemon mounts again;
4. or, on ``guestfs kexec`` (control op ``kexec``): the same handover for the next
   kernel, a lazy unmount, poison, and the exec of the next kernel image in this
   process (`_op_kexec`, `_exec`).

A shield (`mounts.cover`) lies under the FUSE mount from the first kernel's mount to
the last one's stop, across every kexec.

`start_background` runs the daemon detached (``guestfs mount`` without ``-f``): a new
session, output to ``<machine dir>/<machine>.log``, and a pipe on which the daemon
reports success or the reason it failed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
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

from guestfs import control, handover, mounts
from guestfs import kexec as gkexec
from guestfs.errors import FsError
from guestfs.filesystem import AtimeMode, AtimePolicy, Filesystem
from guestfs.fuse_ops import AdapterConfig, Operations, RequestGate, hooks_enabled
from kho_backend import boot as kboot
from kho_backend import machine as kmachine
from kho_backend.boot import Kernel
from kho_backend.cmdline import Cmdline
from kho_backend.errors import BootError, HandoverError, KexecError, MachineError

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 1 << 30
READY_TIMEOUT = 300.0  # seconds; creating and booting a large arena takes a while
EXIT_TIMEOUT = 30.0  # seconds a daemon that failed to start gets to exit
QUIESCE_TIMEOUT = 60.0  # seconds; a quiesce that takes longer aborts the kexec


class StartError(Exception):
    """The daemon could not start; the message says why, as a sentence for the user."""


# --- mount options -------------------------------------------------------------------

# Options passed to the kernel as they are (generic mount flags libfuse understands).
_PASSTHROUGH = frozenset({"suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync",
                          "async", "dirsync"})
# atime options: the kernel leaves atime of FUSE files to the filesystem, so the core
# applies them (libfuse refuses most of them anyway).
_ATIME_MODES = {"relatime": AtimeMode.RELATIME, "nostrictatime": AtimeMode.RELATIME,
                "atime": AtimeMode.RELATIME, "strictatime": AtimeMode.STRICTATIME,
                "norelatime": AtimeMode.STRICTATIME, "noatime": AtimeMode.NOATIME}
_DIRATIME = {"diratime": True, "nodiratime": False}


@dataclass(frozen=True)
class MountOptions:
    """What ``-o`` asked for. ``default_permissions`` is always on."""

    allow_other: bool = False
    read_only: bool = False
    flags: tuple[str, ...] = ()  # from _PASSTHROUGH, in the order given
    atime: AtimePolicy = AtimePolicy()

    @classmethod
    def parse(cls, text: str) -> MountOptions:
        """Parse a comma-separated ``-o`` list; `ValueError` names an unknown option."""
        allow_other = read_only = False
        flags: list[str] = []
        atime = AtimePolicy()
        for opt in filter(None, (o.strip() for o in text.split(","))):
            if opt == "allow_other":
                allow_other = True
            elif opt in ("ro", "rw"):
                read_only = opt == "ro"
            elif opt in _PASSTHROUGH:
                flags.append(opt)
            elif opt in _ATIME_MODES:
                atime = dataclasses.replace(atime, mode=_ATIME_MODES[opt])
            elif opt in _DIRATIME:
                atime = dataclasses.replace(atime, directories=_DIRATIME[opt])
            elif opt != "default_permissions":
                known = sorted({"allow_other", "ro", "rw", "default_permissions",
                                *_PASSTHROUGH, *_ATIME_MODES, *_DIRATIME})
                raise ValueError(f"unknown mount option {opt!r}; supported: "
                                 f"{', '.join(known)}")
        return cls(allow_other, read_only, tuple(flags), atime)

    def text(self) -> str:
        """The ``-o`` text that parses back into these options."""
        opts = (["allow_other"] if self.allow_other else []) + ["ro" if self.read_only else "rw"]
        opts.append(self.atime.mode.value)
        if not self.atime.directories:
            opts.append("nodiratime")
        return ",".join(opts + list(self.flags))

    def fuse_options(self, machine: str, *, debug: bool = False) -> set[str]:
        """The option set for `pyfuse3.init`."""
        opts = {"default_permissions", f"fsname={mounts.FSNAME_PREFIX}{machine}", "subtype=guestfs",
                "ro" if self.read_only else "rw", *self.flags}
        if self.atime.mode is AtimeMode.NOATIME:
            opts.add("noatime")     # only so that the mount table shows it
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
    entry = mounts.mount_at(path)
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
        self._unmount_ns = 0
        self._detached = False       # our own lazy unmount ran: never unmount by path again
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
        """Boot, mount, serve until asked to stop; the process exit code (0 only when
        the filesystem was handed over into the arena or to the next kernel)."""
        try:
            self._start()
        except (StartError, MachineError) as e:
            message = str(e)
            if isinstance(e, (HandoverError, BootError)) and not self.config.format:
                message += (" The arena is left as it was ('guestfs kho dump' shows it); "
                            "to discard it and start an empty filesystem, mount with --format.")
            log.error("%s", message)
            return self._start_failed(message)
        except Exception as e:
            log.exception("start failed")
            return self._start_failed(f"start failed: {e!r}")
        while True:
            try:
                trio.run(self._serve)
            except BaseException as e:
                # Whatever ended the loop, the files go into the arena before we go.
                self._unmount()
                if not self._close_kernel():
                    self._abandon_kernel()
                if isinstance(e, KeyboardInterrupt):
                    log.info("interrupted: the filesystem is handed over into the arena")
                    return 130
                raise
            self._unmount()
            exec_failed = False
            if self._exec_next:
                self._exec_next = False
                self._exec()      # returns only if the exec failed
                exec_failed = True
            if self._close_kernel():
                log.info("stopped")
                return 1 if exec_failed else 0
            # The mount went away from outside (an umount, or a failed exec) and the
            # handover could not be written: mount again, so that nothing is lost.
            self.fs.forget_session()
            try:
                self._mount()
            except StartError as e:
                log.error("%s", e)
                self._abandon_kernel()
                return 1
            log.error("the filesystem could not be handed over, so it is mounted again at "
                      "%s and serves as before", self.mountpoint)

    # --- start ------------------------------------------------------------------

    def _start_failed(self, message: str) -> int:
        self.readiness.fail(message)
        if not self._close_kernel():
            self._abandon_kernel()
        return 1

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
        if metadata is not None and metadata.exec_time_ns:
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
        # Linux never moves atime on a read-only mount.
        fs.atime = AtimePolicy(AtimeMode.NOATIME) if self.config.options.read_only \
            else self.config.options.atime
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
        """Mount the FUSE filesystem at the mount point, over the shield (which a
        previous kernel of this machine may have left there for us)."""
        assert self.fs is not None
        self.gate = RequestGate()
        ops = Operations(self.fs, self.gate, AdapterConfig(read_only=self.config.options.read_only))
        ops.on_init = on_init
        self._mount_started = time.perf_counter_ns()
        options = self.config.options.fuse_options(self.config.machine, debug=self.config.debug)
        log.info("mounting at %s with %s", self.mountpoint, ",".join(sorted(options)))
        try:
            mounts.cover(self.mountpoint, self.config.machine)
            pyfuse3.init(ops, os.fspath(self.mountpoint), options)
        except (RuntimeError, OSError) as e:
            raise StartError(f"cannot mount at {self.mountpoint}: {e}.") from None
        self._mounted = True
        self._detached = False

    # --- serve ------------------------------------------------------------------

    async def _serve(self) -> None:
        server = control.ControlServer(control_path(self.config.machine), self.control_ops)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            nursery.start_soon(self._watch_signals)
            self.readiness.ok()
            log.info("serving %s at %s (pid %d)", self.config.machine, self.mountpoint, os.getpid())
            # Returns when the session ends: unmounted from outside, by _op_umount, or
            # pyfuse3.terminate() after a handover.
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the daemon as ``guestfs umount`` does, but
        also while files are open (a lazy unmount; their processes then see errors),
        once a kexec or unmount under way has ended. If the handover cannot be written,
        the daemon says why and serves on."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("%s: handing over and unmounting", name)
                async with self._exclusive:
                    assert self.kernel is not None
                    if self._exec_next or self.kernel.kho.finalized:
                        return      # a kexec or unmount that just ended did it
                    try:
                        await self._hand_over({"force": True}, exec_next=False)
                    except control.ControlError as e:
                        log.error("%s: %s", name, e)
                        continue
                self._end_session()
                return

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
        """Hand over into the arena, then unmount (refused while files are open, as
        umount(8)); any failure leaves the filesystem serving as before."""
        self._claim()
        async with self._exclusive:
            await self._hand_over(request, exec_next=False)
        self._end_session()
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

    def _end_session(self) -> None:
        """After a handover: requests still waiting would change what was handed over,
        so they get EIO; and the session ends, even if a process still holds the lazily
        unmounted mount (it would keep the connection alive)."""
        self.gate.shut()
        pyfuse3.terminate()

    def _unmount(self) -> None:
        if self._mounted:
            # Lazy unmount if still mounted (e.g. the loop ended on an error); a no-op
            # when the kernel already ended the session. After our own detach the path
            # may hold another mount by now: then only the session is closed.
            pyfuse3.close(unmount=not self._detached)
            self._mounted = False

    def _abandon_kernel(self) -> None:
        """Stop without a handover: the last resort when none could be written."""
        log.error("the files stay in the arena, but no handover describes them: the next "
                  "mount of machine %s will refuse until --format", self.config.machine)
        self._shut_down()

    def _close_kernel(self) -> bool:
        """Hand the filesystem over into the arena, unless that is done (by an unmount,
        or a kexec whose exec failed after poisoning), and close the kernel and remove
        the shield; False, with the kernel still running, when the handover could not
        be written.

        Without a filesystem (a boot that failed or a handover that was refused)
        nothing is written, so the arena stays as it was for `guestfs kho dump`.
        """
        if self.kernel is None:
            self._remove_shield()     # a next kernel that failed to boot
            return True
        if self.fs is not None and not self.kernel.kho.finalized:
            try:
                self.kernel.kexec.prepare({}, exec=False)
                log.info("handed the filesystem over into the arena")
            except KexecError as e:
                log.error("could not hand the filesystem over: %s", e)
                return False
        self._shut_down()
        return True

    def _shut_down(self) -> None:
        """Close the kernel, and remove the shield: no next kernel will mount here."""
        assert self.kernel is not None
        self.kernel.shutdown()
        self.kernel = None
        self._remove_shield()

    def _remove_shield(self) -> None:
        try:
            mounts.uncover(self.mountpoint, self.config.machine)
        except OSError as e:
            log.warning("could not remove the shield under %s: %s", self.mountpoint, e)

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
        if self.kernel.kexec.loaded is None:
            raise control.ControlError("no next kernel is loaded: there is nothing to unload")
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
            assert self.kernel is not None
            if self.kernel.kexec.loaded is None or "cmdline" in request:
                self._load(request)
            warnings = await self._hand_over(request, exec_next=True)
            self._exec_next = True
            self._poison = bool(request.get("poison")) or self.kernel.cmdline.kho_poison
        self._end_session()
        return {"pid": os.getpid(), "kexec_count": self.kernel.kexec.metadata.kexec_count,
                "warnings": warnings}

    async def _refuse_if_busy(self, what: str) -> None:
        # In a worker thread: reading another process's maps can wait on its mmap lock,
        # which one of its threads faulting on this mount may hold.
        busy = await trio.to_thread.run_sync(gkexec.holders, self.mountpoint, os.getpid())
        if busy:
            hint = "use --force (those processes then see errors)" if what == "kexec" else \
                "close those files first"
            raise control.ControlError(
                f"{self.mountpoint} is busy: in use by pid {gkexec.describe_holders(busy)}; "
                f"{hint}.")

    async def _hand_over(self, request: control.Message, *, exec_next: bool) -> list[str]:
        """Quiesce, write the handover (for the exec of the next kernel, or for a later
        mount) and unmount (lazily for an exec or with ``force``). Any failure undoes it
        all: the filesystem serves as before, and ControlError names the mount, the
        phase and the cause. Returns warnings worth passing on (a failed write-back)."""
        assert self.kernel is not None
        what = "kexec" if exec_next else "unmount"
        force = bool(request.get("force"))
        fault = request.get("fail_phase") if hooks_enabled() else None
        phases: dict[str, int] = {}
        if not force:
            await self._refuse_if_busy(what)
        try:
            warnings = await self._quiesce_and_prepare(phases, fault, force, exec_next, what)
            await self._unmount_handed_over(lazy=exec_next or force, fault=fault)
        except Exception as e:
            if not isinstance(e, (KexecError, gkexec.InjectedFault, control.ControlError)):
                log.exception("%s failed", what)
            phase = getattr(e, "phase", None) or fault or "quiesce"
            reason = str(e).rstrip(".")
            if self.kernel.kho.finalized:
                # The handover could not be taken back: serving on would change what it
                # describes, so this kernel stops with it, as an unmount would.
                self._end_session()
                raise control.ControlError(
                    f"{what} of {self.mountpoint} failed in phase {phase}: {reason}, and its "
                    "handover could not be taken back; the daemon stops with the "
                    "filesystem handed over into the arena ('guestfs mount' brings it "
                    "back)") from None
            # The handover is off: the gate must open again, or every client of the
            # mount would wait forever.
            self.gate.thaw()
            raise control.ControlError(f"{what} of {self.mountpoint} aborted in phase {phase}: "
                                       f"{reason}. The filesystem serves as before.") from None
        if exec_next:
            self._record_unmount_phase()
        return warnings

    async def _quiesce_and_prepare(self, phases: dict[str, int], fault: str | None,
                                   force: bool, exec_next: bool, what: str) -> list[str]:
        assert self.kernel is not None
        t0 = time.perf_counter_ns()
        root_fd = await trio.to_thread.run_sync(os.open, self.mountpoint,
                                                os.O_RDONLY | os.O_DIRECTORY)
        try:
            with trio.fail_after(QUIESCE_TIMEOUT):
                warnings = await gkexec.quiesce(self.gate, root_fd, self.mountpoint)
        except trio.TooSlowError:
            raise KexecError(f"requests did not drain within {QUIESCE_TIMEOUT:.0f} s",
                             "quiesce") from None
        finally:
            os.close(root_fd)      # not awaited: this must happen even when cancelled
        for warning in warnings:
            log.warning("%s: %s", what, warning)
        if fault == "quiesce":
            raise gkexec.InjectedFault("injected failure in quiesce")
        if not force:
            await self._refuse_if_busy(what)    # someone may have opened a file meanwhile
        phases["quiesce"] = gkexec.elapsed_ns(t0)
        with gkexec.inject_fault(self.kernel, fault):
            self.kernel.kexec.prepare(phases, exec=exec_next)
        return warnings

    async def _unmount_handed_over(self, *, lazy: bool, fault: str | None) -> None:
        """Unmount after the handover was written; on failure take the handover back."""
        assert self.kernel is not None
        t0 = time.perf_counter_ns()
        try:
            if fault == "unmount":
                raise gkexec.InjectedFault("injected failure in unmount")
            await trio.to_thread.run_sync(mounts.umount2, self.mountpoint,
                                          mounts.MNT_DETACH if lazy else 0)
        except BaseException as e:
            try:
                self.kernel.kexec.abort()
            except KexecError:
                log.exception("the handover could not be taken back")
            if isinstance(e, OSError):
                reason = "files are open there or it is some process's working " \
                    "directory" if e.errno == errno.EBUSY else e.strerror
                raise KexecError(f"cannot unmount {self.mountpoint}: {reason}.",
                                 "unmount") from e
            raise
        self._detached = True
        self._unmounted_at = time.perf_counter_ns()
        self._unmount_ns = self._unmounted_at - t0

    def _record_unmount_phase(self) -> None:
        # From here the kexec is committed: a failure to record a timing is only logged.
        assert self.kernel is not None
        try:
            self.kernel.kexec.record_phase("unmount", self._unmount_ns)
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

    Raises `StartError` with the daemon's reason (or the tail of its log) otherwise; a
    first mount of a machine that fails leaves no log behind. A Ctrl-C while waiting
    raises `StillStarting`: the daemon goes on.
    """
    check_machine_files(config)
    kmachine.checked_dir(create=True)
    log_file = log_path(config.machine)
    new_log = not os.path.lexists(log_file)
    read_fd, write_fd = os.pipe()
    out = open_log(log_file)
    try:
        proc = subprocess.Popen(config.argv(ready_fd=write_fd), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, pass_fds=(write_fd,),
                                start_new_session=True)
    finally:
        os.close(out)
        os.close(write_fd)  # so that the daemon's exit shows as end-of-file
    try:
        reply = _await_readiness(read_fd, progress, log_file)
    except KeyboardInterrupt:
        raise StillStarting(proc.pid) from None
    finally:
        os.close(read_fd)
    if reply is None or not reply.get("ok"):
        # Wait for the failed daemon, so that its machine lock is free when we return.
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        tail = _log_tail(log_file)
        if new_log and not kmachine.machine_exists(config.machine):
            log_file.unlink(missing_ok=True)
        if reply is None:
            raise StartError(f"the daemon ended (exit status {code}) before the mount was "
                             f"live.{tail}")
        raise StartError(str(reply.get("error")))
    entry = mounts.mount_at(Path(config.mountpoint))
    if entry is None or entry.machine != config.machine:
        raise StartError(f"the daemon reported success but {config.mountpoint} is not mounted.")
    return proc.pid


class StillStarting(Exception):
    """Ctrl-C while a daemon was starting: it goes on (its pid is `pid`)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid


def check_machine_files(config: DaemonConfig) -> None:
    """Refuse to make a fresh machine in place of one whose arena vanished (its log is
    still there): that would silently start empty over someone's files."""
    if config.format or kmachine.machine_exists(config.machine):
        return
    log_file = log_path(config.machine)
    if os.path.lexists(log_file):
        raise StartError(f"machine {config.machine}'s arena "
                         f"{kmachine.machine_path(config.machine)} is missing, but its log "
                         f"{log_file} is still there: the arena was moved or deleted. Mount "
                         f"with --format to start an empty machine of that name, or run "
                         f"'guestfs machine destroy {config.machine}' to forget it.")


def open_log(path: Path) -> int:
    """A descriptor appending to the daemon's log (mode 0600), never through a symlink
    and only to a regular file of our own."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartError(f"cannot open the log {path}: {e.strerror}.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise StartError(f"the log {path} is not a regular file of this user; remove it.")
    return fd


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


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" Last lines of {path}:\n  " + "\n  ".join(tail) if tail else ""
