"""One tree: the target's plan comes from the target's ebuild tree, the builds from the binhost's.

* A planned package whose ebuild the binhost's tree lacks is not built: the rest is built and
  published, then the command stops with one `!!!` line naming each such package and why ("the
  binhost's tree has 0.6 only: sync the target" when every version the binhost has is newer,
  "...: sync the binhost's repositories (emerge --sync there)" otherwise, "the binhost's tree does
  not have it: ...", "the binhost has no repository NAME: ..."); `emerge` then installs nothing.
* Each publication records the binhost's trees (meta.json `trees`): a git repository's commit
  (loose or packed ref), else the first line of metadata/timestamp.chk, and the digest of the top
  Manifest; `history --json` shows them, `history` ends its line with "built from ...".

Both sides are on this machine: the target's repos.conf names one copy of the repository, the
binhost root's (its copy of the target's, edited after `config pull`) another copy in which the
versions differ, plus two git overlays. Real components only: Portage 3.0.83 from PyPI, the
session's sshd, our own server. Tiny ebuilds (nothing compiled), two builds in all.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, REPO_NAME, eroot, free_port, need, own_world, run, write_portage_config
eroot, free_port, need, run, write_portage_config
from conftest import tiny_ebuild as tiny

TARGET_ONLY_REPO = "ts-target-only"
OVERLAYS = ("ts-loose", "ts-packed")  # git overlays of the binhost: a loose ref, a packed one

#: The target's tree (the plan comes from it) and the binhost's (the builds come from it).
TARGET_TREE = {
    "app-misc/ts-notary-0.5": "the target is behind",
    "app-misc/ts-other-1.0": "both have it",
    "app-misc/ts-scribe-0.7": "the binhost is behind",
    "app-misc/ts-fresh-1.0": "only the target has it",
    "app-misc/ts-stamp-1.0": "both have it (the history test)",
}
BINHOST_TREE = {
    "app-misc/ts-notary-0.6": "the target is behind",
    "app-misc/ts-other-1.0": "both have it",
    "app-misc/ts-scribe-0.6": "the binhost is behind",
    "app-misc/ts-stamp-1.0": "both have it (the history test)",
}
TARGET_STAMP = "Mon, 01 Jan 2024 00:00:00 +0000"
BINHOST_STAMP = "Tue, 02 Dec 2025 03:45:00 +0000"
BINHOST_STAMP_SHOWN = "2025-12-02 03:45 UTC"  # as history shows it


def add_ebuild(repo, cpv, description):
    category, rest = cpv.split("/")
    name = re.sub(r"-\d.*$", "", rest)
    directory = Path(repo) / category / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{rest}.ebuild").write_text(tiny(name, description))


def git(*args, cwd):
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                "-c", "init.defaultBranch=master", "-c", "safe.directory=*"] + list(args), cwd=cwd)


def make_overlay(path, name, masters=REPO_NAME, ebuilds=()):
    (path / "profiles").mkdir(parents=True)
    (path / "profiles/repo_name").write_text(name + "\n")
    (path / "metadata").mkdir()
    (path / "metadata/layout.conf").write_text(f"masters = {masters}\nthin-manifests = true\n"
                                               "cache-formats =\nprofile-formats = portage-2\n")
    for cpv in ebuilds:
        add_ebuild(path, cpv, "only in the target's overlay")
    if ebuilds:
        (path / "profiles/categories").write_text("app-misc\n")


def repos_conf(*repositories):
    """A repos.conf naming (name, location) pairs, the first the main repository."""
    text = f"[DEFAULT]\nmain-repo = {repositories[0][0]}\n"
    for name, location in repositories:
        text += f"\n[{name}]\nlocation = {location}\nauto-sync = no\n"
    return text


class Lab:
    """A binhost root (own PKGDIR, port, signing key) and one target `ts`, reached through the
    session's sshd. The target's repos.conf names ``target_repo`` (TARGET_TREE) and an overlay the
    binhost does not have; the binhost root's names ``binhost_repo`` (BINHOST_TREE, with a
    timestamp.chk and a top Manifest) and, with git, two git overlays."""

    def __init__(self, world, base):
        self.world, self.base = world, base
        self.target_repo, self.binhost_repo = base / "target-repo", base / "binhost-repo"
        for repo, tree, stamp in ((self.target_repo, TARGET_TREE, TARGET_STAMP),
                                  (self.binhost_repo, BINHOST_TREE, BINHOST_STAMP)):
            shutil.copytree(REPO, repo)
            for cpv, description in tree.items():
                add_ebuild(repo, cpv, description)
            (repo / "metadata/timestamp.chk").write_text(stamp + "\n")
        (self.binhost_repo / "Manifest").write_text("TIMESTAMP 2025-12-02T03:45:00Z\n")
        self.target_only = base / TARGET_ONLY_REPO
        make_overlay(self.target_only, TARGET_ONLY_REPO, ebuilds=["app-misc/ts-lonely-1.0"])

        self.overlays = {}
        if shutil.which("git"):
            for name in OVERLAYS:
                path = base / name
                make_overlay(path, name)
                git("init", "-q", cwd=path)
                git("add", "-A", cwd=path)
                git("commit", "-q", "-m", "start", cwd=path)
                if name == "ts-packed":
                    git("pack-refs", "--all", cwd=path)
                    assert not (path / ".git/refs/heads/master").exists()
                self.overlays[name] = path

        self.root = base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.target = base / "target"
        self.port = free_port()
        self.config = base / "gentoo-binhost.conf"
        write_portage_config(self.target, repo=self.target_repo, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n'))
        target_conf = self.target / "etc/portage/repos.conf" / f"{REPO_NAME}.conf"
        target_conf.write_text(repos_conf((REPO_NAME, self.target_repo),
                                          (TARGET_ONLY_REPO, self.target_only)))
        write_portage_config(self.root, repo=self.target_repo)
        sshd = world.sshd
        self.config.write_text(
            f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\nbind = 127.0.0.1\n"
            f"port = {self.port}\ngpg-home = {base}/g\n\n"
            f"[target ts]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {self.target}\npath = {world.portage_bin}\ntree = own\n")
        self.cli("config", "pull")
        self.cli("keygen")
        self.cli("setup-target")

        # The binhost root's copy of the target's repos.conf now names other copies (its own tree).
        pulled = self.root / "etc/portage/repos.conf"
        assert str(self.target_only) in (pulled / f"{REPO_NAME}.conf").read_text(), \
            "config pull did not copy the target's repos.conf"
        for path in pulled.iterdir():
            path.unlink()  # files or links: the target's own files stay untouched
        (pulled / f"{REPO_NAME}.conf").write_text(repos_conf(
            (REPO_NAME, self.binhost_repo), *sorted(self.overlays.items())))
        assert str(self.target_repo) in target_conf.read_text()

    def cli(self, *args, check=True):
        return self.world.cli(*args, config=self.config, check=check)

    def packages(self, name="*"):
        return sorted(p.name for p in self.pkgdir.rglob(f"{name}-[0-9]*.gpkg.tar"))

    def publication_ids(self):
        published = self.pkgdir / ".published"
        return sorted(int(p.name) for p in published.iterdir() if p.name.isdigit()) if published.is_dir() else []

    def published_cpvs(self):
        index = self.pkgdir / ".published/current/Packages"
        if not index.is_file():
            return []
        return sorted(re.findall(r"^CPV: (\S+)$", index.read_text(), re.MULTILINE))

    def installed(self, prefix="app-misc/ts-"):
        category, name = prefix.split("/")
        directory = eroot(self.target, self.world.eprefix) / "var/db/pkg" / category
        if not directory.is_dir():
            return []
        return sorted(f"{category}/{entry.name}" for entry in directory.iterdir() if entry.name.startswith(name))


@pytest.fixture(scope="module")
def lab(portage_bin, eprefix, host_portage, sshd):
    with own_world("gb-trees-", portage_bin, eprefix, sshd) as (world, base):
        yield Lab(world, base)


def shown(result):
    return result.stdout + result.stderr


def incomplete_line(result, target="ts"):
    """Exit 1, no traceback, exactly one `!!!` line saying the run is incomplete; that line."""
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("!!!") and "incomplete" in line]
    assert len(lines) == 1, f"not one '!!! ... incomplete' line:\n{shown(result)}"
    line = lines[0]
    assert line.startswith(f"!!! {target}: incomplete: the binhost's tree lacks "), line
    assert line.endswith(("; the rest was built and published, nothing was installed",
                          "; the rest has binaries already, nothing was installed")), line
    return line


def plan_line(result, cpv):
    """The plan's line for cpv ("  CPV[:SLOT]  (reason)"): its reason."""
    match = re.search(r"^  " + re.escape(cpv) + r"(?::\S+)?  \((.*)\)$", result.stdout, re.MULTILINE)
    assert match, f"no plan line for {cpv}:\n{shown(result)}"
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# Item 4: the binhost's tree lacks a planned ebuild
# ------------------------------------------------------------------------------------------------

