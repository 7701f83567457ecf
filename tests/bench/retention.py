"""`make bench`, retention: disk stays bounded over months of nightly updates.

Simulates nightly cycles through the real components (Portage from the venv, a real sshd on
127.0.0.1, `serve` as a process), as tests/test_rollback_holds.py drives `update`:

  cycle 0   a binhost (signing key, publish-keep = 5 by default) and one target whose world is
            app-misc/hello-app (compiled once: it never changes) and four tiny packages (nothing
            compiled; each installs 64 KiB of random data, so each build is a ~64 KiB file);
            `update --no-sync` builds them all, the target runs `install -uDN @world`;
  cycle k   the ebuild repository copy gets a new version of one tiny package (two every third
            cycle; the packages in rotation; the repository keeps the two newest ebuilds of each),
            then `update --no-sync` (plan, build, gate, sign, publish, clean) and
            `install -uDN @world` on the target.

After each cycle: the package files in PKGDIR (*.gpkg.tar, *.tbz2, *.xpak outside .published) and
their bytes, the kept publications (PKGDIR/.published/<digits>), and the binhost root's bytes
without PKGDIR (du -sb). The bound a cycle is held to is clean's rule: keep (2) builds of each CPV
installed in the binhost root or recorded on the target, plus what kept publications name; files
outside that rule are counted as strays.

The verdict compares the last third of the cycles with the first third (cycle 0, the initial
build, left out). It is a measurement: whatever the numbers say it exits 0; it exits 1 only when
it cannot run (a command fails), 0 with a note when a prerequisite (root, sshd) is missing.
Cycles: `--cycles N`, else $RETENTION_CYCLES, else 12. `--keep` keeps the temporary directory.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(BENCH))

from conftest import (REPO, World, eroot, find_portage_bin, portage_eprefix, start_sshd,  # noqa: E402
                      write_portage_config)
from pipeline import BenchError, gb, timed_cli  # noqa: E402  (the script as a module; logged CLI runs)
from test_publish import Binhost, add_ebuild, copy_repo  # noqa: E402
from test_rollback_holds import set_world  # noqa: E402
import run as serve_bench  # noqa: E402  (script_version)

DEFAULT_CYCLES = 12
ROTATION = ["app-misc/nightly-a", "app-misc/nightly-b", "app-misc/nightly-c", "app-misc/nightly-d"]
STABLE = ["app-misc/hello-app"]  # and app-misc/hello, its dependency: compiled once
EBUILDS_KEPT = 2  # ebuilds of each package the repository keeps, as the Gentoo tree drops old ones
PACKAGE_SUFFIXES = (".gpkg.tar", ".tbz2", ".xpak")

NIGHTLY = """EAPI=8
DESCRIPTION="Gets a new version most nights (retention bench)"
HOMEPAGE="https://example.invalid/{name}"
S="${{WORKDIR}}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"

