"""The host chroot ([host] chroot, init --host-chroot) without building anything: configuration,
path translation, --pretend, refusals (a real unprivileged user and a real dropped capability)."""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import SCRIPT, need, umount_under


def cli(*args, config, env=None, prefix=()):
    full_env = dict(os.environ)
    full_env.pop("GENTOO_BINHOST_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(list(prefix) + [sys.executable, str(SCRIPT), "--color=n", "-c", str(config)]
                          + list(args), capture_output=True, text=True, env=full_env, timeout=120)


def one_error(result, code, *fragments):
    assert result.returncode == code, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("!!!")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def chroot(tmp_path):
    """A directory shaped like a Gentoo host environment, enough for --pretend (nothing runs)."""
    directory = tmp_path / "gentoo"
    for path in ("usr/bin", "proc", "sys", "dev", "run", "etc", "binhost/etc/portage"):
        (directory / path).mkdir(parents=True)
    for tool in ("emerge", "emaint", "gpkg-sign", "portageq", "emerge-webrsync"):
        (directory / "usr/bin" / tool).write_text("#!/bin/sh\n")
    yield directory
    # Should a regression ever mount something here, pytest must not clean up into the host's /dev.
    umount_under(directory)


def write_config(tmp_path, text):
    path = tmp_path / "gentoo-binhost.conf"
    path.write_text(textwrap.dedent(text))
    return path


def mounts_under(directory):
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if line.split()[4].startswith(str(directory))]


# ---- configuration ---------------------------------------------------------------------------------


def test_the_binhost_root_defaults_to_inside_the_chroot(gb, tmp_path, chroot):
    config = gb.load_config(str(write_config(tmp_path, f"[host]\nchroot = {chroot}\n")), gb.Runner(gb.Output(color=False)))
    assert config.binhost.root == f"{chroot}/binhost"
    assert config.binhost.pkgdir == f"{chroot}/binhost/var/cache/binpkgs"
    # The signing key is used by gpg here, never by Portage in there: it stays out of the chroot.
    assert config.binhost.gpg_home == str(tmp_path / "gentoo-binhost/gnupg")


@pytest.mark.parametrize("text, fragments", [
    ("[host]\nchroot = {chroot}\n[binhost]\nroot = /binhost\n",
     ["[binhost] root = /binhost is outside the host chroot", "put it under"]),
    ("[host]\nchroot = {chroot}\n[binhost]\nroot = {chroot}\n", ["is the host chroot itself"]),
    ("[host]\nchroot = {chroot}\n[target t]\nhost = h\nbinhost-root = /elsewhere\n",
     ["[target t] binhost-root"]),
    ("[host]\nchroot = {chroot}\npath = opt/bin\n", ["must be an absolute path"]),
    ("[host]\npath = /opt/bin\n", ["[host] path without chroot"]),
    ("[host]\nchroot = /\n", ["leave the key out"]),
    ("[host]\nchroots = /x\n", ["unknown key 'chroots'"]),
])
def test_bad_host_settings_are_one_line_errors(tmp_path, chroot, text, fragments):
    config = write_config(tmp_path, text.format(chroot=chroot))
    one_error(cli("list", config=config), 2, *fragments)


# ---- what runs, and how ------------------------------------------------------------------------------


