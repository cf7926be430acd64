"""The ``guestfs`` command line.

Exit codes: 0 success, 1 failure (the reason on stderr as ``guestfs: <message>``),
2 usage error. Each subcommand is one ``@subcommand`` function that adds its parser
and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from guestfs import control, daemon, handover, mounts
from guestfs.kexec import Blackout
from kho_backend import inspect
from kho_backend.arena import Arena
from kho_backend.header import MachineHeader
from kho_backend.kho_in import IncomingHandover
from kho_backend import machine as kmachine
from kho_backend.errors import MachineError
from kho_backend.units import PAGE_SIZE, format_size, parse_size

DAEMON_EXIT_TIMEOUT = 120.0  # seconds `umount` waits for the daemon once unmounted
STATUS_TIMEOUT = 10.0


class CliError(Exception):
    """A failure to report as ``guestfs: <message>`` with exit code 1."""


class CarriesOn(Exception):
    """Ctrl-C after the work was handed to a daemon: it goes on, and this says how to
    follow it (exit code 130)."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in the ``guestfs: <message>`` form (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"guestfs: {message}\n")


def say(message: str) -> None:
    """Progress and diagnostics go to stderr, so stdout stays parseable."""
    print(f"guestfs: {message}", file=sys.stderr, flush=True)


# --- argument types ------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _machine_name(text: str) -> str:
    try:
        kmachine.validate_name(text)
    except MachineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _mount_options(text: str) -> daemon.MountOptions:
    try:
        return daemon.MountOptions.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _machine_option(p: argparse.ArgumentParser) -> None:
    """``--machine NAME``, for the commands that name a machine (default "default")."""
    p.add_argument("--machine", default="default", type=_machine_name,
                   help="machine name (default: %(default)s)")


# --- subcommand registry -----------------------------------------------------------------

Subparsers = Any  # argparse's private _SubParsersAction
_SUBCOMMANDS: list[Callable[[Subparsers], None]] = []


def subcommand(add: Callable[[Subparsers], None]) -> Callable[[Subparsers], None]:
    """Register a function that adds one subcommand's parser (with ``func`` set)."""
    _SUBCOMMANDS.append(add)
    return add


