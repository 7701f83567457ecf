"""build-method = chroot: emerge runs inside the binhost root, a real system (the debootstrap +
PyPI Portage image), with /proc, /sys, /dev, /run and the ebuild repository mounted. Dependencies
resolve, install and compile there alone: the program is built against the binhost root's library,
and the build host's own package database does not change."""

import hashlib
import io
import os
import re
import shutil
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (CHROOT_EPREFIX, REPO, SCRIPT, configure_gentoo_like_root, copy_of_chroot_image,
                      mounts_under, need, processes_inside, remove_chroot, run, slow_ebuild, tiny_ebuild)

LIBV_EBUILD = """EAPI=8
DESCRIPTION="A header that says its version (binhost test package)"
HOMEPAGE="https://example.invalid/libv"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
IUSE="extra"
src_install() {
	insinto /usr/include
	newins - libv.h <<<"#define LIBV_VERSION \\"${PV}$(usex extra +extra '')\\""
}
"""
LIBV_APP_EBUILD = """EAPI=8
DESCRIPTION="Prints the libv it was compiled against (binhost test package)"
HOMEPAGE="https://example.invalid/libv-app"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
DEPEND="dev-libs/libv[extra]"
src_compile() {
	printf '#include <stdio.h>\\n#include <libv.h>\\nint main(void) { puts("libv " LIBV_VERSION); return 0; }\\n' \\
		> main.c || die
	# ESYSROOT stands in for the compiler's default include path (a prefix install here).
	${CC:-gcc} ${CFLAGS} -I"${ESYSROOT}/usr/include" -o libv-app main.c || die
}
src_install() {
	dobin libv-app
}
"""


def runs_in(root, command):
    """Whether a command line runs Portage in root, confined (README: Confinement, `unshare ...
    PYTHON -I -c "$CONFINE_PROGRAM" ROOT -- env -i ...`): these machines allow namespaces, so
    the plain chroot, the fallback, does not count here (tests/test_confinement.py has it)."""
    return command.startswith("unshare ") and f' -I -c "$CONFINE_PROGRAM" {root} -- env -i ' in command


