"""The target's word decides: what the target's own emerge says, not our reading of PKGDIR.

* An unresolvable plan (a dependency that exists nowhere, a masked package) stops `emerge`,
  `build --for-target`, `update` and `doctor` with Portage's reason.
* The gate: before publishing, the target's binary-only emerge against the staged index must take
  every package of its source plan (a `:=` consumer of a library whose sub-slot changed is rebuilt;
  a USE and a USE_EXPAND change are rebuilt).
* After an install the target's package database must hold every package of the plan, each
  installed from a binary (BINPKGMD5); a target that cannot reach the server never gets exit 0.
* EMERGE_DEFAULT_OPTS of the (target's, copied) make.conf is filtered for every emerge we run.
* `--pretend emerge` without a server still shows the plan and the commands.
* A target whose ROOT is not / also gets plan lines "to /" (its build dependencies): not built.

Real components only: Portage 3.0.83 from PyPI, the session's sshd (every target command goes
through it), our own server (`emerge` and `install` serve PKGDIR themselves while they run). One
binhost root and one target, sharing a copy of tests/repo with a few tiny ebuilds (nothing is
compiled), serve the whole module; each test leaves the target's configuration as it found it.
"""

import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from conftest import REPO, eroot, free_port, own_world, portage_env, run, write_portage_config
eroot, free_port, portage_env, run, write_portage_config
from conftest import tiny_ebuild as tiny

# ------------------------------------------------------------------------------------------------
# The repository: tests/repo plus tiny ebuilds (no compiler involved)
# ------------------------------------------------------------------------------------------------


VIRTUAL = """EAPI=8
DESCRIPTION="A virtual (target-word tests)"
SLOT="0"
KEYWORDS="amd64"
RDEPEND="{rdepend}"
"""


EBUILDS = {
    # (a) a dependency that exists nowhere
    "app-misc/broken-1.0": tiny("broken", "Needs a package no repository has", rdepend="app-misc/nowhere"),
    # (b) masked on the target (and so in the binhost root's copy)
    "app-misc/masked-1.0": tiny("masked", "Masked in package.mask"),
    # (c) a library and its := consumer
    "dev-libs/lib-1.0": tiny("lib", "A library with a sub-slot", slot="0/1.0"),
    "app-misc/consumer-1.0": tiny("consumer", "Built against the library's sub-slot",
                                  rdepend="dev-libs/lib:="),
    # (d) a USE flag and a USE_EXPAND variable (GB_TARGETS, declared in the profile)
    "app-misc/flags-1.0": tiny("flags", "Has a USE flag and GB_TARGETS",
                               iuse="extra gb_targets_one gb_targets_two"),
    # (e) a package depending on a virtual ('virtual/*' in --buildpkg-exclude)
    "app-misc/plain-1.0": tiny("plain", "What the virtual pulls in"),
    "app-misc/needs-virtual-1.0": tiny("needs-virtual", "Depends on a virtual", rdepend="virtual/greeter"),
    # (h) a build dependency only: it goes to "/" (for a target whose ROOT is not /); greet is
    # in tests/repo, which the machine's own "/" configuration uses
    "app-misc/tool-1.0": tiny("tool", "Needs greet to build", bdepend="app-misc/greet"),
    # update: a world that cannot be resolved (emerge exits 1: a hard blocker)
    "app-misc/blocker-1.0": tiny("blocker", "Cannot be installed beside plain", rdepend="!!app-misc/plain"),
}

LIB_11 = tiny("lib", "A library with a sub-slot", slot="0/1.1")


