"""Which next image may boot in the daemon's own process: only this same code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from guestfs.daemon import ImageStamp


def test_the_stamp_covers_the_interpreter_and_the_loaded_project_modules() -> None:
    stamp = ImageStamp.take()
    paths = [path for path, _, _ in stamp.files]
    assert paths[0] == sys.executable
    assert sys.modules["guestfs.session"].__file__ in paths
    assert sys.modules["kho_backend.boot"].__file__ in paths
    assert stamp.unchanged()


def test_a_file_changed_or_gone_is_another_image(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("x = 1\n")
    stamp = ImageStamp.take((os.fspath(module),))
    assert stamp.unchanged()
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert not stamp.unchanged()
    stamp = ImageStamp.take((os.fspath(module),))
    module.unlink()
    assert not stamp.unchanged()