def tree_digest(path):
    """A digest of every file name and content below path (a package database)."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(directory, name)
            digest.update(full.encode() + b"\0")
            if not os.path.islink(full):
                digest.update(Path(full).read_bytes())
    return digest.hexdigest()


class ChrootBuild:
    def __init__(self, base, root, repo):
        self.base, self.root, self.repo = base, root, repo
        self.config = base / "gentoo-binhost.conf"
        self.pkgdir = root / "var/cache/binpkgs"

    def cli(self, *args, check=True, timeout=600):
        return run([sys.executable, SCRIPT, "--color=n", "-c", self.config] + list(args),
                   env={"NO_COLOR": "1"}, check=check, timeout=timeout)

    def inside(self, path):
        return self.root / path.lstrip("/")


@pytest.fixture(scope="module")
def chroot_build(eprefix):
    need(os.geteuid() == 0, "a chroot build needs root")
    base = Path(tempfile.mkdtemp(prefix="gbcb-"))  # short: gpg-agent socket paths
    base.chmod(0o755)
    root = base / "binhost"
    try:
        copy_of_chroot_image(root)
        # The repository lives on the build host; the copied configuration names it by this path.
        repo = base / "repo"
        shutil.copytree(REPO, repo, symlinks=True)
        (repo / "profiles/categories").write_text("app-misc\ndev-libs\n")
        for category, name, version, text in (("dev-libs", "libv", "1", LIBV_EBUILD),
                                              ("dev-libs", "libv", "2", LIBV_EBUILD),
                                              ("app-misc", "libv-app", "1.0", LIBV_APP_EBUILD),
                                              ("app-misc", "slow", "1.0", slow_ebuild("/tmp/chroot-build-slow-started"))):
            (repo / category / name).mkdir(parents=True, exist_ok=True)
            (repo / category / name / f"{name}-{version}.ebuild").write_text(text)
        configure_gentoo_like_root(root, repo, extra_make_conf='USE="extra"\n')
        world = ChrootBuild(base, root, repo)
        world.config.write_text(f"[binhost]\nroot = {root}\n")
        yield world
    finally:
        leftovers = processes_inside(root)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        remove_chroot(base)


def test_pretend_shows_mounts_chroot_and_emerge_and_chooses_chroot(chroot_build):
    result = chroot_build.cli("-p", "build", "app-misc/libv-app")
    lines = result.stdout.splitlines()
    root = chroot_build.root
    assert f"mount --types proc proc {root}/proc" in lines
    # Read-only: a build's root phase cannot change the build machine's repository.
    assert f"mount --bind -o ro --make-slave {chroot_build.repo} {root}{chroot_build.repo}" in lines
    # The build itself, after the fetch (README: Confinement).
    emerge = [line for line in lines if runs_in(root, line) and "/emerge --getbinpkg=n" in line][-1]
    assert emerge.endswith("/usr/local/bin/emerge --getbinpkg=n --getbinpkgonly=n app-misc/libv-app")
    assert "buildpkg" in next(word for word in shlex.split(emerge) if word.startswith("FEATURES="))
    assert "--root-deps" not in emerge and "PKGDIR=/var/cache/binpkgs" in emerge
    assert not list(chroot_build.pkgdir.rglob("*.gpkg.tar")) and mounts_under(root) == []


def test_builds_against_the_binhost_root_and_leaves_the_build_host_alone(chroot_build, eprefix):
    host_vdb = Path(eprefix) / "var/db/pkg"
    before = tree_digest(host_vdb)
    chroot_build.cli("keygen")
    result = chroot_build.cli("build", "app-misc/libv-app")
    assert "USE changes are necessary" not in result.stdout + result.stderr
    packages = sorted(p.relative_to(chroot_build.pkgdir).as_posix() for p in chroot_build.pkgdir.rglob("*.gpkg.tar"))
    assert packages == ["app-misc/libv-app/libv-app-1.0-1.gpkg.tar", "dev-libs/libv/libv-2-1.gpkg.tar"]
    # Compiled inside, against the binhost root's libv (version 2, with USE=extra): run it there.
    program = f"{CHROOT_EPREFIX}/usr/bin/libv-app"
    assert run(["chroot", chroot_build.root, program]).stdout == "libv 2+extra\n"
    assert tree_digest(host_vdb) == before, "the build host's package database changed"
    assert mounts_under(chroot_build.root) == [] and processes_inside(chroot_build.root) == []
    # Signed after the build, here, outside the root (README: Signing outside the build).
    with open(chroot_build.pkgdir / "app-misc/libv-app/libv-app-1.0-1.gpkg.tar", "rb") as handle:
        assert b".sig" in handle.read()


def test_a_failing_chroot_build_leaves_no_mounts(chroot_build):
    result = chroot_build.cli("build", "app-misc/no-such-package", check=False)
    # Stopped by the fetch step already (README: Confinement), or by the build.
    assert result.returncode == 1, result.stderr
    assert re.search(r"^!!! emerge (--fetchonly )?failed on the binhost", result.stderr, re.M), result.stderr
    assert mounts_under(chroot_build.root) == []


def test_sigterm_to_the_tool_stops_the_chroot_build_and_unmounts(chroot_build):
    started = chroot_build.root / "tmp/chroot-build-slow-started"
    started.unlink(missing_ok=True)
    build = subprocess.Popen([sys.executable, str(SCRIPT), "--color=n", "-c", str(chroot_build.config),
                              "build", "--oneshot", "app-misc/slow"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert build.poll() is None and time.monotonic() < deadline, build.communicate()[0]
            time.sleep(0.2)
        os.kill(build.pid, signal.SIGTERM)
        output = build.communicate(timeout=90)[0]
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 143, output
    assert processes_inside(chroot_build.root) == []
    assert mounts_under(chroot_build.root) == []


def test_automatic_choice_is_root_when_this_cpu_cannot_run_the_targets_flags(tmp_path):
    need(shutil.which("gcc"), "gcc missing")
    native = set(run(["gcc", "-march=native", "-dM", "-E", "-x", "c", "/dev/null"]).stdout.split())
    candidates = [("-mavx512vp2intersect", "__AVX512VP2INTERSECT__"), ("-mamx-tile", "__AMX_TILE__"),
                  ("-mavx512fp16", "__AVX512FP16__"), ("-mavx5124fmaps", "__AVX5124FMAPS__"),
                  ("-mavx512f", "__AVX512F__"), ("-mavx2", "__AVX2__")]
    usable = [(flag, macro) for flag, macro in candidates if macro not in native
              and run(["gcc", flag, "-E", "-x", "c", "/dev/null"], check=False).returncode == 0]
    need(usable, "this CPU has every instruction set gcc knows here")
    flag, macro = usable[0]
    root = tmp_path / "binhost"
    for program in ("usr/bin/emerge", "usr/bin/gcc"):  # a system to build in, as far as it can tell
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("")
    (root / "etc/portage").mkdir(parents=True)
    (root / "etc/portage/make.conf").write_text(f'COMMON_FLAGS="-O2 {flag}"\nCFLAGS="${{COMMON_FLAGS}}"\n')
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "emerge").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "emerge").chmod(0o755)
    result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "-p", "build", "app-misc/hello"],
                 env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert f"Building with the root method: this CPU lacks {macro}" in result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("ROOT="))
    assert "--root-deps" in command and not result.stdout.startswith("chroot")
    # Said explicitly, the method is used as it is.
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "-p", "build", "app-misc/hello"],
                 env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert "Building with the root method" not in result.stderr


def test_chroot_method_refuses_a_pkgdir_outside_the_root(tmp_path):
    root = tmp_path / "binhost"
    (root / "etc/portage").mkdir(parents=True)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\npkgdir = {tmp_path}/elsewhere\nbuild-method = chroot\n")
    result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "-p", "build", "app-misc/hello"], check=False)
    assert result.returncode == 1
    assert "is outside the binhost root" in result.stderr and "build-method = root" in result.stderr
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = sometimes\n")
    result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "build", "app-misc/hello"], check=False)
    assert result.returncode == 2 and "build-method = sometimes" in result.stderr


# ---- sign, clean, config and doctor run Portage where builds do; the build method and why ----------


def running(result, prefix):
    """The commands -v says it ran (" * Running: ..."), those starting with prefix."""
    return [line[len(" * Running: "):] for line in result.stderr.splitlines()
            if line.startswith(" * Running: " + prefix)]


def test_sign_clean_config_and_doctor_run_portage_inside_the_binhost_root(chroot_build, sshd, portage_bin):
    """README (Build methods): `sign`, `clean`, `config` and `doctor` run Portage in the same place as
    builds do: confined in the root (`unshare ... "$CONFINE_PROGRAM" ROOT -- env -i ...`, README: Confinement)
    with the root's own tools and paths as the root sees them; signing alone runs here, with gpg."""
    from conftest import write_portage_config
    root = chroot_build.root
    if "signing-key" not in chroot_build.config.read_text():
        chroot_build.cli("keygen")
    if not list(chroot_build.pkgdir.rglob("*.gpkg.tar")):
        chroot_build.cli("build", "--oneshot", "dev-libs/libv")
    original = chroot_build.config.read_text()
    target = chroot_build.base / "target"
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    resolv = chroot_build.inside("/etc/resolv.conf")
    try:
        resolv.unlink(missing_ok=True)
        resolv.write_text("nameserver 192.0.2.53\n")  # README: /etc/resolv.conf is copied in
        signed = chroot_build.cli("-v", "sign", "--all")
        assert "Signed" in signed.stdout
        assert resolv.read_text() == Path("/etc/resolv.conf").read_text()
        # README (Signing outside the build): gpg signs on this machine, in gpg-home, never inside
        # the root and never with Portage's gpkg-sign; the index is refreshed inside, as builds do.
        commands = running(signed, "")
        assert not [c for c in commands if "gpkg-sign" in c], commands
        detached = [c for c in commands if "--detach-sign" in c]
        assert detached and all(c.startswith("gpg ") and f"--homedir {signing_home(chroot_build)} " in c
                                for c in detached), detached
        assert any(runs_in(root, c) and c.endswith("/usr/local/bin/emaint binhost --fix") for c in commands)
        assert mounts_under(root) == []

        # config pull links each repository in for the root method: a read-only query under
        # --pretend still mounts the repository over that link (the mount is real, the build is not).
        place = root / str(chroot_build.repo).lstrip("/")
        if place.is_dir() and not place.is_symlink() and not any(place.iterdir()):
            place.rmdir()
            place.symlink_to(chroot_build.repo)
        cleaned = chroot_build.cli("-v", "--pretend", "clean")
        assert any(runs_in(root, c) and c.endswith("/usr/local/bin/portageq envvar EROOT")
                   for c in running(cleaned, "")), cleaned.stderr
        assert f"--pretend: mounting /proc, /sys, /dev and /run in {root} for the read-only queries" in cleaned.stdout
        assert mounts_under(root) == []

        chroot_build.config.write_text(original + (
            f"\n[target t]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {target}\npath = {portage_bin}\n"))
        diff = chroot_build.cli("-v", "config", "diff")
        assert '-USE="extra"' in diff.stdout and '+USE="loud"' in diff.stdout
        assert [c for c in running(diff, "") if runs_in(root, c)] and not running(diff, "sh -c"), \
            "the binhost side was read outside the root"

        doctor = chroot_build.cli("-v", "doctor", check=False)
        assert "OK   build method: chroot: this CPU runs code built with the target's flags" in doctor.stdout
        portageq = [c for c in running(doctor, "") if "portageq envvar -v CHOST" in c and not c.startswith("ssh ")]
        assert portageq and all(runs_in(root, c) and "/usr/local/bin/portageq" in c for c in portageq), portageq
        # The binhost side's USE is the root's own make.conf (USE="extra"), read by the root's Portage.
        assert "t has loud, the binhost has extra" in doctor.stdout
        assert mounts_under(root) == [] and processes_inside(root) == []
    finally:
        chroot_build.config.write_text(original)