def make_repo(base):
    """A copy of tests/repo with EBUILDS, dev-libs and virtual categories and GB_TARGETS."""
    repo = Path(base) / "repo"
    shutil.copytree(REPO, repo)
    categories = repo / "profiles/categories"
    categories.write_text(categories.read_text() + "dev-libs\nvirtual\n")
    defaults = repo / "profiles/default/make.defaults"
    text = defaults.read_text().replace('USE_EXPAND="CPU_FLAGS_X86"', 'USE_EXPAND="CPU_FLAGS_X86 GB_TARGETS"')
    assert "GB_TARGETS" in text
    defaults.write_text(text + 'GB_TARGETS="one"\n')
    for cpv, text in EBUILDS.items():
        add_ebuild(repo, cpv, text)
    add_ebuild(repo, "virtual/greeter-0", VIRTUAL.format(rdepend="app-misc/plain"))
    return repo


def add_ebuild(repo, cpv, text):
    category, rest = cpv.split("/")
    name = re.sub(r"-\d.*$", "", rest)
    directory = repo / category / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{rest}.ebuild").write_text(text)


# ------------------------------------------------------------------------------------------------
# One binhost root and one target for the module
# ------------------------------------------------------------------------------------------------

class Pair:
    """A binhost root (own PKGDIR, transport http on its own port, signing key) whose
    configuration is pulled from one target (own ROOT and PKGDIR, reached through the sshd)."""

    def __init__(self, world, base):
        self.world = world
        self.base = base
        self.repo = make_repo(base)
        self.root = base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.target = base / "target"
        self.port = free_port()
        self.config = base / "gentoo-binhost.conf"
        self.target_make_conf = ('USE="loud"\n'
                                 f'BINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n')
        write_portage_config(self.target, repo=self.repo, extra_make_conf=self.target_make_conf)
        # A binhost root as a stage3 gives it (its own config), then the target's pulled over it.
        write_portage_config(self.root, repo=self.repo)
        sshd = world.sshd
        self.config.write_text(
            f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\nbind = 127.0.0.1\n"
            f"port = {self.port}\ngpg-home = {base}/g\n\n"
            f"[target t1]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {self.target}\npath = {world.portage_bin}\ntree = own\n")
        self.cli("config", "pull")
        self.cli("keygen")
        self.cli("setup-target")

    def cli(self, *args, **options):
        return self.world.cli(*args, config=options.pop("config", self.config), **options)

    # -- the target's configuration, changed in both copies (as config pull would) --

    def etc(self, root=None):
        return (root or self.target) / "etc/portage"

    def both(self):
        return (self.target, self.root)

    def append_make_conf(self, text):
        for root in self.both():
            path = self.etc(root) / "make.conf"
            path.write_text(path.read_text() + text)

    def restore_make_conf(self, saved):
        for root, text in zip(self.both(), saved):
            (self.etc(root) / "make.conf").write_text(text)

    def saved_make_conf(self):
        return [(self.etc(root) / "make.conf").read_text() for root in self.both()]

    # -- what the target has --

    def vdb(self, cpv=""):
        return eroot(self.target, self.world.eprefix) / "var/db/pkg" / cpv

    def installed(self, package):
        """CPVs of ``package`` (category/name) in the target's package database."""
        category, name = package.split("/")
        directory = self.vdb(category)
        if not directory.is_dir():
            return []
        return sorted(f"{category}/{entry.name}" for entry in directory.iterdir()
                      if re.fullmatch(re.escape(name) + r"-\d[^/]*", entry.name))

    def world_file(self):
        return eroot(self.target, self.world.eprefix) / "var/lib/portage/world"

    def packages(self, name="*"):
        return sorted(self.pkgdir.rglob(f"{name}-[0-9]*.gpkg.tar"))

    def assert_from_binary(self, cpv):
        """cpv is installed on the target from a binary package of our PKGDIR; returns BUILD_ID."""
        entry = self.vdb(cpv)
        assert entry.is_dir(), f"{cpv} is not installed on the target: {sorted(self.vdb().glob('*/*'))}"
        md5 = entry / "BINPKGMD5"
        assert md5.is_file(), f"{cpv} was compiled on the target, not installed from a binary"
        build_id = (entry / "BUILD_ID").read_text().strip()
        category, pf = cpv.split("/")
        package = self.pkgdir / category / pf.rsplit("-", 1)[0] / f"{pf}-{build_id}.gpkg.tar"
        if not package.is_file():  # PN-PV-rN: the package directory is PN
            package = next(self.pkgdir.glob(f"{category}/*/{pf}-{build_id}.gpkg.tar"), package)
        assert package.is_file(), f"the target's {cpv} (build {build_id}) is not in our PKGDIR"
        assert hashlib.md5(package.read_bytes()).hexdigest() == md5.read_text().strip(), \
            f"the target's {cpv} is another file than our {package.name}"
        return int(build_id)

    def doctor(self, *atoms):
        result = self.cli("doctor", "--json", *atoms, check=False)
        try:
            return result, {row["check"]: row for row in json.loads(result.stdout)}
        except ValueError:
            raise AssertionError(f"doctor printed no JSON:\n{result.stdout}\n{result.stderr}")

    def target_emerge(self, *args, check=False):
        """The target's own emerge (run here: the target is this machine), as the tool asks it."""
        return run(["emerge"] + list(args),
                   env=portage_env(self.world.portage_bin, self.target, NO_COLOR="1"),
                   check=check, timeout=300)