def test_target_behind_the_binhost_builds_the_rest_and_says_sync_the_target(lab):
    """The target plans ts-notary-0.5 (its tree), the binhost's tree has 0.6 only; ts-other-1.0 is
    in both."""
    assert not lab.packages("ts-other")
    result = lab.cli("build", "--for-target", "app-misc/ts-notary", "app-misc/ts-other", check=False)
    line = incomplete_line(result)
    reason = "the binhost's tree has 0.6 only: sync the target"
    assert "lacks 1 package(s) of the plan: app-misc/ts-notary-0.5 (" + reason + ");" in line, line
    assert line.endswith("; the rest was built and published, nothing was installed"), line
    assert "ts-other" not in line, line
    assert plan_line(result, "app-misc/ts-notary-0.5") == reason, result.stdout

    assert lab.packages("ts-other") == ["ts-other-1.0-1.gpkg.tar"], shown(result)
    assert not lab.packages("ts-notary"), f"a notary was built from the binhost's tree:\n{shown(result)}"
    assert "app-misc/ts-other-1.0" in lab.published_cpvs(), shown(result)
    assert not [cpv for cpv in lab.published_cpvs() if "ts-notary" in cpv]
    listed = lab.cli("list").stdout
    assert re.search(r"^app-misc/ts-other-1\.0\s", listed, re.MULTILINE), listed
    assert "ts-notary" not in listed, listed
    assert lab.installed() == [], shown(result)