def test_only_binhost_distdir_is_ever_bound_writable_at_the_targets_distdir(chroot_build):
    """README: DISTDIR is bound only from [binhost] distdir, at the place the target's DISTDIR names;
    a directory of this machine the target's make.conf names is never bound, and a DISTDIR that is
    a system directory is refused, naming the setting."""
    make_conf = chroot_build.inside("/etc/portage/make.conf")
    original, config_text = make_conf.read_text(), chroot_build.config.read_text()
    named = chroot_build.base / "distfiles"  # exists on this machine: the target names it
    shared = chroot_build.base / "shared-distfiles"
    try:
        named.mkdir()
        make_conf.write_text(original + f'DISTDIR="{named}"\n')
        alone = chroot_build.cli("-p", "build", "dev-libs/libv")
        assert not [line for line in alone.stdout.splitlines() if line.startswith("mount --bind") and str(named) in line]
        shared.mkdir()
        chroot_build.config.write_text(config_text + f"distdir = {shared}\n")
        bound = chroot_build.cli("-p", "build", "dev-libs/libv").stdout.splitlines()
        mount = f"mount --bind --make-slave {shared} {chroot_build.root}{named}"
        assert mount in bound, bound
        chroot_line = next(i for i, line in enumerate(bound) if runs_in(chroot_build.root, line))
        assert bound.index(mount) < chroot_line < bound.index(f"umount --recursive {chroot_build.root}{named}")
        make_conf.write_text(original + 'DISTDIR="/usr/lib"\n')
        refused = chroot_build.cli("-p", "build", "dev-libs/libv", check=False)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "DISTDIR = /usr/lib in" in refused.stderr and f"distdir = {shared}" in refused.stderr, refused.stderr
        assert not [line for line in refused.stdout.splitlines() if "/usr/lib" in line and "mount" in line]
        assert mounts_under(chroot_build.root) == []
    finally:
        make_conf.write_text(original)
        chroot_build.config.write_text(config_text)
        shutil.rmtree(named, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_targets_own_build_method_decides_for_its_environment(chroot_build, tmp_path):
    """README: set build-method ... in a `[target NAME]` with its own `binhost-root`, for that
    environment: [binhost] says root, the target's environment (the real binhost root) is built
    with chroot, and the other target keeps [binhost]'s method."""
    plain = tmp_path / "plain"
    (plain / "etc/portage").mkdir(parents=True)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {plain}\nbuild-method = root\n\n"
                      f"[target cb]\nhost = 127.0.0.1\nbinhost-root = {chroot_build.root}\nbuild-method = chroot\n\n"
                      f"[target other]\nhost = 127.0.0.1\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "emerge").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "emerge").chmod(0o755)

    def pretend_build(target):
        return run([sys.executable, SCRIPT, "--color=n", "-c", config, "-v", "-p", "--target", target,
                    "build", "dev-libs/libv"], env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})

    own = pretend_build("cb")
    assert f"Build method chroot: build-method = chroot in {config}" in own.stderr
    emerge = next(line for line in own.stdout.splitlines()
                  if "emerge --getbinpkg=n" in line and not line.startswith(">>>"))
    assert runs_in(chroot_build.root, emerge) and "--root-deps" not in emerge
    other = pretend_build("other")
    assert f"Build method root: build-method = root in {config}" in other.stderr
    emerge = next(line for line in other.stdout.splitlines()
                  if "emerge --root-deps" in line and not line.startswith(">>>"))
    assert f"ROOT={plain}" in emerge and not emerge.startswith("chroot ")
    assert mounts_under(chroot_build.root) == []


