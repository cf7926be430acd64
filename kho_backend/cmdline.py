"""The kernel command line.

Understood words (the rest are kept, in order, as the kernel keeps parameters it does not
know)::

    kho=on|off                  KHO at boot (default on); also y/n, 1/0, yes/no
    kho_scratch=N%              scratch = N percent of this boot's memblock use (default 200%)
    kho_scratch=LOW,GLOBAL,PERNODE  explicit scratch sizes, e.g. 16M,64M,32M
    kho_poison                  kexec overwrites every page neither preserved nor scratch

As in the kernel, a later occurrence of a parameter overrides an earlier one. ``str()``
gives a canonical command line: known parameters that differ from their defaults first,
then the unknown words; ``Cmdline.parse(str(c)) == c``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BootError
from .units import format_size, parse_size

DEFAULT_SCRATCH_PERCENT = 200

_TRUE = {"on", "y", "yes", "1", "true"}
_FALSE = {"off", "n", "no", "0", "false"}


@dataclass(frozen=True)
class ScratchPolicy:
    """How to size the scratch areas at first boot: a percentage or explicit sizes.

    ``percent`` is set for ``kho_scratch=N%``; otherwise ``lowmem``, ``global_`` and
    ``pernode`` are explicit sizes in bytes (0: no area of that kind).
    """

    percent: int | None = DEFAULT_SCRATCH_PERCENT
    lowmem: int = 0
    global_: int = 0
    pernode: int = 0

    @classmethod
    def parse(cls, value: str) -> ScratchPolicy:
        """Parse the value of ``kho_scratch=`` (``"150%"`` or ``"16M,64M,32M"``)."""
        if value.endswith("%"):
            digits = value[:-1]
            if not digits.isdigit() or int(digits) == 0:
                raise BootError(
                    f"kho_scratch={value} is not valid; a percentage must be a positive "
                    "whole number such as 200%."
                )
            return cls(percent=int(digits))
        parts = value.split(",")
        if len(parts) != 3:
            raise BootError(
                f"kho_scratch={value} is not valid; give a percentage (200%) or three "
                "sizes LOWMEM,GLOBAL,PERNODE (16M,64M,32M)."
            )
        try:
            low, glob, node = (parse_size(p) for p in parts)
        except ValueError as e:
            raise BootError(f"kho_scratch={value} is not valid: {e}") from e
        return cls(percent=None, lowmem=low, global_=glob, pernode=node)

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent}%"
        return ",".join(format_size(n, compact=True) for n in (self.lowmem, self.global_, self.pernode))


@dataclass(frozen=True)
class Cmdline:
    """A parsed kernel command line."""

    kho: bool = True
    kho_scratch: ScratchPolicy = field(default_factory=ScratchPolicy)
    kho_poison: bool = False
    extra: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Cmdline:
        """Parse a whitespace-separated command line; BootError for a malformed known word."""
        kho, scratch, poison = True, ScratchPolicy(), False
        extra: list[str] = []
        for word in text.split():
            key, eq, value = word.partition("=")
            if key == "kho" and eq:
                kho = _parse_bool(word, value)
            elif key == "kho_scratch" and eq:
                scratch = ScratchPolicy.parse(value)
            elif word == "kho_poison":
                poison = True
            else:
                extra.append(word)
        return cls(kho=kho, kho_scratch=scratch, kho_poison=poison, extra=tuple(extra))

    def __str__(self) -> str:
        words = []
        if not self.kho:
            words.append("kho=off")
        if self.kho_scratch != ScratchPolicy():
            words.append(f"kho_scratch={self.kho_scratch}")
        if self.kho_poison:
            words.append("kho_poison")
        return " ".join(words + list(self.extra))


def _parse_bool(word: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BootError(f"{word!r} is not valid on the command line; use on or off.")
