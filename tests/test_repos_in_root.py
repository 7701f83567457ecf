"""A build machine without Gentoo (build-method = chroot, no host chroot): the ebuild repositories
live inside the binhost root.

* Nothing links to a build-host path that does not exist.
* The first build syncs a repository the root's configuration names, and this machine lacks, into
  the root, with the root's own Portage (`emerge --sync NAME` inside it; here the zipfile sync
  module from a local HTTP server, since the test image has no rsync); builds see it read-only.
* `update` syncs it there again (and not on this machine); a repository with `auto-sync = no`
  (here Portage's default Gentoo entry) is left alone.
* What a sync wrote inside the root is read through no link that leads out of it.

Real components: the debootstrap + PyPI Portage image as the binhost root, its own Portage for the
sync and the builds, the session's sshd for a target, our server."""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (REPO, REPO_NAME, SCRIPT, configure_gentoo_like_root, copy_of_chroot_image, http_server,
                      mounts_under, need, processes_inside, remove_chroot, run, tiny_ebuild, write_portage_config)

#: Where the root's configuration puts the repository: a path no build machine has.
LOCATION = "/var/db/repos/gentoo-binhost-test-kept-in-root"
#: A local overlay (eselect repository create): no sync-type, so never named to emerge --sync.
LOCAL = "gbir-local"


def add(repo, name, version):
    directory = Path(repo) / "app-misc" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}-{version}.ebuild").write_text(tiny_ebuild(name, "kept in the root"))