def fake_gentoo_root(root, make_conf=""):
    """A directory that looks like a system to build in (emerge and gcc in its PATH)."""
    for program in ("usr/bin/emerge", "usr/bin/gcc"):
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("")
    (root / "etc/portage").mkdir(parents=True, exist_ok=True)
    (root / "etc/portage/make.conf").write_text(make_conf)


def test_doctor_shows_the_build_method_and_why_and_auto_falls_back_for_an_outside_pkgdir(tmp_path):
    """README: `doctor` shows the method in use and why (WARN when `auto` chose `root` because this CPU
    lacks an instruction set of the target's flags); with `auto`, a pkgdir outside the binhost root is
    built with the root method (no refusal)."""
    root = tmp_path / "binhost"
    fake_gentoo_root(root, 'COMMON_FLAGS="-O2"\n')
    config = tmp_path / "c.conf"
    from conftest import free_port
    target = f"\n[target t]\nhost = 127.0.0.1\nssh-port = {free_port()}\n"  # unreachable: binhost rows only
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "emerge").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "emerge").chmod(0o755)

    def gb(*args):
        return run([sys.executable, SCRIPT, "--color=n", "-c", config, *args], check=False,
                   env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})

    def method_row(result):
        return next((line for line in result.stdout.splitlines() if line[5:].startswith("build method:")),
                    result.stdout + result.stderr)

    config.write_text(f"[binhost]\nroot = {root}\npkgdir = {tmp_path}/elsewhere\n" + target)
    assert method_row(gb("doctor")).startswith("OK   build method: root: pkgdir lies outside the binhost root")
    built = gb("-p", "build", "app-misc/hello")
    assert built.returncode == 0, built.stderr
    assert any(line.startswith("ROOT=") and "--root-deps" in line for line in built.stdout.splitlines())

    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n" + target)
    assert method_row(gb("doctor")) == f"OK   build method: root: build-method = root in {config}"

    need(shutil.which("gcc"), "gcc missing")
    native = set(run(["gcc", "-march=native", "-dM", "-E", "-x", "c", "/dev/null"]).stdout.split())
    usable = [(flag, macro) for flag, macro in (("-mavx512vp2intersect", "__AVX512VP2INTERSECT__"),
                                                ("-mamx-tile", "__AMX_TILE__"), ("-mavx512f", "__AVX512F__"),
                                                ("-mavx2", "__AVX2__"))
              if macro not in native and run(["gcc", flag, "-E", "-x", "c", "/dev/null"], check=False).returncode == 0]
    need(usable, "this CPU has every instruction set gcc knows here")
    flag, macro = usable[0]
    (root / "etc/portage/make.conf").write_text(f'COMMON_FLAGS="-O2 {flag}"\n')
    config.write_text(f"[binhost]\nroot = {root}\n" + target)
    assert method_row(gb("doctor")).startswith(f"WARN build method: root: this CPU lacks {macro}")


# ---- signing outside the build: builds never see the key, the tool signs what they made ---------


def config_value(config, key):
    """The value of the first `key = value` line of a configuration file, else None."""
    for line in Path(config).read_text().splitlines():
        name, equals, value = line.partition("=")
        if equals and name.strip() == key:
            return value.strip()
    return None


def signing_home(chroot_build):
    return config_value(chroot_build.config, "gpg-home")


def ensure_signing_key(chroot_build):
    """The fixture's signing key (made by an earlier test, or here when run alone)."""
    if "signing-key" not in chroot_build.config.read_text():
        chroot_build.cli("keygen")
    return config_value(chroot_build.config, "signing-key").upper()


