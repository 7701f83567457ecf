"""README: Confinement. A chroot build cannot leave the binhost root. Measured from a package's
root phase (pkg_setup) in a real chroot build (the debootstrap + PyPI Portage image): it finds
no private key, no file of the build machine through /proc/*/root, no capability to leave or
remount, no block device, and cannot connect to the test sshd on 127.0.0.1, while its own
loopback works; the package is still built and signed. Where namespaces cannot be had, the build
still runs in the plain chroot, says so, and doctor names what is missing."""

import os
import re
import socket
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import SCRIPT, free_port, need, run
from test_chroot_build import chroot_build  # noqa: F401 - a module fixture: this file's own copy

# Capabilities that allow leaving the root or remounting (linux/capability.h bit numbers).
ESCAPING_CAPABILITIES = {16: "SYS_MODULE", 17: "SYS_RAWIO", 18: "SYS_CHROOT", 19: "SYS_PTRACE",
                         21: "SYS_ADMIN", 27: "MKNOD", 2: "DAC_READ_SEARCH"}

PROBE_EBUILD = r"""EAPI=8
DESCRIPTION="Looks for a way out of the binhost root from a root phase (binhost test package)"
HOMEPAGE="https://example.invalid/probe"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
pkg_setup() {
	local found=() entry bit capeff capbnd
	while IFS= read -r -d '' entry; do
		found+=("key ${entry}")
	done < <(find / -xdev \( -name private-keys-v1.d -o -name secring.gpg -o -name '*.key' \) -print0 2>/dev/null)
	for entry in /proc/[0-9]*/root /proc/[0-9]*/cwd; do
		[[ -e ${entry}@MARKER@ ]] && found+=("host-file ${entry}@MARKER@")
	done
	capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
	capbnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)
	for bit in @BITS@; do
		(( (0x${capeff} >> bit) & 1 )) && found+=("effective ${bit}")
		(( (0x${capbnd} >> bit) & 1 )) && found+=("bounding ${bit}")
	done
	for entry in /dev/* /dev/*/*; do
		[[ -b ${entry} ]] && found+=("block-device ${entry}")
	done
	if (exec 3<>/dev/tcp/127.0.0.1/@PORT@) 2>/dev/null; then
		found+=("connected 127.0.0.1:@PORT@")
	fi
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); socket.create_connection(s.getsockname()); print("own-loopback works")' \
		>> /var/tmp/confinement-report.new || found+=("no own loopback")
	printf '%s\n' "ran" "${found[@]}" >> /var/tmp/confinement-report.new
	mv /var/tmp/confinement-report.new /var/tmp/confinement-report
}
src_install() {
	insinto /usr/share/probe
	newins - probe <<<"probed"
}
"""


def probe_report(chroot_build, marker, port):
    """Build the probe package; returns (build result, the lines its pkg_setup wrote)."""
    directory = chroot_build.repo / "app-misc/probe"
    directory.mkdir(parents=True, exist_ok=True)
    bits = " ".join(str(bit) for bit in sorted(ESCAPING_CAPABILITIES))
    (directory / "probe-1.ebuild").write_text(
        PROBE_EBUILD.replace("@MARKER@", str(marker)).replace("@PORT@", str(port)).replace("@BITS@", bits))
    report = chroot_build.inside("/var/tmp/confinement-report")
    report.unlink(missing_ok=True)
    built = chroot_build.cli("build", "--oneshot", "app-misc/probe", check=False)
    return built, report.read_text().splitlines() if report.exists() else []


def test_a_root_phase_finds_no_way_out_and_the_package_is_still_signed(chroot_build, sshd):
    if "signing-key" not in chroot_build.config.read_text():
        chroot_build.cli("keygen")
    # A file of the build machine, outside the root: /proc/*/root/<it> must lead nowhere.
    marker = Path("/tmp") / f"gb-confinement-marker-{uuid.uuid4().hex}"
    marker.write_text("the build machine's own file\n")
    try:
        with socket.create_connection(("127.0.0.1", sshd.port), timeout=5):
            pass  # the test sshd answers here, on the build machine's loopback
        built, report = probe_report(chroot_build, marker, sshd.port)
    finally:
        marker.unlink()
    assert built.returncode == 0, built.stdout + built.stderr
    assert report == ["own-loopback works", "ran"], report  # nothing found
    assert "Fetching first, the build runs without network" in built.stdout, built.stdout
    assert "without confinement" not in built.stderr, built.stderr
    packages = sorted(chroot_build.pkgdir.glob("app-misc/probe/probe-1-*.gpkg.tar"))
    assert packages
    with tarfile.open(packages[-1]) as archive:
        names = [os.path.basename(name) for name in archive.getnames()]
    assert names[-1] == "Manifest" and any(name.endswith(".sig") for name in names), names