src_install() {{
	insinto /usr/share/{name}
	newins - version <<<"${{PV}}"
	head -c 65536 /dev/urandom > "${{T}}/payload" || die
	doins "${{T}}/payload"
}}
"""


def cpv_split(cpv):
    """("app-misc/nightly-a", "1.3") of "app-misc/nightly-a-1.3"."""
    match = re.fullmatch(r"(.+?)-(\d[^-]*(?:-r\d+)?)", cpv)
    return match.group(1), match.group(2)


class Nightly:
    """The repository copy and the version of each package in rotation."""

    def __init__(self, repo):
        self.repo = repo
        self.versions = {package: 0 for package in ROTATION}
        for package in ROTATION:
            self.bump(package)

    def bump(self, package):
        self.versions[package] += 1
        version = f"1.{self.versions[package]}"
        add_ebuild(self.repo, f"{package}-{version}", NIGHTLY.format(name=package.split("/")[1]))
        directory = self.repo / package
        ebuilds = sorted(directory.glob("*.ebuild"), key=lambda path: int(path.stem.rsplit(".", 1)[1]))
        for old in ebuilds[:-EBUILDS_KEPT]:
            old.unlink()
        return f"{package.split('/')[1]}-{version}"

    def night(self, cycle):
        """The packages that get a new version in cycle (1, 2, ...): one, two every third night."""
        chosen = [ROTATION[(cycle - 1) % len(ROTATION)]]
        if cycle % 3 == 0:
            chosen.append(ROTATION[(cycle + 1) % len(ROTATION)])
        return [self.bump(package) for package in chosen]


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


def package_files(pkgdir):
    """{path relative to PKGDIR: bytes} of the package files (the publications' copies of the
    index are not package files)."""
    found = {}
    for directory, dirs, files in os.walk(pkgdir):
        if directory == str(pkgdir):
            dirs[:] = [name for name in dirs if name != gb.PUBLISHED_DIR]
        for name in files:
            if name.endswith(PACKAGE_SUFFIXES):
                path = os.path.join(directory, name)
                found[os.path.relpath(path, pkgdir)] = os.lstat(path).st_size
    return found


def du_bytes(path, exclude=None):
    """du -sb of path (hard links once), without the tree at exclude."""
    argv = ["du", "-sb"] + ([f"--exclude={exclude}"] if exclude else []) + [str(path)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return int(result.stdout.split()[0])


def installed_cpvs(root, eprefix):
    vdb = eroot(root, eprefix) / "var/db/pkg"
    if not vdb.is_dir():
        return set()
    return {f"{category.name}/{entry.name}" for category in vdb.iterdir() if category.is_dir()
            for entry in category.iterdir() if not entry.name.startswith((".", "-MERGING-"))}


def build_of(relative):
    """(CPV, build id) of a package file's path relative to PKGDIR (category/pn/pf-id.gpkg.tar)."""
    parts = Path(relative).parts
    name = parts[-1]
    for suffix in PACKAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    pf, _, build = name.rpartition("-")
    if not build.isdigit():  # a file without binpkg-multi-instance: pf.tbz2
        pf, build = name, "0"
    return f"{parts[0]}/{pf}", int(build)


def measure(binhost, eprefix):
    pkgdir = binhost.pkgdir
    files = package_files(pkgdir)
    output = gb.Output(color=False, verbosity=0)
    store = gb.Environment(gb.BinhostSettings({"pkgdir": str(pkgdir)}, "bench"), gb.Runner(output), output).packages
    kept = store.publication_ids()
    named = store.published_paths()
    protected = installed_cpvs(binhost.root, eprefix) | store.targets_installed()
    # clean's rule: the newest DEFAULT_KEEP builds of each protected CPV, and what kept
    # publications name. A file that is neither should have gone.
    builds = {}
    for relative in files:
        cpv, build = build_of(relative)
        builds.setdefault(cpv, []).append((build, relative))
    allowed = set(named)
    for cpv, found in builds.items():
        if cpv in protected:
            allowed.update(relative for _build, relative in sorted(found, reverse=True)[:gb.DEFAULT_KEEP])
    strays = sorted(set(files) - allowed)
    retired = store.retired_packages()
    return {
        "files": len(files), "bytes": sum(files.values()), "kept": len(kept),
        "bound": gb.DEFAULT_KEEP * len(protected) + len(named), "protected": len(protected),
        "named": len(named), "strays": strays, "retired": len(retired),
        "unlisted": [path for path in strays if path not in retired],  # strays clean forgot entirely
        "root": du_bytes(binhost.root, exclude=pkgdir.resolve()),
        "published": du_bytes(pkgdir / gb.PUBLISHED_DIR) if (pkgdir / gb.PUBLISHED_DIR).is_dir() else 0,
    }


# ------------------------------------------------------------------------------------------------
# The cycles
# ------------------------------------------------------------------------------------------------

HEADER = (f"{'cycle':>5}  {'new versions':<30} {'update':>7} {'install':>7}  {'files':>5} {'bound':>5} {'stray':>5}"
          f" {'PKGDIR KiB':>10} {'pubs':>4} {'.published KiB':>14} {'root KiB (no PKGDIR)':>20}")


def row_text(row):
    return (f"{row['cycle']:>5}  {', '.join(row['new']) or '-':<30} {row['update']:6.1f}s {row['install']:6.1f}s"
            f"  {row['files']:>5} {row['bound']:>5} {len(row['strays']):>5} {row['bytes'] / 1024:>10.0f} {row['kept']:>4}"
            f" {row['published'] / 1024:>14.0f} {row['root'] / 1024:>20.0f}")


