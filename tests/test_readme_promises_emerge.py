"""README promises of emerge, build --for-target and update that had no test that would catch
them breaking: each test here fails if its promise breaks.

* `emerge` stops before anything is published or installed after a failing build, and when a
  package it built is still not one the target's binary-only emerge takes (naming it and why);
  an existing binary with other USE is rebuilt, and the plan says so.
* emerge's own `-p`/`-pv` among the arguments builds nothing, takes no lock, publishes nothing,
  and only runs the target's binary-only pretend.
* `emerge` stops before building when the target cannot download our index: nothing listens at
  the url, the server answers with an HTTP error (once PKGDIR has an index), or the target has
  neither wget nor curl.
* `build --for-target` builds and publishes, and installs nothing.
* `update` runs `emerge --sync` where the builds' repositories are (this machine), before asking
  the targets; `--no-sync` skips it.

Real components only: Portage 3.0.83 from PyPI, the session's sshd (and, for the target without
wget/curl, a second real sshd whose sessions get a PATH without them), real git for the sync,
our own server. One binhost root and one target (own ROOTs, own PKGDIR, own port) share a git
clone of tests/repo plus a few tiny ebuilds (nothing compiled); each test leaves the target's
installed packages and configuration as it found them.
"""

import fcntl
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from conftest import (REPO, SCRIPT, eroot, free_port, http_server, need, own_world, portage_env, run,
                      start_sshd, write_portage_config)
from conftest import tiny_ebuild as tiny
from test_target_word import assert_fails_naming, shown


BROKEN = """EAPI=8
DESCRIPTION="Dies in src_compile (promise tests)"
HOMEPAGE="https://example.invalid/pa-fails"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
RDEPEND="app-misc/pa-fails-dep"

src_compile() {
	die "this package does not build (on purpose)"
}
"""


EBUILDS = {
    "app-misc/pa-good-1.0": tiny("pa-good", "Builds fine"),
    "app-misc/pa-plain-1.0": tiny("pa-plain", "Builds fine, too"),
    "app-misc/pa-fails-dep-1.0": tiny("pa-fails-dep", "Built before pa-fails dies"),
    "app-misc/pa-fails-1.0": BROKEN,
    "app-misc/pa-flags-1.0": tiny("pa-flags", "Has a USE flag", iuse="extra"),
    "app-misc/pa-all-1.0": tiny("pa-all", "Wanted by every target"),
}


def add_ebuild(repo, cpv, text):
    category, rest = cpv.split("/")
    name = re.sub(r"-\d.*$", "", rest)
    directory = Path(repo) / category / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{rest}.ebuild").write_text(text)


def git(*args, cwd):
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                "-c", "init.defaultBranch=master", "-c", "safe.directory=*"] + list(args), cwd=cwd)