def test_without_namespaces_the_build_still_runs_says_so_and_doctor_names_it(chroot_build, tmp_path):
    """Where namespaces cannot be had (here: unshare refused as in a container that forbids them,
    with unshare's own message, measured), the build runs in the plain chroot with a warning, and
    doctor's confinement row says which protection is missing and why."""
    refusing = tmp_path / "bin"
    refusing.mkdir()
    (refusing / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                                      "exit 1\n")
    (refusing / "unshare").chmod(0o755)
    config = tmp_path / "confinement.conf"
    unreachable = f"[target t]\nhost = 127.0.0.1\nssh-port = {free_port()}\n"  # binhost rows only
    config.write_text(chroot_build.config.read_text() + "\n" + unreachable)

    def gb(*args, path=None):
        environment = {"PATH": path or os.environ["PATH"], "NO_COLOR": "1"}
        return run([sys.executable, SCRIPT, "--color=n", "-c", config, *args], check=False, env=environment)

    def confinement_row(result):
        return next((line for line in result.stdout.splitlines() if line[5:].startswith("confinement:")),
                    result.stdout + result.stderr)

    assert confinement_row(gb("doctor")).startswith(
        f"OK   confinement: builds in the binhost root {chroot_build.root} run in namespaces of their own")
    refused_path = f"{refusing}:{os.environ['PATH']}"
    row = confinement_row(gb("doctor", path=refused_path))
    assert row.startswith(f"WARN confinement: builds in the binhost root {chroot_build.root} run in a plain"
                          " chroot (unshare: unshare failed: Operation not permitted)"), row
    directory = chroot_build.repo / "app-misc/plain"
    directory.mkdir(parents=True, exist_ok=True)
    from conftest import tiny_ebuild
    (directory / "plain-1.ebuild").write_text(tiny_ebuild("plain"))
    built = gb("build", "--oneshot", "app-misc/plain", path=refused_path)
    assert built.returncode == 0, built.stdout + built.stderr
    assert ("Building without confinement in the binhost root"
            f" {chroot_build.root} (unshare: unshare failed: Operation not permitted)") in built.stderr, built.stderr
    assert "Fetching first" not in built.stdout
    assert sorted(chroot_build.pkgdir.glob("app-misc/plain/plain-1-*.gpkg.tar"))


def test_a_confined_command_exits_with_its_own_status_and_leaves_nothing(chroot_build, gb):
    """The confinement passes the command's exit status through (a failing build stays a failure)
    and leaves no mount behind in the host's namespace."""
    from conftest import mounts_under
    config = chroot_build.config
    output = gb.Output(color=False, verbosity=1)
    host = gb.BuildHost(gb.load_config(str(config), gb.Runner(output)).environment_for(), gb.BUILD_METHODS["chroot"])
    need(host.confinement_problem() is None, f"no namespaces here: {host.confinement_problem()}")
    for code in (0, 3, 127):
        assert host.run(["sh", "-c", f"exit {code}"], check=False, offline=True).returncode == code
    status = host.read(["sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/self/status; ls /dev"]).stdout.split()
    effective, bounding = int(status[1], 16), int(status[3], 16)
    assert not [name for bit, name in ESCAPING_CAPABILITIES.items() if (effective | bounding) >> bit & 1]
    assert set(status[4:]) == {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                               "stdout", "tty", "urandom", "zero"}, status
    assert mounts_under(chroot_build.root) == []