def one_cycle(cycle, new, binhost, config, portage_bin, log, eprefix):
    update = timed_cli(config, ["update", "--no-sync"], portage_bin, log, f"cycle {cycle}: update --no-sync")
    install = timed_cli(config, ["install", "-uDN", "@world"], portage_bin, log,
                        f"cycle {cycle}: install -uDN @world")
    row = dict(measure(binhost, eprefix), cycle=cycle, new=new, update=update, install=install)
    print(row_text(row), flush=True)
    return row


def run_cycles(base, portage_bin, eprefix, cycles):
    if os.geteuid() != 0:
        raise SkipBench("the target is reached through an sshd for root logins: run as root")
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh"):
        raise SkipBench("sshd or ssh missing (apt-get install openssh-server)")
    log = base / "retention.log"
    with start_sshd(base / "sshd") as sshd:
        world = World(base, portage_bin, eprefix, sshd)
        repo = copy_repo(base)
        nightly = Nightly(repo)
        binhost = Binhost(world, "retention", repo=repo)
        timed_cli(binhost.config, ["keygen"], portage_bin, log, "keygen")
        root, config = binhost.new_target("nightly")
        set_world(world, root, *STABLE, *ROTATION)
        loaded = gb.load_config(str(config), gb.Runner(gb.Output(color=False, verbosity=0)))
        env = loaded.environment_for(loaded.target("nightly"))
        print(f" * binhost root {binhost.root}; publish-keep = {env.publish_keep}, clean keeps"
              f" {gb.DEFAULT_KEEP} builds of each installed CPV; target world: {' '.join(STABLE + ROTATION)}",
              flush=True)
        print(f" * log of every command: {log}", flush=True)
        rows = []
        with binhost.serving():
            timed_cli(config, ["setup-target"], portage_bin, log, "setup-target")
            print(HEADER, flush=True)
            print("-" * len(HEADER), flush=True)
            rows.append(one_cycle(0, ["(all: first build)"], binhost, config, portage_bin, log, eprefix))
            for cycle in range(1, cycles + 1):
                new = nightly.night(cycle)
                rows.append(one_cycle(cycle, new, binhost, config, portage_bin, log, eprefix))
        return rows, env.publish_keep


class SkipBench(Exception):
    """A prerequisite is missing: nothing is measured."""


# ------------------------------------------------------------------------------------------------
# Verdict
# ------------------------------------------------------------------------------------------------


def mean(values):
    return sum(values) / len(values)


