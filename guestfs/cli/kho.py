"""``guestfs kho dump|memmap``: read-only views of a machine's handover and memory."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from guestfs import control
from guestfs.cli.common import (STATUS_TIMEOUT, CliError, Parser, Subparsers,
                                handed_over_generation, machine_info, machine_option, say)
from guestfs.config import control_path


def add(sub: Subparsers) -> None:
    p = sub.add_parser("kho", help="inspect a machine's KHO handover and memory",
                       description="Read-only views of a machine: they take no lock and "
                       "work on a running machine, a handed-over one, or one whose handover "
                       "a boot refused.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    dump = verbs.add_parser("dump", help="print the pending handover as device-tree source",
                            description="Print the pending KHO handover (root FDT and every "
                            "subtree) as device-tree source with every value decoded (KHO "
                            "stores integers little-endian; a generation of 4 shows as 4, "
                            "addresses in hex), and the preserved memory per order and node. "
                            "With --dtb, also write the flattened trees as they are, which "
                            "'dtc -I dtb -O dts FILE' reads (showing the integers "
                            "byte-swapped).")
    machine_option(dump)
    dump.add_argument("--dtb", type=Path, metavar="FILE",
                      help="write the root FDT to FILE and each subtree NAME beside it, "
                      "to FILE's name with .NAME before its suffix")
    dump.set_defaults(func=run_kho_dump)
    memmap = verbs.add_parser("memmap", help="draw the arena's memory map as a PNG",
                              description="Draw the arena as a PNG (needs matplotlib): a "
                              "title (machine, size, generation), the whole arena one band "
                              "per NUMA node, a close-up of the ranges that hold anything "
                              "but free pages, a legend (free, used, preserved, pool, "
                              "scratch, reserved and KHO pages) and scales in bytes; the "
                              "same figures as text on stdout.")
    machine_option(memmap)
    memmap.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.png",
                        help="the PNG file to write")
    memmap.set_defaults(func=run_kho_memmap)


def run_kho_dump(args: argparse.Namespace) -> int:
    """``guestfs kho dump``."""
    machine_info(args.machine)
    from kho_backend import views      # heavy (numpy): only for this command

    print(views.dump(args.machine))
    if args.dtb is not None:
        for name, blob in views.blobs(args.machine).items():
            path = args.dtb if not name else args.dtb.with_name(
                f"{args.dtb.stem}.{name}{args.dtb.suffix or '.dtb'}")
            path.write_bytes(blob)
            say(f"wrote {'the root FDT' if not name else f'subtree {name}'} to {path}")
    return 0


def run_kho_memmap(args: argparse.Namespace) -> int:
    """``guestfs kho memmap``."""
    machine_info(args.machine)
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("drawing the memory map needs matplotlib: "
                       "pip install 'guestfs[plot]' (set-up installs it)")
    from kho_backend import views

    picture = views.memmap_png(args.machine, args.output,
                               generation=_generation(args.machine))
    say(f"wrote {args.output}")
    print(picture.legend())
    return 0


def _generation(machine: str) -> int | None:
    """The filesystem's generation: its daemon's, or the one its handover waits at."""
    try:
        return control.request(control_path(machine), {"op": "status"},
                               timeout=STATUS_TIMEOUT)["generation"]
    except control.ControlError:
        pass
    return handed_over_generation(machine)
