"""What every ``guestfs`` command shares: errors, messages, option types, look-ups."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from guestfs import mounts
from guestfs.config import MountOptions
from kho_backend import machine as kmachine
from kho_backend.cmdline import Cmdline
from kho_backend.errors import MachineError
from kho_backend.units import PAGE_SIZE, format_size, parse_size

STATUS_TIMEOUT = 10.0   # seconds a status request may take
DEAD_MOUNT_PROBE_TIMEOUT = 5.0  # seconds a dead mount's stat may take (it fails at once)

Subparsers = Any  # argparse's private _SubParsersAction


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
    """Progress and diagnostics go to stderr, so stdout stays parseable, in one style
    whoever wrote the message (the emulated kernel writes sentences): a lower-case
    start, no full stop at the end."""
    print(f"guestfs: {one_style(message)}", file=sys.stderr, flush=True)


def one_style(message: str) -> str:
    """``"The arena is full."`` -> ``"the arena is full"``; an acronym (``KHO``) or a
    path at the start stays as it is."""
    first = message.split(" ", 1)[0]
    if first[:1].isupper() and not (len(first) > 1 and first[1:2].isupper()):
        message = message[0].lower() + message[1:]
    if message.endswith(".") and not message.endswith(".."):
        message = message[:-1]
    return message


def unmount_dead(mountpoint: Path, machine: str) -> None:
    """Unmount a guestfs mount whose daemon is gone (it answers ENOTCONN), and the
    shield under it; refused if a daemon still serves it (its control socket is in
    another machine folder: unmounting it would put another filesystem in its place)."""
    entry = mounts.mount_at(mountpoint)
    if (entry is not None and entry.machine is not None
            and mounts.still_served(mountpoint, DEAD_MOUNT_PROBE_TIMEOUT)):
        raise CliError(f"machine {machine} at {mountpoint} is still served by a daemon "
                       f"whose control socket is not in {kmachine.machine_dir()}; run the "
                       "command with the GUESTFS_MACHINE_DIR it was mounted with")
    try:
        mounts.umount2(mountpoint)
        mounts.uncover(mountpoint, machine)
    except OSError as e:
        raise CliError(f"cannot unmount {mountpoint}: {e.strerror}") from None


# --- argument types ------------------------------------------------------------------


def memory_size(text: str) -> int:
    """An arena size such as ``256M`` or ``4G``: a whole number of pages."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(one_style(str(e))) from None
    if value % PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text} is not a whole number of {format_size(PAGE_SIZE)} pages")
    return value


def machine_name(text: str) -> str:
    """A valid machine name."""
    try:
        kmachine.validate_name(text)
    except MachineError as e:
        raise argparse.ArgumentTypeError(one_style(str(e))) from None
    return text


def mount_options(text: str) -> MountOptions:
    """A ``-o`` list."""
    try:
        return MountOptions.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kernel_cmdline(text: str) -> str:
    """A next kernel's command line made only of the words this kernel understands (a
    real kernel would pass unknown words on to init; here they can only be typos), and
    never kho=off (that kernel could not hand the files over again)."""
    try:
        cmdline = Cmdline.parse(text)
    except MachineError as e:
        raise argparse.ArgumentTypeError(one_style(str(e))) from None
    if not cmdline.kho:
        raise argparse.ArgumentTypeError("kho=off: that kernel could not hand the filesystem "
                                         "over again")
    extra = cmdline.extra
    if extra:
        raise argparse.ArgumentTypeError(
            f"unknown word{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}; "
            "the command line knows kho=on|off, kho_scratch=N% or "
            "kho_scratch=LOW,GLOBAL,PERNODE, and kho_poison")
    return text


def positive(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def machine_option(p: argparse.ArgumentParser) -> None:
    """``--machine NAME``, for the commands that name a machine (default "default")."""
    p.add_argument("--machine", default="default", type=machine_name,
                   help="machine name (default: %(default)s)")


# --- look-ups ----------------------------------------------------------------------------


def machine_at(mountpoint: Path) -> str:
    """The machine mounted at `mountpoint`; CliError if it is no guestfs mount."""
    entry = mounts.mount_at(mountpoint)
    if entry is None or entry.machine is None:
        raise CliError(f"{mountpoint} is not a guestfs mount")
    return entry.machine


def info_dict(info: kmachine.MachineInfo) -> dict[str, Any]:
    """A machine's header, as ``status`` and ``machine list`` print it in JSON."""
    return {"path": os.fspath(info.path), "size": info.size, "nodes": info.nodes,
            "state": info.state.name if info.state is not None else None,
            "pid": info.pid, "in_use": info.alive, "boot_count": info.boot_count,
            "error": info.error}


def machine_info(name: str) -> dict[str, Any]:
    """What the machine's header says, without taking its lock; CliError if there is
    no such machine."""
    for info in kmachine.list_machines():
        if info.name == name:
            return info_dict(info)
    raise CliError(no_machine(name))


def no_machine(name: str) -> str:
    """The one wording for a machine that does not exist."""
    return f"there is no machine named {name!r} in {kmachine.machine_dir()}"


def handed_over_generation(machine: str) -> int | None:
    """The generation of the filesystem waiting in the arena's handover, if there is
    one that can be read (the next mount checks it fully)."""
    # Only when no daemon answers: these load numpy, which the light commands never need.
    from guestfs import handover
    from kho_backend.arena import Arena
    from kho_backend.header import MachineHeader
    from kho_backend.kho_in import IncomingHandover

    try:
        with Arena.open(kmachine.machine_path(machine)) as mem:
            params = MachineHeader.read(mem).boot_params
            if not params.valid:
                return None
            kho = IncomingHandover.parse(mem, params.fdt_phys, params.fdt_size)
            return handover.waiting_generation(mem, kho)
    except (MachineError, OSError):
        return None