def test_a_second_run_builds_and_publishes_nothing_new(lab):
    """Once the rest is built (the test before), the same command again: the same answer, no build,
    no new publication."""
    args = ("build", "--for-target", "app-misc/ts-notary", "app-misc/ts-other")
    if not lab.packages("ts-other"):  # run alone
        lab.cli(*args, check=False)
    built = lab.packages("ts-other")
    publications = lab.publication_ids()
    again = lab.cli(*args, check=False)
    line = incomplete_line(again)
    assert "lacks 1 package(s) of the plan: app-misc/ts-notary-0.5 (the binhost's tree has 0.6 only:" \
        " sync the target);" in line, line
    assert line.endswith("; the rest has binaries already, nothing was installed"), line
    assert "app-misc/ts-other-1.0" in lab.published_cpvs(), f"'the rest was ... published': it is not\n{line}"
    assert lab.packages("ts-other") == built, f"built again:\n{shown(again)}"
    assert lab.publication_ids() == publications, shown(again)


def test_binhost_behind_and_missing_repositories_stop_emerge_before_installing(lab):
    """emerge of packages none of which the binhost's tree has: ts-scribe-0.7 (the binhost has
    0.6, older), ts-fresh (not in the binhost's tree), ts-lonely (from a repository only the
    target has). Nothing is built, published or installed."""
    before = (lab.packages(), lab.published_cpvs())
    result = lab.cli("emerge", "app-misc/ts-scribe", "app-misc/ts-fresh", "app-misc/ts-lonely", check=False)
    line = incomplete_line(result)
    reasons = {
        "app-misc/ts-scribe-0.7": "the binhost's tree has 0.6 only: sync the binhost's repositories"
                                  " (emerge --sync there)",
        "app-misc/ts-fresh-1.0": "the binhost's tree does not have it: sync the binhost's repositories"
                                 " (emerge --sync there)",
        "app-misc/ts-lonely-1.0": f"the binhost has no repository {TARGET_ONLY_REPO}: add it there as the"
                                  " target has it",
    }
    assert "lacks 3 package(s) of the plan: " in line, line
    for cpv, reason in reasons.items():
        assert f"{cpv} ({reason})" in line, line
        assert plan_line(result, cpv) == reason, result.stdout
    assert (lab.packages(), lab.published_cpvs()) == before, shown(result)
    assert "Installing on" not in result.stdout, shown(result)
    assert lab.installed() == [], f"emerge installed something:\n{shown(result)}"


