"""SIGKILL the filesystem at random instants and check what the next boot recovers.

Each *case* boots a kernel process (tests/helpers/fs_kernel.py: the core without FUSE)
on the machine, checks that the filesystem it recovered is sound and is what the
acknowledged operations made, then streams a batch of random operations at it (ending,
sometimes, with a kexec or an unmount's handover) and SIGKILLs it after a random delay:
mid-operation, mid-transaction, mid-kexec, or while it boots and recovers. Every
operation whose answer came back is acknowledged; the ones sent but unanswered may or
may not have happened, in order, so the recovered tree must equal the model after the
acknowledged ones plus some prefix of the rest; the write after that prefix may be torn
(some of its bytes stored, its size not: file data is not journalled, as with ext4's
data=ordered). Used by tests/model/test_crash.py and,
for long runs, tools/crash-stress.
"""

from __future__ import annotations

import copy
import hashlib
import random
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fs_kernel import FsKernel

DIR_MODE = stat.S_IFDIR | 0o755
REG_MODE = stat.S_IFREG | 0o644
NAMES = ["a", "b", "c", "longer-name-" + "x" * 40, "d"]
MAX_DEPTH = 3


@dataclass
class Entry:
    """One path of the model."""

    kind: str                       # "dir", "reg", "lnk"
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


class TreeModel:
    """What the acknowledged operations made: path -> Entry (no hard links)."""

    def __init__(self) -> None:
        self.paths: dict[str, Entry] = {}

    def view(self) -> dict[str, tuple]:
        """Comparable with `observed`."""
        out = {}
        for path, e in self.paths.items():
            if e.kind == "reg":
                what: Any = hashlib.sha256(bytes(e.data)).hexdigest()
            elif e.kind == "lnk":
                what = e.target
            else:
                what = None
            out[path] = (e.kind, len(e.data) if e.kind == "reg" else None, what,
                         sorted(e.xattrs.items()))
        return out

    def apply(self, op: tuple) -> None:
        name, args = op[0], op[1:]
        getattr(self, "_" + name)(*args)

    def _mkdir(self, path: str, _mode: int) -> None:
        self.paths[path] = Entry("dir")

    def _create(self, path: str, _mode: int) -> None:
        self.paths[path] = Entry("reg")

    def _symlink(self, path: str, target: bytes) -> None:
        self.paths[path] = Entry("lnk", target=target)

    def _write(self, path: str, off: int, data: bytes) -> None:
        buf = self.paths[path].data
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data

    def _truncate(self, path: str, size: int) -> None:
        buf = self.paths[path].data
        del buf[size:]
        buf.extend(bytes(size - len(buf)))

    def _setxattr(self, path: str, name: bytes, value: bytes) -> None:
        self.paths[path].xattrs[name] = value

    def _unlink(self, path: str) -> None:
        del self.paths[path]

    _rmdir = _unlink

    def _rename(self, src: str, dst: str, _flags: int) -> None:
        moved = {p: e for p, e in self.paths.items() if p == src or p.startswith(src + "/")}
        for p in [p for p in self.paths if p == dst or p.startswith(dst + "/")]:
            del self.paths[p]
        for p, e in moved.items():
            del self.paths[p]
            self.paths[dst + p[len(src):]] = e

    def _kexec(self, _poison: bool) -> None:
        pass

    def _utimens(self, _path: str, _atime: int, _mtime: int) -> None:
        pass

    def _shutdown(self, _handover: bool) -> None:
        pass


def observed(snapshot: dict) -> dict[str, tuple]:
    """A kernel's snapshot in the model's terms."""
    out = {}
    for path, rec in snapshot["tree"].items():
        kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk"}[
            stat.S_IFMT(rec["mode"])]
        what = rec.get("sha") if kind == "reg" else rec.get("target")
        out[path] = (kind, rec["size"] if kind == "reg" else None, what,
                     sorted(rec["xattrs"].items()))
    return out


# --- random operations ---------------------------------------------------------------