def slope(rows, key):
    """Least-squares growth per cycle of rows[key]."""
    if len(rows) < 2:
        return 0.0
    xs = [row["cycle"] for row in rows]
    ys = [row[key] for row in rows]
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def verdict(rows, publish_keep):
    nightly = [row for row in rows if row["cycle"] > 0]
    third = len(nightly) // 3
    over = [row["cycle"] for row in rows if row["files"] > row["bound"]]
    # A stray in one measurement only is clean's lag: it reads what kept publications name before
    # it prunes the oldest, so a file named only by the publication pruned in that run stays (in
    # the retired list) until the next clean. A stray in two measurements in a row is a leak.
    leaked = sorted({path for before, after in zip(rows, rows[1:]) for path in set(before["strays"]) & set(after["strays"])})
    late = sorted({path for row in rows[:-1] for path in row["strays"]} - set(leaked))
    pending = sorted(set(rows[-1]["strays"]) - set(leaked))
    unlisted = sorted({path for row in rows for path in row["unlisted"]})
    print()
    print("Per cycle: files = package files in PKGDIR; bound = keep (2) x CPVs installed in the binhost root"
          " or recorded on the target + files kept publications name; stray = files neither among the newest"
          f" {gb.DEFAULT_KEEP} builds of such a CPV nor named by a kept publication; pubs = kept publications;"
          " sizes are apparent bytes (du -b).")
    if late:
        print(f" * {len(late)} file(s) were strays after one cycle and gone after the next"
              f"{'' if unlisted else ' (each in the retired list meanwhile)'}: clean reads what kept"
              " publications name before it prunes the oldest, so a file named only by the publication"
              " pruned in that run goes one night late")
    if pending:
        print(f" * {len(pending)} stray file(s) after the last cycle: the next clean would tell whether they go")
    if leaked:
        print(f"!!! {len(leaked)} stray file(s) survived two cleans in a row (a leak): {', '.join(leaked[:8])}"
              f"{' ...' if len(leaked) > 8 else ''}")
    if unlisted:
        print(f"!!! {len(unlisted)} stray file(s) not in the retired list: no clean will remove them:"
              f" {', '.join(unlisted[:8])}{' ...' if len(unlisted) > 8 else ''}")
    if over:
        print(f"!!! more package files than the bound after cycle(s) {', '.join(map(str, over))}")
    if third < 2:
        print(f"Verdict: not enough cycles for a verdict ({len(nightly)}; use 6 or more)")
        return
    first, last = nightly[:third], nightly[-third:]
    first_bytes, last_bytes = mean([row["bytes"] for row in first]), mean([row["bytes"] for row in last])
    first_files, last_files = mean([row["files"] for row in first]), mean([row["files"] for row in last])
    growth_first, growth_last = slope(first, "bytes"), slope(last, "bytes")
    files_first, files_last = slope(first, "files"), slope(last, "files")
    root_growth = round(slope(last, "root") / 1024) + 0  # + 0: no "-0"
    # Linear: the last third still grows about as fast as the first did (and by half a file or
    # more a cycle). Bounded: it levels off, within clean's bound, nothing leaked.
    linear = files_last >= 0.5 and files_last >= 0.75 * max(files_first, 0.0)
    summary = (f"PKGDIR last third (cycles {last[0]['cycle']}-{last[-1]['cycle']}) {last_files:.1f} files,"
               f" {last_bytes / 1024:.0f} KiB on average vs first third (cycles {first[0]['cycle']}-"
               f"{first[-1]['cycle']}) {first_files:.1f} files, {first_bytes / 1024:.0f} KiB"
               f" ({100 * (last_bytes - first_bytes) / first_bytes:+.0f}%); growth per cycle"
               f" {files_first:+.2f} files / {growth_first / 1024:+.0f} KiB, then {files_last:+.2f} files /"
               f" {growth_last / 1024:+.0f} KiB; binhost root without PKGDIR {root_growth:+d} KiB a cycle in"
               f" the last third; within the bound in {len(rows) - len(over)} of {len(rows)} cycles;"
               f" {len(leaked)} leaked file(s)")
    if linear:
        print(f"Verdict: NOT BOUNDED, PKGDIR KEPT GROWING LINEARLY: {summary}")
    elif over or leaked or unlisted:
        print(f"Verdict: LEVELS OFF, BUT NOT WITHIN CLEAN'S RULE: {summary}")
    else:
        print(f"Verdict: BOUNDED (levels off; publish-keep = {publish_keep}): {summary}")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def cycles_default():
    value = os.environ.get("RETENTION_CYCLES", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_CYCLES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=cycles_default(),
                        help=f"nightly cycles after the first build (default $RETENTION_CYCLES or {DEFAULT_CYCLES})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (roots, log)")
    parser.add_argument("cycles_positional", nargs="?", type=int, metavar="CYCLES", help="same as --cycles")
    args = parser.parse_args(argv)
    cycles = args.cycles_positional or args.cycles
    if cycles < 1:
        parser.error("use 1 or more cycles")

    def interrupted(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    portage_bin = find_portage_bin()
    if portage_bin is None:
        print("!!! Portage not found: run `make deps`", file=sys.stderr)
        return 1
    eprefix = portage_eprefix(portage_bin / "python")
    write_portage_config(Path(eprefix), repo=REPO)  # the host's own config, as the host_portage fixture
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-retention-bench-"))
    base.chmod(0o755)  # Portage verifies signatures as nobody
    started = time.monotonic()
    print(f" * Measuring {gb.__file__ and Path(gb.__file__).name} ({serve_bench.script_version()});"
          f" {os.cpu_count()} cores; {cycles} nightly cycles", flush=True)
    try:
        rows, publish_keep = run_cycles(base, portage_bin, eprefix, cycles)
    except SkipBench as reason:
        print(f" * skipped: {reason}")
        return 0
    except BenchError as error:
        print(f"!!! {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("!!! Interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f" * Kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    verdict(rows, publish_keep)
    print(f" * {len(rows)} cycles (the first build and {cycles} nights) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
