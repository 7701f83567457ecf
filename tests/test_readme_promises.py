"""README promises that had no test that would catch them breaking: gcc's flag check, setup-target,
keygen and the key rotation, doctor's FAIL rows, the index dates, clean, sudo, config pull and
push, serve's details, the options, the terminal, --like-target.

Real components only: the binhost's own gcc, ssh (-G and the session's sshd), gpg, Portage 3.0.83
from PyPI (emaint, gpkg-sign, emerge on the target). Everything reuses the session's `world`;
what a test changes (a target root, a PKGDIR, a binhost root, a GnuPG home) is a copy of its own.
"""

import contextlib
import gzip
import io
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, eroot, free_port, need, run, write_portage_config


def doctor_report(result):
    try:
        return {row["check"]: row for row in json.loads(result.stdout)}
    except ValueError:
        raise AssertionError(f"doctor printed no JSON:\n{result.stdout}\n{result.stderr}")


def index_stamp(path):
    text = Path(path).read_text() if not str(path).endswith(".gz") else gzip.decompress(
        Path(path).read_bytes()).decode()
    match = re.search(r"^TIMESTAMP: *(\d+)$", text.split("\n\n", 1)[0], re.MULTILINE)
    assert match, text[:300]
    return int(match.group(1))


def set_index_stamp(path, stamp):
    """PKGDIR/Packages (and Packages.gz) with TIMESTAMP and mtime `stamp`, as Portage leaves them."""
    path = Path(path)
    text = re.sub(r"^TIMESTAMP: *\d+$", f"TIMESTAMP: {stamp}", path.read_text(), count=1, flags=re.MULTILINE)
    path.write_text(text)
    os.utime(path, (stamp, stamp))
    compressed = path.with_name("Packages.gz")
    compressed.write_bytes(gzip.compress(text.encode()))
    os.utime(compressed, (stamp, stamp))


def copy_pkgdir(world, into):
    """A copy of the world's PKGDIR (signed builds, its publications) at `into`."""
    shutil.copytree(world.pkgdir, into, symlinks=True)
    return into