def gpg(home, *args, input=None, check=True):
    return run(["gpg", "--homedir", home, "--batch", "--no-tty", *args], input=input, check=check)


def stop_agent(home):
    run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)


def trusting_keyring(home, public_key):
    """A GnuPG home as a target's /etc/portage/gnupg is after setup-target: only the public key,
    ultimately trusted, readable by `nobody` (Portage verifies as nobody)."""
    home = Path(home)
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    gpg(home, "--import", input=public_key)
    fingerprints = [line.split(":")[9] for line in gpg(home, "--with-colons", "--list-keys").stdout.splitlines()
                    if line.startswith("fpr:")]
    gpg(home, "--import-ownertrust", input=f"{fingerprints[0]}:6:\n")
    gpg(home, "--check-trustdb", check=False)
    stop_agent(home)
    for path in home.iterdir():
        if path.is_file():
            path.chmod(0o644)
    return home


def signers(package, home):
    """{signed member: fingerprint of the primary key of its one good signature} for a GPKG,
    each checked with gpg in home (a detached .sig for an inner archive, the clear-signed
    Manifest itself); a member whose signature does not check maps to gpg's status output."""
    found = {}
    with tarfile.open(package) as archive, tempfile.TemporaryDirectory(dir=Path(home).parent) as scratch:
        members = {os.path.basename(member.name): member for member in archive.getmembers()}
        for name, member in members.items():
            Path(scratch, name).write_bytes(archive.extractfile(member).read())
        for name in members:
            if name.endswith(".sig"):
                signed, argv = name[:-len(".sig")], [f"{scratch}/{name}", f"{scratch}/{name[:-len('.sig')]}"]
            elif name == "Manifest":
                signed, argv = name, [f"{scratch}/Manifest"]
            else:
                continue
            status = gpg(home, "--status-fd", "1", "--verify", *argv, check=False).stdout
            valid = [line.split() for line in status.splitlines() if line.startswith("[GNUPG:] VALIDSIG ")]
            bad = [line for line in status.splitlines() if line.split()[1:2] in (["BADSIG"], ["ERRSIG"])]
            found[signed] = valid[0][-1].upper() if len(valid) == 1 and not bad else status
    return found


# Portage's own check of a GPKG, as a target's emerge makes it (FEATURES=binpkg-request-signature:
# every member must be signed by a key ultimately or fully trusted in BINPKG_GPG_VERIFY_GPG_HOME).
PORTAGE_VERIFY = """
import os, sys
import portage
from portage.gpkg import gpkg
assert "binpkg-request-signature" in portage.settings.features, sorted(portage.settings.features)
package = gpkg(portage.settings, os.path.basename(sys.argv[1])[:-len(".gpkg.tar")], sys.argv[1])
package._verify_binpkg()
print("signature_exist", package.signature_exist)
"""


def portage_verify(package, home):
    return run([sys.executable, "-c", PORTAGE_VERIFY, package], check=False,
               env={"FEATURES": "binpkg-request-signature", "BINPKG_GPG_VERIFY_GPG_HOME": home})


def member_names(package):
    with tarfile.open(package) as archive:
        return [member.name for member in archive.getmembers()]


GPKG_SIGNED_LAYOUT = re.compile(r"gpkg-1 (metadata\.tar(?:\.\w+)?) \1\.sig (image\.tar(?:\.\w+)?) \2\.sig Manifest")

KEYHUNT_EBUILD = r"""EAPI=8
DESCRIPTION="Looks for GnuPG keys from a root phase of its own build (binhost test package)"
HOMEPAGE="https://example.invalid/keyhunt"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"

pkg_setup() {
	# Every GnuPG home or keyring the build, running as root, can see (/proc and /sys left out).
	find / \( -path /proc -o -path /sys \) -prune -o \( -name private-keys-v1.d -o -name secring.gpg \
		-o -name pubring.kbx -o -name pubring.gpg -o -name trustdb.gpg \) -print > "${T}/found" 2>/dev/null
	# The signing key's home and the configuration, by the paths the build host knows them by.
	local place
	for place in @PLACES@; do
		if [[ -e ${place} || -L ${place} ]]; then
			echo "${place}" >> "${T}/found"
		fi
	done
	ls -A @CONFIG_DIR@ > "${T}/config-dir" 2>/dev/null
	if grep -q -e private-keys-v1.d -e secring.gpg -e @GPG_HOME@ "${T}/found"; then
		die "a private key is in reach of the build: $(<"${T}/found")"
	fi
}

src_install() {
	insinto /usr/share/keyhunt
	doins "${T}/found" "${T}/config-dir"
}
"""


