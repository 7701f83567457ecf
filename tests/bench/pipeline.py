"""`make bench`, part 3: the pipeline around the builds, each claim a ratio to its alternative.

Through the real components (Portage from the venv, a real sshd on 127.0.0.1, the debootstrap
chroot image, `serve` as a process):

  (1) coverage: `build --for-target app-misc/hello-app app-misc/greet` split into planning (the
      ssh round trip in which the target says what it would merge) and building (emerge and
      publication), from the timestamps of the lines the command prints, one real run; the bare
      round trip (Remote.plan() called in this process) and `--pretend build --for-target` are
      measured beside it;
  (2) build fidelity: what build-method = chroot costs per build (mounts, chroot, unmounts and
      our bookkeeping): `build --oneshot app-misc/hello` with build-method = chroot against the
      very emerge command it runs (taken from its --pretend output) run by hand with the mounts
      already in place, interleaved; the root method's build of the same package for context;
  (3) publish: publish() of a PKGDIR of 1,000 packages against `cp -al` and `cp -a` snapshots of
      it, and a check that no package file was copied;
  (4) hardening: an honest client's GET /Packages from 127.0.0.2 while 300 connections from
      127.0.0.1 trickle one header byte a second, from `serve` and from nginx (when installed),
      against the same GET with no load; then (no goal) the same 300 spread over ten addresses,
      30 each, under serve's per-address cap.

Nothing fails because something is slow: each goal is reported as met or not. It exits non-zero
only when a part cannot run (Portage missing, a build that fails, a server that answers wrongly);
a part whose prerequisites are missing (root, sshd, nginx, the chroot image) is skipped with the
reason. `--quick` runs each measurement once (twice where a best is taken); `--only PART` runs
one part; `--keep` keeps the logs (plan.log, chroot.log) in the temporary directory.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(BENCH))

from conftest import (REPO, SCRIPT, binhost_serving, configure_gentoo_like_root,  # noqa: E402
                      ensure_chroot_cache,
                      find_portage_bin, free_port, mounts_under, portage_eprefix, remove_chroot,
                      start_sshd, write_portage_config)
import run as serve_bench  # noqa: E402  (tests/bench/run.py: nginx and process helpers)

PLAN_ATOMS = ["app-misc/hello-app", "app-misc/greet"]
CHROOT_ATOM = "app-misc/hello"
FAKE_PACKAGES = 1000
SLOW_CLIENTS = 300
TRICKLE_LIMIT = 20.0  # seconds a slow-client load may last, whatever happens
HONEST_TIMEOUT = 10.0
PARTS = ("plan", "chroot", "publish", "slow")


class BenchError(Exception):
    """A part cannot run: a command failed or a server answered wrongly."""


class Skip(Exception):
    """A prerequisite of one part is missing: the part is skipped, the others run."""


def load_module():
    spec = importlib.util.spec_from_file_location("gentoo_binhost", str(SCRIPT))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentoo_binhost"] = module
    spec.loader.exec_module(module)
    return module


gb = load_module()


def seconds(value):
    return "n/a" if value is None else f"{value:.2f} s"


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def cli_env(portage_bin):
    return dict(os.environ, PATH=f"{portage_bin}:{os.environ['PATH']}", NO_COLOR="1")


def timed_cli(config, args, portage_bin, log, what):
    """Run gentoo-binhost.py -q -c config args..., output to log; its wall time in seconds."""
    argv = [sys.executable, str(SCRIPT), "-q", "--color=n", "-c", str(config), *args]
    with open(log, "ab") as handle:
        handle.write(f"\n### {' '.join(map(shlex.quote, argv))}\n".encode())
        handle.flush()
        started = time.monotonic()
        result = subprocess.run(argv, env=cli_env(portage_bin), stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=900)
        elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit {result.returncode}); its output:\n"
                         + Path(log).read_text(errors="replace")[-3000:])
    return elapsed


def need_root(what):
    if os.geteuid() != 0:
        raise Skip(f"{what} needs root")


# ------------------------------------------------------------------------------------------------
# (1) Planning vs building
# ------------------------------------------------------------------------------------------------


def timed_lines(argv, env, log):
    """Run argv, stdout and stderr merged; [(seconds since start, line)], exit code, total."""
    started = time.monotonic()
    lines = []
    with open(log, "ab") as handle, subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for raw in process.stdout:
            lines.append((time.monotonic() - started, raw.decode("utf-8", "replace").rstrip("\n")))
            handle.write(raw)
        process.wait()
    return lines, process.returncode, time.monotonic() - started


def first_time(lines, pattern):
    for moment, line in lines:
        if re.search(pattern, line):
            return moment
    return None


def bench_planning(base, portage_bin, rounds):
    need_root("an sshd for root logins")
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh"):
        raise Skip("sshd or ssh missing (apt-get install openssh-server)")
    world = base / "plan"
    world.mkdir()
    binhost, target = world / "binhost", world / "target"
    write_portage_config(binhost, extra_make_conf='USE="loud"\n')
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    log = base / "plan.log"
    with start_sshd(world / "sshd") as sshd:
        port = free_port()
        config = world / "gentoo-binhost.conf"
        config.write_text(
            f"[binhost]\nroot = {binhost}\nurl = http://127.0.0.1:{port}/\nbind = 127.0.0.1\nport = {port}\n"
            f"build-method = root\n\n[target t]\nhost = {sshd.host}\nssh-port = {sshd.port}\n"
            f"ssh-options = {sshd.ssh_options}\nroot = {target}\npath = {portage_bin}\n")
        with binhost_serving(config, port):
            # The bare round trip, in this process: ssh, the target's emerge --pretend, its fetch
            # of our index.
            loaded = gb.load_config(str(config), gb.Runner(gb.Output(color=False, verbosity=0)))
            chosen = loaded.target("t")
            env = loaded.environment_for(chosen)
            asks = []
            for _ in range(rounds):
                started = time.monotonic()
                plan = env.remote(chosen).plan(PLAN_ATOMS)
                asks.append(time.monotonic() - started)
            packages = plan.check()
            if plan.fetch_problem() or len(packages) != 3:
                raise BenchError(f"the target's plan is not the expected one: {plan.fetch_problem()};"
                                 f" {[package.cpv for package in packages]}")
            print(f"    Remote.plan(): {', '.join(f'{value:.2f}' for value in asks)} s;"
                  f" {len(packages)} packages planned", flush=True)
            # What a user pays to see the plan: the command, planning only.
            pretend = [timed_cli(config, ["--pretend", "build", "--for-target", *PLAN_ATOMS], portage_bin, log,
                                 "--pretend build --for-target") for _ in range(rounds)]
            print(f"    --pretend build --for-target: {', '.join(f'{value:.2f}' for value in pretend)} s",
                  flush=True)
            # The real thing, once (a second run would find the binaries): split by its own lines.
            argv = [sys.executable, str(SCRIPT), "--color=n", "-c", str(config), "build", "--for-target",
                    *PLAN_ATOMS]
            lines, code, total = timed_lines(argv, cli_env(portage_bin), log)
    if code != 0:
        raise BenchError(f"build --for-target failed (exit {code}):\n"
                         + "\n".join(line for _moment, line in lines[-40:]))
    asked = first_time(lines, r"^>>> Asking t what")
    planned = first_time(lines, r"t would merge \d+ package")
    building = first_time(lines, r"^>>> Building in ")
    published = first_time(lines, r"Published .* as publication")
    if None in (asked, planned, building, published):
        raise BenchError("build --for-target did not print the lines it is timed by:\n"
                         + "\n".join(line for _moment, line in lines[-40:]))
    built = sorted(path.name for path in (binhost / "var/cache/binpkgs").rglob("*.gpkg.tar"))
    if len(built) != 3:
        raise BenchError(f"build --for-target left {built} in PKGDIR, not three packages")
    return {
        "ask": median(asks), "asks": asks, "pretend": median(pretend), "total": total,
        "planning": planned - asked, "building": published - building,
        "before": asked, "after": total - published, "between": building - planned,
    }


def report_planning(result):
    planning, building = result["planning"], result["building"]
    print("(1) coverage: build --for-target " + " ".join(PLAN_ATOMS) + " (3 packages to build; target over ssh on 127.0.0.1)")
    print(f"    planning: the target's answer and what to build  {planning:7.2f} s"
          f"   (bare ssh round trip, Remote.plan(): {result['ask']:.2f} s, median of {len(result['asks'])})")
    print(f"    building: emerge and publication                 {building:7.2f} s")
    print(f"    the rest: start-up {result['before']:.2f} s, lock and checks {result['between']:.2f} s,"
          f" final check {result['after']:.2f} s; whole command {result['total']:.2f} s")
    print(f"    building / planning: {building / planning:.1f}x; planning is {100 * planning / result['total']:.0f}%"
          f" of the command")
    print(f"    --pretend build --for-target (plans, builds nothing): {result['pretend']:.2f} s"
          f" = {100 * result['pretend'] / result['total']:.0f}% of the real command")


# ------------------------------------------------------------------------------------------------
# (2) Chroot build overhead
# ------------------------------------------------------------------------------------------------


def configure_chroot_root(root, repo):
    """The debootstrap image as a Gentoo-like binhost root, as tests/test_chroot_build.py uses it."""
    shutil.copytree(REPO, repo, symlinks=True)
    configure_gentoo_like_root(root, repo)


def pretended_commands(config, portage_bin, root):
    """The mount commands and the chroot ... emerge command `--pretend build` shows: exactly
    what the real build runs."""
    argv = [sys.executable, str(SCRIPT), "--color=n", "-c", str(config), "--pretend", "build", "--oneshot",
            CHROOT_ATOM]
    result = subprocess.run(argv, env=cli_env(portage_bin), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BenchError(f"--pretend build failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    lines = result.stdout.splitlines()
    mounts = [shlex.split(line) for line in lines if line.startswith("mount ")]
    emerge = [shlex.split(line) for line in lines if line.startswith(f"chroot {root} env -i")]
    if len(emerge) != 1 or not mounts:
        raise BenchError(f"--pretend build showed no mounts or no chroot emerge command:\n{result.stdout}")
    return mounts, emerge[0]


def run_logged(argv, log, what):
    with open(log, "ab") as handle:
        handle.write(f"\n### {' '.join(map(shlex.quote, map(str, argv)))}\n".encode())
        handle.flush()
        started = time.monotonic()
        result = subprocess.run([str(word) for word in argv], stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=900)
        elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit {result.returncode}); its output:\n"
                         + Path(log).read_text(errors="replace")[-3000:])
    return elapsed


@contextlib.contextmanager
def mounted_by_hand(mounts, log):
    """The build's own mount commands, then `umount --recursive` of each, the last first."""
    done = []
    try:
        for argv in mounts:
            point = argv[-1]
            os.makedirs(point, exist_ok=True)
            run_logged(argv, log, f"mount {point}")
            done.append(point)
        yield
    finally:
        for point in reversed(done):
            subprocess.run(["mount", "--make-rslave", point], capture_output=True)
            if subprocess.run(["umount", "--recursive", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--recursive", "--lazy", point], capture_output=True)


def bench_chroot(base, portage_bin, rounds, root_binhost):
    need_root("a chroot build (mount, chroot)")
    for program in ("chroot", "mount", "umount"):
        if not shutil.which(program):
            raise Skip(f"{program} missing")
    try:
        cache, timings = ensure_chroot_cache()
    except (pytest.skip.Exception, pytest.fail.Exception) as error:
        raise Skip(f"no chroot image: {error}") from None
    if timings:
        print(f"    built the chroot image cache {cache} ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    top = Path(tempfile.mkdtemp(prefix="gbpl-"))  # short, 0755: Portage verifies as nobody
    top.chmod(0o755)
    log = base / "chroot.log"
    try:
        root = top / "binhost"
        started = time.monotonic()
        subprocess.run(["cp", "-a", str(cache / "root") + "/.", str(root)], check=True)
        root.chmod(0o755)
        copy = time.monotonic() - started
        configure_chroot_root(root, top / "repo")
        config = top / "chroot.conf"
        config.write_text(f"[binhost]\nroot = {root}\nbuild-method = chroot\n")
        print(f"    copied the chroot image in {copy:.1f} s", flush=True)

        mounts, emerge = pretended_commands(config, portage_bin, root)
        build = ["build", "--oneshot", CHROOT_ATOM]
        warm = timed_cli(config, build, portage_bin, log, "chroot build (warm-up)")
        print(f"    warm-up chroot build: {warm:.2f} s", flush=True)
        tool, by_hand, mount_cycles = [], [], []
        for number in range(rounds):
            # Interleaved, in turn first, so that a slow spell of the machine hits both.
            order = ("tool", "hand") if number % 2 == 0 else ("hand", "tool")
            for which in order:
                if which == "tool":
                    tool.append(timed_cli(config, build, portage_bin, log, "chroot build"))
                else:
                    started = time.monotonic()
                    with mounted_by_hand(mounts, log):
                        by_hand.append(run_logged(emerge, log, "the chroot emerge by hand"))
                    mount_cycles.append(time.monotonic() - started - by_hand[-1])
            print(f"    round {number + 1}: build-method = chroot {tool[-1]:.2f} s,"
                  f" same emerge by hand {by_hand[-1]:.2f} s (mount + unmount by hand {mount_cycles[-1]:.2f} s)",
                  flush=True)
        left = mounts_under(root)
        if left:
            raise BenchError(f"mounts left in the chroot after the builds: {left}")
        packages = sorted((root / "var/cache/binpkgs").rglob("hello-*.gpkg.tar"))
        if len(packages) < 1 + 2 * rounds:
            raise BenchError(f"the chroot builds left only {[p.name for p in packages]}")

        # Context: the root method (ROOT= from this machine) on a plain configured root.
        root_config = base / "root-method.conf"
        root_config.write_text(f"[binhost]\nroot = {root_binhost}\nbuild-method = root\n")
        timed_cli(root_config, build, portage_bin, log, "root-method build (warm-up)")
        root_times = [timed_cli(root_config, build, portage_bin, log, "root-method build") for _ in range(rounds)]
        print(f"    root method: {', '.join(f'{value:.2f}' for value in root_times)} s", flush=True)
    finally:
        remove_chroot(top)
    return {"tool": tool, "hand": by_hand, "mounts": mount_cycles, "root": root_times, "copy": copy,
            "mount_count": len(mounts)}


def report_chroot(result):
    tool, hand, root_times = result["tool"], result["hand"], result["root"]
    rounds = len(tool)
    overhead = (sum(tool) - sum(hand)) / rounds
    print(f"(2) build fidelity: build --oneshot {CHROOT_ATOM}, {rounds} build(s) each, interleaved")
    print(f"    build-method = chroot (the command)          {sum(tool) / rounds:7.2f} s a build  (median {median(tool):.2f})")
    print(f"    the same chroot emerge by hand, mounts ready {sum(hand) / rounds:7.2f} s a build  (median {median(hand):.2f})")
    print(f"    build-method = root (the command, for context) {sum(root_times) / rounds:5.2f} s a build  (median {median(root_times):.2f})")
    spread = max(max(tool) - min(tool), max(hand) - min(hand))
    print(f"    overhead per build (command - by hand): {overhead:.2f} s" + (
        f" (difference of the medians {median(tool) - median(hand):.2f} s; run-to-run spread up to {spread:.2f} s"
        + (", larger than the overhead: it is lost in the noise" if spread > abs(overhead) else "") + ")"
        if rounds > 1 else " (one build each: noise of a few tenths of a second is likely)"))
    print(f"    the {result['mount_count']} mounts and their unmounts alone, by hand: {sum(result['mounts']) / rounds:.3f} s"
          f" a build; chroot method vs root method: {sum(tool) / sum(root_times):.2f}x the time")
    print(f"    goal: overhead under 1 s per build: {'MET' if overhead < 1 else 'NOT MET'} ({overhead:.2f} s)")


# ------------------------------------------------------------------------------------------------
# (3) Publishing
# ------------------------------------------------------------------------------------------------


def fake_pkgdir(pkgdir, count):
    """count small package files under category/package/ and a Portage-style Packages naming them."""
    rng = random.Random(1000)
    entries, total = [], 0
    for number in range(count):
        category = f"bench-cat{number % 20}"
        name = f"pkg{number}"
        relative = f"{category}/{name}/{name}-1.{number % 7}-1.gpkg.tar"
        size = rng.randint(4 * 1024, 64 * 1024)
        data = rng.getrandbits(8 * size).to_bytes(size, "little")
        path = pkgdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += size
        entries.append(f"BUILD_ID: 1\nBUILD_TIME: {1732500000 + number}\nCPV: {category}/{name}-1.{number % 7}\n"
                       f"DEFINED_PHASES: compile install\nEAPI: 8\nKEYWORDS: amd64\nLICENSE: MIT\n"
                       f"MD5: {hashlib.md5(data).hexdigest()}\nPATH: {relative}\nSIZE: {size}\nSLOT: 0\n"
                       f"USE: amd64 elibc_glibc kernel_linux\n\n")
    header = (f"ACCEPT_KEYWORDS: amd64\nARCH: amd64\nCBUILD: x86_64-pc-linux-gnu\nCHOST: x86_64-pc-linux-gnu\n"
              f"PACKAGES: {count}\nPROFILE: default/linux/amd64/23.0\nTIMESTAMP: 1732560000\nVERSION: 0\n\n")
    (pkgdir / "Packages").write_text(header + "".join(entries))
    return total


def tree_files(path):
    """{relative path: (size, inode)} of the regular files below path."""
    found = {}
    for directory, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            if not os.path.islink(full):
                found[os.path.relpath(full, path)] = (info.st_size, info.st_ino)
    return found


def bench_publish(base, rounds):
    root = base / "publish"
    pkgdir = root / "var/cache/binpkgs"
    pkgdir.mkdir(parents=True)
    started = time.monotonic()
    package_bytes = fake_pkgdir(pkgdir, FAKE_PACKAGES)
    print(f"    wrote {FAKE_PACKAGES} packages ({package_bytes / 1e6:.1f} MB) and Packages"
          f" ({(pkgdir / 'Packages').stat().st_size / 1e3:.0f} KB) in {time.monotonic() - started:.1f} s", flush=True)
    before = tree_files(pkgdir)

    copies = {"cp -al": [], "cp -a": []}
    for number in range(min(rounds, 3)):
        for name, option in (("cp -al", "-al"), ("cp -a", "-a")):
            snapshot = root / f"snapshot-{number}{option}"
            started = time.monotonic()
            subprocess.run(["cp", option, str(pkgdir), str(snapshot)], check=True)
            copies[name].append(time.monotonic() - started)
            shutil.rmtree(snapshot)

    output = gb.Output(color=False, verbosity=0)
    env = gb.Environment(gb.BinhostSettings({"root": str(root), "pkgdir": str(pkgdir)}, "bench"), gb.Runner(output), output)
    index = pkgdir / "Packages"
    original = index.read_text()
    times, publications = [], []
    for number in range(rounds):
        # Each publication after a build has a changed index (publish skips an unchanged one):
        # here the first package was rebuilt. Written untimed, as emerge writes it.
        index.write_text(original.replace("BUILD_TIME: 1732500000\n", f"BUILD_TIME: {1732600000 + number}\n", 1))
        started = time.monotonic()
        publications.append(env.packages.publish("bench"))
        times.append(time.monotonic() - started)
        if publications[-1] is None:
            raise BenchError("publish() published nothing for a changed index")
    # And once more with nothing changed since the last publication.
    started = time.monotonic()
    unchanged_result = env.packages.publish("bench")
    unchanged = time.monotonic() - started

    published = pkgdir / gb.PUBLISHED_DIR
    files = tree_files(published)
    names = {Path(relative).name for relative in files}
    per_publication = {}
    for relative in files:
        per_publication.setdefault(Path(relative).parts[0], []).append(Path(relative).name)
    inodes = {inode for _size, inode in before.values()}
    shared = [relative for relative, (_size, inode) in files.items() if inode in inodes]
    after = {relative: value for relative, value in tree_files(pkgdir).items()
             if not relative.startswith(gb.PUBLISHED_DIR + "/")}
    current = os.readlink(published / gb.CURRENT_PUBLICATION)
    return {
        "times": times, "copies": copies, "unchanged": unchanged, "unchanged_result": unchanged_result, "package_bytes": package_bytes,
        "published_bytes": sum(size for size, _inode in files.values()), "published_files": len(files),
        "kept": sorted(per_publication), "names": sorted(names), "shared": shared,
        "untouched": after == before, "current": current, "last": publications[-1],
        "only_index": names <= {"Packages", "Packages.gz", "meta.json"}
        and all(len(found) == 3 for found in per_publication.values()),
    }


def report_publish(result):
    best = min(result["times"])
    cp_al, cp_a = min(result["copies"]["cp -al"]), min(result["copies"]["cp -a"])
    rounds = len(result["times"])
    print(f"(3) publish: a PKGDIR of {FAKE_PACKAGES} packages ({result['package_bytes'] / 1e6:.1f} MB), best of {rounds}")
    print(f"    publish()                   {best * 1000:8.1f} ms   (runs: {', '.join(f'{t * 1000:.0f}' for t in result['times'])} ms)")
    copy_rounds = len(result["copies"]["cp -a"])
    print(f"    cp -al (hardlink snapshot)  {cp_al * 1000:8.1f} ms   {cp_al / best:6.1f}x publish's time (best of {copy_rounds})")
    print(f"    cp -a  (full copy)          {cp_a * 1000:8.1f} ms   {cp_a / best:6.1f}x publish's time"
          "  (grows with the packages' size; these are 4-64 KiB)")
    print(f"    publish() of an unchanged index {result['unchanged'] * 1000:8.1f} ms   ("
          + ("nothing published" if result["unchanged_result"] is None
             else f"published again as {result['unchanged_result']}") + ")")
    copied = not result["only_index"] or result["shared"] or not result["untouched"]
    print(f"    .published holds {result['published_files']} files, {result['published_bytes'] / 1e3:.0f} KB"
          f" ({100 * result['published_bytes'] / result['package_bytes']:.2f}% of the packages' bytes) in"
          f" {len(result['kept'])} kept publication(s) ({', '.join(result['kept'])}; current -> {result['current']}):"
          f" {', '.join(result['names'])} each")
    print(f"    goal: under 1 s for {FAKE_PACKAGES} packages: {'MET' if best < 1 else 'NOT MET'} ({best:.3f} s);"
          f" no package file copied: {'NOT MET' if copied else 'MET'}"
          + (f" (other files: {result['names']}; shared inodes: {result['shared'][:3]};"
             f" PKGDIR untouched: {result['untouched']})" if copied else ""))


# ------------------------------------------------------------------------------------------------
# (4) Slow clients
# ------------------------------------------------------------------------------------------------


def honest_get(port, source="127.0.0.2", timeout=HONEST_TIMEOUT):
    """(seconds, status, bytes of body) of one GET /Packages from source; seconds None on a timeout."""
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /Packages HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n"
                         b"Connection: close\r\n\r\n")
            data = b""
            while True:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise socket.timeout
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            return None, None, 0
        except OSError as error:
            return time.monotonic() - started, f"error {error.__class__.__name__}", 0
    elapsed = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "garbage"
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match and int(match.group(1)) != len(body):
        status += f" (short body {len(body)} of {int(match.group(1))})"
    return elapsed, status, len(body)


class Trickler:
    """count connections from source addresses, each sending one byte of a never-ending request
    line a second, until stop() or TRICKLE_LIMIT seconds."""

    REQUEST = b"GET /Packages" + b"/" * 4096

    def __init__(self, port, count, sources=("127.0.0.1",)):
        self.port, self.count, self.sources = port, count, sources
        self.sockets, self.refused = [], 0
        self.sent = {}
        self.stopping = threading.Event()
        self.thread = None
        self.started = None

    def start(self):
        self.started = time.monotonic()
        for number in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(2)
                sock.bind((self.sources[number % len(self.sources)], 0))
                sock.connect(("127.0.0.1", self.port))
                sock.setblocking(False)
            except OSError:
                self.refused += 1
                sock.close()
                continue
            self.sockets.append(sock)
            self.sent[sock] = 0
        self.thread = threading.Thread(target=self.trickle, daemon=True)
        self.thread.start()

    def alive(self):
        """Connections the server still holds open (it has not closed or reset them)."""
        count = 0
        for sock in list(self.sockets):
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    continue
                count += 1  # it answered something: still counts as held
            except BlockingIOError:
                count += 1
            except OSError:
                continue
        return count

    def trickle(self):
        while not self.stopping.is_set() and time.monotonic() - self.started < TRICKLE_LIMIT:
            for sock in self.sockets:
                position = self.sent[sock]
                if position < 0:
                    continue
                try:
                    sock.send(self.REQUEST[position:position + 1])
                    self.sent[sock] = position + 1
                except OSError:
                    self.sent[sock] = -1
            self.stopping.wait(1.0)

    def stop(self):
        self.stopping.set()
        if self.thread:
            self.thread.join(5)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []


def slow_client_load(server_name, port, rounds, sources, settle=2.0):
    """Baseline (best of rounds), then the honest client under the slow clients (best of rounds,
    one a second); everything closed after, within TRICKLE_LIMIT."""
    baseline = []
    for _ in range(rounds):
        elapsed, status, size = honest_get(port)
        if status != "200" or not size:
            raise BenchError(f"{server_name} answered {status} with {size} bytes to GET /Packages")
        baseline.append(elapsed)
    trickler = Trickler(port, SLOW_CLIENTS, sources)
    loaded = []
    try:
        trickler.start()
        time.sleep(settle)  # the server has seen every connection and its first bytes
        held = trickler.alive()
        for _ in range(rounds):
            if time.monotonic() - trickler.started > TRICKLE_LIMIT - 1:
                break
            remaining = max(1.0, min(HONEST_TIMEOUT, TRICKLE_LIMIT - (time.monotonic() - trickler.started)))
            elapsed, status, size = honest_get(port, timeout=remaining)
            loaded.append((elapsed, status))
            if elapsed is None:  # timed out: one is enough to know
                break
            time.sleep(0.5)
        held_after = trickler.alive()
    finally:
        trickler.stop()
    return {"baseline": min(baseline), "loaded": loaded, "held": held, "held_after": held_after,
            "refused": trickler.refused}


def bench_slow_clients(base, rounds, pkgdir, nginx_wanted=True):
    rows = {}
    notes = []
    config = base / "serve.conf"
    port = free_port()
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\nport = {port}\nbind = 127.0.0.1\ntimeout = 30\n")
    servers = [serve_bench.Server("serve", [sys.executable, str(SCRIPT), "-q", "-c", str(config), "serve"],
                                  port, base / "serve.out")]
    nginx = serve_bench.find_program("nginx") if nginx_wanted else None
    if nginx:
        try:
            servers.append(serve_bench.nginx_server(base, pkgdir, nginx))
        except serve_bench.BenchError as error:
            notes.append(f"nginx left out: {error}")
    else:
        notes.append("nginx is not installed: no comparison with it (apt-get install nginx-light;"
                     " `make bench` runs tests/bench/run.py first, which installs it as root)")
    spread = tuple(f"127.0.0.{10 + number}" for number in range(10))
    for server in servers:
        try:
            server.start()
        except serve_bench.BenchError as error:
            if server.name == "serve":
                raise BenchError(str(error)) from None
            notes.append(f"nginx did not start: {error}")
            continue
        try:
            print(f"    {server.name}: 300 slow connections from 127.0.0.1", flush=True)
            rows[(server.name, "one address")] = slow_client_load(server.name, server.port, rounds, ("127.0.0.1",))
            print(f"    {server.name}: 300 slow connections from 10 addresses (127.0.0.10-19)", flush=True)
            rows[(server.name, "ten addresses")] = slow_client_load(server.name, server.port, 1, spread)
        finally:
            server.stop()
    return {"rows": rows, "notes": notes}


def report_slow_clients(result):
    print(f"(4) hardening: GET /Packages from 127.0.0.2 while {SLOW_CLIENTS} connections trickle one"
          " header byte a second"
          " (times: best of the runs; 'vs alone' above 1x is slower under load)")
    print(f"    {'server':<7} {'slow clients from':<18} {'alone':>8} {'under load':>12} {'vs alone':>9}"
          f"  {'slow ones open':>19}  runs under load")
    goal = None
    for (name, where), row in result["rows"].items():
        done = [elapsed for elapsed, status in row["loaded"] if elapsed is not None and status == "200"]
        best = min(done) if done else None
        runs = ", ".join("timed out" if elapsed is None else f"{elapsed:.3f} s {status}"
                         for elapsed, status in row["loaded"])
        ratio = f"{best / row['baseline']:.1f}x" if best else "-"  # >1: slower under load
        under = f"{best:.3f} s" if best is not None else f">{HONEST_TIMEOUT:.0f} s"
        print(f"    {name:<7} {where:<18} {row['baseline']:7.3f}s {under:>12} {ratio:>9}"
              f"  {row['held']:>8} -> {row['held_after']:<8}  {runs}"
              + (f" ({row['refused']} refused)" if row["refused"] else ""))
        if (name, where) == ("serve", "one address"):
            goal = best
    for where in ("one address", "ten addresses"):
        ours, theirs = result["rows"].get(("serve", where)), result["rows"].get(("nginx", where))
        if ours and theirs:
            best = {name: min([elapsed for elapsed, status in row["loaded"] if elapsed is not None and status == "200"],
                              default=None) for name, row in (("serve", ours), ("nginx", theirs))}
            verdict = ("serve timed out" if best["serve"] is None else "nginx timed out" if best["nginx"] is None
                       else f"nginx's time / serve's: {best['nginx'] / best['serve']:.2f}x")
            print(f"    under load from {where}: {verdict}")
    for note in result["notes"]:
        print(f"    * {note}")
    print(f"    goal: serve answers under 1 s with {SLOW_CLIENTS} slow clients from one address:"
          f" {'MET' if goal is not None and goal < 1 else 'NOT MET'}"
          f" ({'timed out' if goal is None else f'{goal:.3f} s'})")
    print("    (ten addresses, 30 each: no goal; under the per-address cap, so it meets serve's limit on"
          " connections in all)")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each measurement once (twice for a best): a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (repeatable)")
    args = parser.parse_args(argv)
    parts = [part for part in PARTS if part in (args.only or PARTS)]

    def interrupted(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    portage_bin = find_portage_bin()
    if portage_bin is None:
        print("!!! Portage not found: run `make deps`", file=sys.stderr)
        return 1
    write_portage_config(Path(portage_eprefix(portage_bin / "python")))
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-pipeline-bench-"))
    base.chmod(0o755)  # Portage verifies as nobody
    rounds = 1 if args.quick else 3
    started = time.monotonic()
    results, skipped, failed = {}, {}, {}
    print(f" * Measuring {SCRIPT.name} ({serve_bench.script_version()}); {os.cpu_count()} cores;"
          f" {'quick' if args.quick else 'full'} run", flush=True)
    try:
        root_binhost = base / "root-binhost"
        write_portage_config(root_binhost)
        publish_pkgdir = None
        steps = [
            ("plan", "(1) planning vs building", lambda: bench_planning(base, portage_bin, rounds)),
            ("chroot", "(2) chroot build overhead", lambda: bench_chroot(base, portage_bin, 1 if args.quick else 5,
                                                                         root_binhost)),
            ("publish", "(3) publishing 1,000 packages", lambda: bench_publish(base, 2 if args.quick else 5)),
            ("slow", "(4) slow clients", lambda: bench_slow_clients(
                base, 2 if args.quick else 3, publish_pkgdir or make_slow_pkgdir(base))),
        ]
        for key, title, function in steps:
            if key not in parts:
                continue
            print(f">>> {title}", flush=True)
            step_started = time.monotonic()
            try:
                results[key] = function()
            except Skip as reason:
                skipped[key] = str(reason)
                print(f" * skipped: {reason}", flush=True)
            except BenchError as error:
                failed[key] = str(error)
                print(f"!!! {error}", flush=True)
            print(f" * {title}: {time.monotonic() - step_started:.0f} s", flush=True)
            if key == "publish" and key in results:
                publish_pkgdir = base / "publish/var/cache/binpkgs"
    except KeyboardInterrupt:
        print("!!! Interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f" * Kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"Pipeline results ({'quick: ' if args.quick else ''}127.0.0.1, {os.cpu_count()} cores,"
          f" {time.monotonic() - started:.0f} s in all)")
    reports = {"plan": report_planning, "chroot": report_chroot, "publish": report_publish,
               "slow": report_slow_clients}
    for key in parts:
        if key in results:
            reports[key](results[key])
        elif key in skipped:
            print(f"({PARTS.index(key) + 1}) skipped: {skipped[key]}")
        else:
            print(f"({PARTS.index(key) + 1}) FAILED: {failed[key].splitlines()[0]}")
    return 1 if failed else 0


def make_slow_pkgdir(base):
    """A PKGDIR for (4) when (3) did not run: its fake packages, published once."""
    root = base / "slow"
    pkgdir = root / "var/cache/binpkgs"
    pkgdir.mkdir(parents=True)
    fake_pkgdir(pkgdir, FAKE_PACKAGES)
    output = gb.Output(color=False, verbosity=0)
    gb.Environment(gb.BinhostSettings({"root": str(root), "pkgdir": str(pkgdir)}, "bench"), gb.Runner(output),
                   output).packages.publish("bench")
    return pkgdir


if __name__ == "__main__":
    sys.exit(main())