@pytest.fixture
def short_dir():
    """A 0755 directory with a short path (gpg-agent socket paths have at most 107 bytes; Portage
    verifies as nobody), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="gbp-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# cpu: "a flag it does not know is an error naming it, except an unknown -mno-X, which is dropped"
# (checked with the binhost's real gcc and its real messages)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def flag_check(gb, tmp_path):
    need(shutil.which("gcc"), "gcc not installed")
    root = tmp_path / "binhost"
    (root / "etc/portage").mkdir(parents=True)
    path = tmp_path / "gb.conf"
    path.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    said = io.StringIO()
    env = gb.load_config(str(path), gb.Runner(gb.Output(color=False, out=said, err=said))).environment_for()

    def check(flags):
        return gb.flags_the_binhost_gcc_accepts(flags, env)
    check.said = said
    return check


def test_gcc_flag_check_drops_an_unknown_mno_flag(gb, flag_check):
    flags = flag_check(["-march=x86-64", "-mno-gbfeature", "-msse3"])
    assert flags == ["-march=x86-64", "-msse3"]
    assert "Dropping -mno-gbfeature" in flag_check.said.getvalue()


def test_gcc_flag_check_names_an_unknown_feature_flag(gb, flag_check):
    with pytest.raises(gb.BinhostError) as error:
        flag_check(["-march=x86-64", "-mno-gbfeature", "-mgbfeature"])
    assert "does not know -mgbfeature" in str(error.value)


def test_gcc_flag_check_names_an_unknown_march_value(gb, flag_check):
    with pytest.raises(gb.BinhostError) as error:
        flag_check(["-march=gbcpu99", "-msse3"])
    assert "-march=gbcpu99" in str(error.value)


# ------------------------------------------------------------------------------------------------
# install: "sudo only when the ssh user (as ssh -G resolves it) is not root"
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("user, sudo", [("root", False), ("alice", True)])
def test_sudo_follows_the_user_ssh_config_resolves(world, tmp_path, user, sudo):
    need(shutil.which("ssh"), "ssh missing")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host gb-alias\n    HostName 127.0.0.1\n    Port 1\n    User {user}\n")
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {tmp_path}\n\n[target t]\nhost = gb-alias\n"
                      f"ssh-options = -F {ssh_config}\n")
    result = world.cli("-p", "install", "app-misc/hello", config=config)
    line = next(line for line in result.stdout.splitlines() if line.startswith("ssh "))
    assert shlex.split(line)[-1].startswith("sudo ") is sudo, line


# ------------------------------------------------------------------------------------------------
# setup-target: "The old file is kept as .gentoo-binhost.conf.<date>.bak; running it again changes
# nothing"; and when the target's gpg (as nobody) does not accept our key, setup-target and doctor
# say so. doctor's FAIL rows for fetch, index and publication.
# ------------------------------------------------------------------------------------------------

def test_setup_target_keeps_the_old_entry_as_a_dot_bak(world):
    root, config = world.new_target("pb-bak")
    world.cli("setup-target", config=config)
    directory = root / "etc/portage/binrepos.conf"
    entry = directory / "gentoo-binhost.conf"
    ours = entry.read_text()
    assert not list(directory.glob(".gentoo-binhost.conf.*.bak"))

    entry.write_text(ours.replace("priority = 10", "priority = 3") + "# changed by hand\n")
    world.cli("setup-target", config=config)
    assert entry.read_text() == ours
    backups = list(directory.glob(".gentoo-binhost.conf.*.bak"))
    assert len(backups) == 1 and "# changed by hand" in backups[0].read_text(), backups

    again = world.cli("setup-target", config=config)
    assert "already points to" in again.stdout + again.stderr
    assert len(list(directory.glob(".gentoo-binhost.conf.*.bak"))) == 1


def test_a_rejected_key_and_a_broken_pkgdir_are_named_by_setup_target_and_doctor(world, tmp_path):
    pkgdir = copy_pkgdir(world, Path(tempfile.mkdtemp(prefix="pb-doctor-", dir=world.base)) / "binpkgs")
    root, config = world.new_target("pb-reject", port=free_port(), pkgdir=pkgdir)
    # A package the current publication names, gone from PKGDIR.
    victim = sorted(pkgdir.rglob("greet-*.gpkg.tar"))[0]
    victim.unlink()
    # nobody (whom Portage verifies as) cannot enter the target's root, so not its keyring either.
    root.chmod(0o700)
    try:
        setup = world.cli("setup-target", config=config, check=False)
        assert setup.returncode == 1, setup.stdout + setup.stderr
        assert "does not accept the binhost's signature" in setup.stderr, setup.stderr

        result = world.cli("doctor", "--json", config=config, check=False)
    finally:
        root.chmod(0o755)
    assert result.returncode == 1
    report = doctor_report(result)
    assert report["signing key"]["status"] == "FAIL", report["signing key"]
    assert "does not accept our signatures" in report["signing key"]["detail"]
    assert report["fetch"]["status"] == "FAIL", report["fetch"]
    assert "cannot download" in report["fetch"]["detail"]
    assert report["index"]["status"] == "FAIL", report["index"]
    assert victim.name in report["index"]["detail"] or "greet" in report["index"]["detail"]
    assert report["publication"]["status"] == "FAIL", report["publication"]
    assert "names missing files" in report["publication"]["detail"]
    assert "greet" in report["publication"]["detail"]


# ------------------------------------------------------------------------------------------------
# "every change to PKGDIR (build, sign, clean) leaves an index whose TIMESTAMP and mtime (and
# Packages.gz's) are strictly newer than before"
# ------------------------------------------------------------------------------------------------

def pkgdir_config(world, pkgdir, path, root=None):
    signing = "".join(line + "\n" for line in world.config.read_text().splitlines()
                      if line.startswith(("signing-key", "gpg-home")))
    path.write_text(world.binhost_section(pkgdir=pkgdir).replace(f"root = {world.binhost}",
                                                                   f"root = {root or world.binhost}")
                    + signing)
    return path


def published(pkgdir):
    """The directory of the publication targets get now."""
    return pkgdir / ".published" / os.readlink(pkgdir / ".published/current")


def date_everything(pkgdir, stamp):
    """PKGDIR's index and the current publication's, as if written at `stamp` (a clock ahead:
    Portage's next rewrite, at the current second, would then be older)."""
    set_index_stamp(pkgdir / "Packages", stamp)
    set_index_stamp(published(pkgdir) / "Packages", stamp)


def assert_moved_forward(directory, before):
    for name in ("Packages", "Packages.gz"):
        path = directory / name
        if name == "Packages.gz" and not path.exists():
            continue
        stamp = index_stamp(path)
        assert stamp > before and stamp != before + 5, (path, stamp, before)
        assert int(path.stat().st_mtime) == stamp, (path, path.stat().st_mtime, stamp)


def test_sign_all_moves_the_index_forward(world, tmp_path):
    pkgdir = copy_pkgdir(world, Path(tempfile.mkdtemp(prefix="pb-sign-", dir=world.base)) / "binpkgs")
    config = pkgdir_config(world, pkgdir, tmp_path / "sign.conf")
    future = int(time.time()) + 600
    date_everything(pkgdir, future)
    old = published(pkgdir)
    world.cli("sign", "--all", config=config)
    assert published(pkgdir) != old
    assert_moved_forward(pkgdir, future)
    assert_moved_forward(published(pkgdir), future)


def clean_situation(world, keep=None):
    """A copy of the world's binhost root without greet installed (so clean retires its build) and
    of its PKGDIR, indexes dated ahead; returns (pkgdir, config)."""
    base = Path(tempfile.mkdtemp(prefix="pb-clean-", dir=world.base))
    root = base / "binhost"
    top_level = {str(world.binhost / "var/cache"): {"binpkgs", "distfiles"}, str(world.binhost / "var"): {"tmp"}}
    # Only those directories of the root: EROOT's path (ROOT + EPREFIX) may hold a "tmp" of its own.
    shutil.copytree(world.binhost, root, symlinks=True,
                    ignore=lambda directory, names: top_level.get(directory, set()) & set(names))
    vdb = eroot(root, world.eprefix) / "var/db/pkg/app-misc"
    greet = sorted(vdb.glob("greet-*"))
    assert greet, sorted(vdb.iterdir())
    for entry in greet:
        shutil.rmtree(entry)
    pkgdir = copy_pkgdir(world, base / "binpkgs")
    config = pkgdir_config(world, pkgdir, base / "clean.conf", root=root)
    if keep:
        config.write_text(config.read_text().replace("[binhost]\n", f"[binhost]\npublish-keep = {keep}\n"))
    return pkgdir, config


def test_clean_moves_the_index_forward(world):
    pkgdir, config = clean_situation(world)
    future = int(time.time()) + 600
    date_everything(pkgdir, future)
    old = published(pkgdir)
    before = (pkgdir / "Packages").read_text()
    world.cli("clean", config=config)
    assert published(pkgdir) != old and "greet" not in (published(pkgdir) / "Packages").read_text()
    assert_moved_forward(published(pkgdir), future)
    if (pkgdir / "Packages").read_text() != before:
        assert_moved_forward(pkgdir, future)


def test_clean_deletes_what_no_kept_publication_names(world):
    """With publish-keep = 1: the first clean keeps greet's file (the publication it replaces names
    it: a target may still be fetching it); the next clean, with that publication pruned, deletes it."""
    pkgdir, config = clean_situation(world, keep=1)
    world.cli("clean", config=config)
    assert sorted(p.name for p in (pkgdir / ".published").iterdir() if p.name.isdigit()) \
        == [os.readlink(pkgdir / ".published/current")]
    assert list(pkgdir.rglob("greet-*.gpkg.tar")), "deleted while the replaced publication named it"
    assert "greet" in (pkgdir / ".published/retired").read_text()
    world.cli("clean", config=config)
    assert not list(pkgdir.rglob("greet-*.gpkg.tar"))


# ------------------------------------------------------------------------------------------------
# keygen --force: "the old home is kept as <gpg-home>.<date>.bak"
# ------------------------------------------------------------------------------------------------

def test_keygen_force_keeps_the_old_home(world, short_dir):
    root = short_dir / "r"
    (root / "etc/portage").mkdir(parents=True)
    config = short_dir / "k.conf"
    config.write_text(f"[binhost]\nroot = {root}\n")
    world.cli("keygen", config=config)
    first = re.search(r"^signing-key = (\S+)", config.read_text(), re.MULTILINE).group(1)
    home = Path(re.search(r"^gpg-home = (\S+)", config.read_text(), re.MULTILINE).group(1))

    world.cli("keygen", "--force", config=config)
    second = re.search(r"^signing-key = (\S+)", config.read_text(), re.MULTILINE).group(1)
    assert second != first
    backups = list(home.parent.glob(home.name + ".*.bak"))
    assert len(backups) == 1, list(home.parent.iterdir())
    listed = run(["gpg", "--homedir", backups[0], "--batch", "--with-colons", "--list-secret-keys"]).stdout
    assert first in listed
    listed = run(["gpg", "--homedir", home, "--batch", "--with-colons", "--list-secret-keys"]).stdout
    assert second in listed and first not in listed


# ------------------------------------------------------------------------------------------------
# config pull / push / diff details
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def pair(world, tmp_path):
    """A fresh binhost root and target root, and a config file naming them (target t)."""
    binhost, target = tmp_path / "pb-binhost", tmp_path / "pb-target"
    write_portage_config(binhost)
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    config = tmp_path / "pb.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\n\n[target t]\nhost = {world.sshd.host}\n"
                      f"ssh-port = {world.sshd.port}\nssh-options = {world.sshd.ssh_options}\n"
                      f"root = {target}\npath = {world.portage_bin}\n")
    return binhost, target, config


