"""A Raspberry Pi's binhost on an amd64 machine, in the README's two commands: an arm64 target
ROOT behind the session's sshd (a test repository with an arm64 profile and `KEYWORDS="arm64"`,
app-misc/hello-arm in its world), `add-target pi`, then `--target pi emerge -uDN @world`.

add-target asks the target, finds it arm64, and fetches and verifies stage3-arm64 from a local
mirror: Debian's arm64 image with PyPI Portage (made with debootstrap and finished under
emulation, cached like the amd64 one), packed and signed as Gentoo's release directories have
it. The emerge plans on the target, builds in the root emulated (qemu-user through binfmt_misc),
signs here, publishes, and installs on the target from the binhost alone: the program there is
an AArch64 executable, and it runs (under qemu-user).

(On a new machine the fixture first builds the arm64 image: about 5 minutes.)"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import (REPO, SCRIPT, binhost_serving, copy_of_chroot_image, eroot, free_port, gentoo_like_tools,
                      mounts_under, need, processes_inside, remove_chroot, run, stop_process, wait_for_port,
                      write_portage_config)
from test_init import gpg_home, offer_stage3

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

#: Compiled with the compiler named by CHOST, as Gentoo's ebuilds do (tc-getCC), in two steps: distcc
#: sends a compile (-c) to a helper, never a link.
HELLO_EBUILD = """EAPI=8
DESCRIPTION="Says where it was built (binhost test package)"
HOMEPAGE="https://example.invalid/{name}"
S="${{WORKDIR}}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="arm64"
src_compile() {{
	printf '#include <stdio.h>\\nint main(void) {{ puts("hello from " ARCH_NAME); return 0; }}\\n' > main.c || die
	${{CC:-${{CHOST}}-gcc}} ${{CFLAGS}} -DARCH_NAME='"arm64"' -c -o main.o main.c || die
	${{CC:-${{CHOST}}-gcc}} ${{CFLAGS}} ${{LDFLAGS}} -o {name} main.o || die
}}
src_install() {{
	dobin {name}
}}
"""
CHOST = "aarch64-unknown-linux-gnu"


def stage3_like(root):
    """What a Gentoo arm64 stage3 has and the Debian image lacks, configuration aside: Portage on
    PATH (gentoo_like_tools), gcc under its CHOST's name, and distcc's masquerade link for that
    name (distcc-config's; distcc sends the compile under it), where Portage's prefix looks."""
    gentoo_like_tools(root)
    (root / "usr/bin" / f"{CHOST}-gcc").symlink_to("aarch64-linux-gnu-gcc")
    (root / "usr/lib/distcc" / f"{CHOST}-gcc").symlink_to("../../bin/distcc")
    (root / "opt/portage/usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "opt/portage/usr/lib/distcc").symlink_to("/usr/lib/distcc")


def arm64_repository(repo, ebuilds):
    """A copy of the test repository with an arm64 profile and app-misc/NAME-1.0 of each ebuild."""
    shutil.copytree(REPO, repo, symlinks=True)
    (repo / "profiles/arch.list").write_text("amd64\narm64\n")
    (repo / "profiles/arm64").mkdir()
    (repo / "profiles/arm64/eapi").write_text("5\n")
    (repo / "profiles/arm64/make.defaults").write_text(ARM64_PROFILE)
    for name, ebuild in ebuilds.items():
        (repo / "app-misc" / name).mkdir()
        (repo / "app-misc" / name / f"{name}-1.0.ebuild").write_text(ebuild)
    return repo


BUILD = "20261120T170000Z"


def arm64_stage3_mirror(base, gb):
    """A local Gentoo mirror offering the arm64 image as stage3-arm64-{openrc,systemd} (the
    machine's init decides which add-target asks for): a zstd tarball with a signed DIGESTS, a
    detached signature and a signed latest list, the way Gentoo's releases/arm64/autobuilds/ has
    them. Returns (server, url, keyring)."""
    staging = base / "stage3-root"
    staging.mkdir()
    copy_of_chroot_image(staging, arch="arm64")
    stage3_like(staging)  # the target's configuration comes with config pull
    release = gpg_home(base / "release-gnupg", "release")
    keyring = base / "gentoo-release.asc"
    keyring.write_text(run(["gpg", "--homedir", release, "--armor", "--export"]).stdout)
    autobuilds = base / "www/releases/arm64/autobuilds"
    (autobuilds / BUILD).mkdir(parents=True)
    payload = None
    for variant in ("openrc", "systemd"):
        tarball = autobuilds / BUILD / f"stage3-arm64-{variant}-{BUILD}.tar.zst"
        if payload is None:
            run(["tar", "--zstd", "--numeric-owner", "-cf", str(tarball), "-C", str(staging), "."])
            payload = tarball
        else:
            os.link(payload, tarball)
        offer_stage3(release, autobuilds, BUILD, f"latest-stage3-arm64-{variant}.txt", tarball)
    remove_chroot(staging)
    server = gb.make_server("127.0.0.1", 0, str(base / "www"), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", keyring


class Lab:
    def __init__(self, base, root, repo, target, config, port, onboarded):
        self.base, self.root, self.repo, self.target, self.config = base, root, repo, target, config
        self.port, self.onboarded = port, onboarded
        self.pkgdir = root / "var/cache/binpkgs"

    def cli(self, *args, check=True, timeout=1200):
        return run([sys.executable, SCRIPT, "--color=n", "-c", self.config] + list(args),
                   env={"NO_COLOR": "1"}, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def arm64_lab(gb, binfmt_aarch64, sshd, portage_bin, eprefix):
    """The README's two commands for a Raspberry Pi, from a configuration with only [binhost]:
    add-target (which finds the target arm64, fetches and verifies an arm64 stage3, pulls its
    configuration, sets it up, runs doctor)."""
    need(os.geteuid() == 0, "a chroot build needs root")
    need(shutil.which("gpg") and shutil.which("zstd"), "gpg and zstd are needed")
    with open(sys.executable, "rb") as handle:
        need(handle.read(20)[18] != 183, "this machine is arm64 itself: nothing to emulate")
    base = Path(tempfile.mkdtemp(prefix="gbem-"))
    base.chmod(0o755)
    root = base / "binhost"
    server = None
    try:
        server, mirror, keyring = arm64_stage3_mirror(base, gb)
        repo = arm64_repository(base / "repo", {name: HELLO_EBUILD.format(name=name)
                                                for name in ("hello-arm", "hello-distcc")})
        target = base / "pi"
        # Its make.conf names its own PORTAGE_TMPDIR, which the binhost root does not have (builds
        # there use the root's /var/tmp), and PKGDIR (builds get the binhost's from the environment);
        # DISTDIR is Portage's default, which a stage3 has.
        write_portage_config(target, repo=repo, profile="arm64", eprefix=eprefix, extra_make_conf=(
            f'BINPKG_GPG_VERIFY_GPG_HOME="{target}/etc/portage/gnupg"\nDISTDIR="/var/cache/distfiles"\n'))
        world = eroot(target, eprefix) / "var/lib/portage/world"
        world.parent.mkdir(parents=True, exist_ok=True)
        world.write_text("app-misc/hello-arm\n")
        port = free_port()
        config = base / "etc/gentoo-binhost.conf"
        config.parent.mkdir()
        config.write_text(f"[binhost]\nroot = {root}\nurl = http://127.0.0.1:{port}/\nbind = 127.0.0.1\n"
                          f"port = {port}\n")
        onboarded = run([sys.executable, SCRIPT, "--color=n", "-c", config, "add-target", "pi", sshd.host,
                         "--ssh-port", str(sshd.port), *[f"--ssh-option={o}" for o in sshd.ssh_option_list],
                         "--root", str(target), "--path", str(portage_bin), "--mirror", mirror,
                         "--keyring", str(keyring)], env={"NO_COLOR": "1"}, check=False, timeout=1200)
        yield Lab(base, root, repo, target, config, port, onboarded)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        for pid in processes_inside(root):
            os.kill(pid, signal.SIGKILL)
        remove_chroot(base)


def test_an_arm64_target_gets_its_world_from_an_amd64_binhost(arm64_lab, eprefix):
    lab = arm64_lab
    said = lab.onboarded.stdout + lab.onboarded.stderr
    assert lab.onboarded.returncode == 0, said
    assert "pi: stage3-arm64-" in said and "Portage's ARCH is arm64 (uname -m says x86_64: the kernel's)" in said, said
    assert "Next: 'gentoo-binhost.py --target pi emerge -uDN @world'" in said, said
    # The root is the verified arm64 stage3, and builds run in it emulated.
    assert elf_machine(lab.root / "bin/sh") == 183, "not an arm64 root"
    shown = lab.cli("-v", "--pretend", "build", "app-misc/hello-arm")
    assert "builds run in it emulated (qemu-user through binfmt_misc)" in shown.stdout + shown.stderr
    with binhost_serving(lab.config, lab.port):
        result = lab.cli("--target", "pi", "emerge", "-uDN", "@world", check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert f"PORTAGE_TMPDIR = {lab.target}/var/tmp (the target's) is no directory in the binhost root: building" \
        " in its /var/tmp" in said, said
    packages = sorted(p.relative_to(lab.pkgdir).as_posix() for p in lab.pkgdir.glob("app-misc/hello-arm/*"))
    assert packages == ["app-misc/hello-arm/hello-arm-1.0-1.gpkg.tar"], packages
    # Installed on the target from the binhost's binary, nothing compiled there.
    installed = eroot(lab.target, eprefix)
    assert (installed / "var/db/pkg/app-misc/hello-arm-1.0/BINPKGMD5").is_file(), said
    program = installed / "usr/bin/hello-arm"
    assert elf_machine(program) == 183, "not an AArch64 program"
    # It runs under qemu-user, with the binhost root's arm64 libraries (this machine has none).
    ran = run(["qemu-aarch64-static", "-L", str(lab.root), str(program)], check=False)
    assert ran.returncode == 0 and ran.stdout == "hello from arm64\n", ran
    # Signed here, by gpg, after the build (the key never in the root); the target verified it.
    assert b".sig" in (lab.pkgdir / packages[0]).read_bytes()
    assert not any(lab.root.rglob("private-keys-v1.d")), "the signing key was put in the root"
    assert mounts_under(lab.root) == [] and processes_inside(lab.root) == []
    # The world is what the target had asked for: nothing left to merge there.
    again = lab.cli("--target", "pi", "emerge", "-uDN", "@world", "--pretend", check=False)
    assert again.returncode == 0 and "pi would merge 0 package(s)" in again.stdout, again.stdout + again.stderr


def elf_machine(path):
    header = Path(path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def start_distccd(directory, compiler=None):
    """A distccd on 127.0.0.1 whose PATH has directory first, with CHOST-gcc there leading to
    compiler (crossdev's name for its cross compiler; Debian names it aarch64-linux-gnu-gcc).
    --enable-tcp-insecure: Debian's distccd runs only what /usr/lib/distcc names, where this
    machine has no CHOST-gcc; a Gentoo helper has crossdev's link there."""
    directory.mkdir(mode=0o755)
    if compiler:
        (directory / f"{CHOST}-gcc").symlink_to(compiler)
    directory.chmod(0o1777)  # distccd started as root drops to an unprivileged user, and logs here
    port = free_port()
    process = subprocess.Popen(["distccd", "--daemon", "--no-detach", "--listen", "127.0.0.1", "--port", str(port),
                                "--allow", "127.0.0.1", "--jobs", "2", "--enable-tcp-insecure",
                                "--log-file", str(directory / "log"), "--log-level", "info"],
                               env={"PATH": f"{directory}:/usr/bin:/bin"})
    assert wait_for_port(port, proc=process), "distccd did not start"
    return process, f"127.0.0.1:{port}/2", directory / "log"


def gcc_versions(root):
    """(this machine's cross gcc, the arm64 root's gcc): a helper must have the root's version."""
    ours = run(["aarch64-linux-gnu-gcc", "-dumpfullversion"]).stdout.strip()
    theirs = run(["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/aarch64-linux-gnu-gcc"),
                  "-dumpfullversion"]).stdout.strip()
    return ours, theirs


@pytest.fixture(scope="module")
def cross_helpers(arm64_lab):
    need(shutil.which("distccd") and shutil.which("aarch64-linux-gnu-gcc"),
         "distcc and gcc-aarch64-linux-gnu are needed (make system-deps)")
    ours, theirs = gcc_versions(arm64_lab.root)
    need(ours == theirs, f"this machine's aarch64-linux-gnu-gcc is {ours}, the arm64 image's gcc {theirs}:"
                         " a helper needs the root's version (a Debian bookworm machine has it)")
    helpers = {}
    try:
        for name, compiler in (("cross", shutil.which("aarch64-linux-gnu-gcc")), ("amd64", shutil.which("gcc")),
                               ("none", None)):
            helpers[name] = start_distccd(arm64_lab.base / f"distccd-{name}", compiler)
        yield {name: (spec, log) for name, (_process, spec, log) in helpers.items()} | {"version": theirs}
    finally:
        for process, _spec, _log in helpers.values():
            stop_process(process)


def test_distcc_helpers_with_a_cross_compiler_take_the_compiling(arm64_lab, cross_helpers):
    """The fast path: Portage runs emulated, the compiles go to this machine's cross compiler."""
    lab = arm64_lab
    assert lab.onboarded.returncode == 0, lab.onboarded.stdout + lab.onboarded.stderr
    # A helper whose CHOST-gcc is this machine's own gcc would return amd64 objects; one without
    # it cannot compile: each is refused before anything is built, naming the fix.
    for name, message in (("amd64", f"compiled for amd64 with {CHOST}-gcc, not for the binhost root's arm64"),
                          ("none", f"does it have {CHOST}-gcc, a compiler for the binhost root's arm64")):
        refused = lab.cli("build", "--distcc", cross_helpers[name][0], "--oneshot", "app-misc/hello-distcc",
                          check=False)
        assert refused.returncode == 1 and message in refused.stderr, refused.stdout + refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not list(lab.pkgdir.glob("app-misc/hello-distcc/*"))
    spec, log = cross_helpers["cross"]
    built = lab.cli("build", "--distcc", spec, "--oneshot", "app-misc/hello-distcc", check=False)
    said = built.stdout + built.stderr
    assert built.returncode == 0, said
    version = cross_helpers["version"]
    assert f"distcc helper {spec}: {CHOST}-gcc {version}, like the binhost root's (arm64: compiled natively" \
        " there, not emulated here)" in said, said
    # The probe and main.c were compiled by the helper's cross compiler.
    assert log.read_text().count("COMPILE_OK") >= 2, log.read_text()
    assert "main.c" in log.read_text()
    packages = sorted(lab.pkgdir.glob("app-misc/hello-distcc/*.gpkg.tar"))
    assert len(packages) == 1
    unpacked = lab.base / "hello-distcc-package"
    unpacked.mkdir()
    run(["tar", "-xf", packages[0], "-C", unpacked])
    image, = (path for path in unpacked.glob("*/image.tar*") if path.suffix != ".sig")
    run(["tar", "-xf", image, "-C", unpacked])  # GNU tar knows the compression by its magic
    program, = unpacked.rglob("usr/bin/hello-distcc")
    assert elf_machine(program) == 183, "not an AArch64 program"
    assert mounts_under(lab.root) == [] and processes_inside(lab.root) == []


def test_doctor_says_the_builds_are_emulated(arm64_lab):
    lab = arm64_lab
    assert lab.onboarded.returncode == 0, lab.onboarded.stdout + lab.onboarded.stderr
    doctor = lab.cli("doctor", check=False)
    assert "OK   emulation: the binhost root's programs run through /usr/libexec/qemu-binfmt/aarch64-binfmt-P" \
        in doctor.stdout, doctor.stdout + doctor.stderr
    assert "builds are slower than on a native machine; distcc helpers with a cross compiler would take the" \
        " compiling" in doctor.stdout
    assert "OK   build method: chroot: the binhost root is arm64, this machine amd64" in doctor.stdout
    assert mounts_under(lab.root) == [] and processes_inside(lab.root) == []