def build_parser() -> Parser:
    """The whole command line."""
    parser = Parser(prog="guestfs", description=(
        "A persistent in-memory FUSE filesystem whose pages live in an emulated "
        "machine's memory and survive a simulated kexec."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guestfs`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, MachineError, daemon.StartError, control.ControlError) as e:
        say(str(e))
        return 1
    except BrokenPipeError:
        # The reader went away (``guestfs kho dump | head``): stop quietly, as a
        # process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # e.g. an output file that cannot be written
        say(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return 1
    except CarriesOn as e:
        say(f"interrupted; {e}")
        return 130
    except KeyboardInterrupt:
        say("interrupted; nothing was changed")
        return 130


# --- mount -------------------------------------------------------------------------------


@subcommand
def _add_mount(sub: Subparsers) -> None:
    p = sub.add_parser("mount", help="boot a kernel on a machine and mount its filesystem",
                       description="Boot a kernel on the machine (creating its arena on first "
                       "use) and mount its filesystem. Returns once the mount is live; the "
                       "daemon runs in the background unless -f.")
    _machine_option(p)
    p.add_argument("--memory", type=_size, metavar="SIZE",
                   help=f"arena size when the machine is created, e.g. 256M, 4G "
                        f"(default {format_size(daemon.DEFAULT_MEMORY)})")
    p.add_argument("--nodes", type=_positive, metavar="N",
                   help="NUMA nodes when the machine is created (default 1)")
    p.add_argument("-o", dest="options", type=_mount_options, default=daemon.MountOptions(),
                   metavar="OPTIONS", help="comma-separated mount options: allow_other, ro, "
                   "rw, nosuid, nodev, noexec, noatime, ... (default_permissions is always on)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="run the daemon in this process, logging to stderr")
    p.add_argument("-d", "--debug", action="store_true",
                   help="debug logging, including FUSE requests (implies -f)")
    p.add_argument("--format", action="store_true",
                   help="format a fresh filesystem even over an arena whose last kernel crashed")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by start_background
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_mount)


def run_mount(args: argparse.Namespace) -> int:
    """``guestfs mount``."""
    config = daemon.DaemonConfig(machine=args.machine, mountpoint=args.mountpoint,
                                 memory=args.memory, nodes=args.nodes, options=args.options,
                                 format=args.format, debug=args.debug)
    if args.foreground or args.debug:
        _log_to_stderr(args.debug)
        if args.ready_fd is None:
            daemon.check_machine_files(config)
        return daemon.run_foreground(config, args.ready_fd)
    _warn_above_ram(config)
    try:
        daemon.start_background(config, progress=say)
    except daemon.StillStarting as e:
        raise CarriesOn(f"the daemon (pid {e.pid}) goes on mounting {args.mountpoint}; "
                        f"'guestfs status --machine {args.machine}' shows when it is "
                        f"live, 'guestfs umount {args.mountpoint}' stops it") from None
    return 0


def _warn_above_ram(config: daemon.DaemonConfig) -> None:
    """An arena larger than RAM works (it is a sparse file) until it is filled."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if config.memory and config.memory > ram and not kmachine.machine_exists(config.machine):
        say(f"warning: {format_size(config.memory)} of memory is more than this machine's "
            f"{format_size(ram)} of RAM; filling it will fail")


def _log_to_stderr(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")


# --- umount ------------------------------------------------------------------------------


@subcommand
def _add_umount(sub: Subparsers) -> None:
    p = sub.add_parser("umount", help="unmount cleanly and wait for the daemon to end",
                       description="Unmount a guestfs mount (refused while files are open "
                       "there) and wait until its daemon has ended.")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_umount)


def run_umount(args: argparse.Namespace) -> int:
    """``guestfs umount``."""
    entry = mounts.mount_at(args.mountpoint)
    if entry is not None and entry.shield_of is not None:
        # A shield whose daemon ended before its next kernel could mount over it.
        mounts.uncover(args.mountpoint, entry.shield_of)
        say(f"removed the shield of machine {entry.shield_of} left at {args.mountpoint}")
        return 0
    machine = _machine_at(args.mountpoint)
    sock = daemon.control_path(machine)
    try:
        pid = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)["pid"]
    except control.NoDaemon:
        return _umount_orphan(args.mountpoint, machine)
    # Opened before asking, so the wait cannot pick up another process that reuses the PID.
    pidfd = os.pidfd_open(pid)
    try:
        try:
            control.request(sock, {"op": "umount"}, timeout=None)
        except control.ControlError:
            if _still_mounted(args.mountpoint, machine):
                raise
            # Unmounted, and the daemon left before it could answer: that is fine.
        _wait_exit(pidfd, pid)
    except KeyboardInterrupt:
        raise CarriesOn(f"the unmount of {args.mountpoint} carries on in daemon pid {pid}; "
                        f"'guestfs status --machine {machine}' shows when it is done") from None
    finally:
        os.close(pidfd)
    return 0


def _umount_orphan(mountpoint: Path, machine: str) -> int:
    """Unmount a guestfs mount whose daemon is gone (it answers ENOTCONN), and the
    shield under it."""
    say(f"no daemon answers for machine {machine}; unmounting the dead mount {mountpoint}")
    try:
        mounts.umount2(mountpoint)
        mounts.uncover(mountpoint, machine)
    except OSError as e:
        raise CliError(f"cannot unmount {mountpoint}: {e.strerror}") from None
    return 0


def _wait_exit(pidfd: int, pid: int) -> None:
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    told = False
    while not select.select([pidfd], [], [], 1.0)[0]:
        if time.monotonic() > deadline:
            raise CliError(f"unmounted, but daemon {pid} has not ended after "
                           f"{DAEMON_EXIT_TIMEOUT:.0f} s")
        if not told:
            say(f"waiting for daemon {pid} to end…")
            told = True


def _still_mounted(mountpoint: Path, machine: str) -> bool:
    entry = mounts.mount_at(mountpoint)
    return entry is not None and entry.machine == machine


def _machine_at(mountpoint: Path) -> str:
    entry = mounts.mount_at(mountpoint)
    if entry is None or entry.machine is None:
        raise CliError(f"{mountpoint} is not a guestfs mount")
    return entry.machine


# --- status ------------------------------------------------------------------------------


@subcommand
def _add_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="show a machine's state",
                       description="Show machine, daemon, generation, arena use and inodes "
                       "of a mount, or of a machine (from its header when no daemon runs).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT")
    which.add_argument("--machine", type=_machine_name,
                       help="a machine, mounted or not (its header when no daemon runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    """``guestfs status``."""
    machine = args.machine or _machine_at(args.mountpoint)
    try:
        status = control.request(daemon.control_path(machine), {"op": "status"},
                                 timeout=STATUS_TIMEOUT)
        status.pop("ok")
    except control.ControlError:
        if args.mountpoint is not None:
            raise CliError(f"{args.mountpoint} is a guestfs mount of machine {machine}, "
                           f"but its daemon does not answer") from None
        status = _offline_status(machine)
    print(json.dumps(status, indent=2) if args.json else _format_status(status))
    return 0


def _info_dict(info: kmachine.MachineInfo) -> dict[str, Any]:
    return {"path": os.fspath(info.path), "size": info.size, "nodes": info.nodes,
            "state": info.state.name if info.state is not None else None,
            "pid": info.pid, "in_use": info.alive, "boot_count": info.boot_count,
            "error": info.error}


def _machine_info(name: str) -> dict[str, Any]:
    """What the machine's header says, without taking its lock."""
    for info in kmachine.list_machines():
        if info.name == name:
            return _info_dict(info)
    raise CliError(f"there is no machine named {name!r} in {kmachine.machine_dir()}")


def _offline_status(machine: str) -> dict[str, Any]:
    return {"machine": machine, "pid": None, "mountpoint": None,
            "generation": _handed_over_generation(machine),
            "arena": _machine_info(machine), "inodes": None, "boot_timings_ns": None,
            "last_blackout": None}


def _handed_over_generation(machine: str) -> int | None:
    """The generation of the filesystem waiting in the arena's handover, if there is
    one that can be read (the next mount checks it fully)."""
    try:
        with Arena.open(kmachine.machine_path(machine)) as mem:
            params = MachineHeader.read(mem).boot_params
            if not params.valid:
                return None
            kho = IncomingHandover.parse(mem, params.fdt_phys, params.fdt_size)
            return handover.read_superblock(kho.retrieve_subtree(handover.SUBTREE)[1]).sb.generation
    except (MachineError, OSError):
        return None


def _pages(n: int) -> str:
    return f"{n} pages ({format_size(n * PAGE_SIZE)})"


def _format_status(s: dict[str, Any]) -> str:
    rows = [("machine", s["machine"])]
    if s["pid"] is None:
        rows.append(("daemon", "not running"))
    else:
        rows.append(("daemon", f"pid {s['pid']}, mounted at {s['mountpoint']} ({s['options']}), "
                               f"up {s['uptime_s']} s"))
    rows.append(("generation", "-" if s["generation"] is None else str(s["generation"])))
    arena = s["arena"]
    if s["pid"] is not None:
        rows.append(("arena", f"{arena['path']}, {format_size(arena['size'])}, "
                              f"{arena['nodes']} node(s)"))
        rows.append(("memory", f"{_pages(arena['used_pages'])} used, "
                               f"{_pages(arena['free_pages'])} free for files"))
        rows.append(("inodes", f"{s['inodes']['used']} used, {s['inodes']['free']} free"))
        timings = s["boot_timings_ns"]
        rows.append(("boot", ", ".join(f"{k} {v / 1e6:.1f} ms" for k, v in timings.items())
                     or "-"))
        rows.append(("last blackout", _format_blackout(s["last_blackout"])))
    else:
        rows.append(("arena", f"{arena['path']}, {format_size(arena['size'])}, "
                              f"{arena['nodes']} node(s)"))
        rows.append(("header", f"state {arena['state']}, boot count {arena['boot_count']}, "
                               f"last pid {arena['pid']}"))
        if arena["error"]:
            rows.append(("error", arena["error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _format_blackout(blackout: dict[str, Any] | None) -> str:
    if not blackout:
        return "none"
    phases = ", ".join(f"{k} {v:.1f}" for k, v in blackout["phases"].items())
    return f"{blackout['total_ms']:.1f} ms ({phases})"


# --- kexec -------------------------------------------------------------------------------

KEXEC_TIMEOUT = 300.0  # seconds to wait for the next kernel to mount (a huge restore)


@subcommand
def _add_kexec(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kexec", help="hand the mounted filesystem over to a new kernel (simulated kexec)",
        description="Quiesce the mount (flush the kernel's dirty pages, hold new requests, "
        "let in-flight ones finish), serialize the superblock and inodes into KHO, preserve "
        "every data page where it is, unmount, and exec the next kernel image in the "
        "daemon's own process (same PID). The next kernel boots from scratch memory, "
        "restores the filesystem without copying a data page and mounts it at the same "
        "place with the same options. Returns when the new mount serves and prints the "
        "blackout by phase. Any failure before the exec aborts: the filesystem serves as "
        "before. Refused while other processes use files on the mount, unless --force.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--load-only", action="store_true",
                      help="only stage the next kernel (like kexec -l); a later plain "
                      "'guestfs kexec' executes it")
    mode.add_argument("--abort", action="store_true",
                      help="unstage a kernel staged with --load-only")
    p.add_argument("--poison", action="store_true",
                   help="before the exec, overwrite every page that is neither preserved "
                   "nor scratch with 0xAA, so that reliance on unpreserved memory shows")
    p.add_argument("--force", action="store_true",
                   help="go on although processes use files on the mount (they then see "
                   "errors)")
    p.add_argument("--cmdline", metavar="ARGS",
                   help="the next kernel's command line: kho=on|off, kho_scratch=N%% or "
                   "LOW,GLOBAL,PERNODE, kho_poison")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # Test-only fault injection, honoured by a daemon started with GUESTFS_TEST_HOOKS=1.
    p.add_argument("--fail-phase", help=argparse.SUPPRESS)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_kexec)


def run_kexec(args: argparse.Namespace) -> int:
    """``guestfs kexec``."""
    sock = daemon.control_path(_machine_at(args.mountpoint))
    extra = {"cmdline": args.cmdline} if args.cmdline is not None else {}
    if args.load_only:
        control.request(sock, {"op": "kexec-load", **extra})
        say("next kernel loaded; 'guestfs kexec' executes it")
        return 0
    if args.abort:
        control.request(sock, {"op": "kexec-unload"})
        say("next kernel unloaded")
        return 0
    before = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)
    started = time.monotonic()
    say(f"kexec of machine {before['machine']} (generation {before['generation']})…")
    try:
        for warning in _request_kexec(sock, {"op": "kexec", "poison": args.poison,
                                             "force": args.force, "fail_phase": args.fail_phase,
                                             **extra}):
            say(f"warning: {warning}")
        after = _await_next_kernel(sock, before)
    except KeyboardInterrupt:
        raise CarriesOn(f"the kexec of {args.mountpoint} carries on in daemon pid "
                        f"{before['pid']}; 'guestfs status {args.mountpoint}' shows its "
                        "generation and last blackout once it is done") from None
    os.stat(args.mountpoint)          # the new mount answers
    after["client_ms"] = round((time.monotonic() - started) * 1e3, 3)
    if args.json:
        print(json.dumps({"generation": after["generation"], "pid": after["pid"],
                          "blackout_ms": after["last_blackout"]["total_ms"],
                          "phases": after["last_blackout"]["phases"],
                          "client_ms": after["client_ms"]}))
    else:
        print(_blackout_table(after))
    return 0


def _request_kexec(sock: Path, request: dict[str, Any]) -> list[str]:
    """Ask for the kexec; the warnings of its quiesce (none if no answer came)."""
    try:
        return list(control.request(sock, request, timeout=KEXEC_TIMEOUT).get("warnings", []))
    except control.DaemonRefused:
        raise
    except control.ControlError:
        # The daemon may exec before its answer is out: the next kernel's status tells.
        return []


def _await_next_kernel(sock: Path, before: dict[str, Any]) -> dict[str, Any]:
    """The next kernel's status once it serves the mount (same PID, next generation)."""
    deadline = time.monotonic() + KEXEC_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)
        except control.ControlError:
            status = None
        if status and status["generation"] > before["generation"] and status["last_blackout"]:
            if status["pid"] != before["pid"]:
                raise CliError(f"the next kernel runs as pid {status['pid']}, not "
                               f"{before['pid']}")
            return status
        if status is None and not _alive(before["pid"]):
            raise CliError(f"the daemon (pid {before['pid']}) ended during the kexec; see "
                           f"{daemon.log_path(before['machine'])}")
        time.sleep(0.005)
    raise CliError(f"the next kernel did not mount within {KEXEC_TIMEOUT:.0f} s; see "
                   f"{daemon.log_path(before['machine'])}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _blackout_table(status: dict[str, Any]) -> str:
    blackout = status["last_blackout"]
    return "\n".join([
        f"kexec done: machine {status['machine']}, pid {status['pid']}, generation "
        f"{status['generation']}",
        f"blackout {blackout['total_ms']:.1f} ms (as seen by this command: "
        f"{status['client_ms']:.1f} ms)",
        Blackout(blackout["phases"]).table()])


# --- filefrag ----------------------------------------------------------------------------


@subcommand
def _add_filefrag(sub: Subparsers) -> None:
    p = sub.add_parser("filefrag", help="show where a file's pages lie in the arena",
                       description="Like filefrag(8): the physical extents of files on a "
                       "guestfs mount, as runs of arena pages (PFNs) with their folio order. "
                       "A kexec keeps every one of them where it is.")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.set_defaults(func=run_filefrag)


def run_filefrag(args: argparse.Namespace) -> int:
    """``guestfs filefrag``."""
    for path in args.files:
        mountpoint, inside = _split_mount(path)
        reply = control.request(daemon.control_path(_machine_at(mountpoint)),
                                {"op": "extents", "path": os.fspath(inside)})
        if args.json:
            print(json.dumps({"file": os.fspath(path), "ino": reply["ino"],
                              "size": reply["size"], "extents": reply["extents"]}))
            continue
        print(f"{path}: inode {reply['ino']}, {reply['size']} bytes, "
              f"{len(reply['extents'])} extent(s)")
        for pgoff, pfn, npages, order in reply["extents"]:
            print(f"  pages {pgoff}..{pgoff + npages - 1} -> pfn {pfn}..{pfn + npages - 1}"
                  f" (order {order})")
    return 0


def _split_mount(path: Path) -> tuple[Path, Path]:
    """The guestfs mount holding `path` (not following its last component) and the
    path inside it."""
    full = Path(os.path.realpath(path.parent)) / path.name
    for top in (full, *full.parents):
        entry = mounts.mount_at(top)
        if entry is not None and entry.machine is not None:
            return top, full.relative_to(top)
    raise CliError(f"{path} is not on a guestfs mount")


# --- machine -----------------------------------------------------------------------------


@subcommand
def _add_machine(sub: Subparsers) -> None:
    p = sub.add_parser("machine", help="list or destroy machines",
                       description="Machines are arenas in the machine folder "
                       f"({kmachine.machine_dir()}); their files live there until destroyed.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    ls = verbs.add_parser("list", help="list the machines and where they are mounted",
                          description="List every machine with its size, state and mount.")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=run_machine_list)
    rm = verbs.add_parser("destroy", help="delete a machine and every file in it",
                          description="Delete a machine's arena, and with it every file "
                          "it holds. Refused while the machine is mounted or in use.")
    rm.add_argument("name", type=_machine_name, metavar="NAME")
    rm.set_defaults(func=run_machine_destroy)


def run_machine_list(args: argparse.Namespace) -> int:
    """``guestfs machine list``."""
    rows = []
    for info in kmachine.list_machines():
        entry = mounts.mount_of_machine(info.name)
        rows.append({"machine": info.name, **_info_dict(info),
                     "mountpoint": os.fspath(entry.mountpoint) if entry else None})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        say(f"no machines in {kmachine.machine_dir()}")
    else:
        print(f"{'MACHINE':<24} {'SIZE':>8} {'STATE':<12} {'PID':>8}  MOUNTPOINT")
        for r in rows:
            pid = r["pid"] if r["in_use"] else None     # not the pid of an ended kernel
            print(f"{r['machine']:<24} {format_size(r['size']):>8} {r['state'] or '?':<12} "
                  f"{pid or '-':>8}  {r['mountpoint'] or '-'}")
    return 0


def run_machine_destroy(args: argparse.Namespace) -> int:
    """``guestfs machine destroy``."""
    entry = mounts.mount_of_machine(args.name)
    if entry is not None:
        raise CliError(f"machine {args.name} is mounted at {entry.mountpoint}; "
                       f"run 'guestfs umount {entry.mountpoint}' first")
    leftovers = [p for p in (daemon.log_path(args.name), daemon.control_path(args.name))
                 if os.path.lexists(p)]
    if kmachine.machine_exists(args.name) or not leftovers:
        kmachine.destroy_machine(args.name)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    say(f"machine {args.name} destroyed")
    return 0


# --- kho ---------------------------------------------------------------------------------


@subcommand
def _add_kho(sub: Subparsers) -> None:
    p = sub.add_parser("kho", help="inspect a machine's KHO handover and memory",
                       description="Read-only views of a machine: they take no lock and "
                       "work on a running machine, a handed-over one, or one whose handover "
                       "a boot refused.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    dump = verbs.add_parser("dump", help="print the pending handover as device-tree source",
                            description="Print the pending KHO handover (root FDT and every "
                            "subtree) as device-tree source, and a summary of the preserved "
                            "memory per order and node.")
    _machine_option(dump)
    dump.set_defaults(func=run_kho_dump)
    memmap = verbs.add_parser("memmap", help="draw the arena's memory map as a PNG",
                              description="Draw the arena: free, used, preserved, scratch "
                              "and metadata pages, one band per NUMA node.")
    _machine_option(memmap)
    memmap.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.png",
                        help="the PNG file to write")
    memmap.set_defaults(func=run_kho_memmap)


def run_kho_dump(args: argparse.Namespace) -> int:
    """``guestfs kho dump``."""
    _machine_info(args.machine)
    print(inspect.dump(args.machine))
    return 0


def run_kho_memmap(args: argparse.Namespace) -> int:
    """``guestfs kho memmap``."""
    _machine_info(args.machine)
    picture = inspect.memmap_png(args.machine, args.output)
    say(f"wrote {args.output}")
    print(picture.legend())
    return 0


if __name__ == "__main__":
    sys.exit(main())