def random_op(rng: random.Random, model: TreeModel) -> tuple:
    """An operation that is valid on `model` (so the filesystem must accept it)."""
    for _ in range(20):
        op = _try_op(rng, model)
        if op is not None:
            return op
    return ("utimens", "", 1, 1)        # the root's times: outside the model


def _try_op(rng: random.Random, model: TreeModel) -> tuple | None:
    dirs = [""] + [p for p, e in model.paths.items() if e.kind == "dir"]
    files = [p for p, e in model.paths.items() if e.kind == "reg"]
    roll = rng.random()
    if roll < 0.35:
        if not files:
            return None
        f = rng.choice(files)
        off = rng.choice([0, 1, 4095, 4096, 30_000, 2 << 20, len(model.paths[f].data)])
        return ("write", f, off, rng.randbytes(rng.choice([1, 100, 5000, 9000])))
    if roll < 0.42:
        return ("truncate", rng.choice(files), rng.choice([0, 1, 5000, 3 << 20])) if files else None
    if roll < 0.5:
        xattrs = [p for p, e in model.paths.items() if e.kind != "lnk"]     # user.* rule
        return ("setxattr", rng.choice(xattrs), b"user.%d" % rng.randrange(3),
                rng.randbytes(rng.randrange(200))) if xattrs else None
    if roll < 0.62:
        return _rename(rng, model, dirs) if model.paths else None
    if roll < 0.72:
        if not model.paths:
            return None
        path = rng.choice(list(model.paths))
        if model.paths[path].kind != "dir":
            return ("unlink", path)
        return None if any(p.startswith(path + "/") for p in model.paths) else ("rmdir", path)
    parent = rng.choice([d for d in dirs if d.count("/") < MAX_DEPTH])
    free = [f"{parent}/{n}" for n in NAMES if f"{parent}/{n}" not in model.paths]
    if not free:
        return None
    path, kind = rng.choice(free), rng.random()
    if kind < 0.3:
        return ("mkdir", path, DIR_MODE)
    if kind < 0.4:
        return ("symlink", path, b"t" * rng.choice([1, 40, 41, 300]))
    return ("create", path, REG_MODE)


def _rename(rng: random.Random, model: TreeModel, dirs: list[str]) -> tuple | None:
    src = rng.choice(list(model.paths))
    targets = [d for d in dirs if d != src and not d.startswith(src + "/")
               and d.count("/") < MAX_DEPTH]
    dst = f"{rng.choice(targets)}/{rng.choice(NAMES)}"
    old = model.paths.get(dst)
    ok = dst != src and (old is None or (
        (old.kind == "dir") == (model.paths[src].kind == "dir")
        and not any(p.startswith(dst + "/") for p in model.paths)))
    if not ok or _depth_after(model, src, dst) > MAX_DEPTH + 1:
        return None
    return ("rename", src, dst, 0)


def _depth_after(model: TreeModel, src: str, dst: str) -> int:
    below = [p[len(src):].count("/") for p in model.paths if p.startswith(src + "/")]
    return dst.count("/") + max(below, default=0)


# --- one case -----------------------------------------------------------------------


@dataclass
class Outcome:
    """What one case saw (for the test's figures)."""

    acked: int = 0
    unacked: int = 0
    killed_in_boot: bool = False
    ended_with: str = ""


