"""A build machine without Gentoo: `init --host-chroot` creates the Gentoo host environment from a
verified "stage3" (here a real Debian chroot with Portage from PyPI, made by debootstrap, signed
like Gentoo's), syncs its repository for real (emerge --sync from a file:// rsync source), and
every build runs inside it: signed packages built in DIR/binhost, served by `serve`, installed on
a target reached through a real sshd. Failing and interrupted builds leave no mounts behind."""

import datetime
import email.utils
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (CHROOT_EPREFIX, CHROOT_REPO, REPO, SCRIPT, binhost_serving, eroot,
                      ensure_chroot_cache, free_port, mounts_under, need, processes_inside, remove_chroot, run, slow_ebuild,
                      write_chroot_portage_config, write_portage_config)
from test_init import gpg_home, sign, tiny_stage3

UPSTREAM = "/srv/binhost-test-upstream"
SNAPSHOT = "Tue, 24 Nov 2026 12:00:00 +0000"


def signed_release(directory, name, payload, release):
    """payload as a file with a clearsigned .DIGESTS and a detached .asc, as Gentoo publishes."""
    path = directory / name
    path.write_bytes(payload) if isinstance(payload, bytes) else shutil.move(str(payload), path)
    data = path.read_bytes()
    digests = directory / (name + ".DIGESTS")
    digests.write_text(f"# BLAKE2B HASH\n{hashlib.blake2b(data).hexdigest()}  {name}\n"
                       f"# SHA512 HASH\n{hashlib.sha512(data).hexdigest()}  {name}\n")
    sign(release, digests, clear=True)
    sign(release, path)
    return path


def host_stage3(cache, base, release):
    """The cached Debian chroot plus a Portage host configuration, as one signed tarball."""
    overlay = base / "overlay"
    write_chroot_portage_config(overlay, CHROOT_EPREFIX)
    # The packaged [gentoo] repository would try the network; ours syncs from a local rsync source.
    (overlay / CHROOT_EPREFIX.lstrip("/") / "etc/portage/repos.conf/binhost-test.conf").write_text(
        f"[DEFAULT]\nmain-repo = binhost-test\n\n[gentoo]\nauto-sync = no\n\n"
        f"[binhost-test]\nlocation = {CHROOT_REPO}\nsync-type = rsync\nsync-uri = file://{UPSTREAM}\n")
    shutil.copytree(REPO, overlay / CHROOT_REPO.lstrip("/"))
    upstream = overlay / UPSTREAM.lstrip("/")
    shutil.copytree(REPO, upstream)
    (upstream / "metadata/timestamp.chk").write_text(SNAPSHOT + "\n")
    (upstream / "app-misc/slow").mkdir()
    (upstream / "app-misc/slow/slow-1.0.ebuild").write_text(slow_ebuild("/tmp/slow-started"))
    tarball = base / "stage3-host.tar.zst"
    run(["tar", "--zstd", "--create", "--file", tarball, "--numeric-owner",
         "--directory", cache / "root", ".", "--directory", overlay, "."], timeout=300)
    shutil.rmtree(overlay)
    return signed_release(base / "release", "stage3-amd64-openrc-20261124T120000Z.tar.zst", tarball,
                          release)


