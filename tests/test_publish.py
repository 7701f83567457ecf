"""Publications: targets only ever see complete builds.

Every successful build (and sign, clean, rollback) publishes PKGDIR's index as
PKGDIR/.published/<ID>/ and switches PKGDIR/.published/current to it; `serve` answers /Packages and
/Packages.gz from there. Real components throughout: Portage 3.0.83 from PyPI builds into fresh
binhost roots (each its own PKGDIR and port, under a mkdtemp directory made 0755: Portage verifies
signatures as `nobody`), our `serve` serves them, targets reached through the session's real sshd
install with their real `emerge --getbinpkgonly`. No timing thresholds: every wait is bounded and
says what it waited for.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (REPO, SCRIPT, World, binhost_serving, eroot, free_port, run, stop_process,
                      write_portage_config)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pworld(portage_bin, eprefix, host_portage, sshd):
    """A World (conftest) of this module's own, without the session world's builds: only its
    helpers (cli, new_target through the session's sshd) are used."""
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-publish-"))
    base.chmod(0o755)  # Portage verifies signatures as nobody
    try:
        yield World(base, portage_bin, eprefix, sshd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Binhost:
    """A fresh binhost root (own PKGDIR, own port, own gpg home) building from ``repo``."""

    def __init__(self, world, name, repo=REPO, extra=""):
        self.world = world
        self.base = Path(tempfile.mkdtemp(prefix=name + "-", dir=world.base))
        self.base.chmod(0o755)
        self.repo = repo
        self.root = self.base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.port = free_port()
        self.config = self.base / "binhost.conf"
        write_portage_config(self.root, repo=repo, extra_make_conf='USE="loud"\n')
        # gpg-home short: gpg-agent's socket path in it is limited to 107 bytes.
        self.config.write_text(f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\n"
                               f"bind = 127.0.0.1\nport = {self.port}\ngpg-home = {self.base}/g\n" + extra)

    def cli(self, *args, config=None, **options):
        return self.world.cli(*args, config=config or self.config, **options)

    def new_target(self, name):
        """A target ROOT (own PKGDIR) with this binhost's repository, and a config file with this
        binhost's [binhost] section and the target."""
        root, config = self.world.new_target(name, signing_config=self.config)
        write_portage_config(root, repo=self.repo, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{root}/etc/portage/gnupg"\n'))
        return root, config

    def serving(self):
        return binhost_serving(self.config, self.port)

    def fetch(self, name="Packages"):
        """GET /name from our running serve (no proxy), as bytes."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}/{name}", timeout=60) as response:
            return response.read()

    def history(self):
        return json.loads(self.cli("history", "--json").stdout)

    def current(self):
        link = self.pkgdir / ".published/current"
        return int(os.readlink(link)) if link.is_symlink() else None

    def packages(self, pattern="*.gpkg.tar"):
        return sorted(self.pkgdir.rglob(pattern))


def entries(index):
    """The package entries of an index (text or bytes) as dicts."""
    if isinstance(index, bytes):
        index = index.decode()
    blocks = index.split("\n\n")[1:]
    return [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            for block in blocks if block.strip()]


def header_timestamp(index):
    if isinstance(index, bytes):
        index = index.decode()
    match = re.search(r"^TIMESTAMP: *(\d+)$", index.split("\n\n", 1)[0], re.MULTILINE)
    assert match, f"no TIMESTAMP in the index header:\n{index[:500]}"
    return int(match.group(1))


def builds(index, cpv):
    """The BUILD_IDs an index names for cpv, sorted."""
    return sorted(int(entry.get("BUILD_ID", "0")) for entry in entries(index) if entry.get("CPV") == cpv)


def cpvs(index):
    return sorted({entry["CPV"] for entry in entries(index)})


def installed_build_id(world, root, cpv):
    path = world.installed(root, f"var/db/pkg/{cpv}/BUILD_ID")
    assert path.is_file(), f"{cpv} is not installed (from a binary package) in {root}"
    return int(path.read_text().strip())


def installed_versions(world, root, package="app-misc/hello"):
    category, name = package.split("/")
    directory = world.installed(root, f"var/db/pkg/{category}")
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if re.fullmatch(re.escape(name) + r"-\d.*", p.name))


def cached_index(world, root):
    """The index the target fetched last (Portage caches it by host name, without the port)."""
    return eroot(root, world.eprefix) / "var/cache/edb/binhost/127.0.0.1/Packages"


def tool_env(world):
    return dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")


HELD_EBUILD = """EAPI=8
DESCRIPTION="Waits in src_compile while a hold file exists (publication tests)"
HOMEPAGE="https://example.invalid/slow"
S="${{WORKDIR}}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
RDEPEND="{rdepend}"

src_compile() {{
	touch {marker} || die
	local waited=0
	# Bounded: never more than 10 minutes, whatever happens to the test.
	while [ -e {hold} ] && [ ${{waited}} -lt 6000 ]; do sleep 0.1; waited=$((waited + 1)); done
}}

src_install() {{
	insinto /usr/share/slow
	newins - done <<<"${{PVR}}"
}}
"""

BROKEN_EBUILD = """EAPI=8
DESCRIPTION="Dies in src_compile (publication tests)"
HOMEPAGE="https://example.invalid/broken"
S="${{WORKDIR}}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
RDEPEND="{rdepend}"

src_compile() {{
	die "this package does not build (on purpose)"
}}

src_install() {{
	insinto /usr/share/broken
	newins - never <<<"${{PVR}}"
}}
"""


def copy_repo(base, drop=()):
    """A copy of tests/repo under base (its ebuilds can then change), without the files in drop."""
    repo = Path(base) / "repo"
    shutil.copytree(REPO, repo)
    for relative in drop:
        (repo / relative).unlink()
    return repo


def add_ebuild(repo, cpv, text):
    category, rest = cpv.split("/")
    name = re.sub(r"-\d.*$", "", rest)
    directory = repo / category / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{rest}.ebuild").write_text(text)


def wait_until(condition, what, process=None, log=None, timeout=300):
    """Poll condition() until true; fail (saying what) when process ends first or after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the build ended before {what}:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}\n{log.read_text() if log else ''}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------
# 1. A target installing during a slow build gets the old publication, complete
# ------------------------------------------------------------------------------------------------

def test_install_during_a_build_gets_the_old_publication(pworld):
    world = pworld
    base = Path(tempfile.mkdtemp(prefix="during-", dir=world.base))
    repo = copy_repo(base)
    binhost = Binhost(world, "during", repo=repo)
    binhost.cli("keygen")
    root, config = binhost.new_target("pub-during")
    with binhost.serving():
        binhost.cli("build", "app-misc/hello-app")
        assert binhost.current() == 1
        binhost.cli("setup-target", config=config)
        before = binhost.fetch("Packages")
        before_gz = binhost.fetch("Packages.gz")
        assert cpvs(before) == ["app-misc/hello-1.1", "app-misc/hello-app-1.0"]

        # The next build: a revision of hello (rebuilt first: slow needs it), then slow, which waits.
        hello = (repo / "app-misc/hello/hello-1.1.ebuild").read_text()
        add_ebuild(repo, "app-misc/hello-1.1-r1", hello)
        hold, marker = base / "hold", base / "slow.started"
        add_ebuild(repo, "app-misc/slow-1.0", HELD_EBUILD.format(
            rdepend=">=app-misc/hello-1.1-r1", marker=marker, hold=hold))
        hold.touch()
        log = base / "build.log"
        with open(log, "w") as log_file:
            build = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(binhost.config), "build",
                                      "--oneshot", "app-misc/hello", "app-misc/slow"], env=tool_env(world),
                                     stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_until(marker.exists, "app-misc/slow's compile started", build, log)
            working = binhost.pkgdir / "Packages"
            assert "app-misc/hello-1.1-r1" in cpvs(working.read_text()), \
                "the scenario needs Portage to have rewritten PKGDIR/Packages for hello-1.1-r1 by now"

            # Mid-build: targets are served the old publication, byte for byte, complete.
            during = binhost.fetch("Packages")
            assert during == before
            assert binhost.fetch("Packages.gz") == before_gz
            for entry in entries(during):
                assert (binhost.pkgdir / entry["PATH"]).is_file(), f"the served index names {entry['PATH']}"
            assert binhost.current() == 1

            # The target gets the old publication's hello-1.1; its tree wants -r1, not published
            # yet, and install says so instead of claiming success.
            install = binhost.cli("install", "app-misc/hello", config=config, check=False)
            assert installed_versions(world, root) == ["hello-1.1"]
            assert install.returncode == 1, install.stdout + install.stderr
            assert "lacks what it asked for: app-misc/hello-1.1-r1: not on the binhost yet" in install.stderr
            assert build.poll() is None, "the build must still be waiting: the install ran mid-build"
        finally:
            hold.unlink(missing_ok=True)
            try:
                build.wait(timeout=300)
            except subprocess.TimeoutExpired:
                stop_process(build)
                pytest.fail("the build did not finish within 300 s of the hold's release")
        assert build.returncode == 0, log.read_text()

        # The finished build is a new publication, and the target now gets the new set.
        assert binhost.current() == 2
        after = binhost.fetch("Packages")
        assert "app-misc/hello-1.1-r1" in cpvs(after) and "app-misc/slow-1.0" in cpvs(after)
        assert header_timestamp(after) > header_timestamp(before)
        for entry in entries(after):
            assert (binhost.pkgdir / entry["PATH"]).is_file(), f"the served index names {entry['PATH']}"
        binhost.cli("install", "--update", "app-misc/hello", config=config)
    assert installed_versions(world, root) == ["hello-1.1-r1"]
    assert header_timestamp(cached_index(world, root).read_text()) == header_timestamp(after)


# ------------------------------------------------------------------------------------------------
# 2. A failed build publishes nothing
# ------------------------------------------------------------------------------------------------

def test_a_failed_build_publishes_nothing(pworld):
    world = pworld
    base = Path(tempfile.mkdtemp(prefix="failed-", dir=world.base))
    repo = copy_repo(base)
    # broken needs hello-app, so emerge builds (and indexes) hello-app before broken dies.
    add_ebuild(repo, "app-misc/broken-1.0", BROKEN_EBUILD.format(rdepend="app-misc/hello-app"))
    binhost = Binhost(world, "failed", repo=repo)
    with binhost.serving():
        binhost.cli("build", "app-misc/hello")
        history = binhost.history()
        assert [entry["id"] for entry in history] == [1]
        before, before_gz = binhost.fetch("Packages"), binhost.fetch("Packages.gz")

        failed = binhost.cli("build", "--oneshot", "app-misc/hello-app", "app-misc/broken", check=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        working = (binhost.pkgdir / "Packages").read_text()
        assert "app-misc/hello-app-1.0" in cpvs(working), \
            "the scenario needs Portage to have indexed hello-app in PKGDIR/Packages before broken died"
        assert not binhost.packages("broken-*")

        assert binhost.fetch("Packages") == before
        assert binhost.fetch("Packages.gz") == before_gz
    assert binhost.history() == history
    assert binhost.current() == 1
    assert sorted(p.name for p in (binhost.pkgdir / ".published").iterdir()) == ["1", "current"]
    assert "nothing was published" in failed.stderr


# ------------------------------------------------------------------------------------------------
# 3. rollback serves the earlier set, as a new publication
# ------------------------------------------------------------------------------------------------

def test_rollback_serves_the_earlier_build(pworld):
    world = pworld
    binhost = Binhost(world, "rollback")
    binhost.cli("keygen")
    root, config = binhost.new_target("pub-rollback")
    cpv = "app-misc/hello-1.1"
    with binhost.serving():
        binhost.cli("build", "--oneshot", "app-misc/hello")
        first = binhost.fetch("Packages")
        assert builds(first, cpv) == [1]
        binhost.cli("setup-target", config=config)
        binhost.cli("build", "--oneshot", "app-misc/hello")
        second = binhost.fetch("Packages")
        assert max(builds(second, cpv)) == 2
        binhost.cli("install", "app-misc/hello", config=config)
        assert installed_build_id(world, root, cpv) == 2
        cached_before = header_timestamp(cached_index(world, root).read_text())
        assert cached_before == header_timestamp(second)

        binhost.cli("rollback")
        assert binhost.current() == 3
        third = binhost.fetch("Packages")
        assert builds(third, cpv) == [1]
        # The same set as publication 1, dated after publication 2.
        strip = ("TIMESTAMP",)
        assert ([{k: v for k, v in e.items() if k not in strip} for e in entries(third)]
                == [{k: v for k, v in e.items() if k not in strip} for e in entries(first)])
        assert header_timestamp(third) > header_timestamp(second)

        binhost.cli("install", "app-misc/hello", config=config)
    assert installed_build_id(world, root, cpv) == 1
    cached_after = header_timestamp(cached_index(world, root).read_text())
    assert cached_after == header_timestamp(third) > cached_before

    history = binhost.history()
    assert [entry["id"] for entry in history] == [3, 2, 1]
    assert [entry["current"] for entry in history] == [True, False, False]
    changes = {entry["id"]: (entry["added"], entry["updated"], entry["removed"]) for entry in history}
    assert changes[1] == ([cpv], [], [])
    assert changes[2] == ([], [cpv], []), "publication 2 has a new build of hello-1.1"
    assert changes[3] == ([], [cpv], []), "the rollback takes hello-1.1 back to build 1"


# ------------------------------------------------------------------------------------------------
# 4. clean keeps what a kept publication serves, and only that long
# ------------------------------------------------------------------------------------------------

def test_clean_keeps_files_of_kept_publications(pworld):
    world = pworld
    binhost = Binhost(world, "clean", extra="publish-keep = 2\n")
    binhost.cli("build", "--oneshot", "app-misc/hello")
    binhost.cli("build", "--oneshot", "app-misc/hello")
    files = binhost.packages("hello-1.1-*.gpkg.tar")
    assert [p.name for p in files] == ["hello-1.1-1.gpkg.tar", "hello-1.1-2.gpkg.tar"]
    build1, build2 = files
    published = binhost.pkgdir / ".published"
    assert builds((published / "1/Packages").read_text(), "app-misc/hello-1.1") == [1]

    # Publication 1 (kept) serves build 1: a target with that index may still fetch it. clean
    # retires build 1 (publication 3 leaves it out) but keeps its file.
    cleaned = binhost.cli("clean", "--keep", "1")
    assert build1.is_file(), "clean deleted a file the kept publication 1 serves:\n" + cleaned.stdout
    assert build2.is_file()
    assert builds((published / "current/Packages").read_text(), "app-misc/hello-1.1") == [2]

    binhost.cli("build", "--oneshot", "app-misc/hello")
    assert [entry["id"] for entry in binhost.history()] == [4, 3], "publish-keep = 2 keeps two"
    assert 1 not in builds((published / "current/Packages").read_text(), "app-misc/hello-1.1"), \
        "a retired build is never published again"
    build3 = binhost.pkgdir / "app-misc/hello/hello-1.1-3.gpkg.tar"
    assert build3.is_file()

    # Publication 1 is gone: no kept publication serves build 1 any more (3 serves build 2, 4
    # build 3), so clean --keep 1 deletes it.
    cleaned = binhost.cli("clean", "--keep", "1")
    assert not build1.exists(), ("build 1 is served by no kept publication, yet clean --keep 1 kept it:\n"
                                 + cleaned.stdout + cleaned.stderr)
    assert build2.is_file(), "publication 2 (kept) serves build 2"
    assert build3.is_file()
    current = (published / "current/Packages").read_text()
    for entry in entries(current):
        assert (binhost.pkgdir / entry["PATH"]).is_file(), f"the current publication names {entry['PATH']}"


# ------------------------------------------------------------------------------------------------
# 5. update: every target's world built, published, summarised
# ------------------------------------------------------------------------------------------------

def summary_line(result, root):
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(root))]
    assert len(lines) == 1, f"one summary line for {root} expected:\n{result.stdout}\n{result.stderr}"
    return lines[0]