def test_a_root_phase_finds_no_key_and_the_package_is_signed_here_afterwards(chroot_build):
    """README (Signing outside the build; Trust model): a build's root phases see no GnuPG home, no
    private key, not the configuration; the package it made is signed here afterwards, as Portage's
    gpkg-sign would (a detached signature after each inner archive, the clear-signed Manifest last),
    and both gpg and Portage's own verifier accept it against the exported public key."""
    fingerprint = ensure_signing_key(chroot_build)
    home = signing_home(chroot_build)
    assert os.path.isdir(f"{home}/private-keys-v1.d")
    base = chroot_build.base
    places = [home, f"{home}/private-keys-v1.d", f"{home}-verify", chroot_build.config, base / "gentoo-binhost",
              "/etc/gentoo-binhost"]
    ebuild = (KEYHUNT_EBUILD.replace("@PLACES@", " ".join(shlex.quote(str(place)) for place in places))
              .replace("@CONFIG_DIR@", shlex.quote(str(base))).replace("@GPG_HOME@", shlex.quote(home)))
    (chroot_build.repo / "app-misc/keyhunt").mkdir(exist_ok=True)
    (chroot_build.repo / "app-misc/keyhunt/keyhunt-1.ebuild").write_text(ebuild)
    chroot_build.cli("build", "--oneshot", "app-misc/keyhunt")
    assert mounts_under(chroot_build.root) == [] and processes_inside(chroot_build.root) == []
    installed = chroot_build.inside(f"{CHROOT_EPREFIX}/usr/share/keyhunt")
    assert (installed / "found").read_text() == "", "GnuPG files in reach of the build"
    # The configuration's directory exists inside only as the way to the bound repository.
    assert (installed / "config-dir").read_text().split() == [chroot_build.repo.name]

    [package] = (chroot_build.pkgdir / "app-misc/keyhunt").glob("keyhunt-1-*.gpkg.tar")
    names = member_names(package)
    assert {name.split("/")[0] for name in names} == {package.name[:-len(".gpkg.tar")]}, names
    assert GPKG_SIGNED_LAYOUT.fullmatch(" ".join(os.path.basename(name) for name in names)), names
    with tarfile.open(package) as archive:
        manifest = archive.extractfile(names[-1]).read()
    assert manifest.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\n"), manifest[:200]

    keyring = trusting_keyring(base / "verify-keyhunt", chroot_build.cli("keygen", "--export").stdout)
    inner = [os.path.basename(name) for name in names if ".tar" in name and not name.endswith(".sig")]
    assert signers(package, keyring) == {name: fingerprint for name in inner + ["Manifest"]}
    verified = portage_verify(package, keyring)
    assert verified.returncode == 0 and "signature_exist True" in verified.stdout, verified.stdout + verified.stderr
    # The check is a real one: without the key, Portage refuses the same package.
    untrusted = base / "verify-nokey"
    untrusted.mkdir(mode=0o755)
    untrusted.chmod(0o755)
    assert portage_verify(package, untrusted).returncode != 0


def test_a_targets_make_conf_asking_to_sign_is_refused_before_building(chroot_build):
    """README (Signing outside the build): a build never signs. Portage's package step reads
    make.conf again, where a target's FEATURES=binpkg-signing comes back whatever the build's
    environment says (measured: the build then fails, or signs with the target's key settings),
    so such a configuration is refused before anything is built, naming the setting and the fix."""
    ensure_signing_key(chroot_build)
    (chroot_build.repo / "app-misc/target-signs").mkdir(exist_ok=True)
    (chroot_build.repo / "app-misc/target-signs/target-signs-1.ebuild").write_text(
        tiny_ebuild("target-signs", "Built for a target whose make.conf signs"))
    make_conf = chroot_build.inside("/etc/portage/make.conf")
    original = make_conf.read_text()
    try:
        make_conf.write_text(original + 'FEATURES="${FEATURES} binpkg-signing"\n'
                             'BINPKG_GPG_SIGNING_KEY="0x0123456789ABCDEF0123456789ABCDEF01234567"\n'
                             'BINPKG_GPG_SIGNING_GPG_HOME="/nonexistent/gnupg"\n')
        refused = chroot_build.cli("build", "--oneshot", "app-misc/target-signs", check=False)
        make_conf.write_text(make_conf.read_text() + 'FEATURES="${FEATURES} -binpkg-signing"\n')
        switched_off = chroot_build.cli("--pretend", "build", "--oneshot", "app-misc/target-signs", check=False)
    finally:
        make_conf.write_text(original)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("!!!")]
    assert errors == [f"!!! FEATURES in {chroot_build.root}/etc/portage/make.conf (the target's) has binpkg-signing,"
                      " which Portage's package step reads again in every build: the binhost signs its packages"
                      " itself (README: 'Signing outside the build'); remove binpkg-signing from the target's"
                      " make.conf, then run config pull"], refused.stderr
    assert "Building in" not in refused.stdout
    assert not (chroot_build.pkgdir / "app-misc/target-signs").exists()
    assert switched_off.returncode == 0, switched_off.stdout + switched_off.stderr
    assert mounts_under(chroot_build.root) == []