class ChrootWorld:
    def __init__(self, base, chroot, portage_bin, eprefix, sshd):
        self.base, self.chroot, self.portage_bin, self.eprefix, self.sshd = (
            base, chroot, portage_bin, eprefix, sshd)
        self.config = base / "gentoo-binhost.conf"
        self.port = free_port()
        self.binhost = chroot / "binhost"
        self.pkgdir = self.binhost / "var/cache/binpkgs"

    def cli(self, *args, check=True, timeout=600):
        return run([sys.executable, SCRIPT, "--color=n", "-c", self.config] + list(args),
                   env={"NO_COLOR": "1"}, check=check, timeout=timeout)

    def popen(self, *args):
        # Its own process group, as a shell job; SIGINT not ignored even if ours is (background).
        return subprocess.Popen([sys.executable, str(SCRIPT), "--color=n", "-c", str(self.config)]
                                + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def mounts(self):
        return mounts_under(self.chroot)

    def state(self):
        path = self.chroot / "var/cache/gentoo-binhost/mounts"
        return path.read_text() if path.exists() else ""


def start_slow_build(world):
    """A build (in its own process group) that has reached app-misc/slow's endless compile."""
    started = world.chroot / "tmp/slow-started"
    if started.exists():
        started.unlink()
    build = world.popen("build", "--oneshot", "app-misc/slow")
    deadline = time.monotonic() + 120
    while not started.exists():
        if build.poll() is not None or time.monotonic() > deadline:
            build.kill()
            pytest.fail(f"the slow build did not start: {build.communicate()[0]}")
        time.sleep(0.2)
    return build


def live_processes_in_group(pgid):
    """Processes of a process group that still run (zombies nobody reaps here do not count)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def world(portage_bin, eprefix, host_portage, sshd):
    need(os.geteuid() == 0, "the host chroot needs root")
    need(shutil.which("zstd") and shutil.which("gpg"), "zstd and gpg are needed")
    cache, _timings = ensure_chroot_cache()
    base = Path(tempfile.mkdtemp(prefix="gbc-"))  # short: gpg-agent socket paths are limited
    base.chmod(0o755)  # Portage verifies as nobody
    chroot = base / "gentoo"
    try:
        (base / "release").mkdir()
        release = gpg_home(base / "release-gnupg", "release")
        keyring = base / "gentoo-release.asc"
        keyring.write_text(run(["gpg", "--homedir", release, "--armor", "--export"]).stdout)
        host_tarball = host_stage3(cache, base, release)
        binhost_tarball = signed_release(base / "release", "stage3-amd64-openrc-20261120T170000Z.tar.xz",
                                         tiny_stage3(), release)
        world = ChrootWorld(base, chroot, portage_bin, eprefix, sshd)
        world.target = base / "target"
        write_portage_config(world.target, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{world.target}/etc/portage/gnupg"\n'))
        world.config.write_text(
            f"[binhost]\nurl = http://127.0.0.1:{world.port}/\nbind = 127.0.0.1\nport = {world.port}\n\n"
            f"[host]\npath = {CHROOT_EPREFIX}/bin\n\n"
            f"[target laptop]\nhost = {sshd.host}\nssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
            f"root = {world.target}\npath = {portage_bin}\n")
        world.init_result = world.cli("init", "--host-chroot", chroot, "--host-stage3", host_tarball,
                                      "--stage3", binhost_tarball, "--keyring", keyring, "--sync")
        world.init_again = lambda *extra: world.cli("init", "--keyring", keyring, *extra, check=False)
        # What `config pull` would bring: the target's configuration, with the chroot's paths.
        write_chroot_portage_config(chroot, "/binhost", extra_make_conf='USE="loud"\n')
        world.cli("keygen")
        world.built = world.cli("build", "app-misc/hello-app", "app-misc/greet")
        with binhost_serving(world.config, world.port):
            yield world
    finally:
        remove_chroot(chroot)  # unmounts first: never rm -rf a mounted /dev
        shutil.rmtree(base, ignore_errors=True)


def test_init_made_a_verified_synced_host_environment(world):
    out = world.init_result.stdout
    assert "Creating the Gentoo host environment" in out
    assert out.count("PGP signature good") == 2  # the host stage3 and the binhost's
    assert "emerge --sync" in out
    assert "Repository binhost-test in the host chroot" in out and "2026-11-24 12:00 UTC" in out
    assert (world.chroot / "var/db/repos/binhost-test/app-misc/slow").is_dir()  # really synced
    assert (world.chroot / "etc/resolv.conf").read_text() == Path("/etc/resolv.conf").read_text()
    assert (world.binhost / "etc/os-release").read_text().startswith("NAME=Gentoo")
    assert os.readlink(world.binhost / "var/db/repos/gentoo") == "/var/db/repos/gentoo"
    text = world.config.read_text()
    assert f"[host]\npath = {CHROOT_EPREFIX}/bin\nchroot = {world.chroot}\n\n[target laptop]" in text
    assert "stage3 = stage3-amd64-openrc-20261120T170000Z.tar.xz" in text
    assert not [p for p in world.base.iterdir() if ".new." in p.name or p.name.endswith(".download")]
    assert world.mounts() == []


def test_builds_run_inside_and_are_signed(world):
    assert "inside the host chroot" in world.built.stdout
    packages = sorted(world.pkgdir.rglob("*.gpkg.tar"))
    assert [p.name for p in packages] == ["greet-1.0-1.gpkg.tar", "hello-1.1-1.gpkg.tar",
                                          "hello-app-1.0-1.gpkg.tar"]
    for package in packages:
        with tarfile.open(package) as archive:
            assert any(name.endswith(".sig") for name in archive.getnames()), package
    # Installed into the binhost root inside the chroot (EPREFIX /opt/portage there).
    assert (world.binhost / CHROOT_EPREFIX.lstrip("/") / "usr/bin/hello-app").exists()
    assert world.mounts() == [] and world.state() == ""


def test_the_target_installs_what_the_chroot_built(world):
    root = world.target
    setup = world.cli("setup-target")
    assert "accepts packages signed by" in setup.stdout
    world.cli("install", ">=app-misc/hello-app-1.0")
    installed = eroot(root, world.eprefix)
    assert run([installed / "usr/bin/hello-app"]).stdout == "hello-app from binhost\n"
    assert (installed / "var/db/pkg/app-misc/hello-app-1.0/BINPKGMD5").is_file()

    # The binhost side of config diff, doctor's checks and clean's portageq run in the chroot too.
    diff = world.cli("config", "diff")
    assert "make.conf" in diff.stdout
    doctor = world.cli("doctor", check=False)
    assert "OK   chroot mounts: none left behind" in doctor.stdout
    assert "snapshot: binhost-test: 2026-11-24 12:00 UTC" in doctor.stdout
    assert "chroot disk:" in doctor.stdout
    clean = world.cli("clean")
    assert "Traceback" not in clean.stderr
    assert world.mounts() == []


def test_a_failing_build_leaves_no_mounts(world):
    result = world.cli("build", "app-misc/no-such-package", check=False)
    assert result.returncode == 1
    assert "!!! emerge failed on the binhost" in result.stderr
    assert world.mounts() == [] and world.state() == ""


@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to the process group"])
def test_an_interrupted_build_leaves_no_mounts_and_no_build_running(world, how):
    build = start_slow_build(world)
    try:
        assert len(world.mounts()) >= 4  # proc, sys (+ submounts), dev (+ pts, shm), run
        if how.startswith("SIGTERM"):
            build.send_signal(signal.SIGTERM)
        else:
            os.killpg(build.pid, signal.SIGINT)
        output = build.communicate(timeout=60)[0]
    finally:
        # The build runs in a process group of its own: look for anything still inside the chroot.
        left = live_processes_in_group(build.pid) + processes_inside(world.chroot)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], "build processes still running after the interrupt"
    if how.startswith("SIGTERM"):
        assert build.returncode == 143 and "!!! Stopped by SIGTERM" in output, output
    else:
        assert build.returncode == 130 and "!!! Interrupted" in output, output
    assert world.mounts() == [] and world.state() == ""


def mount_id(point):
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[0] for line in handle if line.split()[4] == str(point)][-1]


def test_mounts_of_others_are_kept_and_leftovers_are_cleaned(world):
    proc = world.chroot / "proc"
    state = world.chroot / "var/cache/gentoo-binhost/mounts"
    # A record from before a reboot names /proc, which the user has mounted since: not ours.
    state.write_text(f"999999 {proc}\n")
    run(["mount", "--types", "proc", "proc", proc])  # the user's own chroot session
    try:
        world.cli("build", "--oneshot", "app-misc/hello")
        assert world.mounts() == [str(proc)]  # kept, and not mounted a second time
        doctor = world.cli("doctor", check=False)
        assert f"OK   chroot mounts: mounted by someone else, used as they are and never unmounted" \
               f" by gentoo-binhost.py: {proc}" in doctor.stdout
    finally:
        run(["umount", proc])
    # A build killed with SIGKILL leaves its mounts recorded; doctor sees them, the next build
    # removes them.
    run(["mount", "--bind", "--make-slave", "/run", world.chroot / "run"])
    state.write_text(f"{mount_id(world.chroot / 'run')} {world.chroot / 'run'}\n")
    doctor = world.cli("doctor", check=False)
    assert f"WARN chroot mounts: left mounted by a build that did not finish: {world.chroot / 'run'}" \
           in doctor.stdout
    world.cli("build", "--oneshot", "app-misc/hello")
    assert world.mounts() == [] and world.state() == ""


def test_concurrent_commands_share_the_mounts(world):
    """While a build runs, another command in the chroot uses its mounts, mounts nothing twice and
    unmounts nothing; the build, the last one out, unmounts."""
    build = start_slow_build(world)
    try:
        during = world.mounts()
        assert world.cli("config", "diff").returncode == 0  # runs its script in the chroot
        assert world.mounts() == during
        assert sorted(during).count(str(world.chroot / "proc")) == 1
        build.send_signal(signal.SIGTERM)
        build.communicate(timeout=60)
    finally:
        for pid in live_processes_in_group(build.pid):
            os.kill(pid, signal.SIGKILL)
    assert world.mounts() == [] and world.state() == ""


def test_nothing_propagates_to_the_host_where_mounts_are_shared(world):
    """On systemd machines / is a shared mount: unmounting the chroot's rbinds must not take the
    host's /dev/pts, /dev/shm or /sys submounts with them. In a mount namespace of its own with /
    made shared, a build and an interrupted build leave the namespace's mount table as it was."""
    need(shutil.which("unshare"), "unshare (util-linux) is needed")
    script = ("mount --make-rshared / && grep -v ' {chroot}/' /proc/self/mountinfo | cut -d' ' -f5 "
              "| sort > {base}/before && \"$@\"; grep -v ' {chroot}/' /proc/self/mountinfo | cut -d' ' -f5 "
              "| sort > {base}/after").format(chroot=world.chroot, base=world.base)
    run(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script, "sh", sys.executable,
         SCRIPT, "--color=n", "-c", world.config, "build", "--oneshot", "app-misc/hello"], timeout=600)
    before, after = (world.base / "before").read_text(), (world.base / "after").read_text()
    assert "/dev/pts" in before and before == after
    assert world.mounts() == []