def test_update_builds_publishes_and_reports(pworld):
    world = pworld
    base = Path(tempfile.mkdtemp(prefix="update-", dir=world.base))
    repo = copy_repo(base, drop=["app-misc/hello/hello-1.1.ebuild"])
    binhost = Binhost(world, "update", repo=repo)
    binhost.cli("keygen")
    targets = [binhost.new_target(name) for name in ("pub-update-a", "pub-update-b")]
    both = binhost.base / "both.conf"
    both.write_text(targets[0][1].read_text() + "\n"
                    + "[target" + targets[1][1].read_text().split("[target", 1)[1])
    with binhost.serving():
        binhost.cli("build", "app-misc/hello-app")
        for root, config in targets:
            binhost.cli("setup-target", config=config)
            binhost.cli("install", "app-misc/hello-app", config=config)
            assert installed_versions(world, root) == ["hello-1.0"]
        before = binhost.current()

        # The repository snapshot moves on: hello 1.2.
        add_ebuild(repo, "app-misc/hello-1.2", (repo / "app-misc/hello/hello-1.0.ebuild").read_text())
        updated = binhost.cli("update", "--no-sync", config=both, check=False)
        assert updated.returncode == 0, updated.stdout + updated.stderr
        line = summary_line(updated, binhost.root)
        match = re.search(r"\bok: publication (\d+)\b", line)
        assert match, line
        assert int(match.group(1)) == binhost.current() > before
        assert "app-misc/hello-1.2" in cpvs(binhost.fetch("Packages"))
        for root, config in targets:
            binhost.cli("install", "-uDN", "@world", config=config)
            assert installed_versions(world, root) == ["hello-1.2"]
            assert world.installed(root, "usr/share/hello/version").read_text() == "1.2\n"

        # A new version that does not build: nothing is published, the summary says what failed.
        published = binhost.current()
        history = binhost.history()
        served = binhost.fetch("Packages")
        add_ebuild(repo, "app-misc/hello-1.3", BROKEN_EBUILD.format(rdepend=""))
        failed = binhost.cli("update", "--no-sync", config=both, check=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        line = summary_line(failed, binhost.root)
        assert "FAILED" in line and "app-misc/hello-1.3" in line, line
        assert binhost.current() == published
        assert binhost.history() == history
        assert binhost.fetch("Packages") == served


# ------------------------------------------------------------------------------------------------
# 6. The nightly timer and the nginx block
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def plain_config(tmp_path):
    root = tmp_path / "binhost"
    (root / "var/cache/binpkgs").mkdir(parents=True)
    config = tmp_path / "plain.conf"
    config.write_text(f"[binhost]\nroot = {root}\nport = 8087\nbind = 127.0.0.1\n")
    return config, root


def print_option(config, *args):
    return run([sys.executable, SCRIPT, "-c", config, "--color=n", "serve", *args]).stdout


def test_print_timer_systemd_runs_update_with_this_config(plain_config, tmp_path):
    config, _ = plain_config
    text = print_option(config, "--print-timer", "systemd")
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_lines) == 1, text
    command = exec_lines[0][len("ExecStart="):].split()
    assert command[-1] == "update" and str(config) in command and Path(command[0]).is_absolute(), exec_lines
    assert str(SCRIPT) in command
    assert re.search(r"^\[Timer\]$", text, re.MULTILINE) and re.search(r"^OnCalendar=\S", text, re.MULTILINE)
    assert "WantedBy=timers.target" in text
    # The two units as files systemd-analyze can check.
    if shutil.which("systemd-analyze"):
        service, _, timer = text.partition("gentoo-binhost-update.timer")
        units = tmp_path / "units"
        units.mkdir()
        (units / "gentoo-binhost-update.service").write_text(service.rsplit("\n#", 1)[0] + "\n")
        (units / "gentoo-binhost-update.timer").write_text(timer.split("\n", 1)[1])
        checked = run(["systemd-analyze", "verify", "--man=no", units / "gentoo-binhost-update.timer",
                       units / "gentoo-binhost-update.service"], check=False)
        problems = [line for line in (checked.stdout + checked.stderr).splitlines()
                    if "gentoo-binhost-update" in line]
        assert not problems, checked.stdout + checked.stderr