def test_a_second_environment_builds_with_chroot_and_its_packages_are_signed(chroot_build):
    """README (Build methods, Trust model): a `[target NAME]` with its own `binhost-root` and
    `build-method = chroot` builds there, and what it builds is signed with the one key, whose
    gpg-home lies outside both environments (earlier, inside the first root, it was out of the
    second one's reach)."""
    fingerprint = ensure_signing_key(chroot_build)
    home = signing_home(chroot_build)
    base = chroot_build.base
    first = base / "first"
    (first / "etc/portage").mkdir(parents=True)
    directory = base / "two-environments"
    directory.mkdir()
    config = directory / "gentoo-binhost.conf"
    config.write_text(f"[binhost]\nroot = {first}\nbuild-method = root\nsigning-key = {fingerprint}\n"
                      f"gpg-home = {home}\n\n"
                      f"[target second]\nhost = 127.0.0.1\nbinhost-root = {chroot_build.root}\n"
                      "build-method = chroot\n")
    (chroot_build.repo / "app-misc/second-env").mkdir(exist_ok=True)
    (chroot_build.repo / "app-misc/second-env/second-env-1.ebuild").write_text(
        tiny_ebuild("second-env", "Built in a second binhost environment"))
    try:
        built = run([sys.executable, SCRIPT, "--color=n", "-c", config, "-v", "--target", "second",
                     "build", "--oneshot", "app-misc/second-env"], env={"NO_COLOR": "1"})
        assert f"Build method chroot: build-method = chroot in {config}" in built.stderr
        assert "Moved the signing key" not in built.stderr and config_value(config, "gpg-home") == home
        assert mounts_under(chroot_build.root) == [] and processes_inside(chroot_build.root) == []
        [package] = (chroot_build.pkgdir / "app-misc/second-env").glob("second-env-1-*.gpkg.tar")
        assert not list(first.rglob("*.gpkg.tar"))
        assert GPKG_SIGNED_LAYOUT.fullmatch(" ".join(os.path.basename(name) for name in member_names(package)))
        keyring = trusting_keyring(base / "verify-second", chroot_build.cli("keygen", "--export").stdout)
        assert set(signers(package, keyring).values()) == {fingerprint}
        assert chroot_build.inside(f"{CHROOT_EPREFIX}/usr/share/second-env/version").read_text() == "1\n"
    finally:
        shutil.rmtree(first, ignore_errors=True)


def copy_gnupg_home(source, destination):
    """A copy of a GnuPG home (its agent stopped; sockets are no key material)."""
    stop_agent(source)
    shutil.copytree(source, destination, symlinks=True,
                    ignore=lambda directory, names: [name for name in names
                                                     if stat.S_ISSOCK(os.lstat(os.path.join(directory, name)).st_mode)])
    Path(destination).chmod(0o700)


def secret_fingerprints(home):
    listing = gpg(home, "--with-colons", "--list-secret-keys").stdout.splitlines()
    stop_agent(home)
    return [line.split(":")[9].upper() for previous, line in zip([""] + listing, listing)
            if line.startswith("fpr:") and previous.startswith("sec:")]


def test_a_gpg_home_inside_the_binhost_root_is_moved_out_once(chroot_build):
    """README (Signing outside the build): a gpg-home inside a binhost root (the default of earlier
    versions, <root>/etc/gentoo-binhost/gnupg) is moved by the first signing command to the default
    beside the configuration: copied, checked, recorded (a FILE.<date>.bak kept), then removed with
    its old -verify keyring. `doctor` warns until then, --pretend says what it would do; when the
    default exists already, nothing moves and one `!!!` line says why."""
    fingerprint = ensure_signing_key(chroot_build)
    root = chroot_build.root
    old_parent = root / "etc/gentoo-binhost"
    old_home, old_verify = old_parent / "gnupg", old_parent / "gnupg-verify"
    from conftest import free_port
    unreachable = f"\n[target t]\nhost = 127.0.0.1\nssh-port = {free_port()}\n"  # doctor: binhost rows only

    # What a build could have planted beside the key: gpg runs the program gpg.conf names.
    planted = chroot_build.base / "planted-agent"
    ran = chroot_build.base / "planted-agent-ran"
    planted.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    planted.chmod(0o755)

    def old_layout(directory):
        """A configuration in directory whose key lives where earlier versions kept it."""
        shutil.rmtree(old_parent, ignore_errors=True)
        old_parent.mkdir(parents=True)
        copy_gnupg_home(signing_home(chroot_build), old_home)
        (old_home / "gpg.conf").write_text(f"agent-program {planted}\n")
        old_verify.mkdir()
        (old_verify / "pubring.kbx").write_text("")
        directory.mkdir()
        config = directory / "gentoo-binhost.conf"
        config.write_text(f"[binhost]\nroot = {root}\nsigning-key = {fingerprint}\ngpg-home = {old_home}\n"
                          + unreachable)
        return config, directory / "gentoo-binhost/gnupg"

    def gb(config, *args):
        return run([sys.executable, SCRIPT, "--color=n", "-c", config, *args], env={"NO_COLOR": "1"}, check=False)

    try:
        config, default = old_layout(chroot_build.base / "migrate")
        text = config.read_text()
        doctor = gb(config, "doctor")
        assert (f"WARN signing key: gpg-home {old_home} lies inside {root}, where builds could read it"
                in doctor.stdout), doctor.stdout + doctor.stderr

        pretend = gb(config, "--pretend", "sign", "--all")
        assert pretend.returncode == 0, pretend.stdout + pretend.stderr
        assert f"would move it to {default}" in pretend.stderr, pretend.stderr
        assert config.read_text() == text and not list(config.parent.glob("*.bak"))
        # (The old home is looked at as files: its planted gpg.conf would run for gpg here too.)
        assert not default.parent.exists() and list((old_home / "private-keys-v1.d").glob("*.key"))
        assert old_verify.is_dir()

        moved = gb(config, "sign", "--all")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert f"Moved the signing key's GnuPG home out of {root}" in moved.stderr, moved.stderr
        assert "rotate it ('gentoo-binhost.py keygen --force', setup-target on every target, then sign --all)" \
            in moved.stderr, moved.stderr
        assert not (default / "gpg.conf").exists() and not ran.exists(), "the planted gpg.conf came along"
        assert config_value(config, "gpg-home") == str(default)
        [backup] = config.parent.glob("gentoo-binhost.conf.*.bak")
        assert backup.read_text() == text
        assert stat.S_IMODE(default.stat().st_mode) == 0o700
        assert secret_fingerprints(default) == [fingerprint]
        assert not old_home.exists() and not old_verify.exists()
        # Signed with the moved home: every package of the root, still by the same key.
        keyring = trusting_keyring(chroot_build.base / "verify-moved", chroot_build.cli("keygen", "--export").stdout)
        packages = sorted(chroot_build.pkgdir.rglob("*.gpkg.tar"))
        assert packages and all(set(signers(package, keyring).values()) == {fingerprint} for package in packages)
        again = gb(config, "sign", "--all")
        assert again.returncode == 0 and "Moved" not in again.stderr, again.stderr
        stop_agent(default)

        # The default exists already: nothing moves.
        config, default = old_layout(chroot_build.base / "migrate-taken")
        default.mkdir(parents=True)
        text = config.read_text()
        refused = gb(config, "sign", "--all")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("!!!")]
        assert len(errors) == 1 and f"{default} exists already" in errors[0], refused.stderr
        assert config.read_text() == text and not list(config.parent.glob("*.bak"))
        assert list((old_home / "private-keys-v1.d").glob("*.key")) and old_verify.is_dir()
        assert not list(default.iterdir())

        # A key directory that is a link (back into the root, say) is refused: nothing moves.
        config, default = old_layout(chroot_build.base / "migrate-linked")
        keys = old_home / "private-keys-v1.d"
        shutil.move(keys, old_parent / "keys-elsewhere")
        keys.symlink_to(old_parent / "keys-elsewhere")
        text = config.read_text()
        linked = gb(config, "sign", "--all")
        assert linked.returncode == 1, linked.stdout + linked.stderr
        errors = [line for line in linked.stderr.splitlines() if line.startswith("!!!")]
        assert len(errors) == 1 and f"{keys} is not a directory (a symlink?): nothing was moved" in errors[0], \
            linked.stderr
        assert config.read_text() == text and not default.exists() and keys.is_symlink()
        assert not ran.exists()
    finally:
        shutil.rmtree(old_parent, ignore_errors=True)