def test_init_again_resyncs_and_keeps_everything(world):
    upstream = world.chroot / UPSTREAM.lstrip("/")
    (upstream / "metadata/timestamp.chk").write_text("Wed, 25 Nov 2026 06:00:00 +0000\n")
    result = world.init_again("--sync")
    assert result.returncode == 0, result.stderr
    assert "Using the existing host environment" in result.stdout
    assert "Keeping the binhost root" in result.stdout
    assert "2026-11-25 06:00 UTC" in result.stdout
    assert len(sorted(world.pkgdir.rglob("*.gpkg.tar"))) >= 3
    assert world.mounts() == []


def test_sign_config_pull_and_cpu_apply_work_through_the_chroot(world):
    """Last: config pull replaces the binhost's configuration with the target's (host paths)."""
    resigned = world.cli("sign", "--all")
    count = len(list(world.pkgdir.rglob("*.gpkg.tar")))
    assert f"Signed {count} package(s)" in resigned.stdout
    assert world.mounts() == []

    pulled = world.cli("config", "pull")
    kept = next(line for line in pulled.stdout.splitlines() if "Previous configuration kept as" in line)
    assert str(world.binhost / "etc") in kept  # a host path, though the script ran inside
    assert (world.binhost / "etc/portage/make.conf").read_text() == \
        (world.target / "etc/portage/make.conf").read_text()

    cpu = world.cli("cpu", "--apply")  # the target's flags, checked with the chroot's gcc
    assert "Traceback" not in cpu.stderr
    assert "-march=" in (world.binhost / "etc/portage/make.conf").read_text()
    assert world.mounts() == [] and world.state() == ""


