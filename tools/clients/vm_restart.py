"""The VM restart of tools/vm-demo: a QEMU guest whose RAM lives on the mount goes on
across a guestfs kexec, paused only for the time it takes to save its device state,
flush, kexec and restore; or, live, QEMU keeps running through a kexec that keeps the
mount, and waits only for what it asks of the mount during the blackout.

In both modes the guest's pause is timed by its heartbeat (a ``beat N`` line every 4 ms
or so on the serial console, timed here as each line arrives): the pause is the largest
gap between two beats around the kexec, to within a beat's period.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clients import Failure, apt, initramfs
from clients.guestmount import ROOT, GuestMount, Kexec, guest_mount
from clients.procs import started
from clients.qemu import Qmp, SerialConsole, VmConfig
from clients.report import progress

PACKAGES = apt.PACKAGES["vm"]
TICK = r"^tick (\d+) boot (\S+) uptime ([\d.]+)$"
BEAT = r"^beat (\d+)$"
BEATS_AROUND = 25  # heartbeats to see before the pause starts and after it ends
BEAT_TIMEOUT = 30.0  # seconds for that many beats (a guest faulting its RAM back in)
BOOT_TIMEOUT = 120.0  # seconds to boot under TCG (about 5 s) plus filling the RAM
CHECK_TIMEOUT = 300.0  # seconds for the guest to checksum its data (TCG, lazy faults)
EXIT_TIMEOUT = 120.0  # seconds for QEMU to quit (its exit flushes the guest's RAM)
KEXEC_TIMEOUT = 300.0  # seconds for the next kernel to serve (as `guestfs kexec` waits)
MAX_TICK_GAP = 3.0  # seconds of guest uptime between the ticks around the pause


@dataclass(frozen=True)
class Settings:
    """The command line of tools/vm-demo."""

    ram_mb: int
    fill_mb: int
    poison: bool
    live: bool = False      # QEMU keeps running through the kexec
    via_cli: bool = False   # kexec with the `guestfs kexec` command, not on the socket


@dataclass(frozen=True)
class Tick:
    """One ``tick N boot ID uptime S`` line of the guest."""

    n: int
    boot: str
    uptime: float

    @classmethod
    def parse(cls, match: re.Match[str]) -> Tick:
        return cls(int(match.group(1)), match.group(2), float(match.group(3)))


@dataclass(frozen=True)
class Kexecer:
    """How the demo asks for the kexec: as a host orchestrator already running would,
    with one request on the daemon's control socket (what ``guestfs kexec`` sends, less
    the start of a command during the pause), or with the ``guestfs kexec`` command."""

    gm: GuestMount
    poison: bool
    via_cli: bool

    def __call__(self, generation: int) -> Kexec:
        """Kexec the mount whose kernel is at `generation`; returns once the next kernel
        serves it."""
        if self.via_cli:
            return self.gm.kexec(poison=self.poison)
        if str(ROOT) not in sys.path:       # the project's stdlib-only client modules
            sys.path.insert(0, str(ROOT))
        from guestfs import control
        from kho_backend.machine import machine_dir
        sock = control.socket_path(machine_dir(), self.gm.machine)
        t0 = time.perf_counter()
        control.request(sock, {"op": "kexec", "poison": self.poison}, timeout=KEXEC_TIMEOUT)
        deadline = time.monotonic() + KEXEC_TIMEOUT
        while time.monotonic() < deadline:
            try:
                status = control.request(sock, {"op": "status"})
            except control.ControlError:    # an exec'd next image not listening yet
                status = None
            if status and status["generation"] > generation and status["last_blackout"]:
                if status["pid"] != self.gm.pid:
                    raise Failure(f"kexec changed the daemon's PID from {self.gm.pid} to "
                                  f"{status['pid']}")
                blackout = status["last_blackout"]
                return Kexec(status["generation"], status["pid"], blackout["total_ms"],
                             blackout["phases"], ms_since(t0))
            time.sleep(0.002)
        raise Failure(f"the next kernel did not serve within {KEXEC_TIMEOUT:.0f} s")


@dataclass(frozen=True)
class Heartbeat:
    """The guest's heartbeat around the pause, as its lines arrived here."""

    beats: int              # beat lines seen
    pause_ms: float         # the largest gap between two of them across the pause
    period_ms: float        # their median gap: the resolution of `pause_ms`
    elsewhere_ms: float     # the largest gap not across it: the noise of this host
    consecutive: bool       # no beat number skipped (none lost on the console)

    @classmethod
    def measure(cls, console: SerialConsole, start: int, window: tuple[float, float]
                ) -> Heartbeat:
        """The beats from console line `start` on; the pause is the largest gap that
        overlaps `window` (time.monotonic from the start of the host's action to its end:
        ``stop`` to ``cont``, or the ``guestfs kexec`` command)."""
        beats = [(console.arrived[i], int(m.group(1))) for i in range(start, len(console.lines))
                 if (m := re.match(BEAT, console.lines[i]))]
        if len(beats) < 2:
            raise Failure(f"the guest printed {len(beats)} heartbeat lines")
        pairs = list(zip(beats, beats[1:]))
        across = [(b[0] - a[0]) * 1e3 for a, b in pairs
                  if b[0] >= window[0] and a[0] <= window[1]]
        others = [(b[0] - a[0]) * 1e3 for a, b in pairs
                  if not (b[0] >= window[0] and a[0] <= window[1])]
        if not across:
            raise Failure("no heartbeat gap spans the pause (the beats ended before it?)")
        numbers = [n for _, n in beats]
        return cls(len(beats), max(across),
                   statistics.median((b[0] - a[0]) * 1e3 for a, b in pairs),
                   max(others, default=0.0),
                   numbers == list(range(numbers[0], numbers[0] + len(numbers))))

    def problems(self) -> list[str]:
        return [] if self.consecutive else ["heartbeat lines lost on the console"]