@pytest.fixture(scope="module")
def pair(portage_bin, eprefix, host_portage, sshd):
    with own_world("gb-word-", portage_bin, eprefix, sshd) as (world, base):
        yield Pair(world, base)


def shown(result):
    return result.stdout + result.stderr


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("!!!")]


def assert_fails_naming(result, *fragments):
    """Exit 1, no traceback, and one `!!!` line naming every fragment."""
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in error_lines(result) if all(f in line for f in fragments)]
    assert lines, f"no '!!!' line names {fragments}:\n{shown(result)}"
    return lines[0]


def port_nobody_listens_on():
    """A port on 127.0.0.1 that refuses connections (checked)."""
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


# ------------------------------------------------------------------------------------------------
# (a) a dependency that exists nowhere, (b) a masked package
# ------------------------------------------------------------------------------------------------

def test_dependency_that_exists_nowhere_stops_every_command(pair):
    built_before = pair.packages()

    result = pair.cli("emerge", "app-misc/broken", check=False)
    line = assert_fails_naming(result, "app-misc/nowhere")
    assert "cannot resolve" in line, line

    result = pair.cli("build", "--for-target", "app-misc/broken", check=False)
    assert_fails_naming(result, "app-misc/nowhere")

    result, rows = pair.doctor("app-misc/broken")
    coverage = rows.get("coverage")
    assert coverage and coverage["status"] == "FAIL", rows
    assert "app-misc/nowhere" in coverage["detail"], coverage
    assert result.returncode == 1, shown(result)

    assert pair.packages() == built_before, "something was built for an unresolvable plan"
    assert not pair.installed("app-misc/broken")


class WorldEntries:
    """Entries added to the target's world file for one test, removed afterwards."""

    def __init__(self, pair, *atoms):
        self.path, self.atoms = pair.world_file(), atoms

    def __enter__(self):
        self.saved = self.path.read_text() if self.path.exists() else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text((self.saved or "") + "".join(atom + "\n" for atom in self.atoms))

    def __exit__(self, *_exc):
        if self.saved is None:
            self.path.unlink()
        else:
            self.path.write_text(self.saved)


def summary_row(result, name="t1"):
    rows = [line for line in result.stdout.splitlines() if line.startswith(name + " ")]
    assert rows, f"no summary row for {name}:\n{shown(result)}"
    return rows[0]