# ---- README promises about the host chroot that need no build -----------------------------------


def test_doctor_warns_about_a_snapshot_older_than_30_days_and_resolv_conf_follows_the_host(world):
    """README: doctor adds the age of each repository snapshot (a warning after 30 days);
    /etc/resolv.conf is copied in again before every command, so a laptop's changing DNS follows."""
    stamp = world.chroot / CHROOT_REPO.lstrip("/") / "metadata/timestamp.chk"
    original = stamp.read_text()
    resolv = world.chroot / "etc/resolv.conf"
    try:
        resolv.write_text("nameserver 192.0.2.53\n")  # what the DHCP of another network said
        old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=40)
        stamp.write_text(email.utils.format_datetime(old) + "\n")
        doctor = world.cli("doctor", check=False)
        assert (f"WARN snapshot: binhost-test: {old:%Y-%m-%d %H:%M} UTC, older than 30 days: sync with"
                f" 'gentoo-binhost.py init --host-chroot {world.chroot}'") in doctor.stdout, doctor.stdout
        assert resolv.read_text() == Path("/etc/resolv.conf").read_text()
        assert world.mounts() == []
    finally:
        stamp.write_text(original)


def test_pretend_says_it_mounts_for_its_read_only_queries_and_unmounts(world):
    """README: the read-only queries --pretend still runs in the chroot (portageq, the binhost side of
    clean, ...) mount and unmount for real; it says so."""
    result = world.cli("-v", "--pretend", "clean")
    assert (f"--pretend: mounting /proc, /sys, /dev and /run in {world.chroot} for the read-only queries it"
            " runs there, unmounted after them") in result.stdout
    ran = [line for line in result.stderr.splitlines() if line.startswith(" * Running: ")]
    # Confined (README: Confinement): unshare ... -- PYTHON -c "$CONFINE_PROGRAM" CHROOT -- env -i ...
    assert any(line.startswith(" * Running: unshare --pid --fork --kill-child --mount")
               and f' -I -c "$CONFINE_PROGRAM" {world.chroot} -- env -i ' in line and "portageq" in line
               for line in ran), ran
    assert any(line == f" * Running: mount --types proc proc {world.chroot}/proc" for line in ran)
    assert world.mounts() == [] and world.state() == ""