def test_a_build_cannot_switch_the_confinement_off_for_later_commands(chroot_build, tmp_path, gb):
    """The probe runs nothing of the root (a build there could remove or replace `true`), and only
    unshare's own refusal means "no namespaces here": a mount point a build made a link is an
    error, never a quiet fall back to the plain chroot."""
    trues = sorted({Path(os.path.realpath(chroot_build.inside(path))) for path in ("/bin/true", "/usr/bin/true")
                    if chroot_build.inside(path).exists()})
    config = tmp_path / "c.conf"
    config.write_text(chroot_build.config.read_text()
                      + f"\n[target t]\nhost = 127.0.0.1\nssh-port = {free_port()}\n")

    def cli(*args):
        return run([sys.executable, SCRIPT, "--color=n", "-c", config, *args], check=False, env={"NO_COLOR": "1"})

    def confinement_row(result):
        return next((line for line in result.stdout.splitlines() if line[5:].startswith("confinement:")),
                    result.stdout + result.stderr)

    kept = tmp_path / "kept"
    kept.mkdir()
    run_dir = chroot_build.inside("/run")
    try:
        for index, path in enumerate(trues):
            os.rename(path, kept / str(index))
        assert confinement_row(cli("doctor")).startswith("OK   confinement:")
        for index, path in enumerate(trues):
            os.rename(kept / str(index), path)
        os.rename(run_dir, kept / "run")
        run_dir.symlink_to("/etc")
        refused = cli("build", "--oneshot", "app-misc/plain")  # the mounts refuse it first
        errors = [line for line in refused.stderr.splitlines() if line.startswith("!!!")]
        assert refused.returncode == 1 and len(errors) == 1, refused.stdout + refused.stderr
        assert f"{run_dir} is a symbolic link (to /etc)" in errors[0], errors
        assert "Building" not in refused.stdout and "without confinement" not in refused.stderr
        doctored = cli("doctor")
        assert doctored.returncode == 1 and "plain chroot" not in doctored.stdout, doctored.stdout + doctored.stderr
        # The confinement program itself refuses it too (when nothing mounted there first).
        output = gb.Output(color=False, verbosity=0)
        host = gb.BuildHost(gb.load_config(str(config), gb.Runner(output)).environment_for(), gb.BUILD_METHODS["chroot"])
        with pytest.raises(gb.BinhostError, match=f"commands cannot be confined in the binhost root"
                                                               f" {chroot_build.root}: .* is a link or leads out of"):
            host.confinement_problem()
    finally:
        for index, path in enumerate(trues):
            if not os.path.lexists(path):
                os.rename(kept / str(index), path)
        if run_dir.is_symlink():
            run_dir.unlink()
            os.rename(kept / "run", run_dir)


PTY_DRIVER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gentoo_binhost", sys.argv[1])
gb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gb)
output = gb.Output(color=False, verbosity=1)
host = gb.BuildHost(gb.load_config(sys.argv[2], gb.Runner(output)).environment_for(), gb.BUILD_METHODS["chroot"])
script = ("python3 -c 'import fcntl, termios\ntry:\n    fcntl.ioctl(0, termios.TIOCSTI, b\"X\")\n"
          "    print(\"TIOCSTI worked\")\nexcept OSError as error:\n    print(\"TIOCSTI refused\", error.errno)'\n"
          "printf 'answer? '; read answer; echo \"got $answer\"")
with host.mounted():
    result = host.run(["sh", "-c", script], check=False, own_group=True)
print("exit", result.returncode, flush=True)
"""


def test_a_confined_command_on_a_terminal_reads_it_but_cannot_type_into_it(chroot_build, tmp_path):
    """On a terminal (emerge --ask), the confined command reads its answer, but the terminal is not
    its controlling terminal (a session of its own): TIOCSTI, which would push input into the
    shell the tool was started from, is refused."""
    import pty
    import select
    import time
    driver = tmp_path / "driver.py"
    driver.write_text(PTY_DRIVER)
    pid, terminal = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, str(driver), str(SCRIPT), str(chroot_build.config)])
    said, answered, deadline = b"", False, time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not re.search(rb"exit \d+\r?\n", said):
            if select.select([terminal], [], [], 0.5)[0]:
                try:
                    data = os.read(terminal, 1024)
                except OSError:
                    break
                said += data
                if b"answer? " in said and not answered:
                    os.write(terminal, b"yes\n")
                    answered = True
    finally:
        os.waitpid(pid, 0)
        os.close(terminal)
    text = said.decode(errors="replace")
    assert "TIOCSTI refused 1" in text and "TIOCSTI worked" not in text, text
    assert "got yes" in text and "exit 0" in text, text