def test_update_fails_when_the_targets_world_cannot_be_resolved(pair):
    # The target's own `emerge -uDN @world` exits 1 (a hard blocker between two world entries).
    with WorldEntries(pair, "app-misc/blocker", "app-misc/plain"):
        plan = pair.target_emerge("--pretend", "--update", "--deep", "--newuse", "@world")
        assert plan.returncode == 1, shown(plan)
        result = pair.cli("update", "--no-sync", check=False)
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, result.stderr
    row = summary_row(result)
    assert "FAILED" in row and "cannot resolve" in row, row
    assert not pair.packages("blocker")


def test_masked_package_stops_emerge(pair):
    for root in pair.both():
        (pair.etc(root) / "package.mask").write_text("app-misc/masked\n")
    try:
        result = pair.cli("emerge", "app-misc/masked", check=False)
        line = assert_fails_naming(result, "masked")
        assert "app-misc/masked" in line, line
        result = pair.cli("build", "--for-target", "app-misc/masked", check=False)
        assert_fails_naming(result, "masked")
    finally:
        for root in pair.both():
            (pair.etc(root) / "package.mask").unlink()
    assert not pair.packages("masked")
    assert not pair.installed("app-misc/masked")


# ------------------------------------------------------------------------------------------------
# (g) --pretend emerge with no server, (h) build dependencies for "/" are not the target's
# ------------------------------------------------------------------------------------------------

def pretend_commands(result):
    """The build command (ROOT=... emerge --getbinpkg=n ...) and the install command (ssh ...)."""
    lines = result.stdout.splitlines()
    build = [line for line in lines if "--getbinpkg=n" in line and "emerge" in line]
    install = [line for line in lines if line.startswith("ssh ") and "--getbinpkgonly" in line
               and "--pretend" not in line.split("emerge", 1)[-1].split("EMERGE_DEFAULT")[0]]
    return build, install


def test_pretend_emerge_without_a_server_shows_the_plan_and_both_commands(pair):
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", pair.port)) != 0, "something serves the pair's port"
    before = pair.packages()
    result = pair.cli("--pretend", "emerge", "app-misc/hello", check=False)
    assert result.returncode == 0, shown(result)
    assert "would merge 1 package(s)" in shown(result), shown(result)
    assert re.search(r"app-misc/hello-1\.1\S*\s+\(no binary yet\)", result.stdout), result.stdout
    build, install = pretend_commands(result)
    assert build and "=app-misc/hello-1.1::binhost-test" in build[0], result.stdout
    assert "--getbinpkg=n" in build[0], build[0]
    assert install, result.stdout
    assert "app-misc/hello" in install[-1] and "--binpkg-respect-use=y" in install[-1], install
    assert result.stdout.index(build[0]) < result.stdout.index(install[-1]), "install shown before build"
    assert pair.packages() == before, "--pretend built something"
    assert not pair.installed("app-misc/hello"), "--pretend installed something"


def test_build_dependencies_for_slash_are_not_built_for_the_target(pair):
    # The premise, in the target's own plan: with ROOT != /, Portage 3.0.83 ends each line for the
    # target's ROOT with "to <EROOT>/" (EROOT = ROOT + EPREFIX here, = ROOT on Gentoo) and prints
    # lines for / (the build dependency greet) without "to".
    plan = pair.target_emerge("--pretend", "--verbose", "--usepkg=n", "--getbinpkg=n", "app-misc/tool")
    assert plan.returncode == 0, shown(plan)
    lines = [line for line in plan.stdout.splitlines() if line.startswith("[ebuild")]
    greet_lines = [line for line in lines if "app-misc/greet" in line]
    if not greet_lines:
        pytest.skip("greet is installed in this machine's / already: no line for / to ignore")
    assert all(" to /" not in line for line in greet_lines), plan.stdout
    tool_lines = [line for line in lines if "app-misc/tool" in line]
    assert tool_lines and f" to {pair.target}/" in tool_lines[0], plan.stdout

    result = pair.cli("--pretend", "emerge", "app-misc/tool", check=False)
    assert result.returncode == 0, shown(result)
    assert "would merge 1 package(s)" in shown(result), shown(result)
    gap_lines = [line for line in result.stdout.splitlines() if line.startswith("  ") and "(" in line]
    assert not [line for line in gap_lines if "app-misc/greet" in line], result.stdout
    build, _ = pretend_commands(result)
    assert build and "=app-misc/tool-1.0::binhost-test" in build[0], result.stdout
    assert "greet" not in build[0], build[0]

    _, rows = pair.doctor("app-misc/tool")
    assert rows["coverage"]["status"] == "FAIL", rows["coverage"]
    assert "of 1 packages" in rows["coverage"]["detail"], rows["coverage"]
    assert "greet" not in rows["coverage"]["detail"], rows["coverage"]


