"""One tree: a target with `tree = binhost` plans from the binhost's ebuild snapshot, and its live
tree moves to it only once the publication built from it is made.

* setup-target writes `tree = binhost` for a target it sets up for the first time.
* `emerge` pushes each repository both sides have into a staging copy on the target (rsync over
  our ssh), asks the target's plan against that copy, builds, publishes, then moves the live tree
  with Portage's own `emerge --sync` from the published copy (our repos.conf entry names it, and
  `config pull` leaves it out). A version the target's old tree had and the binhost's dropped is
  neither planned nor built; the target ends on the binhost's snapshot with its binaries.
* A failed build leaves the target's live tree and the published index as they were.
* An update damaged on the target (a partial staging copy, a live tree cut short) is repaired by
  the next run. A tree newer on the target than on the binhost stops (it never goes back).
* Both transports; an overlay on both sides; an overlay only the target has is reported and kept.
* remove-target gives the target its own sync settings back.

Real components: Portage 3.0.83 from PyPI on both sides, rsync, the session's sshd, our server.
The target's prefix layout needs the portageq link (write_portage_config(eprefix=...)).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, REPO_NAME, SCRIPT, eroot, free_port, own_world, run, write_portage_config
from conftest import tiny_ebuild as tiny
from test_tree_snapshots import add_ebuild, make_overlay, repos_conf

OVERLAY = "ot-overlay"          # on both sides, different contents
TARGET_ONLY = "ot-target-only"  # only the target has it
TARGET_STAMP = "Mon, 01 Jan 2024 00:00:00 +0000"
BINHOST_STAMP = "Tue, 02 Dec 2025 03:45:00 +0000"
NEWER_STAMP = "Wed, 01 Jan 2031 00:00:00 +0000"
BROKEN_EBUILD = ('EAPI=8\nDESCRIPTION="Fails to build (binhost test package)"\nHOMEPAGE="https://example.invalid/b"\n'
                 'S="${WORKDIR}"\nLICENSE="MIT"\nSLOT="0"\nKEYWORDS="amd64"\n'
                 'src_install() {\n\tdie "broken on purpose"\n}\n')


class Lab:
    """A binhost root and one target `ot` that follows it. The target's tree has app-misc/ot-notary
    0.5 (dropped on the binhost, which has 0.6) and an overlay with ot-old; the binhost's tree has
    ot-notary 0.6 and the overlay with ot-new instead."""

    def __init__(self, world, base):
        self.world, self.base = world, base
        self.target_repo, self.binhost_repo = base / "target-repo", base / "binhost-repo"
        self.target_overlay, self.binhost_overlay = base / "target-overlay", base / "binhost-overlay"
        for repo, ebuilds, stamp in ((self.target_repo, ("app-misc/ot-notary-0.5",), TARGET_STAMP),
                                     (self.binhost_repo, ("app-misc/ot-notary-0.6",), BINHOST_STAMP)):
            shutil.copytree(REPO, repo)
            for cpv in ebuilds:
                add_ebuild(repo, cpv, "follows the binhost")
            (repo / "metadata/timestamp.chk").write_text(stamp + "\n")
        # As on real systems, the target's older snapshot has older files (rsync compares size and
        # modification time, and these two stamps have the same size).
        os.utime(self.target_repo / "metadata/timestamp.chk", (1_700_000_000, 1_700_000_000))
        (self.binhost_repo / "Manifest").write_text("TIMESTAMP 2025-12-02T03:45:00Z\n")
        # The binhost's newer profile enables a flag by default that the target's older one does not.
        defaults = self.binhost_repo / "profiles/default/make.defaults"
        defaults.write_text(defaults.read_text().replace('USE=""', 'USE="otflag"'))
        for repo in (self.target_repo, self.binhost_repo):
            add_ebuild(repo, "app-misc/ot-flagged-1.0", "its default USE comes from the profile")
            ebuild = repo / "app-misc/ot-flagged/ot-flagged-1.0.ebuild"
            ebuild.write_text(ebuild.read_text().replace('IUSE=""', 'IUSE="otflag"'))
        make_overlay(self.target_overlay, OVERLAY, ebuilds=["app-misc/ot-old-1.0"])
        make_overlay(self.binhost_overlay, OVERLAY, ebuilds=["app-misc/ot-new-1.0"])
        self.target_only = base / TARGET_ONLY
        make_overlay(self.target_only, TARGET_ONLY, ebuilds=["app-misc/ot-lonely-1.0"])

        self.root = base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.target = base / "target"
        self.port = free_port()
        self.config = base / "gentoo-binhost.conf"
        write_portage_config(self.target, repo=self.target_repo, eprefix=world.eprefix, extra_make_conf=(
            f'BINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n'))
        self.target_repos_conf = self.target / "etc/portage/repos.conf" / f"{REPO_NAME}.conf"
        self.target_repos_conf.write_text(repos_conf((REPO_NAME, self.target_repo), (OVERLAY, self.target_overlay),
                                                     (TARGET_ONLY, self.target_only)))
        write_portage_config(self.root, repo=self.target_repo)
        sshd = world.sshd
        self.config.write_text(
            f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\nbind = 127.0.0.1\n"
            f"port = {self.port}\ngpg-home = {base}/g\n\n"
            f"[target ot]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {self.target}\npath = {world.portage_bin}\n")
        self.cli("config", "pull")
        self.cli("keygen")
        self.setup = self.cli("setup-target")
        pulled = self.root / "etc/portage/repos.conf"
        for path in pulled.iterdir():
            path.unlink()
        # As a real make.profile (relative, into /var/db/repos/gentoo) resolves on the binhost: into
        # the binhost's own tree.
        profile = self.root / "etc/portage/make.profile"
        profile.unlink()
        profile.symlink_to(self.binhost_repo / "profiles/default")
        (pulled / f"{REPO_NAME}.conf").write_text(repos_conf((REPO_NAME, self.binhost_repo),
                                                             (OVERLAY, self.binhost_overlay)))
        self.trees = self.target / "var/cache/gentoo-binhost/trees"
        self.own_entry = self.target / "etc/portage/repos.conf/zz-gentoo-binhost.conf"

    def cli(self, *args, check=True):
        return self.world.cli(*args, config=self.config, check=check)

    def set_transport(self, transport):
        text = re.sub(r"^transport = .*\n", "", self.config.read_text(), flags=re.MULTILINE)
        self.config.write_text(text.replace("[binhost]\n", f"[binhost]\ntransport = {transport}\n", 1))
        self.cli("setup-target")

    def installed(self):
        directory = eroot(self.target, self.world.eprefix) / "var/db/pkg/app-misc"
        return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []

    def published_cpvs(self):
        index = self.pkgdir / ".published/current/Packages"
        return sorted(re.findall(r"^CPV: (\S+)$", index.read_text(), re.MULTILINE)) if index.is_file() else []

    def mark(self, name, which):
        path = self.trees / f"{name}.{which}"
        return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def lab(portage_bin, eprefix, host_portage, sshd):
    with own_world("gb-onetree-", portage_bin, eprefix, sshd) as (world, base):
        yield Lab(world, base)


def shown(result):
    return result.stdout + result.stderr


def ebuilds(repo, name):
    directory = Path(repo) / "app-misc" / name
    return sorted(path.name for path in directory.glob("*.ebuild")) if directory.is_dir() else []


def test_setup_target_writes_tree_binhost_for_a_new_target(lab):
    assert re.search(r"^tree = binhost$", lab.config.read_text(), re.MULTILINE), lab.config.read_text()
    assert "writing tree = binhost" in lab.setup.stdout, shown(lab.setup)


def test_the_plan_takes_the_profile_of_the_staged_snapshot(lab):
    """The binhost's profile (newer) enables otflag, the target's live one does not: planned with the
    staged profile, the target wants what the binhost builds, and the gate passes."""
    result = lab.cli("emerge", "app-misc/ot-flagged", check=False)
    assert result.returncode == 0, shown(result)
    built = eroot(lab.target, lab.world.eprefix) / "usr/share/ot-flagged/built"
    assert "otflag" in built.read_text().split(), built.read_text()
    assert "Moving ot's live tree to the published snapshot" in result.stdout, shown(result)


def test_target_follows_the_binhosts_snapshot(lab):
    """The target's tree has ot-notary 0.5, which the binhost's dropped for 0.6: emerge plans 0.6
    from the staged snapshot, builds and publishes it, moves the target's tree, installs it."""
    result = lab.cli("emerge", "app-misc/ot-notary", "app-misc/ot-new", check=False)
    assert result.returncode == 0, shown(result)
    assert "Traceback" not in result.stderr
    assert {"ot-new-1.0", "ot-notary-0.6"} <= set(lab.installed()), shown(result)
    assert {"app-misc/ot-notary-0.6", "app-misc/ot-new-1.0"} <= set(lab.published_cpvs())
    # The live trees are the binhost's now, moved by Portage's own sync from the published copy.
    assert ebuilds(lab.target_repo, "ot-notary") == ["ot-notary-0.6.ebuild"], shown(result)
    assert (lab.target_repo / "metadata/timestamp.chk").read_text().strip() == BINHOST_STAMP
    assert ebuilds(lab.target_overlay, "ot-new") == ["ot-new-1.0.ebuild"]
    assert ebuilds(lab.target_overlay, "ot-old") == [], "the overlay kept an ebuild the binhost's copy lacks"
    assert ebuilds(lab.target_only, "ot-lonely") == ["ot-lonely-1.0.ebuild"], "the target-only overlay was touched"
    assert f"has repositories the binhost does not: {TARGET_ONLY}" in result.stderr, shown(result)
    entry = lab.own_entry.read_text()
    assert f"[{REPO_NAME}]\nsync-type = rsync\nsync-uri = file://{lab.trees}/published/{REPO_NAME}\n" in entry, entry
    assert f"[{OVERLAY}]" in entry and f"[{TARGET_ONLY}]" not in entry, entry
    assert "sync-rsync-verify-metamanifest = no" in entry.split(f"[{OVERLAY}]")[1], entry
    assert lab.target_repos_conf.read_text().count("location = ") == 3, "the target's own repos.conf changed"
    for which in ("staged", "published", "live"):
        assert lab.mark(REPO_NAME, which) == {"revision": f"timestamp {BINHOST_STAMP}",
                                              "manifest": lab.mark(REPO_NAME, "staged")["manifest"]}, which
    # The binhost's copy of the configuration never gets our entry; parity does not see it.
    diff = lab.cli("config", "diff", check=False)
    assert "zz-gentoo-binhost" not in shown(diff), shown(diff)
    # The user's own emerge --sync there follows the binhost too: it syncs from the published copy.
    (lab.target_repo / "app-misc/ot-notary/ot-notary-0.6.ebuild").unlink()
    (lab.target_repo / "metadata/timestamp.chk").unlink()
    env = dict(os.environ, ROOT=str(lab.target), PORTAGE_CONFIGROOT=str(lab.target),
               PATH=f"{lab.world.portage_bin}:{os.environ['PATH']}")
    done = subprocess.run(["emerge", "--sync", REPO_NAME], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ebuilds(lab.target_repo, "ot-notary") == ["ot-notary-0.6.ebuild"], done.stdout
    doctor = lab.cli("doctor", check=False).stdout
    row = next(line for line in doctor.splitlines() if line[5:].startswith(f"tree {REPO_NAME}:"))
    assert row.startswith("OK"), row
    assert "live 2025-12-02 03:45 UTC, staged 2025-12-02 03:45 UTC, published 2025-12-02 03:45 UTC" in row, row


def test_doctor_suggests_tree_binhost_to_a_target_without_the_key(lab):
    saved = lab.config.read_text()
    try:
        lab.config.write_text(saved.replace("tree = binhost\n", ""))
        doctor = lab.cli("doctor", check=False).stdout
        row = next(line for line in doctor.splitlines() if line[5:].startswith("tree:"))
        assert row.startswith("WARN tree: ot plans from its own tree"), row
        assert f"set tree = binhost in [target ot] of {lab.config}" in row, row
        assert not [line for line in doctor.splitlines() if line[5:].startswith(f"tree {REPO_NAME}:")], doctor
    finally:
        lab.config.write_text(saved)


def test_a_failed_build_leaves_the_tree_and_index(lab):
    """ot-broken and ot-newer are new in the binhost's overlay: the target plans them from the
    staged snapshot, one build fails, and the target's live tree and the published index stay as
    they were."""
    before = lab.published_cpvs()
    broken = lab.binhost_overlay / "app-misc/ot-broken"
    broken.mkdir(parents=True)
    (broken / "ot-broken-1.0.ebuild").write_text(BROKEN_EBUILD)
    (lab.binhost_overlay / "app-misc/ot-newer").mkdir(parents=True)
    (lab.binhost_overlay / "app-misc/ot-newer/ot-newer-1.0.ebuild").write_text(tiny("ot-newer"))
    live_before = lab.mark(REPO_NAME, "live")
    result = lab.cli("emerge", "app-misc/ot-broken", "app-misc/ot-newer", check=False)
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr
    assert "not built: app-misc/ot-broken-1.0" in result.stderr, shown(result)
    assert ebuilds(lab.target_overlay, "ot-broken") == [], "the live tree moved after a failed build"
    assert ebuilds(lab.target_overlay, "ot-newer") == [], "the live overlay moved after a failed build"
    assert ebuilds(lab.trees / "staged" / OVERLAY, "ot-newer") == ["ot-newer-1.0.ebuild"], "not staged"
    assert ebuilds(lab.trees / "published" / OVERLAY, "ot-newer") == [], "published without a publication"
    assert lab.published_cpvs() == before
    assert lab.mark(REPO_NAME, "live") == live_before
    assert "ot-broken" not in " ".join(lab.installed())
    shutil.rmtree(broken)


def test_pretend_stages_but_never_moves_the_live_tree(lab):
    """--pretend: the plan is asked against the staged snapshot (ot-newer is only there), the move
    is shown, not run; a repository already staged at the binhost's revision is not pushed again."""
    result = lab.cli("--pretend", "emerge", "app-misc/ot-newer", check=False)
    assert result.returncode == 0, shown(result)
    assert re.search(r"^  app-misc/ot-newer-1\.0(:0)?  \(", result.stdout, re.MULTILINE), shown(result)
    assert "(staged there already)" not in result.stdout  # the overlay has no revision: always pushed
    assert "emerge --sync --quiet binhost-test ot-overlay" in result.stdout or \
        "emerge --sync --quiet ot-overlay" in result.stdout, shown(result)
    assert ebuilds(lab.target_overlay, "ot-newer") == [], "--pretend moved the live tree"
    assert "ot-newer-1.0" not in lab.installed()


def test_a_location_that_is_not_that_repository_is_never_sent(lab):
    """The binhost root's repos.conf is the target's copy: a target naming the binhost's gpg-home as
    the location of a repository it has gets nothing from there (only a directory that is the
    repository of that name is sent)."""
    secret = lab.base / "g"
    assert secret.is_dir(), "the premise: the signing key's home"
    theirs = lab.base / "target-secret"
    make_overlay(theirs, "ot-secret")
    binhost_entry = lab.root / "etc/portage/repos.conf/secret.conf"
    target_entry = lab.target / "etc/portage/repos.conf/secret.conf"
    binhost_entry.write_text(f"[ot-secret]\nlocation = {secret}\n")
    target_entry.write_text(f"[ot-secret]\nlocation = {theirs}\n")
    try:
        result = lab.cli("--pretend", "emerge", "app-misc/ot-notary", check=False)
        assert result.returncode == 0, shown(result)
        assert "has repositories the binhost does not: ot-secret" in result.stderr.replace(f"{TARGET_ONLY}, ", ""), \
            shown(result)
        for place in ("pretend", "staged", "published"):
            assert not (lab.trees / place / "ot-secret").exists(), place
        assert (lab.trees / "pretend" / REPO_NAME).is_dir(), "--pretend stages in a place of its own"
    finally:
        binhost_entry.unlink()
        target_entry.unlink()


def test_the_next_run_repairs_an_interrupted_update_over_the_tunnel(lab):
    """A staging copy cut short (before its mark is written: the mark says no revision) and a live
    tree whose sync was interrupted (Portage then removes its timestamp, and our live mark is not
    written): the next emerge, through the tunnel, repairs both."""
    lab.set_transport("tunnel")
    try:
        shutil.rmtree(lab.trees / "staged" / REPO_NAME / "app-misc")
        (lab.trees / f"{REPO_NAME}.staged").write_text("{}\n")
        (lab.target_repo / "metadata/timestamp.chk").unlink()
        (lab.trees / f"{REPO_NAME}.live").unlink()
        (lab.target_repo / "app-misc/ot-notary/ot-notary-0.6.ebuild").unlink()
        result = lab.cli("emerge", "app-misc/ot-newer", check=False)
        assert result.returncode == 0, shown(result)
        assert "ot-newer-1.0" in lab.installed(), shown(result)
        assert ebuilds(lab.target_repo, "ot-notary") == ["ot-notary-0.6.ebuild"], shown(result)
        assert (lab.target_repo / "metadata/timestamp.chk").read_text().strip() == BINHOST_STAMP
        assert ebuilds(lab.target_overlay, "ot-newer") == ["ot-newer-1.0.ebuild"]
        assert lab.mark(REPO_NAME, "live") == lab.mark(REPO_NAME, "published")
    finally:
        lab.set_transport("http")


def test_a_target_tree_newer_than_the_binhosts_is_not_moved_back(lab):
    """update --no-sync cannot sync the binhost first: the target's row fails, naming both
    snapshots, and its tree stays."""
    stamp = lab.target_repo / "metadata/timestamp.chk"
    stamp.write_text(NEWER_STAMP + "\n")
    try:
        result = lab.cli("update", "--no-sync", check=False)
        assert result.returncode == 1, shown(result)
        assert "Traceback" not in result.stderr
        assert (f"ot's tree is newer than the binhost's: {REPO_NAME} ({NEWER_STAMP} there, {BINHOST_STAMP} here);"
                " the target's tree does not go back") in result.stderr, shown(result)
        assert stamp.read_text().strip() == NEWER_STAMP
    finally:
        stamp.write_text(BINHOST_STAMP + "\n")


def test_emerge_syncs_the_binhost_first_when_the_target_is_newer(lab):
    """The target's tree is newer than the binhost's (it has ot-fresh): emerge syncs the binhost's
    repositories (emerge --sync on the build host; here from the newer mirror), then stages, builds
    and installs from that snapshot."""
    mirror = lab.base / "mirror"
    shutil.copytree(lab.binhost_repo, mirror)
    add_ebuild(mirror, "app-misc/ot-fresh-1.0", "only in the newer snapshot")
    (mirror / "metadata/timestamp.chk").write_text(NEWER_STAMP + "\n")
    # The target synced from that newer snapshot already (so it plans ot-fresh).
    add_ebuild(lab.target_repo, "app-misc/ot-fresh-1.0", "only in the newer snapshot")
    stamp = lab.target_repo / "metadata/timestamp.chk"
    stamp.write_text(NEWER_STAMP + "\n")
    # The build host's own Portage configuration (here: one of the test's, through PORTAGE_CONFIGROOT)
    # syncs the binhost's repository from the mirror; Gentoo's default entry stays unsynced.
    host_config = lab.base / "build-host"
    write_portage_config(host_config, repo=lab.binhost_repo)
    (host_config / "etc/portage/repos.conf" / f"{REPO_NAME}.conf").write_text(
        f"[DEFAULT]\nmain-repo = {REPO_NAME}\n\n[{REPO_NAME}]\nlocation = {lab.binhost_repo}\nsync-type = rsync\n"
        f"sync-uri = file://{mirror}\nauto-sync = yes\n\n[gentoo]\nauto-sync = no\n")
    result = run([sys.executable, SCRIPT, "-c", lab.config, "emerge", "app-misc/ot-fresh"], check=False,
                 env={"PATH": f"{lab.world.portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1",
                      "PORTAGE_CONFIGROOT": host_config}, timeout=600)
    assert result.returncode == 0, shown(result)
    assert f"ot's tree is newer than the binhost's ({REPO_NAME} ({NEWER_STAMP} there, {BINHOST_STAMP} here)):" \
        " syncing the binhost first" in result.stdout + result.stderr, shown(result)
    assert (lab.binhost_repo / "metadata/timestamp.chk").read_text().strip() == NEWER_STAMP, shown(result)
    assert "ot-fresh-1.0" in lab.installed(), shown(result)
    assert ebuilds(lab.target_repo, "ot-fresh") == ["ot-fresh-1.0.ebuild"]
    assert stamp.read_text().strip() == NEWER_STAMP
    assert lab.mark(REPO_NAME, "live")["revision"] == f"timestamp {NEWER_STAMP}"


def test_the_move_refuses_when_another_run_staged_since(gb, tmp_path):
    """PROMOTE_SCRIPT, as the target runs it: every staged copy must be the one this run built from
    before any moves (here the second is not): nothing is published, no live stamp goes."""
    base, live = tmp_path / "trees", tmp_path / "live"
    for name, mark in (("first", "r1"), ("second", "someone else's")):
        (base / "staged" / name).mkdir(parents=True)
        (base / "staged" / name / "file").write_text(name)
        (base / f"{name}.staged").write_text(mark + "\n")
    (live / "metadata").mkdir(parents=True)
    (live / "metadata/timestamp.chk").write_text(BINHOST_STAMP + "\n")
    done = subprocess.run(["sh", "-c", gb.PROMOTE_SCRIPT, "gentoo-binhost", str(base), str(tmp_path / "repos.conf"),
                           "zz-gentoo-binhost.conf", "first", "r1", str(live), "second", "r2", str(live)],
                          input="", capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "second is not the snapshot this run built from (another run staged since)" in done.stderr
    assert not (base / "published").exists() and not (base / "first.published").exists()
    assert (live / "metadata/timestamp.chk").is_file()
    assert not (tmp_path / "repos.conf").exists()


def test_config_push_keeps_the_targets_own_entry_and_a_pull_never_takes_one(gb, tmp_path, portage_bin):
    """INSTALL_CONFIG_SCRIPT (config push, as the target runs it) carries the target's own repos.conf
    entry over into the configuration it installs; a target's stream that brings one is left out
    on the binhost (sanitized_config_tar), as the binrepos entry is."""
    import hashlib
    import io
    import tarfile
    configroot = tmp_path / "target"
    portage = configroot / "etc/portage"
    (portage / "repos.conf").mkdir(parents=True)
    (portage / "make.conf").write_text('USE="old"\n')
    (portage / "repos.conf/zz-gentoo-binhost.conf").write_text("[binhost-test]\nsync-type = rsync\n")
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as archive:
        for name, text in (("etc/portage/make.conf", 'USE="new"\n'),
                           ("etc/portage/repos.conf/gentoo.conf", "[gentoo]\nlocation = /var/db/repos/gentoo\n")):
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    data = stream.getvalue()
    done = subprocess.run(["sh", "-c", gb.INSTALL_CONFIG_SCRIPT, "gentoo-binhost", str(configroot),
                           hashlib.sha256(data).hexdigest(), "20261203", "gentoo-binhost.conf", gb.OWN_REPOS_ENTRY],
                          input=data, capture_output=True, timeout=120,
                          env=dict(os.environ, PATH=f"{portage_bin}:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr.decode()
    assert (portage / "make.conf").read_text() == 'USE="new"\n'
    assert (portage / "repos.conf/zz-gentoo-binhost.conf").read_text() == "[binhost-test]\nsync-type = rsync\n"

    output = gb.Output(color=False, verbosity=1)
    planted = io.BytesIO()
    with tarfile.open(fileobj=planted, mode="w") as archive:
        for name in ("etc/portage", "etc/portage/repos.conf"):
            member = tarfile.TarInfo(name)
            member.type = tarfile.DIRTYPE
            archive.addfile(member)
        member = tarfile.TarInfo(gb.OWN_REPOS_MEMBER)
        member.size = 3
        archive.addfile(member, io.BytesIO(b"[x]"))
    kept = gb.config_members(gb.sanitized_config_tar(planted.getvalue(), "ot", output))
    assert gb.OWN_REPOS_MEMBER not in kept


def test_remove_target_gives_the_target_its_own_sync_back(lab):
    assert lab.own_entry.is_file()
    pretend = lab.cli("--pretend", "remove-target", "ot")
    assert lab.own_entry.is_file() and "[target ot]" in lab.config.read_text(), shown(pretend)
    assert "zz-gentoo-binhost.conf" in pretend.stdout, pretend.stdout
    saved = lab.config.read_text()
    result = lab.cli("remove-target", "ot")
    assert not lab.own_entry.exists(), shown(result)
    assert not lab.trees.exists(), shown(result)
    assert lab.target_repos_conf.read_text().count("location = ") == 3
    assert "syncs its repositories with its own settings again" in result.stdout, shown(result)
    # Unreachable: it says exactly what to remove there.
    lab.config.write_text(re.sub(r"ssh-port = \d+", f"ssh-port = {free_port()}", saved))
    unreachable = lab.cli("remove-target", "ot", check=False)
    assert unreachable.returncode == 0, shown(unreachable)
    assert f"rm -f {lab.own_entry} && rm -rf {lab.trees}" in unreachable.stderr, shown(unreachable)
