"""distcc: builds spread to a real distccd on 127.0.0.1, after the helpers' gcc was checked."""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import SCRIPT, free_port, need, run, stop_process, wait_for_port, write_portage_config


@pytest.fixture(scope="module")
def distccd(eprefix):
    need(shutil.which("distccd") and shutil.which("distcc"), "distcc missing (apt-get install distcc)")
    need(os.path.isdir("/usr/lib/distcc"), "/usr/lib/distcc (distcc's masquerade directory) missing")
    # FEATURES=distcc puts $EPREFIX/usr/lib/distcc first in PATH: with Portage from PyPI, EPREFIX
    # is the venv, so it gets a link to Debian's masquerade directory.
    masquerade = Path(eprefix) / "usr/lib/distcc"
    if not masquerade.exists():
        masquerade.parent.mkdir(parents=True, exist_ok=True)
        masquerade.symlink_to("/usr/lib/distcc")
    logs = Path(tempfile.mkdtemp(prefix="gentoo-binhost-distccd-"))
    logs.chmod(0o1777)  # distccd started as root drops to an unprivileged user
    port = free_port()
    process = subprocess.Popen(["distccd", "--daemon", "--no-detach", "--listen", "127.0.0.1",
                                "--port", str(port), "--allow", "127.0.0.1", "--jobs", "2",
                                "--log-file", str(logs / "log"), "--log-level", "info"])
    try:
        assert wait_for_port(port, proc=process), "distccd did not start"
        yield {"host": f"127.0.0.1:{port}/2", "log": logs / "log"}
    finally:
        stop_process(process)
        shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture
def binhost(tmp_path, portage_bin, host_portage):
    root = tmp_path / "binhost"
    write_portage_config(root)
    return root


def cli(portage_bin, config, *args):
    return run([sys.executable, SCRIPT, "-c", config, "--color=n", *args], check=False,
               env={"PATH": f"{portage_bin}:{os.environ['PATH']}"})


def test_build_spreads_compiles_to_a_distcc_helper(tmp_path, binhost, portage_bin, distccd):
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\ndistcc-hosts = {distccd['host']}\n")
    before = distccd["log"].read_text().count("COMPILE_OK") if distccd["log"].exists() else 0
    result = cli(portage_bin, config, "build", "--oneshot", "app-misc/hello")
    assert result.returncode == 0, result.stderr
    assert "like the binhost" in result.stdout
    log = distccd["log"].read_text()
    assert log.count("COMPILE_OK") >= before + 2, log  # the version probe and hello.c
    assert "hello.c" in log
    assert list((binhost / "var/cache/binpkgs").rglob("hello-*.gpkg.tar"))


def test_pretend_shows_the_distcc_environment(tmp_path, binhost, portage_bin):
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\n")
    result = cli(portage_bin, config, "-p", "build", "--distcc", "10.0.0.2/8 10.0.0.3/4", "app-misc/hello")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("ROOT="))
    words = shlex.split(line)
    assert "FEATURES=-getbinpkg binpkg-multi-instance -binpkg-signing -binpkg-request-signature binpkg-ignore-signature distcc buildpkg" in words and "DISTCC_HOSTS=10.0.0.2/8 10.0.0.3/4" in words
    assert any(word.startswith("MAKEOPTS=-j12 -l") for word in words) and words[-1] == "app-misc/hello"


def test_an_unreachable_helper_stops_the_build_before_it_starts(tmp_path, binhost, portage_bin):
    need(shutil.which("distcc"), "distcc missing")
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\ndistcc-hosts = 127.0.0.1:1/2\n")
    result = cli(portage_bin, config, "build", "app-misc/hello")
    assert result.returncode == 1
    assert "distcc helper 127.0.0.1:1/2 cannot compile" in result.stderr
    assert not list((binhost / "var/cache/binpkgs").rglob("*.gpkg.tar"))


def test_a_gcc_version_that_cannot_be_read_is_refused(tmp_path, binhost, portage_bin):
    """Fail closed: a compiler whose objects carry no version (-fno-ident) is not taken for the
    same version as the helper's (both used to read as "unknown")."""
    need(shutil.which("distcc"), "distcc missing")
    wrapper = tmp_path / "bin/gcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('gcc')} -fno-ident \"$@\"\n")
    wrapper.chmod(0o755)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\ndistcc-hosts = 127.0.0.1:1/2\n")
    result = run([sys.executable, SCRIPT, "-c", config, "--color=n", "build", "app-misc/hello"], check=False,
                 env={"PATH": f"{wrapper.parent}:{portage_bin}:{os.environ['PATH']}"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the binhost's gcc: cannot read the gcc version" in result.stderr
    assert not list((binhost / "var/cache/binpkgs").rglob("*.gpkg.tar"))