# ------------------------------------------------------------------------------------------------
# (c) a sub-slot bump, (d) USE and USE_EXPAND changes
# ------------------------------------------------------------------------------------------------

def test_sub_slot_bump_rebuilds_the_consumer(pair):
    pair.cli("emerge", "app-misc/consumer")
    assert pair.installed("dev-libs/lib") == ["dev-libs/lib-1.0"]
    lib_before = pair.assert_from_binary("dev-libs/lib-1.0")
    consumer_before = pair.assert_from_binary("app-misc/consumer-1.0")
    assert "dev-libs/lib:0/1.0=" in (pair.vdb("app-misc/consumer-1.0") / "RDEPEND").read_text()
    assert lib_before >= 1

    add_ebuild(pair.repo, "dev-libs/lib-1.1", LIB_11)
    result = pair.cli("emerge", "--update", "--deep", "--newuse", "@world", check=False)
    assert result.returncode == 0, shown(result)
    assert pair.installed("dev-libs/lib") == ["dev-libs/lib-1.1"], shown(result)
    pair.assert_from_binary("dev-libs/lib-1.1")
    consumer_after = pair.assert_from_binary("app-misc/consumer-1.0")
    assert consumer_after > consumer_before, f"consumer kept build {consumer_before}:\n{shown(result)}"
    assert "dev-libs/lib:0/1.1=" in (pair.vdb("app-misc/consumer-1.0") / "RDEPEND").read_text()
    # The gate said why it is rebuilt.
    assert re.search(r"app-misc/consumer-1\.0\S*\s+\(.*sub-slot", shown(result)) or \
        "app-misc/consumer-1.0" in shown(result), shown(result)


def use_of(pair, cpv):
    return set((pair.vdb(cpv) / "USE").read_text().split())


def test_use_and_use_expand_changes_are_rebuilt(pair):
    saved = pair.saved_make_conf()
    try:
        pair.cli("emerge", "app-misc/flags")
        first = pair.assert_from_binary("app-misc/flags-1.0")
        use = use_of(pair, "app-misc/flags-1.0")
        assert "extra" not in use and "gb_targets_one" in use, use

        pair.append_make_conf('USE="${USE} extra"\n')
        result = pair.cli("emerge", "--update", "--deep", "--newuse", "@world", check=False)
        assert result.returncode == 0, shown(result)
        second = pair.assert_from_binary("app-misc/flags-1.0")
        use = use_of(pair, "app-misc/flags-1.0")
        assert "extra" in use and second > first, (use, first, second, shown(result))

        pair.append_make_conf('GB_TARGETS="two"\n')
        result = pair.cli("emerge", "--update", "--deep", "--newuse", "@world", check=False)
        assert result.returncode == 0, shown(result)
        third = pair.assert_from_binary("app-misc/flags-1.0")
        use = use_of(pair, "app-misc/flags-1.0")
        assert "gb_targets_two" in use and "gb_targets_one" not in use and "extra" in use, use
        assert third > second, shown(result)
    finally:
        pair.restore_make_conf(saved)


# ------------------------------------------------------------------------------------------------
# (e) EMERGE_DEFAULT_OPTS of the target
# ------------------------------------------------------------------------------------------------