def test_commands_in_the_chroot_get_its_paths_and_a_clean_environment(gb, chroot, monkeypatch):
    monkeypatch.setenv("MAKEOPTS", "-j3")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")  # not generated in a fresh stage3
    monkeypatch.setenv("PYTHONPATH", "/host/only")
    settings = gb.BinhostSettings({}, "c.conf", gb.HostSettings({"chroot": str(chroot),
                                                                 "path": "/opt/portage/bin"}, "c.conf"))
    output = gb.Output(color=False)
    host = gb.BuildHost(gb.Environment(settings, gb.Runner(output), output))
    argv, env = host.command(["emerge", "--buildpkg", ">=dev-lang/python-3.12", f"{chroot}/binhost/x"],
                             gb.portage_environment(settings))
    assert env is None
    # Confined (README: Confinement): unshare ... -- PYTHON -I -c PROGRAM CHROOT -- env -i ...
    assert argv[:len(gb.CONFINE_UNSHARE)] == gb.CONFINE_UNSHARE
    assert argv[argv.index(str(chroot)) - 3:argv.index(str(chroot)) + 4] == [
        "-I", "-c", gb.CONFINE_PROGRAM, str(chroot), "--", "env", "-i"]
    assert "ROOT=/binhost" in argv and "PORTAGE_CONFIGROOT=/binhost" in argv
    assert "PKGDIR=/binhost/var/cache/binpkgs" in argv
    assert "MAKEOPTS=-j3" in argv
    assert not any(word.startswith(("PYTHONPATH", "LANG")) for word in argv)
    assert f"PATH=/opt/portage/bin:{gb.CHROOT_PATH}" in argv
    assert argv[-4:] == ["emerge", "--buildpkg", ">=dev-lang/python-3.12", "/binhost/x"]
    assert host.program("emerge", "") == "/usr/bin/emerge"
    assert gb.under(host.chroot, "/binhost/var/db/pkg") == f"{chroot}/binhost/var/db/pkg"
    with pytest.raises(gb.BinhostError, match="not found in the host chroot"):
        host.program("distcc", "install distcc")


def test_pretend_build_shows_mounts_chroot_and_unmounts_and_runs_nothing(chroot, tmp_path):
    config = write_config(tmp_path, f"[host]\nchroot = {chroot}\n")
    resolv = chroot / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text("nameserver 192.0.2.1\n")  # not this machine's: the build would sync it
    try:
        result = cli("--pretend", "build", "-uDN", ">=dev-lang/python-3.12", config=config)
        assert resolv.read_text() == "nameserver 192.0.2.1\n"
    finally:
        shutil.copyfile("/etc/resolv.conf", resolv)
    assert result.returncode == 0, result.stderr
    # Before a root-method build, the repositories' links into the binhost root (shown, not made).
    link = [f"mkdir -p {chroot}/binhost/var/db/repos", f"ln -s /var/db/repos/gentoo {chroot}/binhost/var/db/repos/gentoo"]
    assert result.stdout.splitlines()[:2] == link, result.stdout
    lines = [line for line in result.stdout.splitlines() if line not in link]
    assert not (chroot / "binhost/var/db/repos/gentoo").exists()
    # Then name resolution inside, as this machine's (shown, not written), and the mounts.
    assert lines[0] == f" * Would write {resolv}:" and "-nameserver 192.0.2.1" in lines, result.stdout
    lines = lines[lines.index(f"mount --types proc proc {chroot}/proc"):]
    assert lines[0] == f"mount --types proc proc {chroot}/proc"
    assert f"mount --rbind --make-rslave /dev {chroot}/dev" in lines
    assert f"mount --rbind --make-rslave /sys {chroot}/sys" in lines
    assert f"mount --bind --make-slave /run {chroot}/run" in lines
    # Confined: the fetch first, then the build (README: Confinement).
    fetch_line, chroot_line = [line for line in lines if line.startswith("unshare ")]
    assert f' -I -c "$CONFINE_PROGRAM" {chroot} -- env -i ' in chroot_line and " --net " in chroot_line
    assert fetch_line.endswith(" --fetchonly --ask=n") and " --net " not in fetch_line
    argv = shlex.split(chroot_line)
    assert argv[-6:] == ["/usr/bin/emerge", "--root-deps", "--getbinpkg=n", "--getbinpkgonly=n",
                         "-uDN", ">=dev-lang/python-3.12"]
    assert "ROOT=/binhost" in argv
    assert lines.index(chroot_line) < lines.index(f"umount --recursive {chroot}/proc") == len(lines) - 1
    assert mounts_under(chroot) == []
    assert not (chroot / "var/cache/gentoo-binhost/mounts").exists()


