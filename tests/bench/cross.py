"""`make bench`, cross: an arm64 package built on this amd64 machine in an arm64 binhost root,
under emulation (qemu-user through binfmt_misc), with and without a distcc helper that runs this
machine's cross compiler (Debian's aarch64-linux-gnu-gcc, under crossdev's name
aarch64-unknown-linux-gnu-gcc).

Both runs go through `build` on the same root and the same package: app-misc/bench-cross
compiles FILES generated C files at -O2 (about as much compiling per file as a small library's)
and links them. Portage itself runs emulated in both; with the helper, cc1 runs natively there
and only the preprocessing and the link stay emulated. The report gives the wall time of each
(the best of ROUNDS builds), the ratio, and the compile jobs the helper ran (from its own log).

A measurement: it exits 0 whatever the numbers are, 1 when a build fails, and says what is
missing when it cannot run (root, binfmt_misc, qemu-user-static, distcc, gcc-aarch64-linux-gnu).
On a new machine it first builds the tests' arm64 image (about 5 minutes).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import pytest  # noqa: E402  (need() skips through pytest's exception)

from conftest import (SCRIPT, configure_gentoo_like_root, copy_of_chroot_image, processes_inside,  # noqa: E402
                      register_qemu_aarch64, remove_chroot, stop_process)
from test_arm64_build import CHOST, arm64_repository, start_distccd, stage3_like  # noqa: E402

FILES = 24
ROUNDS = 2
BENCH_EBUILD = """EAPI=8
DESCRIPTION="Compiles generated C files (make bench)"
HOMEPAGE="https://example.invalid/bench-cross"
S="${WORKDIR}"
LICENSE="MIT"
SLOT="0"
KEYWORDS="arm64"
src_compile() {
	local i objects=
	for ((i = 1; i <= %(files)d; i++)); do
		awk -v n=$i 'BEGIN { for (j = 1; j <= 80; j++) printf "double f%%d_%%d(double x) { double s = 0;'\\
' for (int k = 0; k < 100; k++) { s += x * k / (k + 1.0) + %%d; if (s > 1e6) s /= 3; } return s; }\\n", n, j, j;'\\
' printf "int main%%d(void) { return 0; }\\n", n }' > f$i.c || die
		objects+=" f$i.o"
	done
	printf 'int main(void) { return 0; }\\n' > main.c || die
	printf 'all: bench-cross\\nbench-cross: main.o%%s\\n\\t$(CC) $(CFLAGS) -o $@ $^\\n%%%%.o: %%%%.c\\n\\t$(CC) $(CFLAGS) -c -o $@ $<\\n' \\
		"${objects}" > Makefile || die
	emake CC="${CC:-${CHOST}-gcc}"
}
src_install() {
	dobin bench-cross
}
""" % {"files": FILES}


def prepare(base):
    root = copy_of_chroot_image(base / "binhost", arch="arm64")
    stage3_like(root)
    repo = arm64_repository(base / "repo", {"bench-cross": BENCH_EBUILD})
    configure_gentoo_like_root(root, repo, extra_make_conf='CFLAGS="-O2 -pipe"\n')
    profile = root / "etc/portage/make.profile"
    profile.unlink()
    profile.symlink_to(os.path.relpath(repo / "profiles/arm64", "/etc/portage"))
    config = base / "gentoo-binhost.conf"
    config.write_text(f"[binhost]\nroot = {root}\n")
    return root, config


def timed_build(config, distcc_hosts=None):
    argv = [sys.executable, str(SCRIPT), "-q", "--color=n", "-c", str(config), "build"]
    if distcc_hosts:
        argv += ["--distcc", distcc_hosts]
    argv += ["--oneshot", "--quiet-build=y", "app-misc/bench-cross"]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"!!! build failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return elapsed


def main():
    if os.geteuid() != 0:
        print(" * not root: skipping the cross-compiling benchmark (it builds in a chroot)")
        return 0
    missing = [name for name in ("distccd", "aarch64-linux-gnu-gcc", "qemu-aarch64-static") if not shutil.which(name)]
    if missing:
        print(f" * {', '.join(missing)} missing: skipping the cross-compiling benchmark (make system-deps)")
        return 0
    try:
        register_qemu_aarch64()
    except pytest.skip.Exception as reason:
        print(f" * skipping the cross-compiling benchmark: {reason}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-cross-bench-"))
    base.chmod(0o755)
    helper = None
    try:
        try:
            _root, config = prepare(base)
            helper, spec, log = start_distccd(base / "distccd", shutil.which("aarch64-linux-gnu-gcc"))
        except (pytest.skip.Exception, pytest.fail.Exception, AssertionError) as problem:
            print(f" * skipping the cross-compiling benchmark: {problem}")
            return 0
        timed_build(config)  # warm-up: Portage's metadata cache, the page cache
        emulated = min(timed_build(config) for _ in range(ROUNDS))
        before = len(re.findall(r"COMPILE_OK", log.read_text())) if log.exists() else 0
        helped = min(timed_build(config, spec) for _ in range(ROUNDS))
        jobs = len(re.findall(r"COMPILE_OK", log.read_text())) - before - ROUNDS  # less the probes
        print(f"\nbuild of app-misc/bench-cross ({FILES + 1} C files at -O2, {CHOST}) in an arm64 root,"
              f" {os.cpu_count()} cores")
        print(f"{'run':<34} {'wall':>8} {'vs emulated':>12}")
        print(f"{'emulated (qemu-user)':<34} {emulated:7.1f}s {1:11.2f}x")
        print(f"{'distcc helper, cross compiler':<34} {helped:7.1f}s {emulated / helped:11.2f}x"
              f"  ({jobs} compile jobs on the helper in {ROUNDS} builds)")
        return 0
    finally:
        if helper is not None:
            stop_process(helper)
        for pid in processes_inside(base / "binhost"):
            os.kill(pid, 9)
        remove_chroot(base)


if __name__ == "__main__":
    sys.exit(main())