def test_emerge_default_opts_of_the_target_are_filtered(pair):
    saved = pair.saved_make_conf()
    try:
        pair.append_make_conf("EMERGE_DEFAULT_OPTS=\"--ask --columns --quiet-repo-display"
                              " --buildpkg-exclude 'virtual/*'\"\n")
        updated = pair.cli("update", "--no-sync", check=False)
        assert updated.returncode == 0, shown(updated)
        rows = [line for line in updated.stdout.splitlines() if line.startswith("t1 ")]
        assert rows and " ok" in rows[0], updated.stdout

        shown_commands = pair.cli("--pretend", "emerge", "app-misc/needs-virtual", check=False)
        assert "EMERGE_DEFAULT_OPTS=" in shown_commands.stdout, shown_commands.stdout

        result = pair.cli("emerge", "app-misc/needs-virtual", check=False)
        assert result.returncode == 0, shown(result)
        for cpv in ("app-misc/needs-virtual-1.0", "virtual/greeter-0", "app-misc/plain-1.0"):
            pair.assert_from_binary(cpv)
        assert pair.packages("greeter"), "no binary of the virtual: --buildpkg-exclude reached the build"
    finally:
        pair.restore_make_conf(saved)


# ------------------------------------------------------------------------------------------------
# (f) the target cannot reach the server: install never says yes
# ------------------------------------------------------------------------------------------------

def test_install_from_an_unreachable_server_fails(pair):
    pair.cli("build", "--for-target", "app-misc/greet")
    assert pair.packages("greet")
    unreachable = port_nobody_listens_on()
    config = pair.base / "unreachable.conf"
    config.write_text(pair.config.read_text().replace(f"url = http://127.0.0.1:{pair.port}/",
                                                      f"url = http://127.0.0.1:{unreachable}/"))
    assert f":{unreachable}/" in config.read_text()
    binrepo = pair.etc() / "binrepos.conf/gentoo-binhost.conf"
    saved = binrepo.read_text()
    try:
        pair.cli("setup-target", config=config)
        assert f":{unreachable}/" in binrepo.read_text()
        result = pair.cli("install", "app-misc/greet", config=config, check=False)
    finally:
        binrepo.write_text(saved)
    assert result.returncode == 1, shown(result)
    assert not pair.installed("app-misc/greet"), shown(result)
    # Asked first (the plan query downloads our index there), the target cannot reach the url:
    # that stops it before its emerge runs; an install that went on would lack what it asked for.
    line = next((line for line in error_lines(result) if "lacks what it asked for" in line
                 or "cannot download" in line), None)
    assert line, f"no '!!!' line says it lacks what it asked for, or cannot download:\n{shown(result)}"
    assert f"127.0.0.1:{unreachable}/Packages" in line, line


def test_install_that_compiles_on_the_target_is_not_a_success(pair):
    """The target's binrepos entry points where nothing listens (the configured url works: the
    plan query passes); greet is installed there already, compiled from source."""
    pair.cli("build", "--for-target", "app-misc/greet")
    pair.target_emerge("--oneshot", "--usepkg=n", "--getbinpkg=n", "app-misc/greet", check=True)
    assert not (pair.vdb("app-misc/greet-1.0") / "BINPKGMD5").exists()
    unreachable = port_nobody_listens_on()
    binrepo = pair.etc() / "binrepos.conf/gentoo-binhost.conf"
    saved = binrepo.read_text()
    try:
        binrepo.write_text(saved.replace(f"127.0.0.1:{pair.port}", f"127.0.0.1:{unreachable}"))
        assert f":{unreachable}" in binrepo.read_text()
        result = pair.cli("install", "app-misc/greet", check=False)
    finally:
        binrepo.write_text(saved)
        pair.target_emerge("--unmerge", "app-misc/greet")
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, result.stderr
    line = next((line for line in error_lines(result) if "app-misc/greet" in line
                 or "emerge failed" in line), None)
    assert line, shown(result)
    assert "lacks what it asked for" in line or "emerge failed" in line, line