def test_print_timer_cron_runs_update_with_this_config(plain_config):
    config, _ = plain_config
    text = print_option(config, "--print-timer", "cron")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, text
    fields = lines[0].split()
    # /etc/cron.d format: five schedule fields, the user, the command.
    assert all(re.fullmatch(r"[0-9*/,-]+", field) for field in fields[:5]), lines[0]
    assert fields[5] == "root", lines[0]
    command = fields[6:]
    assert "update" in command and str(config) in command and str(SCRIPT) in command, lines[0]
    # Logged through syslog, which rotates, not into a file that grows forever.
    assert lines[0].endswith("2>&1 | logger -t gentoo-binhost-update"), lines[0]
    assert ">>" not in lines[0]


def test_print_nginx_serves_the_index_from_the_current_publication(plain_config):
    config, root = plain_config
    text = print_option(config, "--print-nginx")
    pkgdir = root / "var/cache/binpkgs"
    assert re.search(rf"^\s*root {re.escape(str(pkgdir))};$", text, re.MULTILINE), text
    for name in ("Packages", "Packages.gz"):
        match = re.search(rf"^\s*location = /{re.escape(name)} \{{(.*?)\}}", text, re.MULTILINE)
        assert match, f"no exact location for /{name}:\n{text}"
        words = match.group(1).split()
        assert words[0] == "try_files", match.group(0)
        # The published index first; PKGDIR's own only before any publication.
        assert words[1] == f"/.published/current/{name}", match.group(0)
        assert words[2:] == [f"/{name}", "=404;"], match.group(0)
