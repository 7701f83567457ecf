"""Only one build per binhost at a time: a second build waits for the lock, saying so."""

import fcntl
import os
import subprocess
import sys
import time

from conftest import SCRIPT


def test_second_build_waits_for_the_first(tmp_path):
    root = tmp_path / "binhost"
    (root / "etc/portage").mkdir(parents=True)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "emerge").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/ran\n")
    (bin_dir / "emerge").chmod(0o755)
    lock_path = tmp_path / ".binhost.build.lock"  # beside the root: init --force and purge take it too
    stderr_path = tmp_path / "stderr"
    with open(lock_path, "a+") as held, open(stderr_path, "w") as stderr:
        fcntl.flock(held, fcntl.LOCK_EX)
        build = subprocess.Popen(
            [sys.executable, str(SCRIPT), "-c", str(config), "--color=n", "build", "app-misc/hello"],
            env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
            stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 30
        while "waiting" not in stderr_path.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert "Another build is running on" in stderr_path.read_text()
        assert build.poll() is None and not (tmp_path / "ran").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    assert build.wait(timeout=30) == 0
    assert (tmp_path / "ran").read_text() == ("--root-deps --getbinpkg=n --getbinpkgonly=n"
                                              " app-misc/hello\n")