# ------------------------------------------------------------------------------------------------
# update with a world entry that exists nowhere's dependency
# ------------------------------------------------------------------------------------------------

def test_update_with_an_unresolvable_world_entry_fails(pair):
    """app-misc/broken (needs app-misc/nowhere) in the target's world. NOTE: Portage 3.0.83's own
    `emerge -uDN @world` drops such an entry with a warning ("Problems have been detected with
    your world file ... masked or don't exist: app-misc/broken") and exits 0."""
    with WorldEntries(pair, "app-misc/broken"):
        result = pair.cli("update", "--no-sync", check=False)
    assert result.returncode == 1, shown(result)
    row = summary_row(result)
    assert "FAILED" in row and "app-misc/broken" in row, row


def test_install_that_merges_nothing_is_not_a_success(pair):
    """The target's emerge exits 0 having merged nothing (its binrepos entry points where nothing
    listens: Portage says so in the middle and goes on with what it has) while the plan, asked
    through the configured url, wants an update: the check of its package database says so."""
    add_ebuild(pair.repo, "app-misc/bump-1.0", tiny("bump", "Gets a new version"))
    pair.cli("emerge", "app-misc/bump")
    pair.assert_from_binary("app-misc/bump-1.0")
    add_ebuild(pair.repo, "app-misc/bump-1.1", tiny("bump", "Gets a new version"))
    pair.cli("build", "--for-target", "--update", "--deep", "--newuse", "@world")
    assert pair.packages("bump-1.1")
    binrepo = pair.etc() / "binrepos.conf/gentoo-binhost.conf"
    saved = binrepo.read_text()
    try:
        binrepo.write_text(saved.replace(f"127.0.0.1:{pair.port}", f"127.0.0.1:{port_nobody_listens_on()}"))
        direct = pair.target_emerge("--getbinpkgonly", "--update", "--deep", "--newuse", "@world")
        assert direct.returncode == 0, shown(direct)  # the premise: Portage itself says yes
        assert pair.installed("app-misc/bump") == ["app-misc/bump-1.0"]
        result = pair.cli("install", "--update", "--deep", "--newuse", "@world", check=False)
    finally:
        binrepo.write_text(saved)
    line = assert_fails_naming(result, "lacks what it asked for", "app-misc/bump-1.1")
    assert pair.installed("app-misc/bump") == ["app-misc/bump-1.0"], line
    # With the entry back, the same command installs it and says yes.
    result = pair.cli("install", "--update", "--deep", "--newuse", "@world", check=False)
    assert result.returncode == 0, shown(result)
    pair.assert_from_binary("app-misc/bump-1.1")


# ------------------------------------------------------------------------------------------------
# doctor tells fetch failures apart (real wget on the target)
# ------------------------------------------------------------------------------------------------

