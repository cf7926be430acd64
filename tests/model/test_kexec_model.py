"""Model-based test of the handover: random operations interleaved with kexecs (with
poisoning) and unmount/mount cycles, checked after every step against a reference model.

The filesystem runs in a kernel process of its own (tests/helpers/fs_kernel.py, the core
without FUSE); every kexec really execs that process into a new image that boots from the
arena. A smaller version on a real mount with `guestfs kexec` is in test_kexec_mount.py.
"""

from __future__ import annotations

import errno
import hashlib
import stat
import sys
import uuid
from pathlib import Path
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from conftest_machine import examples, machine_env  # noqa: F401  (fixture)
from guestfs.errors import FsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from fs_kernel import FsKernel  # noqa: E402

NAMES = st.sampled_from(["a", "b", "c", "d"])
DATA = st.binary(min_size=1, max_size=9000)
OFFSETS = st.sampled_from([0, 1, 4095, 4096, 10000, 2 << 20])
RENAME_NOREPLACE = 1


@dataclass(eq=False)
class Node:
    """One inode of the reference model."""

    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[str, Node] | None = None
    uid: int = 0
    gid: int = 0
    times: tuple[int, int] | None = None     # (atime, mtime) when set by utimens

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class HandoverModel(RuleBasedStateMachine):
    """The filesystem in a kernel process against a dict-of-nodes model."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = f"model-{uuid.uuid4().hex[:10]}"
        self.kernel = FsKernel(self.machine)
        self.pid = self.kernel.pid
        self.root = Node(ino=1, mode=stat.S_IFDIR | 0o755, children={})
        self.open: dict[int, Node] = {}   # handle -> node of a file unlinked while open
        self.generation = 0

    def teardown(self) -> None:
        self.kernel.close()

    # --- the model's view ---------------------------------------------------------

    def entries(self, want=lambda n: True) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = []

        def walk(d: Node, path: str) -> None:
            for name, child in d.children.items():
                p = f"{path}/{name}"
                if want(child):
                    out.append((p, child))
                if child.is_dir:
                    walk(child, p)
        walk(self.root, "")
        return out

    def files(self):
        return [p for p, n in self.entries(lambda n: stat.S_ISREG(n.mode))]

    def dirs(self):
        return ["/"] + [p for p, n in self.entries(lambda n: n.is_dir)]

    def node(self, path: str) -> Node:
        n = self.root
        for part in path.strip("/").split("/"):
            if part:
                n = n.children[part]
        return n

    @staticmethod
    def join(d: str, name: str) -> str:
        return f"{d.rstrip('/')}/{name}"

    def split(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rpartition("/")
        return self.node(head), name

    def expect_errno(self, code: int, op: str, *args) -> None:
        with pytest.raises(FsError) as e:
            self.kernel.call(op, *args)
        assert e.value.errno == code, f"{op}{args}: {e.value}"

    # --- operations ----------------------------------------------------------------

    @rule(data=st.data(), name=NAMES, kind=st.sampled_from(["create", "mkdir", "symlink"]))
    def make(self, data, name, kind) -> None:
        d = data.draw(st.sampled_from(self.dirs()))
        path = self.join(d, name)
        parent = self.node(d)
        args = {"create": (0o644,), "mkdir": (0o755,), "symlink": (b"target/" + name.encode(),)}
        if name in parent.children:
            self.expect_errno(errno.EEXIST, kind, path, *args[kind])
            return
        ino = self.kernel.call(kind, path, *args[kind])
        if kind == "create":
            node = Node(ino, stat.S_IFREG | 0o644)
        elif kind == "mkdir":
            node = Node(ino, stat.S_IFDIR | 0o755, children={})
        else:
            node = Node(ino, stat.S_IFLNK | 0o777, target=args[kind][0])
        if parent.mode & stat.S_ISGID:      # BSD group semantics of a set-gid directory
            node.gid = parent.gid
            if node.is_dir:
                node.mode |= stat.S_ISGID
        parent.children[name] = node

    @rule(data=st.data(), off=OFFSETS, payload=DATA)
    def write(self, data, off, payload) -> None:
        if not self.files():
            return
        path = data.draw(st.sampled_from(self.files()))
        assert self.kernel.call("write", path, off, payload) == len(payload)
        buf = self.node(path).data
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(payload)] = payload
        self.node(path).times = None

    @rule(data=st.data(), size=st.sampled_from([0, 1, 4096, 5000, (2 << 20) + 3]))
    def truncate(self, data, size) -> None:
        if not self.files():
            return
        path = data.draw(st.sampled_from(self.files()))
        self.kernel.call("truncate", path, size)
        buf = self.node(path).data
        del buf[size:]
        buf.extend(bytes(size - len(buf)))
        self.node(path).times = None

    @rule(data=st.data(), name=NAMES, noreplace=st.booleans())
    def rename(self, data, name, noreplace) -> None:
        items = self.entries()
        if not items:
            return
        src, node = data.draw(st.sampled_from(items))
        d = data.draw(st.sampled_from(self.dirs()))
        dst = self.join(d, name)
        flags = RENAME_NOREPLACE if noreplace else 0
        expected = self.rename_errno(src, node, d, name, flags)
        if expected:
            self.expect_errno(expected, "rename", src, dst, flags)
            return
        self.kernel.call("rename", src, dst, flags)
        sparent, sname = self.split(src)
        dparent = self.node(d)
        if dparent.children.get(name) is node:
            return
        del sparent.children[sname]
        dparent.children[name] = node

    def rename_errno(self, src: str, node: Node, d: str, name: str, flags: int) -> int:
        dparent = self.node(d)
        target = dparent.children.get(name)
        # In the order the VFS checks (do_renameat2): an existing target under
        # RENAME_NOREPLACE first (even onto itself), then a directory into itself.
        if target is not None and flags & RENAME_NOREPLACE:
            return errno.EEXIST
        if node.is_dir and (d + "/").startswith(src + "/"):
            return errno.EINVAL
        if target is None:
            return 0
        if target is node:
            return 0
        if node.is_dir and not target.is_dir:
            return errno.ENOTDIR
        if target.is_dir and not node.is_dir:
            return errno.EISDIR
        if target.is_dir and target.children:
            return errno.ENOTEMPTY
        return 0

    @rule(data=st.data(), name=NAMES)
    def link(self, data, name) -> None:
        if not self.files():
            return
        src = data.draw(st.sampled_from(self.files()))
        d = data.draw(st.sampled_from(self.dirs()))
        if name in self.node(d).children:
            self.expect_errno(errno.EEXIST, "link", src, self.join(d, name))
            return
        self.kernel.call("link", src, self.join(d, name))
        self.node(d).children[name] = self.node(src)

    @rule(data=st.data(), keep_open=st.booleans())
    def unlink(self, data, keep_open) -> None:
        items = [p for p, n in self.entries(lambda n: not n.is_dir)]
        if not items:
            return
        path = data.draw(st.sampled_from(items))
        node = self.node(path)
        if keep_open and stat.S_ISREG(node.mode):
            handle = self.kernel.call("open", path)
            self.open[handle] = node
        self.kernel.call("unlink", path)
        parent, name = self.split(path)
        del parent.children[name]

    @rule()
    def read_and_close_open_files(self) -> None:
        for handle, node in list(self.open.items()):
            # The node, not a copy: another hard link may have changed the data since.
            assert self.kernel.call("read_handle", handle) == bytes(node.data)
            node.times = None     # the read moved atime (relatime); another link may show it
            self.kernel.call("close", handle)
            del self.open[handle]

    @rule(data=st.data())
    def rmdir(self, data) -> None:
        dirs = self.dirs()[1:]
        if not dirs:
            return
        path = data.draw(st.sampled_from(dirs))
        node = self.node(path)
        if node.children:
            self.expect_errno(errno.ENOTEMPTY, "rmdir", path)
            return
        self.kernel.call("rmdir", path)
        parent, name = self.split(path)
        del parent.children[name]

    @rule(data=st.data(), name=st.sampled_from([b"user.a", b"trusted.b", b"security.c"]),
          value=st.binary(max_size=300))
    def setxattr(self, data, name, value) -> None:
        items = [(p, n) for p, n in self.entries() if not stat.S_ISLNK(n.mode)]
        if not items:
            return
        path, node = data.draw(st.sampled_from(items))
        self.kernel.call("setxattr", path, name, value)
        node.xattrs[name] = value

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o755, 0o4755, 0o2770, 0o1777]))
    def chmod(self, data, mode) -> None:
        items = [(p, n) for p, n in self.entries() if not stat.S_ISLNK(n.mode)]
        if not items:
            return
        path, node = data.draw(st.sampled_from(items))
        self.kernel.call("chmod", path, mode)
        node.mode = stat.S_IFMT(node.mode) | mode

    @rule(data=st.data(), uid=st.sampled_from([0, 1000, 65534]), gid=st.sampled_from([0, 100]))
    def chown(self, data, uid, gid) -> None:
        items = self.entries(lambda n: stat.S_ISDIR(n.mode))
        if not items:
            return
        path, node = data.draw(st.sampled_from(items))
        self.kernel.call("chown", path, uid, gid)
        node.uid, node.gid = uid, gid

    @rule(data=st.data(), atime=st.integers(0, 2**40), mtime=st.integers(0, 2**40))
    def utimens(self, data, atime, mtime) -> None:
        items = self.entries(lambda n: stat.S_ISREG(n.mode))
        if not items:
            return
        path, node = data.draw(st.sampled_from(items))
        self.kernel.call("utimens", path, atime, mtime)
        node.times = (atime, mtime)

    @rule()
    def kexec(self) -> None:
        booted = self.kernel.kexec(poison=True)
        assert booted["pid"] == self.pid, "kexec must keep the process (same PID)"
        self.generation += 1
        assert booted["generation"] == self.generation
        self.open.clear()     # the processes holding files did not survive the kexec

    @rule()
    def unmount_and_mount(self) -> None:
        self.kernel.call("shutdown", True)
        self.kernel.close()
        self.kernel = FsKernel(self.machine)
        self.pid = self.kernel.pid
        self.generation += 1
        assert self.kernel.boot_reply["generation"] == self.generation
        self.open.clear()

    # --- the check after every step --------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        snap = self.kernel.call("snapshot")
        assert snap["problems"] == []
        got = snap["tree"]
        want = dict(self.entries())
        assert sorted(got) == sorted(want)
        for path, node in want.items():
            self.check_node(path, got[path], node, want)

    def check_node(self, path: str, rec: dict, node: Node, tree: dict) -> None:
        assert rec["ino"] == node.ino, path
        assert rec["mode"] == node.mode, path
        assert (rec["uid"], rec["gid"]) == (node.uid, node.gid), path
        assert rec["xattrs"] == node.xattrs, path
        if node.is_dir:
            subdirs = sum(1 for c in node.children.values() if c.is_dir)
            assert rec["nlink"] == 2 + subdirs, path
        else:
            assert rec["nlink"] == sum(1 for n in tree.values() if n is node), path
        if node.target is not None:
            assert rec["target"] == node.target and rec["size"] == len(node.target), path
        if stat.S_ISREG(node.mode):
            assert rec["size"] == len(node.data), path
            assert rec["sha"] == hashlib.sha256(node.data).hexdigest(), path
        if node.times is not None:
            assert (rec["atime"], rec["mtime"]) == node.times, path


@pytest.mark.slow
def test_handover_model(machine_env) -> None:
    run_state_machine_as_test(HandoverModel, settings=settings(
        max_examples=examples(25), stateful_step_count=35, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
