"""The daemon: one running "kernel" of a machine, serving its filesystem over FUSE.

The kernel and its filesystem are a `Session` (boot, restore, handover, exec); the daemon
adds the trio loop, the FUSE mount, the request gate and the control socket. Its life
(`Daemon.run`):

1. check the mount point, open the session (boot, restore or format), mount over the
   shield, and serve FUSE requests and control requests in one trio loop; tell whoever
   started us that the mount is live (`Readiness`);
2. on ``guestfs umount`` (control op ``umount``) or SIGTERM / SIGINT / SIGHUP: quiesce,
   hand the filesystem over into the arena, and only then unmount (`_hand_over`), so
   that the next ``guestfs mount`` finds it and a failure leaves the mount serving;
3. on ``guestfs kexec`` (control op ``kexec``): the same handover for the next kernel,
   then, when the next image is this same code, the next kernel boots in this process
   with the modules loaded and takes the FUSE connection over, so the mount stays and
   requests wait at the gate (`_kexec_in_process`); otherwise (``--exec``, or the code
   on disk changed) a lazy unmount, poison and the exec of the next kernel image in
   this process, as a kernel's ``kexec -e``;
4. after an external ``umount`` / ``fusermount3 -u`` the handover comes after the
   unmount (`_close_session`), and if it cannot be written the daemon mounts again.

A shield (`mounts.cover`) lies under the FUSE mount from the first kernel's mount to
the last one's stop, across every kexec.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import faulthandler
import gc
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from guestfs import connection, control, mounts, quiesce
from guestfs.atime import AtimeMode, AtimePolicy
from guestfs.background import Readiness
from guestfs.blackout import Blackout, elapsed_ns
from guestfs.config import DEFAULT_MEMORY, DaemonConfig, StartError, control_path
from guestfs.connection import ConnectionHandover, ConnectionId, ConnectionState
from guestfs.errors import FsError
from guestfs.fuse_ops import AdapterConfig, Operations, RequestGate
from guestfs.session import Fault, Options, Session, State
from kho_backend import machine as kmachine
from kho_backend.cmdline import Cmdline
from kho_backend.errors import BootError, HandoverError, KexecError, MachineError
from kho_backend.kexec import LoadedImage

log = logging.getLogger(__name__)

QUIESCE_TIMEOUT = 60.0  # seconds; a quiesce that takes longer aborts the kexec
#: Seconds between two frees of the unlinked files that wait (`_reap_in_background`).
REAP_INTERVAL = 0.05
#: Background work (the deferred initialisation, the frees that wait) pauses while a
#: kexec or an unmount holds the daemon: its quiesce, part of the blackout, must not
#: wait for a slice of it between two awaits. Seconds between two looks.
BACKGROUND_PAUSE = 0.002
#: Why the path the daemon mounted at is gone: a folder above it was renamed.
MOVED = ("no such path: was a folder above it renamed? Rename it back, or 'umount' the "
         "mount where it is now (the daemon then hands over)")
#: The signals that stop the daemon as ``guestfs umount`` does (`Daemon._watch_signals`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class MountState(enum.Enum):
    """The daemon's FUSE mount."""

    UNMOUNTED = "unmounted"
    MOUNTED = "mounted"
    DETACHED = "detached"     # our own unmount ran: never unmount by path again


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
    """One kernel of a machine, mounted and serving.

    `fault` makes the first handover fail in that phase, on purpose: for tests, which
    start a daemon with it explicitly (the command line has no such switch).
    """

    def __init__(self, config: DaemonConfig, readiness: Readiness,
                 fault: Fault | None = None) -> None:
        self.config = config
        self.mountpoint = Path(os.path.realpath(config.mountpoint))
        self.readiness = readiness
        self.fault = fault
        self.gate = RequestGate()
        self.ops: Operations | None = None
        self.session: Session | None = None
        #: The code this process runs: a next image that would run it too boots here.
        self.image = ImageStamp.take()
        #: The next image to exec after an in-process boot failed (no session is left).
        self._fallback_image: LoadedImage | None = None
        self.mount_state = MountState.UNMOUNTED
        self.started_ns = 0
        self.last_blackout: dict[str, Any] | None = None
        self.exec_next = False       # a kexec handed over and unmounted: exec, not stop
        self.poison = False          # and poison first
        # kexec, kexec-load/-unload and umount change what the daemon is: one at a time.
        self._exclusive = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._mount_started = 0
        self._unmounted_at = 0
        self._unmount_ns = 0
        #: A stop signal that came while no trio loop listened (`_defer_stop_signals`).
        self._stop_noted: int | None = None
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
        self._defer_stop_signals()
        try:
            return self._run()
        finally:
            # Python resets its handlers to the defaults as the interpreter exits: a
            # signal then would kill a daemon that has already stopped cleanly.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def _run(self) -> int:
        # What exists now (modules, the interpreter's own objects) lives as long as the
        # process: kept out of the collections, so that the one at each in-process
        # switch (see `_switch`) scans only the kernels' objects.
        gc.freeze()
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
                if not self._close_session():
                    self._abandon_session()
                raise
            self._unmount()
            exec_failed = self._exec_if_handed_over()
            if self._close_session():
                log.info("stopped")
                return 1 if exec_failed else 0
            # The mount went away from outside (an umount) and the handover could not be
            # written: mount again, so that nothing is lost.
            assert self.session is not None
            self.session.fs.forget_session()
            try:
                self._mount()
            except StartError as e:
                log.error("%s", e)
                self._abandon_session()
                return 1
            log.error("the filesystem could not be handed over, so it is mounted again at "
                      "%s and serves as before", self.mountpoint)

    # --- start ------------------------------------------------------------------

    def _start_failed(self, message: str) -> int:
        self.readiness.fail(message)
        if not self._close_session():
            self._abandon_session()
        return 1

    def _start(self) -> None:
        check_mountpoint(self.mountpoint)
        self.started_ns = time.monotonic_ns()
        started_wall = time.time_ns()
        cfg = self.config
        memory = cfg.memory
        if memory is None and not kmachine.machine_exists(cfg.machine):
            memory = DEFAULT_MEMORY
        log.info("booting machine %s", cfg.machine)
        self.session = Session.open(Options(cfg.machine, memory=memory, nodes=cfg.nodes or 1,
                                            format=cfg.format, atime=self._atime()),
                                    fault=self.fault)
        booted_by = self.session.booted_by_kexec
        self._mount(on_init=lambda: self._mounted_after_kexec(booted_by, started_wall))

    def _atime(self) -> AtimePolicy:
        # Linux never moves atime on a read-only mount.
        options = self.config.options
        return AtimePolicy(AtimeMode.NOATIME) if options.read_only else options.atime

    def _mounted_after_kexec(self, metadata, started_wall: int) -> None:
        """The new mount answers: if a kexec booted us, that ends its blackout."""
        if metadata is None:
            return
        session = self.session
        blackout = Blackout.measure(metadata, started_wall,
                                    session.kernel.boot_timings.get("total", 0),
                                    session.restore_ns, elapsed_ns(self._mount_started))
        self.last_blackout = blackout.as_dict()
        log.info("kexec blackout %.1f ms:\n%s", blackout.total_ms, blackout.table())

    def _settle_in_background(self) -> None:
        """Finish the boot's deferred initialisation, the free lists' (see
        kho_backend.page_alloc) then the memmap's (kho_backend.memmap), from a task of
        its own, a slice at a time between requests: the requests held through a
        blackout go first, the work is no part of any request's wait, and it pauses
        while a kexec or an unmount holds the daemon (`BACKGROUND_PAUSE`)."""
        assert self._nursery is not None
        self._nursery.start_soon(self._settle_memmap, self._session())

    async def _settle_memmap(self, session: Session) -> None:
        kernel = session.kernel
        t0, cpu_ns = time.perf_counter_ns(), 0
        # Only while this kernel serves: a handed-over kernel's memmap is the next
        # kernel's memory.
        while self.session is session and session.state is State.RUNNING:
            if self._exclusive.locked():
                await trio.sleep(BACKGROUND_PAUSE)
                continue
            try:
                step = time.perf_counter_ns()
                # Listing a chunk settles its memmap too: the lists first.
                done = kernel.buddy.list_some() and kernel.memmap.settle_some()
                cpu_ns += time.perf_counter_ns() - step
                if done:
                    log.info("free lists and memmap initialised: %.1f ms of work over %.1f ms",
                             cpu_ns / 1e6, elapsed_ns(t0) / 1e6)
                    return
            except Exception:   # only an optimisation: chunks are done when first needed
                log.exception("the deferred initialisation of the free lists or the memmap "
                              "failed; chunks are initialised when first needed")
                return
            await trio.sleep(0)

    async def _reap_in_background(self) -> None:
        """Free the unlinked files whose frees wait (`Filesystem.reap_pending`) every
        `REAP_INTERVAL`, between requests: they wait at most about that long."""
        while True:
            await trio.sleep(REAP_INTERVAL)
            session = self.session
            if session is None or session.state is not State.RUNNING or \
                    self._exclusive.locked():
                continue
            try:
                session.fs.reap_pending()
            except Exception:   # they stay on the orphan list, which the next mount frees
                log.exception("freeing unlinked files failed")

    def _mount(self, on_init: Callable[[], None] | None = None) -> None:
        """Mount the FUSE filesystem at the mount point, over the shield (which a
        previous kernel of this machine may have left there for us)."""
        assert self.session is not None
        self.gate = RequestGate()
        ops = Operations(self.session.fs, self.gate,
                         AdapterConfig(read_only=self.config.options.read_only))
        ops.on_init = on_init
        self.ops = ops
        self._mount_started = time.perf_counter_ns()
        options = self.config.options.fuse_options(self.config.machine, debug=self.config.debug)
        log.info("mounting at %s with %s", self.mountpoint, ",".join(sorted(options)))
        try:
            mounts.cover(self.mountpoint, self.config.machine)
            pyfuse3.init(ops, os.fspath(self.mountpoint), options)
        except (RuntimeError, OSError) as e:
            raise StartError(f"cannot mount at {self.mountpoint}: {e}.") from None
        self.mount_state = MountState.MOUNTED

    # --- serve ------------------------------------------------------------------

    async def _serve(self) -> None:
        server = control.ControlServer(control_path(self.config.machine), self.control_ops)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(server.serve)
            nursery.start_soon(self._watch_signals)
            self._settle_in_background()
            nursery.start_soon(self._reap_in_background)
            self.readiness.ok()
            log.info("serving %s at %s (pid %d)", self.config.machine, self.mountpoint, os.getpid())
            # Returns when the session ends: unmounted from outside, or pyfuse3.terminate()
            # after a handover.
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    def _defer_stop_signals(self) -> None:
        """Outside the trio loop a stop signal is only noted, and the loop, once it
        serves, stops on it (`_watch_signals`): Python's default SIGINT would raise in the
        middle of a boot's or a handover's writes to the arena, and SIGTERM's or SIGHUP's
        would end the process between a handover and the removal of the shield. A
        signal that comes again while the first is handled is re-raised by trio when its
        receiver closes, and lands here too: one stop is enough."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note_stop)
        # Those a previous kernel's exec held back (`_exec_if_handed_over`) come now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _pass_stop_on(self) -> None:
        """Before an exec: a stop signal that another thread took (the block is this
        thread's) was noted here; sent again to this thread, where it stays pending
        across the exec, the next image gets it."""
        if self._stop_noted is not None:
            signal.pthread_kill(threading.get_ident(), self._stop_noted)

    def _note_stop(self, signum: int, frame: object) -> None:
        self._stop_noted = signum     # a signal handler: nothing that takes a lock

    async def _watch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the daemon as ``guestfs umount`` does, but
        also while files are open (a lazy unmount; their processes then see errors),
        once a kexec or unmount under way has ended. If the handover cannot be written,
        the daemon says why and serves on."""
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            noted, self._stop_noted = self._stop_noted, None
            if noted is not None and await self._stop_on(noted, " (received while booting)"):
                return
            async for signum in signals:
                if await self._stop_on(signum):
                    return

    async def _stop_on(self, signum: int, when: str = "") -> bool:
        """Hand over and unmount on a stop signal; False if the daemon serves on."""
        name = signal.Signals(signum).name
        log.info("%s%s: handing over and unmounting", name, when)
        async with self._exclusive:
            session = self.session
            if session is None or session.state is not State.RUNNING:
                # A kexec or unmount that just ended did it, or a kexec whose next
                # kernel failed to boot here is exec'ing it instead.
                log.warning("%s: a kexec or unmount has ended this kernel; %s",
                            name, "stop the next one with 'guestfs umount'")
                return True
            try:
                await self._hand_over({"force": True}, for_exec=False)
            except control.ControlError as e:
                log.error("%s: %s", name, e)
                return False
        self._end_session()
        return True

    # --- control ops --------------------------------------------------------------

    def _session(self) -> Session:
        if self.session is None:
            raise control.ControlError("no kernel runs: a kexec is under way")
        return self.session

    async def _op_status(self, request: control.Message) -> control.Message:
        return self.status()

    async def _op_check(self, request: control.Message) -> control.Message:
        # The core's fsck of the live filesystem; between two requests it is consistent.
        return {"problems": self._session().fs.check()}

    async def _op_extents(self, request: control.Message) -> control.Message:
        """The physical extents of a file, by its path inside the mount (filefrag)."""
        fs = self._session().fs
        inode = fs.get(1)
        try:
            for part in Path(str(request.get("path", ""))).parts:
                inode = fs.lookup(inode.ino, os.fsencode(part))
        except FsError as e:
            raise control.ControlError(f"{request.get('path')}: {os.strerror(e.errno)}") from None
        extents = fs.extents(inode.ino) if inode.is_reg else []
        return {"ino": inode.ino, "size": inode.size,
                "extents": [list(e) for e in extents]}

    def _claim(self) -> None:
        """Refuse a state-changing request while another one is under way."""
        if self._exclusive.locked() or self._session().state is not State.RUNNING:
            raise control.ControlError("another kexec or unmount of this machine is under way")

    async def _op_umount(self, request: control.Message) -> control.Message:
        """Hand over into the arena, then unmount (refused while files are open, as
        umount(8)); any failure leaves the filesystem serving as before."""
        self._claim()
        async with self._exclusive:
            await self._hand_over(request, for_exec=False)
        self._end_session()
        return {"pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        """What ``guestfs status`` shows of a running daemon."""
        session = self._session()
        kernel, fs = session.kernel, session.fs
        st = fs.statfs(reap=False)      # the files that wait to be freed count, and show
        npages = kernel.arena.npages
        return {
            "machine": self.config.machine,
            "pid": os.getpid(),
            "mountpoint": os.fspath(self.mountpoint),
            "options": self.config.options.text(),
            "generation": fs.sb.generation,
            "uuid": fs.sb.uuid,
            "arena": {
                "path": os.fspath(kernel.arena.path),
                "size": kernel.arena.size,
                "nodes": kernel.arena.nodes,
                "pages": npages,
                "used_pages": npages - kernel.buddy.free_pages(movable=True),
                "free_pages": kernel.buddy.free_pages(),
            },
            "inodes": {"used": st.f_files - st.f_ffree, "free": st.f_ffree,
                       "waiting_to_be_freed": fs.waiting_frees},
            "uptime_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 3),
            "boot_timings_ns": dict(kernel.boot_timings),
            "restore_ns": session.restore_ns,
            "last_blackout": self.last_blackout,
        }

    # --- stop ---------------------------------------------------------------------

    def _end_session(self) -> None:
        """After a handover: requests still waiting would change what was handed over,
        so they get EIO; and the FUSE session ends, even if a process still holds the
        lazily unmounted mount (it would keep the connection alive)."""
        self.gate.shut()
        pyfuse3.terminate()

    def _unmount(self) -> None:
        if self.mount_state is not MountState.UNMOUNTED:
            # Lazy unmount if still mounted (e.g. the loop ended on an error); a no-op
            # when the kernel already ended the session. After our own unmount the path
            # may hold another mount by now: then only the session is closed.
            pyfuse3.close(unmount=self.mount_state is MountState.MOUNTED)
            self.mount_state = MountState.UNMOUNTED

    def _close_session(self) -> bool:
        """Hand the filesystem over into the arena unless a handover stands (an
        unmount's, or a kexec's whose exec failed after poisoning), close the kernel and
        remove the shield; False, with the kernel still running, when the handover
        could not be written.

        Without a session (a boot that failed or a handover that was refused) nothing
        is written, so the arena stays as it was for `guestfs kho dump`.
        """
        session = self.session
        if session is None:
            self._remove_shield()     # a next kernel that failed to boot
            return True
        if session.state is State.RUNNING:
            try:
                session.hand_over({}, for_exec=False)
                log.info("handed the filesystem over into the arena")
            except KexecError as e:
                log.error("could not hand the filesystem over: %s", e)
                return False
        self._shut_down()
        return True

    def _abandon_session(self) -> None:
        """Stop without a handover: the last resort when none could be written."""
        log.error("the files stay in the arena, but no handover describes them: the next "
                  "mount of machine %s will refuse until --format", self.config.machine)
        self._shut_down()

    def _shut_down(self) -> None:
        """Close the kernel, and remove the shield: no next kernel will mount here."""
        self._session().close()
        self.session = None
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
        cmdline = str(request.get("cmdline", ""))
        try:
            if not Cmdline.parse(cmdline).kho:
                # That kernel could never hand over: its unmount would lose every file.
                raise control.ControlError("refusing a next kernel with kho=off: it could "
                                           "not hand the filesystem over again")
            self._session().load(self._next_image(), cmdline)
        except (KexecError, MachineError) as e:
            raise control.ControlError(str(e)) from None
        return {"loaded": True, "cmdline": cmdline}

    async def _op_kexec_unload(self, request: control.Message) -> control.Message:
        self._claim()
        session = self._session()
        if session.kernel.kexec.loaded is None:
            raise control.ControlError("no next kernel is staged ('guestfs kexec --load-only' "
                                       "stages one): there is nothing to abort")
        session.unload()
        return {"loaded": False}

    def _next_image(self) -> list[str]:
        # The same daemon, mounting the same machine at the same place with the same
        # options; never --format, and the arena already exists.
        return dataclasses.replace(self.config, format=False, memory=None, nodes=None).argv()

    async def _op_kexec(self, request: control.Message) -> control.Message:
        """Quiesce and hand over; then boot the next kernel in this process, keeping the
        mount (`_kexec_in_process`), or unmount and let `run` poison and exec it.

        Any failure up to and including the handover (and the unmount of an exec)
        aborts: the filesystem serves as before and the reply names the phase. An exec
        is refused while other processes use the mount (checked again once requests are
        held), unless ``force``; a kexec that keeps the mount is not.
        """
        self._claim()
        session = self._session()
        async with self._exclusive:
            if session.kernel.kexec.loaded is None or "cmdline" in request:
                self._load(request)
            poison = bool(request.get("poison")) or session.kernel.cmdline.kho_poison
            if not request.get("exec") and self._runs_this_code(session.kernel.kexec.loaded):
                del session     # the old kernel must be unreachable once it leaves
                reply = await self._kexec_in_process(poison)
            else:
                if not request.get("exec"):
                    log.info("kexec: the next image is not the code this process runs (its "
                             "files changed on disk): it is exec'd, and the mount dropped")
                warnings = await self._hand_over(request, for_exec=True)
                self.exec_next = True
                self.poison = poison
                reply = {"pid": os.getpid(), "in_process": False, "warnings": warnings}
        if self.exec_next:
            self._end_session()
        return reply

    def _runs_this_code(self, image: LoadedImage | None) -> bool:
        """Whether the staged image is this daemon's own, and would run the code this
        process has loaded (same interpreter, module files unchanged on disk)."""
        return (image is not None and list(image.argv) == self._next_image()
                and self.image.unchanged())

    # --- kexec in this process, the mount kept ------------------------------------------

    async def _kexec_in_process(self, poison: bool) -> control.Message:
        """Hand over with the FUSE connection's own state, then end this kernel and boot
        the next one in this process: the mount, the connection and every open file
        stay, and requests wait at the gate until the new kernel serves them.

        Returns the reply once the new kernel serves. If its boot fails after the
        handover, the daemon falls back to the exec of the next image (the mount is
        dropped, lazily, for it; `exec_next` is set) and the reply's warning says why.
        """
        try:
            st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        except OSError as e:
            reason = MOVED if e.errno == errno.ENOENT else e.strerror
            raise control.ControlError(f"kexec of {self.mountpoint} aborted: cannot stat its "
                                       f"root ({reason}). The filesystem serves as "
                                       "before.") from None
        owner = ConnectionId(os.getpid(), st.st_dev)
        kho = self._session().kernel.kho
        participant = ConnectionHandover(lambda: self._connection_state(owner))
        kho.register(participant)
        try:
            warnings = await self._hand_over({"force": True}, for_exec=True, keep_mount=True)
        finally:
            if self.session is not None and self.session.state is State.RUNNING:
                kho.unregister(participant)     # aborted: the kernel serves on
        # From here no checkpoint until the gate thaws: nothing changes the connection's
        # state between the snapshot at finalize and its adoption by the next kernel.
        image = self._session().kernel.kexec.loaded
        del kho         # the old kernel must be unreachable once it leaves (see _switch)
        try:
            self._switch(owner, poison)
        except Exception as e:
            await self._fall_back_to_exec(e, image)
            warnings.append(f"the next kernel could not boot in the daemon's process ({e}); "
                            "the next image was exec'd instead, and the mount dropped for it")
            return {"pid": os.getpid(), "in_process": False, "warnings": warnings}
        self._settle_in_background()
        return {"pid": os.getpid(), "in_process": True, "warnings": warnings}

    def _connection_state(self, owner: ConnectionId) -> ConnectionState:
        assert self.ops is not None
        handles, next_fh, cached = self.ops.open_handles()
        return connection.capture(owner, self._session().fs.kernel_refs(), handles,
                                  next_fh, cached)

    def _switch(self, owner: ConnectionId, poison: bool) -> None:
        """End this kernel and boot the next in this process; the gate opens once the
        new filesystem is in the adapter. Raises if the new kernel cannot boot (the
        handover then stands in the arena, whole)."""
        old = self._session()
        fail_boot = old.take_fault(Fault.BOOT)     # a test's, once
        if poison:
            old.poison()
        old.leave()           # stamps the exec time; the lock goes, the mapping stays
        self.session = None
        # The old kernel's objects sit in reference cycles (KHO and its participants and
        # pools, the store's hooks) and hold views of the arena mapping: free them now, or
        # each kexec would leave them behind until some later collection.
        # Part of the switch (phase exec): a few ms with a full inode cache.
        del old
        gc.collect()
        started_wall = time.time_ns()
        new = Session.open(Options(self.config.machine, atime=self._atime(), connection=owner),
                           fault=Fault.BOOT if fail_boot else None)
        # From here nothing can fail: the new kernel serves.
        self.session = new
        t0 = time.perf_counter_ns()
        assert self.ops is not None and new.kept is not None
        kept = new.kept
        self.ops.adopt(new.fs, kept.handle_rows(), kept.next_fh, kept.cached)
        self.started_ns = time.monotonic_ns()
        self._mount_started = t0
        self.gate.thaw()
        try:
            self._mounted_after_kexec(new.booted_by_kexec, started_wall)
        except Exception:       # only the figures: the kexec is done
            log.exception("could not measure the blackout")

    async def _fall_back_to_exec(self, error: Exception, image: LoadedImage | None) -> None:
        """The in-process boot failed after the handover was written: exec the next image
        instead, as a kexec without the mount kept (requests held get EIO, later ones
        ENOTCONN). If even that fails, the daemon stops with the handover in the arena."""
        log.error("kexec: the next kernel could not boot in this process (%s); the handover "
                  "stands in the arena, so the next image is exec'd instead, and the mount is "
                  "dropped for it", error, exc_info=not isinstance(error, (KexecError,
                                                                          MachineError)))
        # Either the old kernel is still there, handed over (poison or leave failed: `run`
        # execs through it), or no kernel is (the boot failed: `run` execs `image`).
        self._fallback_image = image
        self.exec_next = True
        self.poison = False
        try:
            await trio.to_thread.run_sync(mounts.umount2, self.mountpoint, mounts.MNT_DETACH)
        except OSError as e:
            log.error("cannot unmount %s for the exec: %s", self.mountpoint, e.strerror)
        self.mount_state = MountState.DETACHED
        self._unmounted_at = time.perf_counter_ns()

    async def _refuse_if_busy(self, what: str) -> None:
        # In a worker thread: reading another process's maps can wait on its mmap lock,
        # which one of its threads faulting on this mount may hold.
        busy = await trio.to_thread.run_sync(quiesce.holders, self.mountpoint, os.getpid())
        if busy:
            hint = "use --force (those processes then see errors)" if what == "kexec" else \
                "close those files first"
            if what == "kexec" and not self.image.unchanged():
                hint = ("the code on disk changed since the daemon started, so the next "
                        f"image is exec'd and the mount dropped; {hint}")
            raise control.ControlError(
                f"{self.mountpoint} is busy: in use by pid {quiesce.describe_holders(busy)}; "
                f"{hint}.")

    async def _hand_over(self, request: control.Message, *, for_exec: bool,
                         keep_mount: bool = False) -> list[str]:
        """Quiesce, write the handover (for the next kernel, or for a later mount) and
        unmount (lazily for an exec or with ``force``; not at all with `keep_mount`,
        where the next kernel boots in this process and requests stay held at the gate).
        Any failure undoes it all: the filesystem serves as before, and ControlError
        names the mount, the phase and the cause. Returns warnings worth passing on (a
        failed write-back)."""
        session = self._session()
        what = "kexec" if for_exec else "unmount"
        force = bool(request.get("force"))
        if not force:
            await self._refuse_if_busy(what)
        phases: dict[str, int] = {}
        try:
            warnings = await self._quiesce_and_prepare(phases, force, for_exec, what)
            if not keep_mount:
                await self._unmount_handed_over(lazy=for_exec or force)
        except Exception as e:
            if not isinstance(e, (KexecError, control.ControlError)):
                log.exception("%s failed", what)
            phase = getattr(e, "phase", None) or (
                Fault.UNMOUNT.value if session.state is State.HANDED_OVER else "quiesce")
            # A KexecError names the phase itself; the message names it once.
            cause = e.__cause__ if isinstance(e, KexecError) and e.__cause__ else e
            reason = str(cause).rstrip(".")
            if session.state is not State.RUNNING:
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
        if for_exec and not keep_mount:
            self._record_unmount_phase()
        return warnings

    async def _quiesce_and_prepare(self, phases: dict[str, int], force: bool, for_exec: bool,
                                   what: str) -> list[str]:
        session = self._session()
        session.fs.reap_pending()      # before the freeze: no part of the blackout
        t0 = time.perf_counter_ns()
        root_fd = await trio.to_thread.run_sync(_open_root, self.mountpoint)
        try:
            with trio.fail_after(QUIESCE_TIMEOUT):
                warnings = await quiesce.quiesce(self.gate, root_fd, self.mountpoint)
        except trio.TooSlowError:
            raise KexecError(f"requests did not drain within {QUIESCE_TIMEOUT:.0f} s",
                             "quiesce") from None
        finally:
            if root_fd is not None:
                os.close(root_fd)      # not awaited: this must happen even when cancelled
        for warning in warnings:
            log.warning("%s: %s", what, warning)
        if session.take_fault(Fault.QUIESCE):
            raise KexecError("injected failure in quiesce", "quiesce")
        if not force:
            await self._refuse_if_busy(what)    # someone may have opened a file meanwhile
        phases["quiesce"] = elapsed_ns(t0)
        session.hand_over(phases, for_exec=for_exec)
        return warnings

    async def _unmount_handed_over(self, *, lazy: bool) -> None:
        """Unmount after the handover was written; on failure take the handover back."""
        session = self._session()
        t0 = time.perf_counter_ns()
        try:
            if session.take_fault(Fault.UNMOUNT):
                raise OSError(errno.EIO, "injected failure in unmount")
            await trio.to_thread.run_sync(mounts.umount2, self.mountpoint,
                                          mounts.MNT_DETACH if lazy else 0)
        except BaseException as e:
            try:
                session.abort()
            except Exception:
                log.exception("the handover could not be taken back")
            if isinstance(e, OSError):
                reason = {errno.EBUSY: "files are open there or it is some process's "
                          "working directory", errno.ENOENT: MOVED}.get(e.errno, e.strerror)
                # From None: the message names the cause (its OSError would show instead).
                raise KexecError(f"cannot unmount {self.mountpoint}: {reason}.",
                                 "unmount") from None
            raise
        self.mount_state = MountState.DETACHED
        self._unmounted_at = time.perf_counter_ns()
        self._unmount_ns = self._unmounted_at - t0

    def _record_unmount_phase(self) -> None:
        # From here the kexec is committed: a failure to record a timing is only logged.
        try:
            self._session().record_phase("unmount", self._unmount_ns)
        except MachineError:
            log.exception("could not record the unmount phase")

    def _exec_if_handed_over(self) -> bool:
        """Poison (if asked) and exec the next kernel when a kexec handed over; True if
        the exec failed (it logs why, and the filesystem stays handed over in the arena
        or is handed over as by an unmount)."""
        if not self.exec_next:
            return False
        self.exec_next = False
        session = self.session
        # A stop signal during the next image's start-up stays pending, blocked across
        # the exec, until its daemon notes it (`_defer_stop_signals`): its half-started
        # interpreter would end on it, leaving the shield and no daemon.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if session is None:         # an in-process boot failed: its image is left
                assert self._fallback_image is not None
                log.info("kexec: exec %s", " ".join(self._fallback_image.argv))
                self._pass_stop_on()
                exec_image(self._fallback_image)
            # Leaving the FUSE loop and closing the session, between unmount and poison.
            session.record_phase("teardown", elapsed_ns(self._unmounted_at))
            if self.poison:
                session.poison()
            log.info("kexec: exec %s", " ".join(session.kernel.kexec.loaded.argv))
            self._pass_stop_on()
            session.exec()
        except Exception as e:
            log.exception("kexec failed at exec: %s; the filesystem stays in the arena for "
                          "the next 'guestfs mount'", e)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return True


@dataclasses.dataclass(frozen=True)
class ImageStamp:
    """The code a process runs: the interpreter and every module file of the project it
    has loaded, with their sizes and modification times."""

    files: tuple[tuple[str, int, int], ...]

    @classmethod
    def take(cls, paths: tuple[str, ...] | None = None) -> ImageStamp:
        """Stamp `paths`, by default the interpreter and the loaded project modules."""
        if paths is None:
            paths = (sys.executable, *sorted(
                m.__file__ for name, m in list(sys.modules.items())
                if name.partition(".")[0] in ("guestfs", "kho_backend")
                and getattr(m, "__file__", None)))
        files = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                files.append((path, -1, -1))
            else:
                files.append((path, st.st_size, st.st_mtime_ns))
        return cls(tuple(files))

    def unchanged(self) -> bool:
        """Whether every file still has the size and time it had."""
        return ImageStamp.take(tuple(f[0] for f in self.files)) == self


def exec_image(image: LoadedImage) -> None:
    """Replace this process with `image` (flushing the logs first); raises OSError only."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(image.path, image.argv)


def run_foreground(config: DaemonConfig, ready_fd: int | None = None) -> int:
    """Run the daemon in this process; returns the exit code."""
    # A fatal signal (SIGBUS: a page of the sparse arena that its full filesystem cannot
    # back) must leave a line in the log, or the daemon vanishes without a word.
    faulthandler.enable()
    return Daemon(config, Readiness(ready_fd)).run()


def _open_root(mountpoint: Path) -> int | None:
    """The mount's root directory, to syncfs through; None if it cannot be opened (its
    metadata is corrupt: EIO), which must not keep the filesystem from handing over."""
    try:
        return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        log.warning("cannot open %s to write back mapped pages: %s", mountpoint, e.strerror)
        return None