def test_doctor_tells_a_network_failure_from_an_auth_failure(pair, gb):
    import threading
    dead = port_nobody_listens_on()
    config = pair.base / "fetch-dead.conf"
    config.write_text(pair.config.read_text().replace(f"url = http://127.0.0.1:{pair.port}/",
                                                      f"url = http://127.0.0.1:{dead}/"))
    result = pair.cli("doctor", "--json", config=config, check=False)
    rows = {row["check"]: row for row in json.loads(result.stdout)}
    assert rows["fetch"]["status"] == "FAIL", rows["fetch"]
    assert "(wget exit 4)" in rows["fetch"]["detail"] and "network failure" in rows["fetch"]["detail"], rows["fetch"]

    # A server that wants credentials the configuration does not give: 401.
    server = gb.make_server("127.0.0.1", 0, str(pair.pkgdir), gb.Output(color=False, verbosity=0),
                            authorizations=gb.basic_authorizations([("someone", "secret")]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config.write_text(pair.config.read_text().replace(
            f"url = http://127.0.0.1:{pair.port}/", f"url = http://127.0.0.1:{server.server_address[1]}/"))
        result = pair.cli("doctor", "--json", config=config, check=False)
    finally:
        server.shutdown()
        server.server_close()
    rows = {row["check"]: row for row in json.loads(result.stdout)}
    assert rows["fetch"]["status"] == "FAIL", rows["fetch"]
    assert "(wget exit 6)" in rows["fetch"]["detail"] and "refused the credentials" in rows["fetch"]["detail"]


@pytest.mark.parametrize("tool, code, meaning", [
    ("curl", "7", "network failure"), ("curl", "60", "TLS failure"), ("wget", "5", "TLS failure"),
    ("curl", "22", "HTTP error"), ("wget", "8", "HTTP error"), ("none", "127", "neither wget nor curl"),
])
def test_fetch_failures_are_told_apart(gb, tool, code, meaning):
    assert meaning in gb.describe_fetch_failure(tool, code)


def test_no_at_emerge_ask_prompt_is_not_a_failure(pair):
    """On a terminal, install keeps --ask; the user's No (emerge exits 128 + SIGINT) is no error."""
    import os
    import pty
    import select
    import signal
    import sys
    import time
    from conftest import SCRIPT
    pair.cli("build", "--for-target", "app-misc/plain")
    env = dict(os.environ, PATH=f"{pair.world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: our tool on a terminal
        try:
            os.execve(sys.executable, [sys.executable, str(SCRIPT), "-c", str(pair.config), "install", "--ask",
                                       "app-misc/plain"], env)
        finally:
            os._exit(127)
    seen, deadline, answered, status = b"", time.monotonic() + 120, False, None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 1)
            if ready:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:
                    chunk = b""
                seen += chunk
                if not answered and b"Would you like to merge these packages?" in seen:
                    os.write(terminal, b"n\n")
                    answered = True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    text = seen.decode(errors="replace")
    assert answered, text
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, text
    assert "emerge was told No" in text, text


def test_both_sides_read_alike_and_the_remote_holds_the_route(pair, gb, monkeypatch):
    """The binhost's LocalShell and a target's Remote answer one interface: a query's output, or
    one error naming the side with the query's real exit status. A target's route to PKGDIR is
    its Remote's for the block serving() holds (here: this command serves the port, as nothing
    else does), nested blocks share it, and plan() asks the target through it."""
    monkeypatch.setenv("PATH", f"{pair.world.portage_bin}:{os.environ['PATH']}")
    config = gb.load_config(str(pair.config), gb.Runner(gb.Output(color=False, verbosity=0)))
    target = config.target("t1")
    env = config.environment_for(target)
    remote = env.remote(target)
    assert env.remote(target) is remote
    sides = (gb.LocalShell(env), remote)
    arches = [side.read(["portageq", "envvar", "ARCH"]).strip() for side in sides]
    assert arches[0] and arches[0] == arches[1], arches
    for side, where in zip(sides, ("the binhost", "target t1")):
        with pytest.raises(gb.BinhostError, match=rf"^sh failed on {where} \(exit 3\)"):
            side.read(["sh", "-c", "exit 3"])
    pair.pkgdir.mkdir(parents=True, exist_ok=True)
    assert gb.who_answers("127.0.0.1", pair.port) is None
    with remote.serving():
        assert gb.is_our_server(gb.who_answers("127.0.0.1", pair.port))
        with remote.serving():
            plan = remote.plan(["app-misc/plain"])
        assert gb.is_our_server(gb.who_answers("127.0.0.1", pair.port))  # the outer block's still
    assert gb.who_answers("127.0.0.1", pair.port) is None
    assert (plan.fetch_problem(), plan.exit_code, plan.problem()) == (None, 0, None), plan.text