class CrashRun:
    """Cases on one machine, one after another; each case's kill is the next one's
    recovery."""

    def __init__(self, machine: str, seed: int, memory: int = 64 << 20) -> None:
        self.machine = machine
        self.memory = memory
        self.rng = random.Random(seed)
        self.model = TreeModel()
        self.pending: list[tuple] = []       # sent, not acknowledged, in order
        self.recovery_s: list[float] = []
        self.torn = 0                           # recoveries that found a write cut short

    def case(self) -> Outcome:
        out = Outcome()
        if self.rng.random() < 0.15:         # killed while it boots and recovers
            out.killed_in_boot = True
            early = FsKernel(self.machine, self.memory, wait=False)
            time.sleep(self.rng.uniform(0, 0.6))
            early.kill()
        started = time.perf_counter()
        kernel = FsKernel(self.machine, self.memory)
        self.recovery_s.append(time.perf_counter() - started)
        try:
            self._check_recovered(kernel)
            ops = self._batch()
            out.ended_with = ops[-1][0]
            acked = self._stream_and_kill(kernel, ops)
        finally:
            kernel.close()
        for op in ops[:acked]:
            self.model.apply(op)
        self.pending = ops[acked:]
        out.acked, out.unacked = acked, len(ops) - acked
        return out

    def _check_recovered(self, kernel: FsKernel) -> None:
        snap = kernel.call("snapshot")
        assert snap["problems"] == [], f"the recovered filesystem fails its check: {snap['problems'][:3]}"
        seen = observed(snap)
        model = copy.deepcopy(self.model)
        for done in range(len(self.pending) + 1):
            torn = (seen != model.view() and done < len(self.pending)
                    and self._torn(kernel, model, self.pending[done], seen))
            self.torn += torn
            if torn or seen == model.view():
                self.model = model          # the first `done` unanswered ops happened
                self.pending = []
                return
            if done < len(self.pending):
                model.apply(self.pending[done])
        raise AssertionError(_diff(self.model.view(), seen, self.pending))

    @staticmethod
    def _torn(kernel: FsKernel, model: TreeModel, op: tuple, seen: dict) -> bool:
        """Whether `seen` is `model` with the write `op` cut short: data pages are not
        journalled (as ext4's data=ordered), so a write the process died in may have
        stored part of its bytes, never its size; everything else is as before it. If
        so, `model` takes the file's bytes as found."""
        if op[0] != "write":
            return False
        _, path, off, data = op
        want = model.view()
        if {p for p in set(want) | set(seen) if want.get(p) != seen.get(p)} != {path}:
            return False
        old = bytes(model.paths[path].data)
        found = kernel.call("contents", path)
        if len(found) != len(old):
            return False
        new = (old + bytes(max(0, off - len(old))))[:off] + data + old[off + len(data):]
        if any(f != o and f != n for f, o, n in zip(found, old, new[:len(old)])):
            return False
        entry, before = model.paths[path], model.paths[path].data
        entry.data = bytearray(found)
        if seen == model.view():
            return True
        entry.data = before
        return False

    def _batch(self) -> list[tuple]:
        scratch = copy.deepcopy(self.model)
        ops = []
        for _ in range(self.rng.randint(1, 30)):
            op = random_op(self.rng, scratch)
            scratch.apply(op)
            ops.append(op)
        end = self.rng.random()
        if end < 0.2:
            ops.append(("kexec", False))
        elif end < 0.3:
            ops.append(("shutdown", True))
        return ops

    def _stream_and_kill(self, kernel: FsKernel, ops: list[tuple]) -> int:
        """Send every op at once, SIGKILL after a random delay; the number answered."""
        timer = threading.Timer(self.rng.uniform(0, 0.05), kernel.kill)
        payload = b"".join(msgpack.packb({"op": op[0], "args": op[1:]}, use_bin_type=True)
                           for op in ops)
        timer.start()
        writer = threading.Thread(target=kernel.send_raw, args=(payload,), daemon=True)
        writer.start()
        acked = 0
        try:
            for reply in kernel.replies():
                assert reply.get("ok", True), f"{ops[acked]} failed: {reply}"
                acked += 1
                if acked == len(ops):
                    break
        finally:
            timer.cancel()
            kernel.kill()
            writer.join(timeout=30)
        return acked


def _diff(want: dict, seen: dict, pending: list[tuple]) -> str:
    missing = sorted(set(want) - set(seen))[:5]
    extra = sorted(set(seen) - set(want))[:5]
    changed = sorted(p for p in set(want) & set(seen) if want[p] != seen[p])[:5]
    return (f"the recovered tree is not the model after the acknowledged operations plus "
            f"a prefix of the {len(pending)} unanswered ones {pending[:3]}: missing "
            f"{missing}, unexpected {extra}, different {changed}")