class Lab:
    def __init__(self, base, root, www, url):
        self.base, self.root, self.www, self.url = base, root, www, url
        self.config = base / "gentoo-binhost.conf"
        self.pkgdir = root / "var/cache/binpkgs"
        self.inside = root / LOCATION.lstrip("/")

    def publish_tree(self, *versions):
        """The mirror's snapshot: tests/repo and app-misc/ir-tiny at these versions, as a zip."""
        source = self.base / "snapshot" / "tree"
        shutil.rmtree(source.parent, ignore_errors=True)
        shutil.copytree(REPO, source)
        for version in versions:
            add(source, "ir-tiny", version)
        shutil.make_archive(str(self.www / "tree"), "zip", root_dir=source.parent, base_dir="tree")

    def cli(self, *args, check=True, timeout=900):
        return run([sys.executable, SCRIPT, "--color=n", "-c", self.config] + list(args),
                   env={"NO_COLOR": "1"}, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def lab(eprefix):
    need(os.geteuid() == 0, "a chroot build needs root")
    assert not os.path.exists(LOCATION), f"the premise: this machine has no {LOCATION}"
    base = Path(tempfile.mkdtemp(prefix="gbir-"))
    base.chmod(0o755)
    root = base / "binhost"
    www = base / "www"
    www.mkdir()
    try:
        copy_of_chroot_image(root)
        with http_server(www) as url:
            configure_gentoo_like_root(root, Path(LOCATION))
            (root / "etc/portage/repos.conf/binhost-test.conf").write_text(
                f"[DEFAULT]\nmain-repo = {REPO_NAME}\n\n[{REPO_NAME}]\nlocation = {LOCATION}\nsync-type = zipfile\n"
                f"sync-uri = {url}tree.zip\n\n[gentoo]\nauto-sync = no\n\n"
                f"[{LOCAL}]\nlocation = /var/db/repos/{LOCAL}\n")
            lab = Lab(base, root, www, url)
            lab.config.write_text(f"[binhost]\nroot = {root}\nbuild-method = chroot\ngpg-home = {base}/g\n")
            lab.publish_tree("1.0")
            yield lab
    finally:
        for pid in processes_inside(root):
            os.kill(pid, 9)
        remove_chroot(base)


def test_the_first_build_syncs_the_repository_into_the_root_and_builds_see_it_read_only(lab):
    assert not lab.inside.exists()
    pretend = lab.cli("--pretend", "build", "app-misc/ir-tiny")
    assert "emerge --sync binhost-test" in pretend.stdout, pretend.stdout
    assert not lab.inside.exists(), "--pretend synced"
    result = lab.cli("build", "--oneshot", "app-misc/ir-tiny", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Syncing {REPO_NAME} inside the binhost root {lab.root} (this machine has no such repository)" \
        f": emerge --sync {REPO_NAME}\n" in result.stdout, result.stdout
    assert f"{LOCAL} (/var/db/repos/{LOCAL}) is on neither this machine nor in the binhost root" in result.stderr
    assert (lab.inside / "app-misc/ir-tiny/ir-tiny-1.0.ebuild").is_file()
    assert [p.name for p in lab.pkgdir.rglob("ir-tiny-*.gpkg.tar")] == ["ir-tiny-1.0-1.gpkg.tar"]
    assert not os.path.exists(LOCATION), "the sync wrote on this machine"
    assert not (lab.root / "var/db/repos/gentoo").is_symlink(), "a link to this machine's missing Gentoo tree"
    assert mounts_under(lab.root) == []
    # Builds see it read-only: bound onto itself with ro (shown under --pretend).
    shown = lab.cli("--pretend", "build", "app-misc/ir-tiny").stdout
    inside = f"{lab.root}{LOCATION}"
    assert f"mount --bind -o ro --make-slave {inside} {inside}" in shown.splitlines(), shown
    assert "emerge --sync" not in shown, "synced again though it is there"


def test_update_syncs_the_repository_inside_the_root(lab, sshd, portage_bin):
    """update: emerge --sync of the kept repository inside the root (the mirror has 2.0 now), not on
    this machine; Gentoo's default entry (auto-sync = no here) is not synced."""
    target = lab.base / "target"
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    original = lab.config.read_text()
    lab.publish_tree("1.0", "2.0")
    try:
        lab.config.write_text(original + (
            f"\n[target t]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {target}\npath = {portage_bin}\ntree = own\n"))
        result = lab.cli("update", check=False)
        said = result.stdout + result.stderr
        assert f"Syncing {REPO_NAME} inside the binhost root {lab.root} (this machine has no such repository):" \
               f" emerge --sync {REPO_NAME}" in said, said
        assert not re.search(r"Syncing the ebuild repositories on this machine", said), said
        assert "gentoo" not in said.split("emerge --sync", 1)[1].splitlines()[0], said
        assert (lab.inside / "app-misc/ir-tiny/ir-tiny-2.0.ebuild").is_file(), said
        assert not os.path.exists(LOCATION)
        assert mounts_under(lab.root) == []
    finally:
        lab.config.write_text(original)


def test_what_the_sync_wrote_is_read_through_no_link_out_of_the_root(gb, tmp_path):
    """A repository inside the root is the root's content: its sync (or a build that could write
    there) may leave absolute links, which mean paths of the chroot, never this machine's files."""
    from types import SimpleNamespace
    secret = tmp_path / "secret"
    secret.write_text("this machine's secret\n")
    root = tmp_path / "root"
    repository = root / "var/db/repos/planted"
    (repository / "profiles").mkdir(parents=True)
    (repository / "profiles/repo_name").write_text("planted\n")
    (repository / "metadata").mkdir()
    (repository / "metadata/timestamp.chk").symlink_to(secret)
    (repository / "Manifest").symlink_to(secret)
    assert gb.repository_name(str(repository)) == "planted"
    assert gb.repository_state(str(repository), str(root)) == {}, "read through a link to this machine"
    # A git worktree's gitdir, absolute, names a path of the chroot: not followed either.
    fake_git = tmp_path / "fake.git"
    fake_git.mkdir()
    (fake_git / "HEAD").write_text("0123456789abcdef0123456789abcdef01234567\n")
    (repository / ".git").write_text(f"gitdir: {fake_git}\n")
    assert gb.repository_state(str(repository), str(root)) == {}
    assert gb.repository_state(str(repository), str(tmp_path / "other-root")) == {
        "revision": "git 0123456789abcdef0123456789abcdef01234567"}, "a repository of this machine's own"
    settings = SimpleNamespace(root=str(root), host_chroot=None)
    assert gb.repository_directory(settings, "/var/db/repos/planted") == str(repository)
    # A link on the way to it: the repository is not taken from there.
    elsewhere = tmp_path / "elsewhere"
    (root / "var/db/repos").rename(elsewhere)
    (root / "var/db/repos").symlink_to(elsewhere)
    assert gb.repository_directory(settings, "/var/db/repos/planted") == "/var/db/repos/planted"


MOUNTS_DRIVER = r"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("gentoo_binhost", sys.argv[1])
gb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gb)
root = sys.argv[2]
repository = os.path.join(root, "var/db/repos/kept")
point = os.path.realpath(repository)
output = gb.Output(color=False, verbosity=0)
runner = gb.Runner(output)

def mounts(writable, exclusive=()):
    made = gb.HostMounts(root, runner, output, lambda: [("var/db/repos/kept", "{}", not writable)])
    made.exclusive = exclusive
    return made

def writable():
    try:
        with open(os.path.join(repository, "probe"), "w"):
            return "writable"
    except OSError:
        return "read-only"

# A sync's writable view; a query that started before the repository was there joins it; the
# sync leaves first: the query, last out, leaves the view (not its place) mounted, and recorded.
sync, query = mounts(writable=True), gb.HostMounts(root, runner, output)
sync.enter()
query.enter()
print("joined", writable())
sync.leave()
query.leave()
print("left", point in gb.mount_points())
# The next command finds nobody using the mounts: the leftover is not used as it is.
build = mounts(writable=False)
build.enter()
print("build", writable())
# A sync while a command holds the read-only view: refused, nothing mounted over it.
try:
    mounts(writable=True, exclusive=[point]).enter()
    print("sync entered")
except gb.BinhostError as error:
    print("sync refused:", error)
build.leave()
print("end", point in gb.mount_points())
# What a command mounted is unmounted as it was listed, whatever the configuration says meanwhile.
listed = [("var/db/repos/kept", "{}", True)]
changing = gb.HostMounts(root, runner, output, lambda: list(listed))
changing.enter()
print("listed", point in gb.mount_points())
listed.clear()  # config pull, say, named the repository no more
changing.leave()
print("unlisted", point in gb.mount_points())
"""


def test_the_sync_view_of_a_kept_repository_never_outlives_its_record(tmp_path):
    """The mounts of the binhost root are shared by the commands using it; the sync sees a kept
    repository writable, builds see it read-only; what a command mounted is unmounted as it was
    listed when it mounted. Run in a mount namespace of its own."""
    need(os.geteuid() == 0 and shutil.which("unshare"), "mounts need root and unshare")
    root = tmp_path / "root"
    (root / "var/db/repos/kept/profiles").mkdir(parents=True)
    (root / "var/db/repos/kept/profiles/repo_name").write_text("kept\n")
    driver = tmp_path / "driver.py"
    driver.write_text(MOUNTS_DRIVER)
    result = run(["unshare", "--mount", "--propagation", "private", sys.executable, driver, SCRIPT, root],
                 check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert said.splitlines()[:3] == ["joined writable", "left True", "build read-only"], said
    assert "sync refused:" in said and "is mounted (another command using" in said, said
    assert said.splitlines()[-3:] == ["end False", "listed True", "unlisted False"], said


def test_the_chroot_method_binds_a_repository_over_the_link_config_pull_made(gb, tmp_path):
    """config pull links the root's repositories in, for the root method (Portage on this machine
    reads them there). Inside the root such a link points at itself: the chroot method binds the
    repository over it for each build (add-target, which runs config pull, then failed every
    chroot build)."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, symlinks=True)
    root = tmp_path / "root"
    write_portage_config(root, repo=repo)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = chroot\n")
    env = gb.load_config(str(config), gb.Runner(gb.Output(color=False, verbosity=0))).environment_for()
    gb.link_repositories_into(env)
    link = root / str(repo).lstrip("/")
    assert link.is_symlink() and os.readlink(link) == str(repo)
    assert (str(repo), str(repo), True) in gb.chroot_build_binds(env)