def start_heartbeat(console: SerialConsole) -> int:
    """Start the guest's heartbeat and wait for a few beats; the console line index of
    the first."""
    seen = len(console.lines)
    console.send("beat")
    first, _ = console.expect(BEAT, BEAT_TIMEOUT, seen)
    await_beats(console, first)
    return first


def await_beats(console: SerialConsole, start: int) -> None:
    """Wait for `BEATS_AROUND` beats from console line `start` on."""
    index = start
    for _ in range(BEATS_AROUND):
        index, _ = console.expect(BEAT, BEAT_TIMEOUT, index)
        index += 1


@dataclass
class Pause:
    """The VM pause, from ``stop`` to ``cont``, by phase (milliseconds)."""

    save: float = 0.0  # stop, migrate the device state to the mount
    flush: float = 0.0  # QEMU's exit: its dirty RAM pages written through FUSE
    kexec: float = 0.0  # `guestfs kexec` as seen from here
    restore: float = 0.0  # the next QEMU (started ahead): migrate_incoming, cont

    @property
    def total(self) -> float:
        return self.save + self.flush + self.kexec + self.restore


@dataclass
class Outcome:
    """What the demo saw."""

    before: Tick  # the last tick before the pause
    after: Tick  # the first one after it
    checksum_before: str
    checksum_after: str
    state_bytes: int
    pause: Pause
    kexec: Kexec
    heartbeat: Heartbeat

    def problems(self) -> list[str]:
        """Everything that shows the guest did not simply go on."""
        found = self.heartbeat.problems()
        if self.after.n != self.before.n + 1:
            found.append(f"tick {self.after.n} follows tick {self.before.n}")
        if self.after.boot != self.before.boot:
            found.append(f"boot id changed: {self.before.boot} -> {self.after.boot}")
        if not 0 < self.after.uptime - self.before.uptime < MAX_TICK_GAP:
            found.append(f"uptime went from {self.before.uptime} to {self.after.uptime}")
        if self.checksum_after != self.checksum_before:
            found.append(f"RAM checksum changed: {self.checksum_before} -> "
                         f"{self.checksum_after}")
        return found


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def qemu(config: VmConfig, console: SerialConsole, qmp_path: Path, *, incoming: bool
         ) -> Iterator[tuple[subprocess.Popen[bytes], Qmp]]:
    """A QEMU process on `console`, with its QMP connection; ended with the block."""
    with started("qemu", config.argv(qmp_path, incoming=incoming), stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE) as child:
        reader = console.attach(child)
        qmp = Qmp(qmp_path, child)
        try:
            yield child.proc, qmp
        finally:
            qmp.close()
        child.proc.wait(EXIT_TIMEOUT)
        reader.join()