# ------------------------------------------------------------------------------------------------
# Item 1: a publication records the binhost's trees
# ------------------------------------------------------------------------------------------------

def test_publication_records_the_binhosts_trees(lab):
    result = lab.cli("build", "--for-target", "app-misc/ts-stamp", check=False)
    assert result.returncode == 0, shown(result)
    assert "app-misc/ts-stamp-1.0" in lab.published_cpvs(), shown(result)

    history = json.loads(lab.cli("history", "--json").stdout)
    newest = history[0]
    assert newest["current"] and "app-misc/ts-stamp-1.0" in newest["added"], newest
    trees = newest["trees"]
    expected = {REPO_NAME} | set(lab.overlays) | ({"gentoo"} if os.path.isdir("/var/db/repos/gentoo") else set())
    assert set(trees) == expected, trees
    # The binhost's copy, not the target's: its timestamp and its top Manifest.
    manifest = hashlib.sha256((lab.binhost_repo / "Manifest").read_bytes()).hexdigest()
    assert trees[REPO_NAME] == {"revision": f"timestamp {BINHOST_STAMP}", "manifest": f"sha256 {manifest}"}, trees
    meta = json.loads((lab.pkgdir / ".published" / str(newest["id"]) / "meta.json").read_text())
    assert meta["trees"] == trees, meta

    text = [line for line in lab.cli("history").stdout.splitlines() if line.lstrip().startswith(f"{newest['id']} *")]
    assert len(text) == 1, text
    assert f"; built from {REPO_NAME}@{BINHOST_STAMP_SHOWN}" in text[0], text[0]
    assert TARGET_STAMP not in text[0], text[0]
    # doctor's repository row names the snapshot the latest published builds came from.
    doctor = lab.cli("doctor", check=False).stdout
    row = next((line for line in doctor.splitlines() if line[5:].startswith(f"repository {REPO_NAME}:")), doctor)
    assert row.endswith(f"; the latest published builds came from {REPO_NAME}@{BINHOST_STAMP_SHOWN}"), row

    need(lab.overlays, "git missing: the git overlays' commits are not checked")
    for name, path in lab.overlays.items():
        head = git("rev-parse", "HEAD", cwd=path).stdout.strip()
        assert trees[name] == {"revision": f"git {head}"}, (name, trees)
        assert f"{name}@{head[:12]}" in text[0], text[0]
    if "gentoo" not in trees:
        assert text[0].endswith("; built from " + ", ".join(
            f"{name}@{BINHOST_STAMP_SHOWN if name == REPO_NAME else trees[name]['revision'][4:16]}"
            for name in sorted(trees))), text[0]