def test_pull_leaves_out_backups_swap_and_cfg_files_and_keeps_the_old_world(world, pair):
    binhost, target, config = pair
    etc = target / "etc/portage"
    (etc / "make.conf.bak").write_text("a backup\n")
    (etc / ".make.conf.swp").write_text("vim swap\n")
    (etc / "._cfg0000_make.conf").write_text("etc-update\n")
    (etc / "env").mkdir()
    (etc / "env/native.conf").write_text('CFLAGS="-O2 -march=native"\n')
    (eroot(target, world.eprefix) / "var/lib/portage").mkdir(parents=True)
    (eroot(target, world.eprefix) / "var/lib/portage/world").write_text("app-misc/greet\n")
    old_world = eroot(binhost, world.eprefix) / "var/lib/portage/world"
    old_world.parent.mkdir(parents=True)
    old_world.write_text("app-misc/hello\n")

    world.cli("config", "pull", config=config)
    copied = binhost / "etc/portage"
    assert (copied / "make.conf").read_text() == (etc / "make.conf").read_text()
    for name in ("make.conf.bak", ".make.conf.swp", "._cfg0000_make.conf"):
        assert not (copied / name).exists(), name
    native = (copied / "env/native.conf").read_text()
    assert "native" not in native and "-march=" in native, native
    assert old_world.read_text() == "app-misc/greet\n"
    backups = list(old_world.parent.glob(".world.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == "app-misc/hello\n", backups


def test_push_always_shows_what_it_changes(world, pair):
    binhost, target, config = pair
    world.cli("config", "pull", config=config)
    with open(binhost / "etc/portage/make.conf", "a") as make_conf:
        make_conf.write('MAKEOPTS="-j3"\n')
    pushed = world.cli("config", "push", config=config)
    assert '+MAKEOPTS="-j3"' in pushed.stdout + pushed.stderr
    assert 'MAKEOPTS="-j3"' in (target / "etc/portage/make.conf").read_text()


def test_pull_skips_missing_repositories_leaves_taken_places_and_warns(world, pair, tmp_path):
    binhost, target, config = pair
    missing = f"/var/db/repos/pb-missing-{os.getpid()}"
    assert not os.path.exists(missing)
    taken = Path(tempfile.mkdtemp(prefix="pb-taken-", dir=world.base))
    empty = Path(tempfile.mkdtemp(prefix="pb-empty-", dir=world.base))
    try:
        with open(target / "etc/portage/repos.conf/binhost-test.conf", "a") as repos:
            repos.write(f"\n[pb-missing]\nlocation = {missing}\n\n[pb-taken]\nlocation = {taken}\n"
                        f"\n[pb-empty]\nlocation = {empty}\n")
        # The target's make.profile points into the repository the build host lacks.
        profile = target / "etc/portage/make.profile"
        profile.unlink()
        profile.symlink_to(os.path.relpath(missing + "/profiles/default", "/etc/portage"))
        # In the binhost root: a place taken by a directory with something in it, and an empty one.
        (binhost / str(taken).lstrip("/")).mkdir(parents=True)
        (binhost / str(taken).lstrip("/") / "mine").write_text("keep me\n")
        (binhost / str(empty).lstrip("/")).mkdir(parents=True)

        pull = world.cli("config", "pull", config=config)
        said = pull.stdout + pull.stderr
        assert not os.path.lexists(binhost / missing.lstrip("/")), said
        place = binhost / str(taken).lstrip("/")
        assert place.is_dir() and not place.is_symlink() and (place / "mine").read_text() == "keep me\n"
        link = binhost / str(empty).lstrip("/")
        assert link.is_symlink() and os.readlink(link) == str(empty), said
        assert "does not resolve" in said and "make.profile" in said, said
    finally:
        shutil.rmtree(taken, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)


def test_config_diff_all_goes_on_past_a_difference_with_a_summary(world, pair, tmp_path):
    """`--all` (config diff): every target in turn, going on past a failing one, then a summary
    table; exit code 1 if any failed. A target whose configuration differs counts as failed."""
    binhost, target, config = pair
    second = tmp_path / "pb-target2"
    write_portage_config(second)
    text = config.read_text()
    config.write_text(text + "\n" + text.split("\n\n", 1)[1].replace("[target t]", "[target t2]")
                      .replace(f"root = {target}", f"root = {second}"))
    world.cli("--target", "t2", "config", "pull", config=config)
    result = world.cli("config", "diff", "--all", config=config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert '+USE="loud"' in result.stdout  # t's difference, shown
    table = result.stdout[result.stdout.rindex("target "):]
    rows = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
    assert "FAILED" in rows["t"] and "differs" in rows["t"], table
    assert "FAILED" not in rows["t2"] and "ok" in rows["t2"].lower(), table


# ------------------------------------------------------------------------------------------------
# Lower harm, one each: serve is read-only (405), -q silences the access log, serve --help shows
# the configured bind and port, --print-nginx's TLS and auth lines, list --json on an empty binhost
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_pkgdir(tmp_path):
    pkgdir = tmp_path / "pkgdir"
    pkgdir.mkdir()
    (pkgdir / "Packages").write_text("VERSION: 0\nTIMESTAMP: 1\n\n")
    return pkgdir


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_serve_is_read_only(gb, small_pkgdir, method):
    import http.client
    import threading
    server = gb.make_server("127.0.0.1", 0, str(small_pkgdir), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        connection.request(method, "/Packages", body=b"x" if method != "DELETE" else None)
        answer = connection.getresponse()
        assert answer.status == 405
        assert answer.getheader("Allow") == "GET, HEAD"
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert (small_pkgdir / "Packages").read_text() == "VERSION: 0\nTIMESTAMP: 1\n\n"


def access_log_of_serve(config, port, *options):
    import subprocess
    import sys
    import urllib.request
    from conftest import SCRIPT, stop_process, wait_for_port
    server = subprocess.Popen([sys.executable, str(SCRIPT), "--color=n", *options, "-c", str(config), "serve"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port(port, proc=server), server.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/Packages", timeout=10) as answer:
            assert answer.status == 200
    finally:
        stop_process(server)
    return server.stdout.read()


def test_quiet_serve_writes_no_access_log(tmp_path, small_pkgdir):
    port = free_port()
    config = tmp_path / "s.conf"
    config.write_text(f"[binhost]\npkgdir = {small_pkgdir}\nbind = 127.0.0.1\nport = {port}\n")
    assert re.search(r'"GET /Packages HTTP/1\.1" 200', access_log_of_serve(config, port))
    port = free_port()
    config.write_text(f"[binhost]\npkgdir = {small_pkgdir}\nbind = 127.0.0.1\nport = {port}\n")
    assert "GET /Packages" not in access_log_of_serve(config, port, "-q")


def test_serve_help_shows_the_configured_bind_and_port(world, tmp_path):
    config = tmp_path / "s.conf"
    config.write_text(f"[binhost]\nroot = {tmp_path}\nbind = 127.0.0.42\nport = 18423\n")
    shown = world.cli("serve", "--help", config=config).stdout
    assert "127.0.0.42" in shown and "18423" in shown, shown


def test_print_nginx_has_tls_and_auth_lines_only_when_configured(world, tmp_path, small_pkgdir):
    config = tmp_path / "n.conf"
    plain = f"[binhost]\npkgdir = {small_pkgdir}\nbind = 127.0.0.1\nport = 18080\n"
    config.write_text(plain)
    block = world.cli("serve", "--print-nginx", config=config).stdout
    assert "ssl_certificate" not in block and "auth_basic" not in block
    auth = tmp_path / "auth"
    auth.write_text("user:secret\n")
    auth.chmod(0o600)
    config.write_text(plain + f"tls-cert = {tmp_path}/c.pem\ntls-key = {tmp_path}/k.pem\nauth-file = {auth}\n")
    block = world.cli("serve", "--print-nginx", config=config).stdout
    assert f"ssl_certificate {tmp_path}/c.pem;" in block
    assert f"ssl_certificate_key {tmp_path}/k.pem;" in block
    assert re.search(r"listen [^;]*ssl", block), block
    assert "auth_basic " in block and "auth_basic_user_file" in block
    assert "secret" not in block  # nginx needs its own hashed htpasswd file


def test_list_json_of_an_empty_binhost_is_an_empty_list(world, tmp_path):
    root = tmp_path / "empty"
    (root / "etc/portage").mkdir(parents=True)
    config = tmp_path / "l.conf"
    config.write_text(f"[binhost]\nroot = {root}\n")
    result = world.cli("list", "--json", config=config)
    assert json.loads(result.stdout) == []


# ------------------------------------------------------------------------------------------------
# Third share: the key rotation recipe and sign --all after a real rotation; doctor --all's
# fingerprint groups; the build as the terminal's foreground job; init --like-target through the
# real ssh round trip; lower-harm one-liners (--pretend/-v/-q, clean --pretend's space, keygen's
# files and passphrase, a second environment noticed by doctor, emerge missing on the target, a
# chatty shell start-up file).
# ------------------------------------------------------------------------------------------------

def config_value(config, key):
    match = re.search(rf"^{key} = (\S+)", Path(config).read_text(), re.MULTILINE)
    assert match, Path(config).read_text()
    return match.group(1)


def signers(package):
    """The issuer fingerprints of every signature inside a GPKG (gpg --list-packets of each .sig)."""
    import tarfile
    found = []
    with tarfile.open(package) as archive:
        for member in archive.getmembers():
            if member.name.endswith(".sig"):
                packets = run(["gpg", "--batch", "--list-packets"],
                              input=archive.extractfile(member).read().decode("latin-1"),
                              check=False).stdout
                found += re.findall(r"issuer fpr v4 ([0-9A-F]{40})", packets)
    return found


@pytest.fixture
def serving_pkgdir(gb):
    """serve(pkgdir, port): our HTTP server on PKGDIR's publication, in this process, until the end."""
    import threading
    servers = []

    def serve(pkgdir, port=0):
        server = gb.make_server("127.0.0.1", port, str(pkgdir), gb.Output(color=False, verbosity=0))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_key_rotation_recipe_then_sign_all_resigns_every_package(world, short_dir, serving_pkgdir):
    """Trust model: "To rotate the key: keygen --force, setup-target on every target, then sign --all
    to re-sign existing packages; remove the old key from a target with gpg --homedir
    /etc/portage/gnupg --delete-keys OLDFPR". On copies: the world's PKGDIR and GnuPG home."""
    old_key = config_value(world.config, "signing-key")
    world_home = Path(config_value(world.config, "gpg-home"))
    home = short_dir / "g"
    shutil.copytree(world_home, home, symlinks=True, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    pkgdir = copy_pkgdir(world, short_dir / "binpkgs")
    packages = sorted(p for p in pkgdir.rglob("*.gpkg.tar") if ".published" not in p.parts)
    assert packages and all(set(signers(p)) == {old_key} for p in packages)
    signing = short_dir / "signing.conf"
    signing.write_text(f"signing-key = {old_key}\ngpg-home = {home}\n")
    port = serving_pkgdir(pkgdir, free_port())
    root, config = world.new_target("pb-rotate", port=port, pkgdir=pkgdir, signing_config=signing)
    world.cli("setup-target", config=config)

    world.cli("keygen", "--force", config=config)
    new_key = config_value(config, "signing-key")
    assert new_key != old_key and config_value(config, "gpg-home") == str(home)
    kept = list(short_dir.glob("g.*.bak"))
    assert len(kept) == 1 and old_key in run(["gpg", "--homedir", kept[0], "--batch", "--with-colons",
                                               "--list-secret-keys"]).stdout

    resigned = world.cli("sign", "--all", config=config)
    assert f"Signed {len(packages)} package(s)" in resigned.stdout, resigned.stdout
    for package in packages:
        assert set(signers(package)) == {new_key}, (package, signers(package))

    world.cli("setup-target", config=config)
    target_home = root / "etc/portage/gnupg"
    run(["gpg", "--homedir", target_home, "--batch", "--yes", "--delete-keys", old_key])
    listed = run(["gpg", "--homedir", target_home, "--batch", "--with-colons", "--list-keys"]).stdout
    assert new_key in listed and old_key not in listed
    installed = world.cli("install", "app-misc/hello", config=config, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"
    for gnupg in [home, target_home] + kept:
        run(["gpgconf", "--homedir", gnupg, "--kill", "all"], check=False)


def test_doctor_all_groups_by_fingerprint_and_notices_a_moved_url(world, tmp_path):
    """--all: "doctor --all also says which targets have the same configuration fingerprint and so
    could share one binhost environment"; and "Adding a second environment moves the first one's URL
    from / to /<name>/: run setup-target on its targets again (doctor notices)". Two targets with
    byte-identical /etc/portage; the second gets an environment of its own after the first's
    setup-target."""
    shared = tmp_path / "var-shared"
    roots = {}
    for name in ("pb-twin1", "pb-twin2"):
        roots[name] = tmp_path / name
        write_portage_config(roots[name], var_root=shared, extra_make_conf='USE="loud"\n')

    def section(name, extra=""):
        return (f"\n[target {name}]\nhost = {world.sshd.host}\nssh-port = {world.sshd.port}\n"
                f"ssh-options = {world.sshd.ssh_options}\nroot = {roots[name]}\npath = {world.portage_bin}\n"
                + extra)
    config = tmp_path / "all.conf"
    config.write_text(world.config.read_text() + section("pb-twin1"))
    world.cli("setup-target", config=config)
    entry = (roots["pb-twin1"] / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert f"sync-uri = http://127.0.0.1:{world.port}/\n" in entry, entry

    second = tmp_path / "binhost-b"
    write_portage_config(second, extra_make_conf='USE="loud"\n')
    config.write_text(config.read_text() + section("pb-twin2", f"binhost-root = {second}\n"))
    result = world.cli("--all", "doctor", config=config, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    shared_line = [line for line in said.splitlines() if "have the same configuration" in line]
    assert len(shared_line) == 1 and "pb-twin1, pb-twin2" in shared_line[0], said
    assert re.search(r"\(fingerprint [0-9a-f]{16}\): they can share one binhost environment", shared_line[0])
    table = result.stdout[result.stdout.rindex("target "):]
    assert "pb-twin1" in table and "pb-twin2" in table, table
    moved = [line for line in said.splitlines() if line.startswith("FAIL binrepos") and "pb-twin1" in line]
    assert moved and f"http://127.0.0.1:{world.port}/binhost/" in moved[0], said
    assert "setup-target" in moved[0]


def process_stat(pid):
    """(state, ppid, pgrp, session, tty_nr, tpgid) of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5])


def group_commands(pgid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _, group = process_stat(entry.name)[:3]
                if group == pgid and state != "Z":  # zombies a container's init never reaps
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError):
                continue
    return found


def wait_until_reading_terminal(pgid, seconds=20):
    """Until a process of the group sleeps in the terminal's read. Python checks for signals
    before it calls read(): a Ctrl-C typed between emerge's prompt and that call is caught
    but interrupts nothing, and emerge then waits for a line (a person is never that quick;
    a test under load is)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if process_stat(entry.name)[2] == pgid and \
                            (entry / "wchan").read_text() in ("wait_woken", "n_tty_read"):
                        return
        time.sleep(0.05)


@pytest.mark.parametrize("answer, said_by_emerge", [(b"No\r", "Quitting."), (b"\x03", "Interrupted.")],
                         ids=["No", "Ctrl-C"])
def test_on_a_terminal_the_build_is_the_foreground_job_and_emerge_ask_asks(portage_bin, tmp_path, answer,
                                                                           said_by_emerge):
    """Signals: "On a terminal the build is the foreground job: Ctrl-C reaches all of it, and
    `emerge --ask` can still ask." The tool runs on a pseudo-terminal of its own; the answer is
    typed there. (emerge itself exits 128 + SIGINT after a No, so the tool's 130 is no failure.)"""
    import pty
    import select
    import signal
    import sys
    from conftest import SCRIPT
    root = tmp_path / "binhost"
    write_portage_config(root)
    config = tmp_path / "ask.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    env = dict(os.environ, PATH=f"{portage_bin}:{os.environ['PATH']}", NO_COLOR="1", TERM="dumb")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the session leader on the new terminal
        try:
            os.execve(sys.executable, [sys.executable, str(SCRIPT), "-c", str(config), "--color=n", "build",
                                       "--ask", "app-misc/hello"], env)
        finally:
            os._exit(127)
    seen, status, build_group = b"", None, None

    def read_until(predicate, seconds):
        nonlocal seen, status
        deadline = time.monotonic() + seconds
        while not predicate() and time.monotonic() < deadline:
            if status is None:
                waited, code = os.waitpid(pid, os.WNOHANG)
                if waited:
                    status = code
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # EIO: every process on the terminal is gone
                    chunk = b""
                seen += chunk
                if not chunk and status is not None:
                    return
    try:
        read_until(lambda: b"[Yes/No]" in seen, 120)
        assert b"[Yes/No]" in seen, seen.decode(errors="replace")
        _, _, tool_group, _, _, build_group = process_stat(pid)
        assert build_group != tool_group, "the tool, not the build, is the terminal's foreground job"
        assert any("emerge" in command for command in group_commands(build_group)), group_commands(build_group)
        wait_until_reading_terminal(build_group)
        os.write(terminal, answer)
        read_until(lambda: status is not None, 60)
    finally:
        if status is None:
            for group in (build_group, pid):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.killpg(group, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(terminal)
    said = seen.decode(errors="replace")
    assert status is not None, "the tool did not end within 60 s of the answer:\n" + said
    assert said_by_emerge in said, said
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, said)
    assert not group_commands(build_group), "the build outlived the tool"
    assert not list((root / "var/cache/binpkgs").rglob("*.gpkg.tar")), said


def signed_stage3_mirror(tmp_path, serving_pkgdir, arch, variant, build="20261120T170000Z", file_arches=None):
    """A local mirror offering one stage3 (arch, variant) as Gentoo's does (offer_stage3), and the
    arch's latest-stage3.txt; with file_arches (an arch whose stage3s carry subarch names), one of
    each. Returns (url, keyring, path of the first)."""
    from test_init import gpg_home, offer_stage3, tiny_stage3
    need(shutil.which("gpg") and shutil.which("xz"), "gpg and xz are needed")
    release = gpg_home(tmp_path / "release-gnupg", "release")
    keyring = tmp_path / "gentoo-release.asc"
    keyring.write_text(run(["gpg", "--homedir", release, "--armor", "--export"]).stdout)
    autobuilds = tmp_path / f"www/releases/{arch}/autobuilds"
    (autobuilds / build).mkdir(parents=True)
    paths = []
    for file_arch in file_arches or [arch]:
        tarball = autobuilds / build / f"stage3-{file_arch}-{variant}-{build}.tar.xz"
        tarball.write_bytes(tiny_stage3())
        offer_stage3(release, autobuilds, build, f"latest-stage3-{file_arch}-{variant}.txt", tarball)
        paths.append(f"{build}/{tarball.name}")
    (autobuilds / "latest-stage3.txt").write_text("# ts=1795194000\n" + "".join(f"{path} 1\n" for path in paths))
    return f"http://127.0.0.1:{serving_pkgdir(tmp_path / 'www')}", keyring, paths[0]


def test_init_like_target_asks_the_target_over_ssh_and_picks_the_variant(world, tmp_path, serving_pkgdir):
    """init: "--like-target asks the target (one ssh round trip) for its machine, CHOST, init system
    and profile and picks the matching variant, saying why (... a no-multilib profile is
    nomultilib-openrc, systemd is systemd, ...)". The target is the session's sshd; its ROOT's
    make.profile (a no-multilib systemd profile) and this machine's uname are what it answers. The
    local mirror offers only that variant, so its signed latest list decides what would be taken."""
    variant = "nomultilib-systemd"
    mirror, keyring, path = signed_stage3_mirror(tmp_path, serving_pkgdir, "amd64", variant)

    target = tmp_path / "target"
    (target / "etc/portage").mkdir(parents=True)
    (target / "etc/portage/make.profile").symlink_to(
        "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0/no-multilib/systemd")
    root = tmp_path / "new-binhost"
    config = tmp_path / "like.conf"
    config.write_text(f"[binhost]\nroot = {root}\n\n[target far]\nhost = {world.sshd.host}\n"
                      f"ssh-port = {world.sshd.port}\nssh-options = {world.sshd.ssh_options}\n"
                      f"root = {target}\npath = {world.portage_bin}\n")
    logins = world.sshd.log_text().count("Accepted publickey")
    result = world.cli("-p", "init", "--like-target", "--mirror", mirror, "--keyring", keyring, config=config,
                       check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    machine = os.uname().machine
    assert machine == "x86_64" or pytest.skip(f"the variant names are amd64's; this machine is {machine}")
    chosen = next((line for line in said.splitlines() if "far: stage3-" in line), said)
    assert f"far: stage3-amd64-{variant}, because x86_64 is amd64" in chosen, chosen
    assert "the profile is no-multilib" in chosen and "systemd" in chosen, chosen
    assert f"Would download {mirror}/releases/amd64/autobuilds/{path}" in said, said
    assert world.sshd.log_text().count("Accepted publickey") == logins + 1, "one ssh round trip"
    assert not root.exists()


def init_like_a_target_of_profile(world, tmp_path, mirror, keyring, profile_path, make_defaults):
    """`init --pretend --like-target` for target pi, whose make.profile is tmp_path/profile_path with
    make_defaults (ARCH, CHOST): what it says."""
    target = tmp_path / "target"
    profile = tmp_path / profile_path
    profile.mkdir(parents=True)
    (profile / "eapi").write_text("5\n")
    (profile / "make.defaults").write_text(make_defaults)
    (target / "etc/portage").mkdir(parents=True)
    (target / "etc/portage/make.profile").symlink_to(profile)
    config = tmp_path / "arm.conf"
    config.write_text(f"[binhost]\nroot = {tmp_path / 'new-binhost'}\n\n[target pi]\nhost = {world.sshd.host}\n"
                      f"ssh-port = {world.sshd.port}\nssh-options = {world.sshd.ssh_options}\n"
                      f"root = {target}\npath = {world.portage_bin}\n")
    result = world.cli("-p", "init", "--like-target", "--mirror", mirror, "--keyring", keyring, config=config,
                       check=False)
    return result.stdout + result.stderr


def test_init_like_target_takes_the_arch_portage_says_over_uname(world, tmp_path, serving_pkgdir):
    """init --like-target: the arch is the target's userland's, as its Portage says (ARCH), not what
    uname -m says (a 64-bit kernel may run another userland). Here the target's profile says arm64
    on this x86_64 machine: the arm64 list of the local mirror is the one taken."""
    mirror, keyring, path = signed_stage3_mirror(tmp_path, serving_pkgdir, "arm64", "systemd")
    # A systemd profile: init decided.
    said = init_like_a_target_of_profile(world, tmp_path, mirror, keyring, "profiles/default/linux/arm64/23.0/systemd",
                                         'ARCH="arm64"\nCHOST="aarch64-unknown-linux-gnu"\n')
    machine = os.uname().machine
    assert machine == "x86_64" or pytest.skip(f"the premise is a kernel that is not arm64's; this one is {machine}")
    chosen = next((line for line in said.splitlines() if "pi: stage3-" in line), said)
    assert "pi: stage3-arm64-systemd, because Portage's ARCH is arm64 (uname -m says x86_64: the kernel's)" \
        in chosen, said
    assert f"Would download {mirror}/releases/arm64/autobuilds/{path}" in said, said


def test_init_like_target_takes_a_32_bit_arm_userlands_subarch_from_its_chost(world, tmp_path, serving_pkgdir):
    """init --like-target: Gentoo names arm's stage3s by subarch. A 32-bit userland's CHOST decides
    which (armv7a-...-gnueabihf: armv7a_hardfp), not the kernel's machine (aarch64 under a 64-bit
    kernel; this machine's here), of the ones the arm directory's latest-stage3.txt lists."""
    mirror, keyring, path = signed_stage3_mirror(tmp_path, serving_pkgdir, "arm", "systemd",
                                                 file_arches=["armv7a_hardfp", "armv6j_hardfp"])
    said = init_like_a_target_of_profile(world, tmp_path, mirror, keyring,
                                         "profiles/default/linux/arm/23.0/armv7a_hf/systemd",
                                         'ARCH="arm"\nCHOST="armv7a-unknown-linux-gnueabihf"\n')
    assert "pi: stage3-arm-systemd, because Portage's ARCH is arm" in said, said
    assert f"Would download {mirror}/releases/arm/autobuilds/{path}" in said, said
    assert "armv7a_hardfp" in path


@pytest.fixture
def options_target(world):
    """A target of its own (for each test) whose config names an auth file, with a binrepos entry
    of someone else's."""
    auth = world.base / "pb-auth"
    auth.write_text("portage:pbs3cret\n")
    auth.chmod(0o600)
    name = os.path.basename(tempfile.mkdtemp(prefix="pb-options-", dir=world.base))
    shutil.rmtree(world.base / name)
    root, config = world.new_target(name, extra_binhost=f"auth-file = {auth}\n")
    entry = root / "etc/portage/binrepos.conf/gentoo-binhost.conf"
    entry.parent.mkdir(parents=True)
    entry.write_text("[gentoo-binhost]\nsync-uri = http://old.invalid/pb/\n")
    return root, config, entry


def test_pretend_runs_read_only_queries_masks_the_password_and_quiet_and_verbose_work(world, options_target):
    """Global options: -p "print every command that would change something ... and run none.
    Read-only queries (the target's current binrepos.conf, ...) still run ... setup-target shows
    the auth file's password as ********"; -v "also show every command as it runs, read-only ones
    included"; -q "only warnings and errors"."""
    root, config, entry = options_target
    pretend = world.cli("-p", "setup-target", config=config)
    said = pretend.stdout + pretend.stderr
    # The diff is against what the target has: the read-only query ran; nothing was written.
    assert "-sync-uri = http://old.invalid/pb/" in said, said
    assert re.search(r"^\+sync-uri = http://portage:\*{8}@127\.0\.0\.1:\d+/$", said, re.MULTILINE), said
    assert "pbs3cret" not in said
    assert entry.read_text() == "[gentoo-binhost]\nsync-uri = http://old.invalid/pb/\n"
    assert not (root / "etc/portage/gnupg").exists()
    assert "Running:" not in said
    verbose = world.cli("-p", "-v", "setup-target", config=config)
    verbose = verbose.stdout + verbose.stderr
    assert re.search(r"Running: ssh .*binrepos\.conf", verbose, re.DOTALL), verbose
    assert "pbs3cret" not in verbose

    config.write_text(re.sub(r"^auth-file = .*\n", "", config.read_text(), flags=re.MULTILINE))
    assert ">>> Writing" in pretend.stdout  # what a plain run says as it writes
    quiet = world.cli("-q", "setup-target", config=config)
    assert quiet.stdout.strip() == "" and ">>>" not in quiet.stderr, quiet.stdout + quiet.stderr
    assert "sync-uri = http://127.0.0.1:" in entry.read_text()


def test_pretend_shows_the_scripts_run_on_the_target_by_name(world, options_target):
    """Global options: "Our own sh scripts are shown by name (sh -c "$INSTALL_CONFIG_SCRIPT" ...;
    with -v in full)": also those setup-target runs on the target over ssh."""
    _, config, _ = options_target
    body = 'if [ -f "$dir/$name" ]; then cp -p "$dir/$name"'  # a line of WRITE_FILE_SCRIPT
    full = world.cli("-p", "-v", "setup-target", config=config).stdout
    assert body in full, full
    shown = world.cli("-p", "setup-target", config=config).stdout
    assert "$WRITE_FILE_SCRIPT" in shown and "$TRUST_KEY_SCRIPT" in shown, shown
    assert body not in shown, shown


def test_clean_pretend_lists_what_would_go_why_and_the_space_it_frees(world, gb):
    """clean: "--pretend lists what would go, and why, and how much space it frees"."""
    pkgdir, config = clean_situation(world)
    doomed = sorted(p for p in pkgdir.rglob("greet-*.gpkg.tar") if ".published" not in p.parts)
    assert doomed
    current = os.readlink(pkgdir / ".published/current")
    result = world.cli("clean", "--pretend", config=config)
    said = result.stdout + result.stderr
    for package in doomed:
        path = package.relative_to(pkgdir).as_posix()
        assert f"{path}  (no longer installed in the binhost root)" in said, said
        assert package.exists()
    freed = gb.human_size(sum(p.stat().st_size for p in doomed))
    assert f"Would free {freed} ({len(doomed)} package(s))" in said, said
    assert "hello" not in said.replace(str(pkgdir), ""), said
    assert os.readlink(pkgdir / ".published/current") == current


def test_keygen_records_the_key_keeps_the_old_file_and_sets_a_passphrase_only_when_asked(world, short_dir):
    """keygen: "Creates an ed25519 signing key in a binhost-only GnuPG home (gpg-home, default gnupg
    in a gentoo-binhost directory beside the configuration file ...; mode 0700, outside every binhost
    root) ... records signing-key and gpg-home in the configuration file (the previous file is kept
    as FILE.<date>.bak). The key has no passphrase so builds run unattended; --passphrase-file FILE
    sets one"."""
    def signs(home, fingerprint, passphrase, what):
        gpg = ["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback"]
        run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=False)  # nothing cached
        return run(gpg + ["--passphrase", passphrase, "--local-user", fingerprint, "--output", "-",
                          "--detach-sign", what], check=False).returncode == 0

    for name, options, passphrase in (("plain", [], ""), ("secret", ["--passphrase-file"], "pb pass phrase")):
        root = short_dir / name
        (root / "etc/portage").mkdir(parents=True)
        (short_dir / f"{name}-etc").mkdir()
        config = short_dir / f"{name}-etc" / "binhost.conf"
        before = f"[binhost]\nroot = {root}\n# a comment of the user's\n"
        config.write_text(before)
        if options:
            (short_dir / "pass").write_text(passphrase + "\n")
            options = options + [short_dir / "pass"]
        world.cli("keygen", *options, config=config)
        fingerprint = config_value(config, "signing-key")
        home = Path(config_value(config, "gpg-home"))
        assert home == config.parent / "binhost/gnupg" and (home.stat().st_mode & 0o777) == 0o700
        assert "# a comment of the user's" in config.read_text()
        backups = list(config.parent.glob("binhost.conf.*.bak"))
        assert len(backups) == 1 and backups[0].read_text() == before, backups
        if not options:
            assert signs(home, fingerprint, "", config), "the key needs a passphrase"
        else:
            assert not signs(home, fingerprint, "", config), "--passphrase-file set no passphrase"
            assert signs(home, fingerprint, passphrase, config)
        run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)


def test_emerge_missing_on_the_target_says_to_set_path(world):
    """Troubleshooting: "`emerge not found on target`: a non-interactive ssh session has a minimal
    PATH. Set `path =` in the target's section". The session's sshd logs in with root's own PATH,
    which lacks the venv's Portage: the target section without its path line."""
    root, config = world.new_target("pb-nopath")
    config.write_text(re.sub(r"^path = .*\n", "", config.read_text(), flags=re.MULTILINE))
    result = world.cli("install", "app-misc/hello", config=config, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    errors = [line for line in said.splitlines() if line.startswith("!!!")]
    assert len(errors) == 1 and re.search(r"(emerge|portageq) not found on target pb-nopath", errors[0]), said
    assert "set path = in [target pb-nopath]" in errors[0] and str(config) in errors[0], said
    assert not world.installed(root, "usr/bin/hello").exists()


def test_a_chatty_shell_start_up_is_named_when_the_configuration_stream_is_no_tar(world, tmp_path):
    """Troubleshooting: "`the configuration stream is not a tar` (config pull/diff, doctor):
    something on the target prints to stdout for non-interactive ssh sessions (an echo in
    .bashrc)". An sshd of its own prints a line before every command, as such a .bashrc does."""
    from conftest import start_sshd
    need(Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen"), "sshd/ssh-keygen missing")
    chatty = 'ForceCommand echo "Welcome back"; eval "$SSH_ORIGINAL_COMMAND"\n'
    with start_sshd(tmp_path / "sshd", extra_config=chatty) as server:
        root, config = world.new_target("pb-chatty", sshd=server)
        result = world.cli("config", "diff", config=config, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    errors = [line for line in said.splitlines() if line.startswith("!!!")]
    assert len(errors) == 1 and "the configuration stream is not a tar" in errors[0], said
    assert ".bashrc" in errors[0], said


def test_build_features_add_to_make_conf_and_to_an_exported_one(portage_bin, tmp_path):
    """build: "FEATURES adds to make.conf's and to one you exported". The environment --pretend
    shows for the build is given to Portage's own portageq: every one of the three sources counts."""
    import sys
    from conftest import SCRIPT
    root = tmp_path / "binhost"
    write_portage_config(root, extra_make_conf='FEATURES="${FEATURES} nostrip"\n')
    config = tmp_path / "f.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    path = f"{portage_bin}:{os.environ['PATH']}"
    shown = run([sys.executable, SCRIPT, "-c", config, "--color=n", "-p", "build", "app-misc/hello"],
                env={"PATH": path, "FEATURES": "noclean"}).stdout
    line = next(line for line in shown.splitlines() if "--root-deps" in line and "FEATURES=" in line)
    words = shlex.split(line)
    env = dict(word.split("=", 1) for word in words[:next(i for i, w in enumerate(words) if "=" not in w)])
    assert env["FEATURES"].split()[0] == "noclean", env["FEATURES"]
    features = run([portage_bin / "portageq", "envvar", "FEATURES"], inherit_env=False,
                   env=dict(env, PATH=path, PORTAGE_USERNAME="root", PORTAGE_GRPNAME="root")).stdout.split()
    for feature in ("nostrip", "noclean", "buildpkg", "binpkg-multi-instance"):
        assert feature in features, (feature, features)
    assert "getbinpkg" not in features