def restart(config: VmConfig, console: SerialConsole, work: Path, gm: GuestMount,
            kexecer: Kexecer) -> Outcome:
    """Boot the guest, let it fill and checksum its RAM and start its heartbeat; start
    the next QEMU ahead (``-incoming defer``, paused, on the same RAM file: as QEMU's own
    CPR does, its start-up is then no part of the pause); stop the guest, save its device
    state to the mount, quit the first QEMU, kexec the mount, and let the next QEMU take
    the saved state and go on."""
    pause = Pause()
    with qemu(config, console, work / "qmp1.sock", incoming=False) as (proc, qmp):
        progress(f"booting the guest; it fills {config.fill_mb} MiB of its RAM")
        index, match = console.expect(r"^checksum before (\w+)$", BOOT_TIMEOUT)
        sum_before = match.group(1)
        console.expect(r"^tick 3 ", 10, index)  # a few ticks, for the record
        beats = start_heartbeat(console)
        qmp.leave_out_shared_ram()
        progress("starting the next QEMU, paused, waiting for the saved state")
        with qemu(config, console, work / "qmp2.sock", incoming=True) as (_, qmp2):
            qmp2.leave_out_shared_ram()
            generation = gm.status()["generation"]
            progress("pausing the VM: stop, save the device state, quit")
            stopped = save_and_quit(config, qmp, proc, pause)
            ticks = [m for line in console.lines if (m := re.match(TICK, line))]
            before = Tick.parse(ticks[-1])
            state_bytes = config.state_path.stat().st_size
            progress("guestfs kexec")
            kexec = kexecer(generation)
            pause.kexec = kexec.wall_ms
            seen = len(console.lines)
            resumed = resume(config, qmp2, pause)
            await_beats(console, seen)
            heartbeat = Heartbeat.measure(console, beats, (stopped, resumed))
            console.send("quiet")
            progress("the VM runs again; the guest checksums its RAM")
            _, tick = console.expect(TICK, 10, seen)
            console.send("check")
            _, after = console.expect(r"^checksum after (\w+)$", CHECK_TIMEOUT, seen)
            qmp2.execute("quit")
    return Outcome(before, Tick.parse(tick), sum_before, after.group(1), state_bytes, pause,
                   kexec, heartbeat)


def save_and_quit(config: VmConfig, qmp: Qmp, proc: subprocess.Popen[bytes],
                  pause: Pause) -> float:
    """Stop the guest, save its device state to the mount and quit QEMU; when ``stop``
    was sent (time.monotonic)."""
    t0, stopped = time.perf_counter(), time.monotonic()
    qmp.execute("stop")
    qmp.execute("migrate", uri=f"exec:cat > {config.state_path}")
    qmp.wait("query-migrate", "status", "completed")
    pause.save = ms_since(t0)
    t0 = time.perf_counter()
    qmp.execute("quit")
    proc.wait(EXIT_TIMEOUT)
    pause.flush = ms_since(t0)
    return stopped


def resume(config: VmConfig, qmp: Qmp, pause: Pause) -> float:
    """The next QEMU, started ahead, takes the saved state and the RAM on the mount and
    goes on; when ``cont`` returned (time.monotonic)."""
    t0 = time.perf_counter()
    qmp.execute("migrate-incoming", uri=f"exec:cat {config.state_path}")
    qmp.wait("query-status", "status", "paused")
    qmp.execute("cont")
    pause.restore = ms_since(t0)
    return time.monotonic()