def test_one_host_per_build_method_binds_what_the_configuration_names_when_it_mounts(gb, tmp_path):
    """A command holds one BuildHost per build method (its mounts with it); what it binds is
    read when it mounts, so a repository config pull adds meanwhile is bound too (what it bound is
    unmounted as it was bound: test_the_sync_view_of_a_kept_repository_never_outlives_its_record)."""
    repo, other = tmp_path / "repo", tmp_path / "other"
    shutil.copytree(REPO, repo, symlinks=True)
    shutil.copytree(REPO, other, symlinks=True)
    (other / "profiles/repo_name").write_text("other\n")
    root = tmp_path / "root"
    write_portage_config(root, repo=repo)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = chroot\n")
    env = gb.load_config(str(config), gb.Runner(gb.Output(color=False, verbosity=0))).environment_for()
    host = env.host
    assert env.host is host and env.host_for(gb.BUILD_METHODS["chroot"]) is host
    assert env.host_for() is env.host_for() and env.host_for() is not host
    assert env.host_for(gb.BUILD_METHODS["chroot"], trees_writable=True) is not host

    def bound():
        return [name for name, _ in host.mounts.mounts[len(gb.CHROOT_MOUNTS):]]
    assert bound() == [str(repo).strip("/")]
    (root / "etc/portage/repos.conf/other.conf").write_text(f"[other]\nlocation = {other}\n")
    assert bound() == [str(other).strip("/"), str(repo).strip("/")]


def test_no_repository_link_is_made_through_a_link_planted_in_the_root(gb, tmp_path):
    """A build's root phase can leave a link in the binhost root where a repository's link goes
    (its parent pointing out of the root): config pull refuses, and makes nothing there."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, symlinks=True)
    root = tmp_path / "root"
    write_portage_config(root, repo=repo)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    parent = root / str(repo.parent).lstrip("/")
    parent.parent.mkdir(parents=True, exist_ok=True)
    parent.symlink_to(elsewhere)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    env = gb.load_config(str(config), gb.Runner(gb.Output(color=False, verbosity=0))).environment_for()
    with pytest.raises(gb.BinhostError, match=f"{parent} is a symbolic link .*refusing to write"):
        gb.link_repositories_into(env)
    assert list(elsewhere.iterdir()) == []
