"""A guestfs "kernel" process without FUSE, driven over its stdin/stdout.

Tests start it with `FsKernel`; it boots the machine, restores the filesystem handed over
to it (or formats a fresh one) and answers msgpack requests naming core calls on paths.
On ``kexec`` it really hands over: prepare (serialize + KHO finalize), poison, and exec
itself in the same process, whose next image boots from the arena and answers the
pending request. Pipes survive the exec, as a serial console survives a kexec.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guestfs.errors import FsError  # noqa: E402
from guestfs.filesystem import Ctx  # noqa: E402
from guestfs.session import Options, Session  # noqa: E402

ROOT = Ctx(uid=0, gid=0)


class Server:
    """The process side: one booted kernel and its filesystem."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = [sys.executable, *argv]
        machine, memory = argv[1], argv[2]
        self.session = Session.open(Options(machine, memory=int(memory), cmdline="kho_poison"))
        self.kernel, self.fs = self.session.kernel, self.session.fs
        self.released = self.session.released
        self.handles: dict[int, int] = {}
        self.next_handle = 1

    # --- paths ---------------------------------------------------------------

    def resolve(self, path: str) -> int:
        ino = 1
        for part in path.strip("/").split("/"):
            if part:
                ino = self.fs.lookup(ino, part.encode()).ino
        return ino

    def parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self.resolve(head), name.encode()

    # --- requests --------------------------------------------------------------

    def op_create(self, path: str, mode: int) -> int:
        return self.fs.create(*self.parent(path), mode, ROOT).ino

    def op_mkdir(self, path: str, mode: int) -> int:
        return self.fs.mkdir(*self.parent(path), mode, ROOT).ino

    def op_symlink(self, path: str, target: bytes) -> int:
        return self.fs.symlink(*self.parent(path), target, ROOT).ino

    def op_link(self, src: str, dst: str) -> int:
        return self.fs.link(self.resolve(src), *self.parent(dst), ROOT).ino

    def op_unlink(self, path: str) -> None:
        """As through the kernel: the file is looked up (a reference held) before its
        name goes, and forgotten after, so a small file's free waits (on the orphan
        list) and a kill finds some waiting."""
        parent, name = self.parent(path)
        ino = self.fs.lookup(parent, name).ino
        self.fs.ref(ino)
        self.fs.unlink(parent, name, ROOT)
        self.fs.forget(ino, 1)

    def op_rmdir(self, path: str) -> None:
        self.fs.rmdir(*self.parent(path), ROOT)

    def op_rename(self, src: str, dst: str, flags: int) -> None:
        self.fs.rename(*self.parent(src), *self.parent(dst), flags, ROOT)

    def op_write(self, path: str, off: int, data: bytes) -> int:
        return self.fs.write(self.resolve(path), off, data)

    def op_truncate(self, path: str, size: int) -> None:
        self.fs.setattr(self.resolve(path), ROOT, size=size)

    def op_chmod(self, path: str, mode: int) -> None:
        self.fs.setattr(self.resolve(path), ROOT, mode=mode)

    def op_chown(self, path: str, uid: int, gid: int) -> None:
        self.fs.setattr(self.resolve(path), ROOT, uid=uid, gid=gid)

    def op_utimens(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        self.fs.setattr(self.resolve(path), ROOT, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def op_setxattr(self, path: str, name: bytes, value: bytes) -> None:
        self.fs.setxattr(self.resolve(path), name, value, ROOT)

    def op_open(self, path: str) -> int:
        ino = self.resolve(path)
        self.fs.open(ino, os.O_RDWR)
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.handles[handle] = ino
        return handle

    def op_close(self, handle: int) -> None:
        self.fs.release(self.handles.pop(handle))

    def op_read_handle(self, handle: int) -> bytes:
        ino = self.handles[handle]
        return bytes(self.fs.read(ino, 0, self.fs.get(ino).size))

    def op_contents(self, path: str) -> bytes:
        """A file's bytes, straight from the store (no atime change)."""
        inode = self.fs.get(self.resolve(path))
        return bytes(self.fs.store.maps.read(inode, 0, inode.size))

    def op_snapshot(self) -> dict:
        """Every reachable name with what a model can check, and the machine's figures."""
        tree: dict[str, dict] = {}
        self._walk(1, "", tree)
        return {"tree": tree, "free_pages": self.kernel.buddy.free_pages(),
                "generation": self.fs.sb.generation, "released": self.released,
                "problems": self.fs.check(), "pid": os.getpid()}

    def _walk(self, ino: int, path: str, tree: dict) -> None:
        # Straight from the store, so that taking a snapshot changes no atime.
        store = self.fs.store
        for _cookie, name, child_ino, _mode in list(store.dirs.entries(self.fs.get(ino))):
            inode = self.fs.get(child_ino)
            child = f"{path}/{name.decode()}"
            tree[child] = self._describe(inode)
            if inode.is_dir:
                self._walk(inode.ino, child, tree)

    def _describe(self, inode) -> dict:
        store = self.fs.store
        rec = {"ino": inode.ino, "mode": inode.mode, "uid": inode.uid, "gid": inode.gid,
               "nlink": inode.nlink, "size": inode.size, "mtime": inode.mtime_ns,
               "atime": inode.atime_ns, "xattrs": store.xattrs(inode)}
        if inode.is_symlink:
            rec["target"] = store.target(inode)
        if inode.is_reg:
            data = bytes(store.maps.read(inode, 0, inode.size))
            rec["sha"] = hashlib.sha256(data).hexdigest()
            rec["extents"] = [list(e) for e in store.maps.extents(inode)]
        return rec

    def op_kexec(self, poison: bool) -> None:
        self.session.load(self.argv, "kho_poison" if poison else "")
        self.session.hand_over({}, for_exec=True)
        if poison:
            self.session.poison()
        self.session.exec()

    def op_shutdown(self, handover: bool) -> None:
        """End this kernel: with a handover (a clean unmount), or as a crash."""
        if handover:
            self.session.hand_over({}, for_exec=False)
        self.session.close()
        reply({"ok": True, "value": None})
        sys.exit(0)

    def serve(self) -> None:
        reply({"ok": True, "value": {"pid": os.getpid(), "released": self.released,
                                     "generation": self.fs.sb.generation}})
        unpacker = msgpack.Unpacker(raw=False)
        stdin = sys.stdin.buffer
        while True:
            chunk = os.read(stdin.fileno(), 1 << 16)
            if not chunk:
                return
            unpacker.feed(chunk)
            for req in unpacker:
                reply(self.handle(req))

    def handle(self, req: dict) -> dict:
        try:
            value = getattr(self, "op_" + req["op"])(*req.get("args", ()))
            return {"ok": True, "value": value}
        except FsError as e:
            return {"ok": False, "errno": e.errno, "error": str(e)}
        except Exception as e:
            return {"ok": False, "errno": errno.EIO, "error": f"{type(e).__name__}: {e}"}


def reply(msg: dict) -> None:
    os.write(sys.stdout.fileno(), msgpack.packb(msg, use_bin_type=True))


class FsKernel:
    """The test side: start a kernel process and call it."""

    def __init__(self, machine: str, memory: int = 64 << 20, *, wait: bool = True) -> None:
        """Start the process; with `wait`, until it booted (its reply is `boot_reply`)."""
        self.proc = subprocess.Popen([sys.executable, __file__, machine, str(memory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.boot_reply = self._read()["value"] if wait else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, *args: Any) -> Any:
        """The value of `op`; FsError with the errno the core answered."""
        self.proc.stdin.write(msgpack.packb({"op": op, "args": args}, use_bin_type=True))
        self.proc.stdin.flush()
        res = self._read()
        if not res["ok"]:
            raise FsError(res["errno"], res.get("error", ""))
        return res["value"]

    def kexec(self, poison: bool = True) -> dict:
        """Hand over and exec; the answer is the next image's boot reply (same PID)."""
        return self.call("kexec", poison)

    def _read(self) -> dict:
        while True:
            for msg in self.unpacker:
                return msg
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"the kernel process {self.proc.pid} ended: {err[-3000:]}")
            self.unpacker.feed(chunk)

    def send_raw(self, payload: bytes) -> None:
        """Write requests without waiting for answers (a killed process ends it)."""
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def replies(self) -> Iterator[dict]:
        """Answers as they come, until the process's output ends."""
        while True:
            yield from self.unpacker
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return
            self.unpacker.feed(chunk)

    def kill(self) -> None:
        """SIGKILL the process (by its own PID) if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        """Stop this process (by its own PID) if it still runs."""
        self.kill()
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except BrokenPipeError:     # requests it never read
                pass


if __name__ == "__main__":
    Server(sys.argv).serve()
