"""``guestfs kho dump|memmap``: read-only views of a machine's handover and memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from guestfs.cli.common import Parser, Subparsers, machine_info, machine_option, say


def add(sub: Subparsers) -> None:
    p = sub.add_parser("kho", help="inspect a machine's KHO handover and memory",
                       description="Read-only views of a machine: they take no lock and "
                       "work on a running machine, a handed-over one, or one whose handover "
                       "a boot refused.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    dump = verbs.add_parser("dump", help="print the pending handover as device-tree source",
                            description="Print the pending KHO handover (root FDT and every "
                            "subtree) as device-tree source, and a summary of the preserved "
                            "memory per order and node.")
    machine_option(dump)
    dump.set_defaults(func=run_kho_dump)
    memmap = verbs.add_parser("memmap", help="draw the arena's memory map as a PNG",
                              description="Draw the arena: free, used, preserved, scratch "
                              "and metadata pages, one band per NUMA node.")
    machine_option(memmap)
    memmap.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.png",
                        help="the PNG file to write")
    memmap.set_defaults(func=run_kho_memmap)


def run_kho_dump(args: argparse.Namespace) -> int:
    """``guestfs kho dump``."""
    machine_info(args.machine)
    from kho_backend import views      # heavy (numpy): only for this command

    print(views.dump(args.machine))
    return 0


def run_kho_memmap(args: argparse.Namespace) -> int:
    """``guestfs kho memmap``."""
    machine_info(args.machine)
    from kho_backend import views

    picture = views.memmap_png(args.machine, args.output)
    say(f"wrote {args.output}")
    print(picture.legend())
    return 0
