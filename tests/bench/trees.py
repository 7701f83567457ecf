"""`make bench`, trees: what following the binhost's snapshot costs a target (tree = binhost).

A synthetic ebuild tree shaped like Gentoo's (categories, packages, ebuilds, a metadata cache
entry per ebuild, Manifests; --files N files in all, 60,000 by default, about a third of
Gentoo's) is pushed into a staging copy with the tool's own rsync command (snapshot_push_argv)
over ssh with compression, as staging does, to a throwaway sshd on 127.0.0.1 (root; without it,
from one directory to another here, and the bytes are rsync's own count). The bytes are what ssh
sent. Measured in the same run:

  first push          the whole tree (what a first staging costs)
  one-ebuild change   an ebuild and its cache entry changed, then the push again: bytes and time
                      (rsync's file list is most of it)
  at the snapshot     what checking a target is at a snapshot costs: for a repository with a
                      revision (a git commit, or timestamp.chk and the top Manifest) the tool
                      compares it with the staged mark (repository_state here, one line there);
                      without one, the push again, which walks both copies (size and time);
                      each against re-hashing every file of the tree (SHA-256, what a digest
                      check of the whole tree costs)

It prints the numbers and the ratios. A measurement: it exits 0 whatever the numbers are, 1 only
when rsync fails.
"""

import argparse
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from conftest import start_sshd  # noqa: E402
from pipeline import gb  # noqa: E402  (the script as a module)


def make_tree(root, files):
    """About `files` files: per package 3 ebuilds, 3 cache entries, a Manifest and metadata.xml."""
    per_package = 8
    packages = max(1, files // per_package)
    for number in range(packages):
        category, package = f"cat-{number % 160:03d}", f"pkg{number}"
        directory = root / category / package
        directory.mkdir(parents=True, exist_ok=True)
        cache = root / "metadata/md5-cache" / category
        cache.mkdir(parents=True, exist_ok=True)
        for version in (1, 2, 3):
            text = f'EAPI=8\nDESCRIPTION="package {number}"\nSLOT="0"\nKEYWORDS="amd64"\n' + "#" * 600 + "\n"
            (directory / f"{package}-{version}.ebuild").write_text(text)
            (cache / f"{package}-{version}").write_text(f"DEFINED_PHASES=-\nEAPI=8\n_md5_={number:032x}\n" + "x" * 300)
        (directory / "Manifest").write_text(f"DIST {package}-1.tar.gz 12345 BLAKE2B {'a' * 128}\n")
        (directory / "metadata.xml").write_text("<pkgmetadata/>\n" + " " * 400)
    (root / "metadata/timestamp.chk").write_text("Tue, 02 Dec 2025 03:45:00 +0000\n")
    (root / "Manifest").write_text("".join(f"MANIFEST cat-{number:03d}/Manifest.gz 1234 BLAKE2B {'b' * 128}\n"
                                           for number in range(160)))


def push(source, destination, sshd=None):
    remote_shell, target = (), str(destination)
    if sshd is not None:  # as staging runs it: the tool's ssh options plus compression, ssh's own count
        options = [("LogLevel=VERBOSE" if option == "LogLevel=ERROR" else option) for option in sshd.ssh_option_list]
        remote_shell = ["--rsh", shlex.join(["ssh", "-p", str(sshd.port)] + options + ["-o", "Compression=yes"])]
        target = f"{sshd.host}:{destination}"
    argv = gb.snapshot_push_argv(str(source), target, remote_shell) + ["--stats"]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"rsync failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    wire = re.search(r"Transferred: sent (\d+)", done.stderr)
    sent = re.search(r"Total bytes sent: ([\d,.]+)", done.stdout)
    return seconds, int(wire.group(1)) if wire else int(float(sent.group(1).replace(",", ""))) if sent else 0


def rehash(root):
    started = time.monotonic()
    for directory, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                hashlib.sha256(handle.read()).digest()
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=int(os.environ.get("TREES_FILES", "60000")))
    args = parser.parse_args()
    if not shutil.which("rsync"):
        print("trees: rsync is not installed: skipped")
        return 0
    base = Path(tempfile.mkdtemp(prefix="gb-bench-trees-"))
    base.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            sshd = None
            if os.geteuid() == 0 and (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
                with contextlib.suppress(Exception):
                    sshd = stack.enter_context(start_sshd(base / "sshd"))
            measure(base, args.files, sshd)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def measure(base, files, sshd):
    source, staged = base / "binhost-tree", base / "staged"
    make_tree(source, files)
    count = sum(len(names) for _d, _s, names in os.walk(source))
    size = sum(os.path.getsize(os.path.join(d, name)) for d, _s, names in os.walk(source) for name in names)
    first_seconds, first_bytes = push(source, staged, sshd)
    changed = next(source.glob("cat-007/*/*-2.ebuild"))
    changed.write_text(changed.read_text() + "# a one-line fix\n")
    cache = source / "metadata/md5-cache/cat-007" / changed.stem
    cache.write_text(cache.read_text().replace("_md5_=", "_md5_=f"))
    change_seconds, change_bytes = push(source, staged, sshd)
    check_seconds, check_bytes = push(source, staged, sshd)
    started = time.monotonic()
    gb.repository_state(str(source))
    mark_seconds = time.monotonic() - started
    hash_seconds = rehash(source)
    print(f"trees: {count} files, {size:,} bytes, pushed {'over ssh' if sshd else 'locally (no sshd)'}")
    print(f"  first push          {first_seconds:7.2f} s  {first_bytes:>12,} bytes sent")
    print(f"  one-ebuild change   {change_seconds:7.2f} s  {change_bytes:>12,} bytes sent"
          f"  ({size / max(change_bytes, 1):.0f}x fewer than the tree's bytes)")
    print(f"  re-hashing the tree {hash_seconds:7.2f} s")
    print(f"  at the snapshot     {mark_seconds:7.4f} s  with a revision: its mark"
          f"  (re-hashing: {hash_seconds / max(mark_seconds, 1e-6):,.0f}x the check)")
    print(f"  at the snapshot     {check_seconds:7.2f} s  {check_bytes:>12,} bytes sent without one: the push walks"
          f" both copies  (re-hashing: {hash_seconds / max(check_seconds, 1e-6):.1f}x the check)")


if __name__ == "__main__":
    sys.exit(main())