def unsigned_copy(package, destination):
    """The GPKG package without its signatures: members as they are, a plain Manifest."""
    with tarfile.open(package) as old, tarfile.open(destination, "w", format=tarfile.GNU_FORMAT) as new:
        records = []
        for member in old.getmembers():
            name = os.path.basename(member.name)
            if name.endswith(".sig") or name == "Manifest":
                continue
            data = old.extractfile(member).read()
            new.addfile(member, io.BytesIO(data))
            records.append(f"DATA {name} {len(data)} BLAKE2B {hashlib.blake2b(data).hexdigest()}"
                           f" SHA512 {hashlib.sha512(data).hexdigest()}\n")
        manifest = "".join(records).encode()
        info = tarfile.TarInfo(os.path.dirname(member.name) + "/Manifest")
        info.size, info.mtime = len(manifest), int(time.time())
        new.addfile(info, io.BytesIO(manifest))


def test_sign_refuses_a_package_file_that_is_a_symlink(chroot_build):
    """README (Signing outside the build): a package file that is a symlink is refused, with one
    `!!!` line, and what it points to is not touched (a build's root phase could plant it, at a
    path the index names); a file the index does not name is never signed."""
    ensure_signing_key(chroot_build)
    [source] = sorted(chroot_build.pkgdir.rglob("libv-2-*.gpkg.tar"))[:1]
    elsewhere = chroot_build.base / "elsewhere"
    elsewhere.mkdir()
    original = elsewhere / "original.gpkg.tar"
    victim = elsewhere / "victim.gpkg.tar"
    unsigned_copy(source, victim)
    before = victim.read_bytes(), victim.stat().st_mtime_ns
    unindexed = chroot_build.pkgdir / "app-misc/planted/planted-1-1.gpkg.tar"
    unindexed.parent.mkdir(parents=True)
    shutil.copy(victim, unindexed)
    os.rename(source, original)
    source.symlink_to(victim)
    try:
        for args in (["sign"], ["sign", "--all"]):
            refused = chroot_build.cli(*args, check=False)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            errors = [line for line in refused.stderr.splitlines() if line.startswith("!!!")]
            assert len(errors) == 1, refused.stderr
            assert errors[0] == (f"!!! {source}: the index names a package outside {chroot_build.pkgdir} or"
                                 " through a link: remove it and rebuild"), errors[0]
            assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before and source.is_symlink()
            assert sorted(path.name for path in elsewhere.iterdir()) == ["original.gpkg.tar", "victim.gpkg.tar"]
        assert mounts_under(chroot_build.root) == []
    finally:
        source.unlink()
        os.rename(original, source)
    unsigned = chroot_build.cli("sign")
    assert "already signed" in unsigned.stdout and unindexed.read_bytes() == before[0]
    shutil.rmtree(unindexed.parent, ignore_errors=True)
    shutil.rmtree(elsewhere, ignore_errors=True)