def test_a_failed_webrsync_is_named_and_https_proxy_is_passed_in(world):
    """README: `emerge-webrsync failed in the host chroot` ... behind a proxy export https_proxy,
    which is passed in. (A stand-in emerge-webrsync that fails, as without network.)"""
    webrsync = world.chroot / CHROOT_EPREFIX.lstrip("/") / "bin/emerge-webrsync"
    saved = webrsync.with_name("emerge-webrsync.saved")
    webrsync.rename(saved)
    try:
        webrsync.write_text('#!/bin/sh\necho "proxy seen: $https_proxy"\nexit 7\n')
        webrsync.chmod(0o755)
        result = run([sys.executable, SCRIPT, "--color=n", "-c", world.config, "init", "--keyring",
                      world.base / "gentoo-release.asc"], env={"https_proxy": "http://proxy.example:3128"},
                     check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "proxy seen: http://proxy.example:3128" in result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("!!!")]
        assert errors and "emerge-webrsync failed in the host chroot" in errors[-1] \
            and "exit 7" in errors[-1] and "again to retry" in errors[-1], errors
        assert world.mounts() == [] and world.state() == ""
    finally:
        webrsync.unlink(missing_ok=True)
        saved.rename(webrsync)


def bad_release(world, name, payload, damage):
    """A signed release of payload beside the real ones, then damaged: "payload" after signing, or
    "signature" (a good signature by the release key, of other data)."""
    directory = world.base / "bad-release"
    directory.mkdir(exist_ok=True)
    path = signed_release(directory, name, payload, world.base / "release-gnupg")
    if damage == "payload":
        path.write_bytes(payload + b"tampered")
    else:
        other = directory / "other"
        other.write_bytes(b"not the stage3")
        sign(world.base / "release-gnupg", other)
        (directory / "other.asc").replace(path.with_name(path.name + ".asc"))
    return path


@pytest.mark.parametrize("damage, options, message", [
    ("signature", [], "PGP signature"),
    ("payload", [], "does not match its DIGESTS"),
    ("payload", ["--no-verify-pgp"], "does not match its DIGESTS"),
])
def test_a_bad_host_stage3_is_refused_before_anything_is_extracted(world, damage, options, message):
    """README: `--host-stage3 FILE` is verified the same way (FILE.DIGESTS and FILE.asc beside it);
    a digest mismatch is always fatal, --no-verify-pgp or not; a failed init leaves nothing behind."""
    tarball = bad_release(world, f"stage3-amd64-openrc-2026112{len(options)}T000000Z.tar.xz", tiny_stage3(), damage)
    directory = world.base / "other-host"
    config = world.base / "bad-host.conf"
    config.write_text("[binhost]\nport = 8080\n")
    keyring = [] if options else ["--keyring", world.base / "gentoo-release.asc"]
    result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "init", "--host-chroot", directory,
                  "--host-stage3", tarball, "--no-sync", *keyring, *options], check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("!!!")]
    assert len(errors) == 1 and message in errors[0] and tarball.name in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Extracting" not in result.stdout
    assert not directory.exists() and not list(world.base.glob(".other-host*"))
    assert tarball.exists()  # the user's own file: only a download is deleted
    assert config.read_text() == "[binhost]\nport = 8080\n"