class Lab:
    """A binhost root (own PKGDIR, port, signing key) and one target `pa`, reached through the
    session's sshd, both using ``repo``: a git clone of ``upstream`` (tests/repo + EBUILDS)."""

    def __init__(self, world, base):
        self.world, self.base = world, base
        self.upstream = base / "upstream"
        shutil.copytree(REPO, self.upstream)
        for cpv, text in EBUILDS.items():
            add_ebuild(self.upstream, cpv, text)
        git("init", "-q", cwd=self.upstream)
        git("add", "-A", cwd=self.upstream)
        git("commit", "-q", "-m", "start", cwd=self.upstream)
        self.repo = base / "repo"
        git("clone", "-q", str(self.upstream), str(self.repo), cwd=base)
        self.root = base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.target = base / "target"
        self.port = free_port()
        self.config = base / "gentoo-binhost.conf"
        write_portage_config(self.target, repo=self.repo, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n'))
        write_portage_config(self.root, repo=self.repo)
        sshd = world.sshd
        self.binhost_section = (f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\n"
                                f"bind = 127.0.0.1\nport = {self.port}\ngpg-home = {base}/g\n")
        self.target_section = (f"\n[target pa]\nhost = {sshd.host}\nssh-port = {sshd.port}\n"
                               f"ssh-options = {sshd.ssh_options}\nroot = {self.target}\n"
                               f"path = {world.portage_bin}\ntree = own\n")
        self.config.write_text(self.binhost_section + self.target_section)
        self.cli("config", "pull")
        self.cli("keygen")
        self.cli("setup-target")

    def cli(self, *args, config=None, env=None, check=True, timeout=600):
        full = {"PATH": f"{self.world.portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
        full.update(env or {})
        return run([sys.executable, SCRIPT, "-c", config or self.config] + list(args), env=full,
                   check=check, timeout=timeout)

    def config_with(self, name, binhost_section=None, target_section=None):
        path = self.base / name
        path.write_text((binhost_section or self.binhost_section) + (target_section or self.target_section))
        return path

    # -- the binhost side --

    def packages(self, name="*"):
        return sorted(p.name for p in self.pkgdir.rglob(f"{name}-[0-9]*.gpkg.tar"))

    def publications(self):
        """(current publication, every publication id) as PKGDIR/.published says."""
        published = self.pkgdir / ".published"
        current = published / "current"
        ids = sorted(p.name for p in published.iterdir() if p.name.isdigit()) if published.is_dir() else []
        return (os.readlink(current) if current.is_symlink() else None), ids

    def published_cpvs(self):
        index = self.pkgdir / ".published/current/Packages"
        if not index.is_file():
            return []
        return sorted(re.findall(r"^CPV: (\S+)$", index.read_text(), re.MULTILINE))

    def binhost_make_conf(self):
        return self.root / "etc/portage/make.conf"

    # -- the target side --

    def vdb(self, cpv=""):
        return eroot(self.target, self.world.eprefix) / "var/db/pkg" / cpv

    def installed(self, prefix="app-misc/pa-"):
        category, name = prefix.split("/")
        directory = self.vdb(category)
        if not directory.is_dir():
            return []
        return sorted(f"{category}/{entry.name}" for entry in directory.iterdir() if entry.name.startswith(name))

    def unmerge(self, *atoms):
        run(["emerge", "--unmerge", "--quiet"] + list(atoms),
            env=portage_env(self.world.portage_bin, self.target, NO_COLOR="1"), timeout=300)

    def world_file(self):
        return eroot(self.target, self.world.eprefix) / "var/lib/portage/world"


@pytest.fixture(scope="module")
def lab(portage_bin, eprefix, host_portage, sshd):
    need(shutil.which("git"), "git missing (the sync test's repository is a git clone)")
    with own_world("gb-pa-", portage_bin, eprefix, sshd) as (world, base):
        yield Lab(world, base)


# ------------------------------------------------------------------------------------------------
# build --for-target: steps 1 to 3, no install
# ------------------------------------------------------------------------------------------------

def test_build_for_target_builds_and_publishes_but_installs_nothing(lab):
    assert not lab.packages("pa-flags")
    result = lab.cli("build", "--for-target", "app-misc/pa-flags", check=False)
    assert result.returncode == 0, shown(result)
    assert re.search(r"app-misc/pa-flags-1\.0\S*\s+\(no binary yet\)", result.stdout), shown(result)
    assert lab.packages("pa-flags"), shown(result)
    assert "app-misc/pa-flags-1.0" in lab.published_cpvs(), shown(result)
    assert lab.installed() == [], f"build --for-target installed something:\n{shown(result)}"


# ------------------------------------------------------------------------------------------------
# emerge stops before publishing or installing: a failing build, a binary the target won't take
# ------------------------------------------------------------------------------------------------

def test_failing_build_stops_emerge_before_publishing_or_installing(lab):
    """pa-fails-dep builds (and Portage indexes it in PKGDIR), then pa-fails dies: nothing is
    installed on the target (not even the dependency that built) and nothing is published."""
    before = lab.publications()
    result = lab.cli("emerge", "app-misc/pa-fails", check=False)
    line = assert_fails_naming(result, "app-misc/pa-fails-1.0")
    # Named exactly: the dependency built before pa-fails died, so only pa-fails is "not built".
    assert line.endswith("not built: app-misc/pa-fails-1.0"), line
    assert lab.packages("pa-fails-dep"), "the scenario needs pa-fails-dep built before pa-fails died"
    assert not lab.packages("pa-fails")
    assert "Installing on" not in result.stdout, f"went on to install after a failing build:\n{shown(result)}"
    assert lab.installed() == [], f"installed after a failing build:\n{shown(result)}"
    assert lab.publications() == before, f"a failing emerge published:\n{shown(result)}"
    assert "app-misc/pa-fails-dep-1.0" not in lab.published_cpvs()


def test_binary_the_target_still_would_not_take_stops_before_installing(lab):
    """A published binary of pa-flags without USE=extra (built for the target as it was). The
    target now wants extra, and the binhost root's make.conf says USE=-extra (a configuration that
    differs): the plan names the existing binary's other USE, the build makes another binary the
    target's binary-only emerge does not take, and emerge stops naming the package and why,
    before publishing or installing."""
    if "app-misc/pa-flags-1.0" not in lab.published_cpvs():
        lab.cli("build", "--for-target", "app-misc/pa-flags")
    built_before = lab.packages("pa-flags")
    make_conf, target_make_conf = lab.binhost_make_conf(), lab.target / "etc/portage/make.conf"
    saved_binhost, saved_target = make_conf.read_text(), target_make_conf.read_text()
    before = lab.publications()
    try:
        target_make_conf.write_text(saved_target + 'USE="${USE} extra"\n')
        make_conf.write_text(saved_binhost + 'USE="${USE} -extra"\n')
        result = lab.cli("emerge", "app-misc/pa-flags", check=False)
    finally:
        make_conf.write_text(saved_binhost)
        target_make_conf.write_text(saved_target)
    # The plan: the existing binary has other USE, so it is rebuilt.
    assert re.search(r"app-misc/pa-flags-1\.0\S*\s+\(its binary has other USE \(the target wants extra\)\)",
                     result.stdout), shown(result)
    assert len(lab.packages("pa-flags")) == len(built_before) + 1, f"not rebuilt:\n{shown(result)}"
    line = assert_fails_naming(result, "app-misc/pa-flags-1.0", "other USE")
    assert "extra" in line.split("app-misc/pa-flags-1.0", 1)[1], line
    assert "Installing on" not in result.stdout, f"went on to install:\n{shown(result)}"
    assert lab.installed() == [], f"installed what the target would not take:\n{shown(result)}"
    assert lab.publications() == before, f"published what the target would not take:\n{shown(result)}"


# ------------------------------------------------------------------------------------------------
# emerge's own -p/-pv: builds nothing, takes no lock, publishes nothing
# ------------------------------------------------------------------------------------------------

class HeldBuildLock:
    """The binhost's build lock held by this test (flock, as a running build holds it); let go
    after ``seconds`` at the latest, so a command that waits for it cannot hang the test."""

    def __init__(self, lab, seconds=30):
        self.path = lab.root.parent / f".{lab.root.name}.build.lock"
        self.seconds = seconds

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.timer = threading.Timer(self.seconds, self.release)
        self.timer.start()
        return self

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

    def __exit__(self, *_exc):
        self.timer.cancel()
        self.release()


def test_emerge_own_pretend_builds_nothing_takes_no_lock_publishes_nothing(lab):
    if "app-misc/pa-flags-1.0" not in lab.published_cpvs():
        lab.cli("build", "--for-target", "app-misc/pa-flags")
    before, packages, index = lab.publications(), lab.packages(), (lab.pkgdir / "Packages").read_text()
    with HeldBuildLock(lab):
        # Nothing to build: the target's binary-only pretend shows our binary.
        covered = lab.cli("emerge", "-pv", "app-misc/pa-flags", check=False, timeout=120)
        # No binary yet: still nothing is built.
        gap = lab.cli("emerge", "-pv", "app-misc/pa-good", check=False, timeout=120)
    for result in (covered, gap):
        assert "Another build is running" not in result.stderr, f"emerge -pv took the build lock:\n{shown(result)}"
        assert "Building in" not in result.stdout, shown(result)
        assert "Traceback" not in result.stderr, result.stderr
    assert covered.returncode == 0, shown(covered)
    assert re.search(r"^\[binary[^\]]*\]\s+app-misc/pa-flags-1\.0", covered.stdout, re.MULTILINE), shown(covered)
    assert re.search(r"app-misc/pa-good-1\.0\S*\s+\(no binary yet\)", gap.stdout), shown(gap)
    assert lab.packages() == packages, "emerge -pv built something"
    assert lab.publications() == before, "emerge -pv published"
    assert (lab.pkgdir / "Packages").read_text() == index, "emerge -pv changed PKGDIR's index"
    assert lab.installed() == [], "emerge -pv installed something"


# ------------------------------------------------------------------------------------------------
# The target cannot download our index: stop before building
# ------------------------------------------------------------------------------------------------

def port_nobody_listens_on():
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


def assert_stopped_before_building(lab, result, packages_before):
    assert "Building in" not in result.stdout, f"built although the target cannot fetch:\n{shown(result)}"
    assert lab.packages() == packages_before, shown(result)
    assert lab.installed() == [], shown(result)


def test_emerge_stops_before_building_when_nothing_answers_at_the_url(lab):
    """The url names a port nothing listens on (the command serves PKGDIR on the configured port
    itself, which the target does not use)."""
    dead = port_nobody_listens_on()
    config = lab.config_with("dead-url.conf", lab.binhost_section.replace(
        f"url = http://127.0.0.1:{lab.port}/", f"url = http://127.0.0.1:{dead}/"))
    packages = lab.packages()
    result = lab.cli("emerge", "app-misc/pa-good", config=config, check=False)
    line = assert_fails_naming(result, f"cannot download http://127.0.0.1:{dead}/Packages")
    assert "wget exit 4" in line and "network failure" in line, line
    assert_stopped_before_building(lab, result, packages)


def test_build_for_target_stops_when_the_server_answers_with_an_error(lab, tmp_path):
    """Once PKGDIR has an index, a 404 from the server at the url (another directory served
    there) is no longer taken for "nothing built yet"."""
    if not (lab.pkgdir / "Packages").is_file():
        lab.cli("build", "--for-target", "app-misc/pa-flags")
    empty = tmp_path / "served"
    empty.mkdir()
    packages = lab.packages()
    with http_server(empty) as url:
        config = lab.config_with("http-error.conf", lab.binhost_section.replace(
            f"url = http://127.0.0.1:{lab.port}/", f"url = {url}"))
        result = lab.cli("build", "--for-target", "app-misc/pa-good", config=config, check=False)
    line = assert_fails_naming(result, f"cannot download {url}Packages")
    assert "wget exit 8" in line and "answered with an HTTP error" in line, line
    assert_stopped_before_building(lab, result, packages)


def test_emerge_stops_before_building_when_the_target_has_neither_wget_nor_curl(lab):
    """A second real sshd whose sessions get a PATH of links to /usr/bin and /usr/sbin without
    wget and curl (the login shell's ~/.bashrc may add its own directories in front)."""
    bin_dir = lab.base / "no-fetcher-bin"
    bin_dir.mkdir(exist_ok=True)
    for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            link = bin_dir / name
            if name not in ("wget", "curl") and not os.path.lexists(link):
                link.symlink_to(os.path.join(directory, name))
    packages = lab.packages()
    with start_sshd(lab.base / "sshd-no-fetcher", f"SetEnv PATH={bin_dir}\n") as sshd:
        found = run(sshd.ssh_argv("command -v wget curl; echo found=$?"), check=False)
        assert "found=1" in found.stdout, f"the premise: no wget or curl there\n{shown(found)}"
        config = lab.config_with("no-fetcher.conf", target_section=(
            f"\n[target pa]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {lab.target}\npath = {lab.world.portage_bin}\ntree = own\n"))
        result = lab.cli("emerge", "app-misc/pa-good", config=config, check=False)
    assert_fails_naming(result, "pa has neither wget nor curl")
    assert_stopped_before_building(lab, result, packages)


# ------------------------------------------------------------------------------------------------
# update runs emerge --sync where the builds' repositories are (this machine); --no-sync skips it
# ------------------------------------------------------------------------------------------------

def test_update_syncs_the_repositories_on_this_machine_unless_no_sync(lab):
    """This machine's Portage configuration (PORTAGE_CONFIGROOT for Portage on this machine, so
    the session's shared one stays untouched) syncs the repository the builds use with real git
    from a file:// upstream. A commit upstream reaches the repository with `update`, not with
    `update --no-sync`."""
    host = lab.base / "this-machine"
    etc = write_portage_config(host, repo=lab.repo)
    (etc / "repos.conf" / "binhost-test.conf").write_text(
        "[DEFAULT]\nmain-repo = binhost-test\n\n[gentoo]\nauto-sync = no\n\n"
        f"[binhost-test]\nlocation = {lab.repo}\nsync-type = git\nsync-uri = file://{lab.upstream}\n"
        "auto-sync = yes\n")
    this_machine = {"PORTAGE_CONFIGROOT": str(host)}
    marker, later = lab.repo / "metadata/pa-synced", lab.repo / "metadata/pa-not-synced"

    def commit_upstream(path):
        (lab.upstream / path.relative_to(lab.repo)).write_text("upstream\n")
        git("add", "-A", cwd=lab.upstream)
        git("commit", "-q", "-m", path.name, cwd=lab.upstream)

    commit_upstream(marker)
    assert not marker.exists()
    result = lab.cli("update", env=this_machine, check=False)
    assert result.returncode == 0, shown(result)
    assert "emerge --sync" in result.stdout, shown(result)
    assert marker.is_file(), f"update did not sync the repository:\n{shown(result)}"

    commit_upstream(later)
    result = lab.cli("update", "--no-sync", env=this_machine, check=False)
    assert result.returncode == 0, shown(result)
    assert "emerge --sync" not in result.stdout, shown(result)
    assert not later.exists(), f"update --no-sync synced:\n{shown(result)}"


# ------------------------------------------------------------------------------------------------
# emerge --all: every target's build first (once for what they share), one publication, then the
# installs
# ------------------------------------------------------------------------------------------------

def test_emerge_all_builds_once_publishes_once_and_installs_on_every_target(lab):
    second = lab.base / "target-pb"
    write_portage_config(second, repo=lab.repo, extra_make_conf=(
        f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{second}/etc/portage/gnupg"\n'))
    both = lab.target_section + lab.target_section.replace("[target pa]", "[target pb]").replace(
        f"root = {lab.target}\n", f"root = {second}\n")
    config = lab.config_with("all.conf", binhost_section=lab.config.read_text().split("\n[target")[0] + "\n",
                             target_section=both)
    lab.cli("--target", "pb", "setup-target", config=config)
    _, before = lab.publications()
    try:
        result = lab.cli("--all", "emerge", "app-misc/pa-all", config=config, check=False)
        assert result.returncode == 0, shown(result)
        assert lab.packages("pa-all") == ["pa-all-1.0-1.gpkg.tar"], "built more than once:\n" + shown(result)
        _, after = lab.publications()
        assert len(after) == len(before) + 1, f"not one publication: {before} -> {after}\n{shown(result)}"
        for root in (lab.target, second):
            assert list((eroot(root, lab.world.eprefix) / "var/db/pkg/app-misc").glob("pa-all-1.0/BINPKGMD5")), \
                f"{root}: not installed from the binary:\n{shown(result)}"
        table = result.stdout[result.stdout.index("target "):]
        assert re.search(r"^pa\s+\d+\.\ds\s+ok$", table, re.MULTILINE), table
        assert re.search(r"^pb\s+\d+\.\ds\s+ok$", table, re.MULTILINE), table
    finally:
        for root in (lab.target, second):
            run(["emerge", "--unmerge", "--quiet", "app-misc/pa-all"],
                env=portage_env(lab.world.portage_bin, root, NO_COLOR="1"), check=False, timeout=300)