@dataclass
class LiveOutcome:
    """What the live demo saw: the guest's ticks around the kexec and its checksums."""

    ticks: list[Tick]           # from the last tick before the kexec on
    largest_gap_ms: float       # between two ticks' arrivals here, around the kexec
    checksum_before: str
    checksum_after: str
    kexec: Kexec
    heartbeat: Heartbeat

    def problems(self) -> list[str]:
        """Everything that shows the guest did not simply go on."""
        found = self.heartbeat.problems()
        if [t.n for t in self.ticks] != list(range(self.ticks[0].n,
                                                   self.ticks[0].n + len(self.ticks))):
            found.append(f"ticks not consecutive: {[t.n for t in self.ticks]}")
        if len({t.boot for t in self.ticks}) != 1:
            found.append(f"boot id changed: {sorted({t.boot for t in self.ticks})}")
        if self.largest_gap_ms > MAX_TICK_GAP * 1e3:
            found.append(f"the guest stood still for {self.largest_gap_ms:.0f} ms")
        if self.checksum_after != self.checksum_before:
            found.append(f"RAM checksum changed: {self.checksum_before} -> "
                         f"{self.checksum_after}")
        return found


def run_live(config: VmConfig, console: SerialConsole, qmp_path: Path, gm: GuestMount,
             kexecer: Kexecer) -> LiveOutcome:
    """Boot the guest, let it fill and checksum its RAM, kexec the mount under the
    running QEMU, let it tick on, then have it checksum its RAM again."""
    with qemu(config, console, qmp_path, incoming=False) as (proc, qmp):
        progress(f"booting the guest; it fills {config.fill_mb} MiB of its RAM")
        index, match = console.expect(r"^checksum before (\w+)$", BOOT_TIMEOUT)
        last, _ = console.expect(r"^tick 3 ", 10, index)
        beats = start_heartbeat(console)
        generation = gm.status()["generation"]
        progress("guestfs kexec, QEMU running")
        window = time.monotonic()
        kexec = kexecer(generation)
        await_beats(console, len(console.lines))
        heartbeat = Heartbeat.measure(console, beats, (window, window + kexec.wall_ms / 1e3))
        console.send("quiet")
        console.expect(r"^tick ", 10, len(console.lines))
        end, _ = console.expect(r"^tick ", 10, len(console.lines))  # two ticks after
        lines = range(last, end + 1)
        ticks = [(console.arrived[i], m) for i in lines
                 if (m := re.match(TICK, console.lines[i]))]
        gap = max(b[0] - a[0] for a, b in zip(ticks, ticks[1:])) * 1e3
        progress("the guest checksums its RAM")
        seen = len(console.lines)
        console.send("check")
        _, after = console.expect(r"^checksum after (\w+)$", CHECK_TIMEOUT, seen)
        qmp.execute("quit")
    return LiveOutcome([Tick.parse(m) for _, m in ticks], gap, match.group(1), after.group(1),
                       kexec, heartbeat)


def find_kernel() -> Path:
    """The newest Debian kernel image in /boot."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise Failure("no /boot/vmlinuz-* (linux-image-amd64 is installed but has no image?)")
    return kernels[-1]


def run(settings: Settings) -> Outcome | LiveOutcome:
    """The whole demo."""
    apt.ensure(PACKAGES)  # tools/setup.sh has installed them for the tests; a fallback
    arena_mb = settings.ram_mb + settings.ram_mb // 4 + 128  # RAM file, state, metadata
    with tempfile.TemporaryDirectory(prefix="vm-demo-") as tmp, \
            guest_mount("vmdemo", f"{arena_mb}M") as gm:
        work = Path(tmp)
        initramfs.build(work / "initrd.gz")
        config = VmConfig(find_kernel(), work / "initrd.gz", settings.ram_mb,
                          gm / "vm0.ram", settings.fill_mb)
        console = SerialConsole()
        kexecer = Kexecer(gm, settings.poison, settings.via_cli)
        if settings.live:
            return run_live(config, console, work / "qmp1.sock", gm, kexecer)
        return restart(config, console, work, gm, kexecer)