def test_pretend_init_on_an_existing_chroot_shows_the_sync_and_the_config_change(chroot, tmp_path):
    config = write_config(tmp_path, "[binhost]\nport = 8080\n")
    result = cli("--pretend", "init", "--host-chroot", str(chroot), config=config)
    assert result.returncode == 0, result.stderr
    assert f"Using the existing host environment in {chroot}" in result.stdout
    webrsync = next(line for line in result.stdout.splitlines() if line.startswith("unshare "))
    assert shlex.split(webrsync)[-1] == "/usr/bin/emerge-webrsync"
    assert f"Keeping the binhost root {chroot}/binhost" in result.stdout
    assert f"+chroot = {chroot}" in result.stdout  # the diff of the config file it would write
    assert config.read_text() == "[binhost]\nport = 8080\n"
    assert mounts_under(chroot) == []


def test_init_host_chroot_options_need_a_chroot(tmp_path):
    config = write_config(tmp_path, "[binhost]\nroot = /binhost\n")
    one_error(cli("init", "--no-sync", config=config), 2, "--host-chroot DIR")


@pytest.mark.parametrize("euid, capabilities, fragment", [
    (1000, None, "needs root"),
    (0, (1 << 41) - 1 - (1 << 18), "lacks CAP_SYS_CHROOT"),
    (0, (1 << 41) - 1 - (1 << 21), "lacks CAP_SYS_ADMIN"),
])
def test_privileges_are_named(gb, euid, capabilities, fragment):
    with pytest.raises(gb.BinhostError, match=fragment):
        gb.check_chroot_privileges("/srv/gentoo", euid=euid, capabilities=capabilities)
    gb.check_chroot_privileges("/srv/gentoo", euid=0, capabilities=(1 << 41) - 1)


def test_a_missing_capability_is_refused_for_real(chroot, tmp_path):
    """setpriv really takes CAP_SYS_CHROOT away; the build stops before mounting anything."""
    need(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv (util-linux)")
    config = write_config(tmp_path, f"[host]\nchroot = {chroot}\n")
    result = cli("build", "app-misc/hello", config=config,
                 prefix=["setpriv", "--bounding-set", "-sys_chroot", "--inh-caps", "-sys_chroot"])
    one_error(result, 1, "lacks CAP_SYS_CHROOT", str(chroot))
    assert mounts_under(chroot) == []


def test_not_root_is_refused_for_real(chroot):
    need(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv (util-linux)")
    # nobody must be able to read the config: outside pytest's 0700 directories.
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        config = write_config(Path(directory), f"[host]\nchroot = {chroot}\n")
        config.chmod(0o644)
        result = cli("build", "app-misc/hello", config=config,
                     prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    one_error(result, 1, "needs root", "run gentoo-binhost.py as root")


def test_repository_timestamps_from_emerge_info(gb):
    info = textwrap.dedent("""\
        Repositories:

        gentoo
            location: /var/db/repos/gentoo
            timestamp: Mon, 23 Nov 2026 00:45:00 +0000

        local
            location: /var/db/repos/local

        ACCEPT_KEYWORDS="amd64"
        """)
    assert gb.parse_repository_timestamps(info) == {"gentoo": "Mon, 23 Nov 2026 00:45:00 +0000"}
    older = "Timestamp of repository gentoo: Sun, 01 Nov 2026 00:45:00 +0000\n"
    assert gb.parse_repository_timestamps(older) == {"gentoo": "Sun, 01 Nov 2026 00:45:00 +0000"}


def test_init_refuses_a_mount_point_as_the_chroot(tmp_path):
    """The stage3 is extracted beside DIR and renamed into place, which a mount point cannot be."""
    need(os.geteuid() == 0, "needs root (mount)")
    directory = tmp_path / "disk"
    directory.mkdir()
    subprocess.run(["mount", "--types", "tmpfs", "tmpfs", str(directory)], check=True)
    try:
        (directory / "lost+found").mkdir()  # a fresh filesystem is not an existing environment
        config = write_config(tmp_path, "[binhost]\nport = 8080\n")
        result = cli("init", "--host-chroot", str(directory), "--no-sync", "--no-verify-pgp",
                     "--host-stage3", str(tmp_path / "stage3.tar.xz"), config=config)
        one_error(result, 1, f"{directory} is a mount point", f"{directory}/gentoo")
    finally:
        umount_under(directory)