def test_init_with_target_creates_that_targets_binhost_root_inside(world):
    """README: `--host-chroot DIR` (or [host] chroot; with `--target NAME`, that target's binhost root
    is created inside)."""
    second = world.chroot / "second"
    config = world.base / "second.conf"
    config.write_text(world.config.read_text() + f"\n[target second]\nhost = 127.0.0.1\nbinhost-root = {second}\n")
    stage3 = world.base / "release/stage3-amd64-openrc-20261120T170000Z.tar.xz"
    before = sorted(p.name for p in world.binhost.iterdir())
    try:
        result = run([sys.executable, SCRIPT, "--color=n", "-c", config, "init", "--target", "second",
                      "--no-sync", "--stage3", stage3, "--keyring", world.base / "gentoo-release.asc"])
        assert "Using the existing host environment" in result.stdout
        assert (second / "etc/os-release").read_text().startswith("NAME=Gentoo")
        assert (second / "usr/bin/hello").is_file() and (second / "var/cache/binpkgs").is_dir()
        assert sorted(p.name for p in world.binhost.iterdir()) == before  # the other root untouched
        assert world.mounts() == []
    finally:
        remove_chroot(second)
        config.unlink(missing_ok=True)


def test_a_busy_leftover_mount_is_detached_lazily_by_the_next_command(world):
    """README: `... is busy: detaching it lazily`: a process still has a file open under a mount in
    the chroot; the mount is detached at once. Mounts left by a killed build are removed by the next
    command that runs in the chroot."""
    run_dir = world.chroot / "run"
    state = world.chroot / "var/cache/gentoo-binhost/mounts"
    run(["mount", "--bind", "--make-slave", "/run", run_dir])  # as a build killed with SIGKILL left it
    holder = None
    try:
        state.write_text(f"{mount_id(run_dir)} {run_dir}\n")
        holder = subprocess.Popen(["sleep", "120"], cwd=run_dir)  # keeps the mount busy
        result = world.cli("config", "diff", check=False)
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
        assert f"{run_dir} is busy" in result.stderr and "detaching it lazily" in result.stderr, result.stderr
        assert world.mounts() == [] and world.state() == ""
    finally:
        if holder:
            holder.kill()
            holder.wait()
        if str(run_dir) in world.mounts():
            run(["umount", "--recursive", "--lazy", run_dir], check=False)


def test_cpu_warns_about_isa_this_machine_lacks_and_writes_cpu_flags_where_they_are_kept(gb, world):
    """README (cpu): a warning names the ISA extensions the target has and this machine lacks;
    `cpu --apply` writes CPU_FLAGS_X86 where the configuration keeps it (a package.use file that
    mentions it, else make.conf if it is set there), each with a backup (FILE.<date>.bak). The target
    reports its CPU through cpuid2cpuflags; a stand-in there claims an extension this CPU lacks."""
    need(os.uname().machine == "x86_64", "CPU_FLAGS_X86 only on x86")
    lacking = sorted(set(gb.CPU_FLAGS_X86_NAMES) - set(gb.host_cpu_flags("CPU_FLAGS_X86") or []))
    need(lacking, "this CPU has every CPU_FLAGS_X86 flag")
    fake = world.base / "fake-cpuid2cpuflags"
    fake.mkdir(exist_ok=True)
    (fake / "cpuid2cpuflags").write_text(f"#!/bin/sh\necho 'CPU_FLAGS_X86: mmx sse sse2 {lacking[0]}'\n")
    (fake / "cpuid2cpuflags").chmod(0o755)
    config = world.base / "cpu.conf"
    config.write_text(world.config.read_text().replace(f"path = {world.portage_bin}\n",
                                                       f"path = {fake}:{world.portage_bin}\n"))
    portage = world.binhost / "etc/portage"
    package_use, aside = portage / "package.use", portage / ".package.use.test-aside"
    make_conf = portage / "make.conf"
    saved = make_conf.read_bytes()
    earlier_backups = set(portage.glob("make.conf.*.bak"))
    try:
        if os.path.lexists(package_use):
            package_use.rename(aside)  # whatever an earlier cpu --apply wrote there
        package_use.mkdir()
        (package_use / "zz-cpu").write_text("*/* CPU_FLAGS_X86: mmx  # kept here by the target\n")
        make_conf.write_text(saved.decode() + 'CPU_FLAGS_X86="sse"\n')

        def cpu_apply():
            return run([sys.executable, SCRIPT, "--color=n", "-c", config, "cpu", "--apply"])

        flags = " ".join(sorted(["mmx", "sse", "sse2", lacking[0]]))
        result = cpu_apply()
        assert (f"laptop's CPU has {lacking[0]}, this machine's does not" in result.stderr
                and "SIGILL" in result.stderr), result.stderr
        assert f"*/* CPU_FLAGS_X86: {flags}" in (package_use / "zz-cpu").read_text()
        assert 'CPU_FLAGS_X86="sse"' in make_conf.read_text()  # the package.use file wins
        assert list(package_use.glob("zz-cpu.*.bak")) and not (package_use / "00cpu-flags").exists()
        (package_use / "zz-cpu").unlink()
        for backup in set(package_use.glob("zz-cpu.*.bak")) | set(portage.glob("make.conf.*.bak")) - earlier_backups:
            backup.unlink()
        before = make_conf.read_text()
        cpu_apply()  # no package.use file mentions it: make.conf, where it is set
        assert f'CPU_FLAGS_X86="{flags}"' in make_conf.read_text()
        backups = set(portage.glob("make.conf.*.bak")) - earlier_backups
        assert [b.read_text() for b in backups] == [before] and not (package_use / "00cpu-flags").exists()
    finally:
        for path in set(portage.glob("make.conf.*.bak")) - earlier_backups:
            path.unlink()
        make_conf.write_bytes(saved)
        shutil.rmtree(package_use, ignore_errors=True)
        if os.path.lexists(aside):
            aside.rename(package_use)
        config.unlink(missing_ok=True)


