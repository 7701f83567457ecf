"""build-method = chroot: emerge runs inside the binhost root, a real system (the debootstrap +
PyPI Portage image), with /proc, /sys, /dev, /run and the ebuild repository mounted. Dependencies
resolve, install and compile there alone: the program is built against the binhost root's library,
and the build host's own package database does not change."""

import hashlib
import os
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (CHROOT_EPREFIX, REPO, SCRIPT, configure_gentoo_like_root, ensure_chroot_cache,
                      mounts_under, need, processes_inside, remove_chroot, run, slow_ebuild)

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
    cache, _timings = ensure_chroot_cache()
    base = Path(tempfile.mkdtemp(prefix="gbcb-"))  # short: gpg-agent socket paths
    base.chmod(0o755)
    root = base / "binhost"
    try:
        run(["cp", "-a", str(cache / "root") + "/.", root])
        root.chmod(0o755)
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
    emerge = next(line for line in lines if line.startswith(f"chroot {root} env -i"))
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
    # Signed inside, with the verify keyring Portage checks each new signature against.
    with open(chroot_build.pkgdir / "app-misc/libv-app/libv-app-1.0-1.gpkg.tar", "rb") as handle:
        assert b".sig" in handle.read()


def test_a_failing_chroot_build_leaves_no_mounts(chroot_build):
    result = chroot_build.cli("build", "app-misc/no-such-package", check=False)
    assert result.returncode == 1 and "!!! emerge failed on the binhost" in result.stderr
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
    builds do: `chroot ROOT env -i ...` with the root's own tools and paths as the root sees them."""
    from conftest import write_portage_config
    root = chroot_build.root
    inside = f"chroot {root} env -i "
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
        gpkg_sign = [c for c in running(signed, "") if "gpkg-sign " in c]
        assert gpkg_sign and all(c.startswith(inside) and " ROOT=/ " in c and " PKGDIR=/var/cache/binpkgs " in c
                                 and "/usr/local/bin/gpkg-sign /var/cache/binpkgs/" in c for c in gpkg_sign), gpkg_sign
        assert any(c.startswith(inside) and c.endswith("/usr/local/bin/emaint binhost --fix") for c in running(signed, ""))
        assert mounts_under(root) == []

        cleaned = chroot_build.cli("-v", "--pretend", "clean")
        assert any(c.startswith(inside) and c.endswith("/usr/local/bin/portageq envvar EROOT")
                   for c in running(cleaned, "chroot ")), cleaned.stderr
        assert f"--pretend: mounting /proc, /sys, /dev and /run in {root} for the read-only queries" in cleaned.stdout
        assert mounts_under(root) == []

        chroot_build.config.write_text(original + (
            f"\n[target t]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {target}\npath = {portage_bin}\n"))
        diff = chroot_build.cli("-v", "config", "diff")
        assert '-USE="extra"' in diff.stdout and '+USE="loud"' in diff.stdout
        assert running(diff, inside) and not running(diff, "sh -c"), "the binhost side was read outside the root"

        doctor = chroot_build.cli("-v", "doctor", check=False)
        assert "OK   build method: chroot: this CPU runs code built with the target's flags" in doctor.stdout
        portageq = [c for c in running(doctor, "") if "portageq envvar -v CHOST" in c and not c.startswith("ssh ")]
        assert portageq and all(c.startswith(inside) and "/usr/local/bin/portageq" in c for c in portageq), portageq
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
        chroot_line = next(i for i, line in enumerate(bound) if line.startswith(f"chroot {chroot_build.root} env -i"))
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
    assert emerge.startswith(f"chroot {chroot_build.root} env -i") and "--root-deps" not in emerge
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
    assert method_row(gb("doctor")).startswith("OK   build method: root: pkgdir lie outside the binhost root")
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
