"""A Raspberry Pi's binhost on an amd64 machine: an arm64 binhost root (Debian's arm64 image with
PyPI Portage, made with debootstrap and finished under emulation, cached like the amd64 one), a
test repository with an arm64 profile and `KEYWORDS="arm64"`, and an arm64 target ROOT behind the
session's sshd. `emerge` through the tool plans on the target, builds in the root emulated
(qemu-user through binfmt_misc), signs here, publishes, and installs on the target from the
binhost alone: the program there is an AArch64 executable, and it runs (under qemu-user).

(On a new machine the fixture first builds the arm64 image: about 5 minutes.)"""

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (REPO, SCRIPT, configure_gentoo_like_root, eroot, copy_of_chroot_image, free_port,
                      mounts_under, need, processes_inside, remove_chroot, run, write_portage_config)

ARM64_PROFILE = """ARCH="arm64"
ACCEPT_KEYWORDS="arm64"
ACCEPT_LICENSE="*"
CHOST="aarch64-unknown-linux-gnu"
CHOST_arm64="aarch64-unknown-linux-gnu"
ELIBC="glibc"
KERNEL="linux"
USERLAND="GNU"
USE=""
IUSE_IMPLICIT="prefix prefix-guest prefix-stack"
USE_EXPAND="CPU_FLAGS_ARM"
USE_EXPAND_HIDDEN="ELIBC KERNEL USERLAND"
USE_EXPAND_IMPLICIT="ARCH ELIBC KERNEL USERLAND"
USE_EXPAND_UNPREFIXED="ARCH"
USE_EXPAND_VALUES_ARCH="amd64 arm64"
USE_EXPAND_VALUES_ELIBC="glibc"
USE_EXPAND_VALUES_KERNEL="linux"
USE_EXPAND_VALUES_USERLAND="GNU"
"""

HELLO_ARM_EBUILD = """EAPI=8
DESCRIPTION="Says where it was built (binhost test package)"
HOMEPAGE="https://example.invalid/hello-arm"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="arm64"
src_compile() {
	printf '#include <stdio.h>\\nint main(void) { puts("hello from " ARCH_NAME); return 0; }\\n' > main.c || die
	${CC:-gcc} ${CFLAGS} -DARCH_NAME='"arm64"' -o hello-arm main.c || die
}
src_install() {
	dobin hello-arm
}
"""


class Lab:
    def __init__(self, base, root, repo, target, config):
        self.base, self.root, self.repo, self.target, self.config = base, root, repo, target, config
        self.pkgdir = root / "var/cache/binpkgs"

    def cli(self, *args, check=True, timeout=1200):
        return run([sys.executable, SCRIPT, "--color=n", "-c", self.config] + list(args),
                   env={"NO_COLOR": "1"}, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def arm64_lab(binfmt_aarch64, sshd, portage_bin, eprefix):
    need(os.geteuid() == 0, "a chroot build needs root")
    with open(sys.executable, "rb") as handle:
        need(handle.read(20)[18] != 183, "this machine is arm64 itself: nothing to emulate")
    base = Path(tempfile.mkdtemp(prefix="gbem-"))
    base.chmod(0o755)
    root = base / "binhost"
    try:
        copy_of_chroot_image(root, arch="arm64")
        repo = base / "repo"
        shutil.copytree(REPO, repo, symlinks=True)
        (repo / "profiles/arch.list").write_text("amd64\narm64\n")
        (repo / "profiles/arm64").mkdir()
        (repo / "profiles/arm64/eapi").write_text("5\n")
        (repo / "profiles/arm64/make.defaults").write_text(ARM64_PROFILE)
        (repo / "app-misc/hello-arm").mkdir()
        (repo / "app-misc/hello-arm/hello-arm-1.0.ebuild").write_text(HELLO_ARM_EBUILD)
        configure_gentoo_like_root(root, repo)
        profile = root / "etc/portage/make.profile"
        profile.unlink()
        profile.symlink_to(os.path.relpath(repo / "profiles/arm64", "/etc/portage"))
        target = base / "pi"
        write_portage_config(target, repo=repo, profile="arm64", eprefix=eprefix, extra_make_conf=(
            f'BINPKG_GPG_VERIFY_GPG_HOME="{target}/etc/portage/gnupg"\n'))
        port = free_port()
        config = base / "gentoo-binhost.conf"
        config.write_text(f"[binhost]\nroot = {root}\nurl = http://127.0.0.1:{port}/\nbind = 127.0.0.1\n"
                          f"port = {port}\ngpg-home = {base}/g\n\n"
                          f"[target pi]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
                          f"root = {target}\npath = {portage_bin}\ntree = own\n")
        yield Lab(base, root, repo, target, config)
    finally:
        for pid in processes_inside(root):
            os.kill(pid, signal.SIGKILL)
        remove_chroot(base)


def test_an_arm64_target_gets_its_package_from_an_amd64_binhost(arm64_lab, eprefix):
    lab = arm64_lab
    lab.cli("keygen")
    lab.cli("setup-target")
    result = lab.cli("emerge", "--oneshot", "app-misc/hello-arm", check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    shown = lab.cli("-v", "--pretend", "build", "app-misc/hello-arm")
    assert "builds run in it emulated (qemu-user through binfmt_misc)" in shown.stdout + shown.stderr
    packages = sorted(p.relative_to(lab.pkgdir).as_posix() for p in lab.pkgdir.rglob("*.gpkg.tar"))
    assert packages == ["app-misc/hello-arm/hello-arm-1.0-1.gpkg.tar"], packages
    # Installed on the target from the binhost's binary, nothing compiled there.
    installed = eroot(lab.target, eprefix)
    assert (installed / "var/db/pkg/app-misc/hello-arm-1.0/BINPKGMD5").is_file(), said
    program = installed / "usr/bin/hello-arm"
    header = program.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, "not an AArch64 program"
    # It runs under qemu-user, with the binhost root's arm64 libraries (this machine has none).
    ran = run(["qemu-aarch64-static", "-L", str(lab.root), str(program)], check=False)
    assert ran.returncode == 0 and ran.stdout == "hello from arm64\n", ran
    # Signed here, by gpg, after the build (the key never in the root); the target verified it.
    assert b".sig" in (lab.pkgdir / packages[0]).read_bytes()
    assert mounts_under(lab.root) == [] and processes_inside(lab.root) == []


def test_doctor_says_the_builds_are_emulated(arm64_lab):
    lab = arm64_lab
    doctor = lab.cli("doctor", check=False)
    assert "OK   emulation: the binhost root's programs run through /usr/libexec/qemu-binfmt/aarch64-binfmt-P" \
        in doctor.stdout, doctor.stdout + doctor.stderr
    assert "OK   build method: chroot: the binhost root is arm64, this machine amd64" in doctor.stdout
    assert mounts_under(lab.root) == [] and processes_inside(lab.root) == []