def test_init_force_replaces_the_binhost_root_checked_with_the_host_environments_keys(world):
    """Last: it replaces the binhost root. README: the binhost's own stage3 is checked with the keys
    the verified host stage3 brought along (a --keyring given is used instead); an existing binhost
    root is kept, --force replaces it: PKGDIR moves into the new one (the signing key lives outside
    every root, untouched), the rest of the old root is kept as ROOT.<date>.bak."""
    host_keys = world.chroot / "usr/share/openpgp-keys/gentoo-release.asc"
    need(not Path("/usr/share/openpgp-keys/gentoo-release.asc").exists(), "this machine has Gentoo's keys")
    host_keys.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(world.base / "gentoo-release.asc", host_keys)
    stage3 = world.base / "release/stage3-amd64-openrc-20261120T170000Z.tar.xz"
    packages = sorted(p.relative_to(world.pkgdir) for p in world.pkgdir.rglob("*.gpkg.tar"))
    gnupg = world.base / "gentoo-binhost/gnupg"  # the default: beside the configuration
    key_files = sorted(p.relative_to(gnupg) for p in gnupg.rglob("*") if p.is_file() and not p.name.startswith("S."))
    assert packages and key_files and (world.binhost / "etc/portage/make.conf").exists()

    # A --keyring that does not hold the release key is used for the binhost's stage3 too: refused.
    other = gpg_home(world.base / "other-gnupg", "other")
    other_keys = world.base / "other.asc"
    other_keys.write_text(run(["gpg", "--homedir", other, "--armor", "--export"]).stdout)
    refused = world.cli("init", "--force", "--no-sync", "--stage3", stage3, "--keyring", other_keys, check=False)
    assert refused.returncode == 1 and "Extracting" not in refused.stdout, refused.stdout + refused.stderr
    assert f"the PGP signature of {stage3.name}.DIGESTS is not valid for Gentoo's release keys" in refused.stderr
    assert (world.binhost / "etc/portage/make.conf").exists()

    result = world.cli("init", "--force", "--no-sync", "--stage3", stage3)
    out = result.stdout
    assert f"Verifying the binhost's stage3 with the release keys of the host environment, {host_keys}" in out
    assert f"PGP signature good (a key from {host_keys})" in out
    backups = [p for p in world.chroot.iterdir() if p.name.startswith("binhost.") and p.name.endswith(".bak")]
    assert len(backups) == 1 and (backups[0] / "etc/portage/make.conf").exists()  # the old root, kept
    assert not (world.binhost / "etc/portage/make.conf").exists()  # a fresh stage3
    assert (world.binhost / "etc/os-release").read_text().startswith("NAME=Gentoo")
    assert sorted(p.relative_to(world.pkgdir) for p in world.pkgdir.rglob("*.gpkg.tar")) == packages
    assert sorted(p.relative_to(gnupg) for p in gnupg.rglob("*") if p.is_file()
                  and not p.name.startswith("S.")) == key_files
    assert world.mounts() == []
