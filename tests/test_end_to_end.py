"""The whole loop through real components: real emerge builds and signs GPKGs into a binhost root,
our `serve` serves PKGDIR, `setup-target` configures a target ROOT reached through a real sshd, and
the target's real `emerge --getbinpkgonly` verifies and installs them. No fakes."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import (SCRIPT, binhost_serving, eroot, free_port, install_from, is_signed, need, run, start_sshd,
                      stop_process, wait_for_port, write_portage_config)


def test_signed_install_end_to_end(world):
    root, config = world.new_target("laptop")
    setup = world.cli("setup-target", config=config)
    assert "accepts packages signed by" in setup.stdout
    entry = (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert f"sync-uri = http://127.0.0.1:{world.port}/\n" in entry
    assert "verify-signature = true\n" in entry
    gnupg = root / "etc/portage/gnupg"
    assert gnupg.stat().st_mode & 0o755 == 0o755
    assert not [p.name for p in gnupg.iterdir() if p.name.startswith("S.")], "agent sockets left"

    again = world.cli("setup-target", config=config)
    assert "already points to" in again.stdout
    assert not list((root / "etc/portage/binrepos.conf").glob(".*.bak"))

    world.cli("install", ">=app-misc/hello-app-1.0", config=config)
    assert run([world.installed(root, "usr/bin/hello-app")]).stdout == "hello-app from binhost\n"
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"
    # Installed from the binary package, not built on the target.
    assert world.installed(root, "var/db/pkg/app-misc/hello-app-1.0/BINPKGMD5").is_file()
    assert "app-misc/hello-app" in world.installed(root, "var/lib/portage/world").read_text()


def test_emerge_builds_signed_and_installs(world):
    root, config = world.new_target("desktop")
    world.cli("setup-target", config=config)
    result = world.cli("emerge", "--oneshot", "app-misc/greet", config=config)
    # The target's plan is covered by what the binhost built already: nothing is rebuilt.
    assert "would merge 1 package(s): 1 with a binary here, 0 to build" in result.stdout
    assert "Building in" not in result.stdout
    assert world.installed(root, "usr/share/greet/use.txt").read_text() == "loud\n"
    assert all(is_signed(package) for package in world.pkgdir.rglob("greet-*.gpkg.tar"))


def test_use_mismatch_is_refused_not_silently_installed(world):
    root, config = world.new_target("quiet", use="-loud")
    world.cli("setup-target", config=config)
    result = world.cli("install", "app-misc/greet", config=config, check=False)
    assert result.returncode == 1
    assert "!!! emerge failed on target quiet" in result.stderr
    assert not world.installed(root, "usr/share/greet/use.txt").exists()


def test_a_server_gone_during_the_install_is_named_as_the_cause(world):
    """README (install): when the target's emerge fails and the target cannot download our
    Packages, the error says so. serve answers the plan's question, then stops before the
    target's real emerge --getbinpkgonly fetches anything."""
    port = free_port()
    root, config = world.new_target("gone", port=port, pkgdir=world.pkgdir)
    with binhost_serving(config, port) as server:
        world.cli("setup-target", config=config)
        install = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(config), "install", "app-misc/hello"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}",
                                            NO_COLOR="1"))
        try:
            shown = []
            for line in install.stdout:  # Portage starts for seconds before its first download
                shown.append(line)
                if "Installing on gone" in line:
                    stop_process(server)
                    break
            stdout, stderr = install.communicate(timeout=600)
        finally:
            stop_process(install)
    assert "Installing on gone" in "".join(shown), "".join(shown) + stdout + stderr
    assert install.returncode == 1, stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("!!! ")]
    assert errors[-1].startswith(f"!!! emerge failed on target gone: gone cannot download"
                                 f" http://127.0.0.1:{port}/Packages (wget exit 4): a network failure"), stderr
    assert not world.installed(root, "usr/bin/hello").exists()


def test_tampered_package_is_refused(gb, world):
    pkgdir = world.base / "tampered-pkgdir"
    shutil.copytree(world.pkgdir, pkgdir)
    package = next(pkgdir.rglob("hello-1.1-*.gpkg.tar"))
    with tarfile.open(package) as archive:
        image = next(member for member in archive.getmembers() if "/image.tar" in member.name
                     and not member.name.endswith(".sig"))
    with open(package, "r+b") as handle:
        handle.seek(image.offset_data + image.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    root, result, _ = install_from(gb, world, pkgdir, "tampered")
    assert result.returncode == 1, result.stdout
    assert not world.installed(root, "usr/bin/hello").exists()


def test_package_signed_by_another_key_is_refused(gb, world):
    pkgdir = world.base / "other-key-pkgdir"
    shutil.copytree(world.pkgdir, pkgdir)
    other = world.base / "other.conf"
    other.write_text(world.binhost_section(pkgdir=pkgdir, gpg_home=world.base / "other-gnupg"))
    world.cli("keygen", config=other)
    world.cli("sign", "--all", config=other)
    # The target trusts the binhost's real key only.
    root, result, _ = install_from(gb, world, pkgdir, "other-key")
    assert result.returncode == 1
    assert not world.installed(root, "usr/bin/hello").exists()


def test_keygen_twice_keeps_the_first_key(world):
    config = world.base / "keygen.conf"
    config.write_text(world.binhost_section(gpg_home=world.base / "keygen-gnupg"))
    world.cli("keygen", config=config)
    first = config.read_text()
    fingerprint = next(line for line in first.splitlines() if line.startswith("signing-key"))
    again = world.cli("keygen", config=config, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert config.read_text() == first
    exported = world.cli("keygen", "--export", config=config).stdout
    assert "BEGIN PGP PUBLIC KEY BLOCK" in exported
    listing = run(["gpg", "--homedir", world.base / "keygen-gnupg", "--with-colons", "--list-secret-keys"])
    assert fingerprint.split("=")[1].strip() in listing.stdout


def test_setup_target_pretend_changes_nothing(world):
    root, config = world.new_target("pretend")
    result = world.cli("-p", "setup-target", config=config)
    assert "+sync-uri = http://127.0.0.1:" in result.stdout
    assert any(line.startswith("ssh ") for line in result.stdout.splitlines())
    assert not (root / "etc/portage/binrepos.conf").exists()
    assert not (root / "etc/portage/gnupg").exists()


def test_setup_target_leaves_a_binrepos_file_alone(world):
    root, config = world.new_target("plainfile")
    binrepos = root / "etc/portage/binrepos.conf"
    binrepos.write_text("[mine]\nsync-uri = http://example.invalid/\n")
    result = world.cli("setup-target", config=config, check=False)
    assert result.returncode == 1
    assert "binrepos.conf is a file, not a directory" in result.stderr
    assert binrepos.read_text() == "[mine]\nsync-uri = http://example.invalid/\n"


def test_unsigned_opt_out_is_loud(world):
    root, config = world.new_target("unsigned")
    result = world.cli("setup-target", "--no-verify-signature", config=config)
    assert "verify-signature = false" in result.stderr
    entry = (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert "verify-signature = false\n" in entry


def test_getuto_keyring_gets_the_key_lsigned(world):
    """A Gentoo target whose /etc/portage/gnupg is managed by getuto: an ultimately trusted local
    key whose passphrase is in `pass`. Our key is lsigned with it, not given ultimate trust."""
    root, config = world.new_target("getuto")
    home = root / "etc/portage/gnupg"
    home.mkdir(mode=0o700)
    (home / "pass").write_text("local-secret\n")
    gpg = ["gpg", "--homedir", home, "--batch", "--no-tty"]
    run(gpg + ["--pinentry-mode", "loopback", "--passphrase-file", home / "pass",
               "--quick-generate-key", "Portage local key", "ed25519", "cert,sign", "never"])
    local = run(gpg + ["--with-colons", "--list-secret-keys"]).stdout
    local_fpr = next(line.split(":")[9] for line in local.splitlines() if line.startswith("fpr"))
    run(gpg + ["--import-ownertrust"], input=f"{local_fpr}:6:\n")

    setup = world.cli("setup-target", config=config)
    assert "lsigned with getuto's local key" in setup.stdout
    assert "accepts packages signed by" in setup.stdout
    trust = run(gpg + ["--export-ownertrust"]).stdout
    binhost_fpr = next(line.split("=")[1].strip() for line in world.config.read_text().splitlines()
                       if line.startswith("signing-key"))
    assert f"{binhost_fpr}:6:" not in trust, "getuto keyrings must not get a second ultimate key"

    world.cli("install", "app-misc/hello", config=config)
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"


def test_install_with_basic_auth_through_portage(gb, world):
    auth = world.base / "auth"
    auth.write_text("portage:pass%word\n")
    auth.chmod(0o600)
    root, result, entry = install_from(
        gb, world, world.pkgdir, "auth", extra_binhost=f"auth-file = {auth}\n",
        authorizations=gb.basic_authorizations([("portage", "pass%word")]))
    assert re.search(r"sync-uri = http://portage:pass%%word@127\.0\.0\.1:\d+/\n", entry)
    assert result.returncode == 0, result.stderr
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"


def test_install_through_an_ssh_tunnel_with_no_open_port(world):
    tunnel_port = free_port()
    root, config = world.new_target("tunnel", extra_binhost=f"transport = tunnel\ntunnel-port = {tunnel_port}\n")
    world.cli("setup-target", config=config)
    entry = (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert f"sync-uri = http://127.0.0.1:{tunnel_port}/" in entry
    assert not wait_for_port(tunnel_port, timeout=0.2), "nothing may listen there outside a run"
    world.cli("install", "app-misc/hello-app", config=config)
    assert run([world.installed(root, "usr/bin/hello-app")]).stdout == "hello-app from binhost\n"
    assert not wait_for_port(tunnel_port, timeout=0.2), "the tunnel ends with the command"


def test_serve_tunnel_reaches_the_target_and_install_goes_through_it(world):
    """A running serve --tunnel holds the target's port: install (transport = tunnel) goes through
    that tunnel instead of failing to open its own on the same port."""
    tunnel_port = free_port()
    root, config = world.new_target("serve-tunnel",
                                    extra_binhost=f"transport = tunnel\ntunnel-port = {tunnel_port}\n")
    world.cli("setup-target", config=config)
    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}")
    server = subprocess.Popen([sys.executable, SCRIPT, "-c", config, "--color=n", "serve", "--tunnel",
                               "--port", str(free_port())], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port(tunnel_port, timeout=20, proc=server), server.communicate(timeout=5)
        fetched = run(world.sshd.ssh_argv("curl", "-sS", "--fail", f"http://127.0.0.1:{tunnel_port}/Packages"))
        assert fetched.stdout.startswith("ACCEPT_")
        installed = world.cli("install", "app-misc/hello", config=config, check=False)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert f"holds port {tunnel_port} on serve-tunnel already: going through its tunnel" in installed.stdout
        assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=20)
    assert server.returncode == 0, stderr
    assert f"sync-uri = http://127.0.0.1:{tunnel_port}/" in stdout


def test_install_over_tls_through_portage(gb, world):
    """Portage's own fetchers (urllib for the index, wget for packages) against `serve` over HTTPS.
    The target trusts our test CA through its environment, as a real one would through its CA store."""
    need(shutil.which("openssl") and shutil.which("wget"), "openssl and wget are needed")
    tls = world.base / "tls"
    tls.mkdir()
    cert, key = tls / "cert.pem", tls / "key.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert])
    wgetrc = tls / "wgetrc"
    wgetrc.write_text(f"ca_certificate = {cert}\n")
    tls_world = gb.BinhostSettings({"tls-cert": str(cert), "tls-key": str(key)}, "test")
    with start_sshd(world.base / "sshd-tls", f"SetEnv SSL_CERT_FILE={cert} WGETRC={wgetrc}\n") as sshd:
        root, result, entry = install_from(gb, world, world.pkgdir, "tls", sshd=sshd, scheme="https",
                                           ssl_context=gb.tls_context(tls_world))
    assert re.search(r"sync-uri = https://127\.0\.0\.1:\d+/\n", entry)
    assert result.returncode == 0, result.stderr
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"


@pytest.fixture
def config_pair(world, tmp_path):
    """A fresh binhost root and target root (config tests rewrite them), and a config file."""
    binhost, target = tmp_path / "cfg-binhost", tmp_path / "cfg-target"
    write_portage_config(binhost)
    write_portage_config(target, extra_make_conf='USE="loud"\n')
    (target / "etc/portage/package.use").mkdir()
    secret = target / "etc/portage/package.use/private"
    secret.write_text("app-misc/greet -loud\n")
    secret.chmod(0o600)
    (target / "etc/portage/gnupg").mkdir(mode=0o700)
    (target / "etc/portage/gnupg/pubring.kbx").write_text("keyring")
    (target / "etc/portage/make.conf~").write_text("editor backup")
    world_file = eroot(target, world.eprefix) / "var/lib/portage/world"
    world_file.parent.mkdir(parents=True, exist_ok=True)
    world_file.write_text("app-misc/hello\n")
    config = tmp_path / "cfg.conf"
    config.write_text(f"[binhost]\nroot = {binhost}\n\n[target t]\nhost = {world.sshd.host}\n"
                      f"ssh-port = {world.sshd.port}\nssh-options = {world.sshd.ssh_options}\n"
                      f"root = {target}\npath = {world.portage_bin}\ntree = own\n")
    return binhost, target, config


def test_config_diff_pull_and_push_round_trip(world, config_pair):
    binhost, target, config = config_pair
    diff = world.cli("config", "diff", config=config).stdout
    assert '+USE="loud"' in diff and "package.use/private" in diff and "gnupg" not in diff
    assert "make.conf~" not in diff

    before = (binhost / "etc/portage/make.conf").read_text()
    pretend = world.cli("-p", "config", "pull", config=config)
    assert '+USE="loud"' in pretend.stdout
    assert (binhost / "etc/portage/make.conf").read_text() == before

    world.cli("config", "pull", config=config)
    copied = binhost / "etc/portage"
    assert (copied / "make.profile").is_symlink()
    assert os.readlink(copied / "make.profile") == os.readlink(target / "etc/portage/make.profile")
    assert (copied / "package.use/private").stat().st_mode & 0o777 == 0o600
    assert not (copied / "gnupg").exists() and not (copied / "make.conf~").exists()
    assert (eroot(binhost, world.eprefix) / "var/lib/portage/world").read_text() == "app-misc/hello\n"
    backups = list((binhost / "etc").glob(".portage.*.bak"))
    assert len(backups) == 1 and (backups[0] / "make.conf").read_text() == before
    assert "identical" in world.cli("config", "diff", config=config).stdout

    # The binhost's entry for itself never travels; each side keeps its own.
    (binhost / "etc/portage/binrepos.conf").mkdir()
    (binhost / "etc/portage/binrepos.conf/gentoo-binhost.conf").write_text("[gentoo-binhost]\n")
    (target / "etc/portage/binrepos.conf").mkdir()
    (target / "etc/portage/binrepos.conf/gentoo-binhost.conf").write_text("[target's own]\n")
    with open(binhost / "etc/portage/make.conf", "a") as make_conf:
        make_conf.write('MAKEOPTS="-j2"\n')
    world.cli("config", "push", config=config)
    assert 'MAKEOPTS="-j2"' in (target / "etc/portage/make.conf").read_text()
    assert (target / "etc/portage/gnupg/pubring.kbx").read_text() == "keyring"
    assert (target / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text() == "[target's own]\n"
    assert list((target / "etc").glob(".portage.*.bak"))
    assert not list((target / "etc").glob(".gentoo-binhost-config.*"))


def test_interrupted_push_leaves_the_old_configuration(world, config_pair, tmp_path):
    binhost, target, config = config_pair
    with open(binhost / "etc/portage/make.conf", "a") as make_conf:
        make_conf.write("# " + "x" * 100000 + "\n")
    before = (target / "etc/portage/make.conf").read_text()
    # An ssh whose connection drops after 2 KiB of the transfer.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ssh").write_text(f"#!/bin/sh\nhead -c 2048 | {shutil.which('ssh')} \"$@\"\n")
    (shim / "ssh").chmod(0o755)
    result = run([sys.executable, SCRIPT, "-c", config, "config", "push"], check=False,
                 env={"PATH": f"{shim}:{world.portage_bin}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert "incomplete transfer" in result.stderr
    assert (target / "etc/portage/make.conf").read_text() == before
    assert not list((target / "etc").glob(".portage.*.bak"))
    assert not list((target / "etc").glob(".gentoo-binhost-config.*"))


def test_doctor_names_each_difference(world, config_pair):
    import json
    binhost, target, config = config_pair
    world.cli("config", "pull", config=config)
    report = {r["check"]: r for r in json.loads(
        world.cli("doctor", "--json", config=config, check=False).stdout)}
    for check in ("configuration", "world", "USE", "CHOST", "ARCH", "profile"):
        assert report[check]["status"] == "OK", report[check]

    with open(target / "etc/portage/make.conf", "a") as make_conf:
        make_conf.write('USE="${USE} -loud"\n')
    with open(eroot(target, world.eprefix) / "var/lib/portage/world", "a") as world_file:
        world_file.write("app-misc/greet\n")
    (target / "etc/portage/binrepos.conf").mkdir()
    (target / "etc/portage/binrepos.conf/gentoo-binhost.conf").write_text(
        "[gentoo-binhost]\nsync-uri = http://wrong.invalid/\n")
    result = world.cli("doctor", "--json", config=config, check=False)
    assert result.returncode == 1 and "problem" in result.stderr
    report = {r["check"]: r for r in json.loads(result.stdout)}
    assert report["USE"]["status"] == "FAIL" and "loud" in report["USE"]["detail"]
    assert report["world"]["status"] == "FAIL" and "app-misc/greet" in report["world"]["detail"]
    assert report["binrepos"]["status"] == "FAIL" and "http://wrong.invalid/" in report["binrepos"]["detail"]
    assert report["configuration"]["status"] == "FAIL" and "make.conf" in report["configuration"]["detail"]
    # Every FAIL line names its fix: a command of ours, or emaint's.
    fixes = re.compile(r"'gentoo-binhost\.py [a-z-]+|'emaint |is serve running|: (check|set|install|sync) ")
    for line in report.values():
        if line["status"] == "FAIL":
            assert fixes.search(line["detail"]), line
    assert report["world"]["detail"].endswith("run 'gentoo-binhost.py config pull'"), report["world"]

    plain = world.cli("--color=n", "doctor", config=config, check=False).stdout
    assert any(line.startswith("FAIL USE: ") for line in plain.splitlines())


def test_doctor_passes_for_a_working_target(world):
    import json
    root, config = world.new_target("doctor")
    world.cli("setup-target", config=config)
    report = {r["check"]: r for r in json.loads(
        world.cli("doctor", "--json", "app-misc/hello", config=config, check=False).stdout)}
    for check in ("binrepos", "fetch", "signing key", "index", "preflight", "CHOST", "profile"):
        assert report[check]["status"] == "OK", report[check]


def test_cpu_over_ssh_satisfies_the_macro_criterion_and_applies(world, config_pair):
    binhost, target, config = config_pair
    result = world.cli("cpu", config=config)
    common = next(line for line in result.stdout.splitlines() if line.startswith("COMMON_FLAGS="))
    flags = [word for word in shlex.split(shlex.split(common.split("=", 1)[1])[0]) if word.startswith("-m")]
    assert flags[0].startswith(("-march=", "-mcpu=")) and "-march=native" not in flags

    def macros(*options):
        return set(run(["gcc", "-dM", "-E", "-x", "c", "/dev/null", *options]).stdout.splitlines())
    assert macros(*flags) == macros("-march=native")
    assert re.search(r'^CPU_FLAGS_X86=".*\bsse2\b', result.stdout, re.M)

    world.cli("cpu", "--apply", config=config)
    make_conf = (binhost / "etc/portage/make.conf").read_text()
    assert flags[0] in make_conf and "-O2" in make_conf
    assert "CPU_FLAGS_X86:" in (binhost / "etc/portage/package.use/00cpu-flags").read_text()
    assert list((binhost / "etc/portage").glob("make.conf.*.bak"))


def test_pull_replaces_march_native_with_the_targets_flags(world, config_pair):
    binhost, target, config = config_pair
    make_conf = target / "etc/portage/make.conf"
    make_conf.write_text(make_conf.read_text().replace('CFLAGS="-O2 -pipe"', 'CFLAGS="-march=native -O2 -pipe"'))
    result = world.cli("config", "pull", config=config)
    assert "uses -march=native" in result.stderr
    pulled = (binhost / "etc/portage/make.conf").read_text()
    assert "-march=native" not in pulled and re.search(r'CFLAGS="-march=\S+ .*-O2 -pipe"', pulled)
    assert "-march=native" in make_conf.read_text(), "the target keeps its own make.conf"


def test_push_without_a_world_file_keeps_the_targets(world, config_pair):
    binhost, target, config = config_pair
    binhost_world = eroot(binhost, world.eprefix) / "var/lib/portage/world"
    assert not binhost_world.exists()
    world.cli("config", "push", config=config)
    assert (eroot(target, world.eprefix) / "var/lib/portage/world").read_text() == "app-misc/hello\n"


def test_list_shows_what_the_binhost_holds(world):
    import json
    records = json.loads(world.cli("list", "--json").stdout)
    by_cpv = {record["cpv"]: record for record in records}
    assert {"app-misc/hello-1.1", "app-misc/hello-app-1.0", "app-misc/greet-1.0"} <= set(by_cpv)
    assert "loud" in by_cpv["app-misc/greet-1.0"]["use"]
    assert by_cpv["app-misc/hello-1.1"]["size"] > 0 and by_cpv["app-misc/hello-1.1"]["build_time"]
    plain = world.cli("list").stdout
    assert any(line.startswith("app-misc/hello-1.1") and "build" in line for line in plain.splitlines())


def test_clean_keeps_the_newest_builds_of_installed_packages(world, tmp_path):
    import json
    # A binhost of its own: clean deletes files.
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-clean-"))
    try:
        binhost = base / "binhost"
        write_portage_config(binhost)
        config = base / "c.conf"
        config.write_text(f"[binhost]\nroot = {binhost}\npublish-keep = 1\n")
        for _ in range(3):
            world.cli("build", "--oneshot", "app-misc/hello-app", config=config)
        world.cli("build", "--oneshot", "=app-misc/hello-1.0", config=config)  # replaces 1.1
        before = json.loads(world.cli("list", "--json", config=config).stdout)
        assert sum(r["cpv"] == "app-misc/hello-app-1.0" for r in before) == 3
        pretend = world.cli("-p", "clean", "--keep", "2", config=config)
        assert "Would free" in pretend.stdout
        assert json.loads(world.cli("list", "--json", config=config).stdout) == before
        world.cli("clean", "--keep", "2", config=config)
        # hello-1.1 was in the publication targets had until this clean: retired (left out of the
        # new publication), its file kept for them; the next clean removes it.
        current = (binhost / "var/cache/binpkgs/.published/current/Packages").read_text()
        assert "CPV: app-misc/hello-1.1\n" not in current and "CPV: app-misc/hello-1.0\n" in current
        world.cli("clean", "--keep", "2", config=config)
        after = json.loads(world.cli("list", "--json", config=config).stdout)
        builds = sorted(r["build_id"] for r in after if r["cpv"] == "app-misc/hello-app-1.0")
        assert builds == [2, 3]
        assert not [r for r in after if r["cpv"] == "app-misc/hello-1.1"], "no longer installed"
        assert [r for r in after if r["cpv"] == "app-misc/hello-1.0"]
        assert len(list((binhost / "var/cache/binpkgs").rglob("*.gpkg.tar"))) == len(after)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_all_targets_go_on_past_a_failure_with_a_summary(world):
    _, good = world.new_target("all-good")
    world.cli("setup-target", config=good)
    both = world.base / "all.conf"
    sections = good.read_text() + ("\n[target all-gone]\nhost = root@127.0.0.1\nssh-port = 1\n"
                                   "ssh-options = -o BatchMode=yes -o ConnectTimeout=5\n")
    both.write_text(sections)
    result = world.cli("--all", "install", "app-misc/hello", config=both, check=False)
    assert result.returncode == 1
    assert "1 of 2 target(s) failed: all-gone" in result.stderr
    table = result.stdout[result.stdout.index("target "):]
    assert "all-gone" in table and "FAILED" in table
    assert re.search(r"all-good\s+\d+\.\ds\s+ok", table)
    doctor = world.cli("--all", "doctor", "--json", config=both, check=False)
    import json
    report = json.loads(doctor.stdout)
    assert set(report["targets"]) == {"all-good", "all-gone"}
    assert doctor.returncode == 1


def test_a_hung_target_fails_its_own_row_and_the_others_go_on(gb, world, monkeypatch, capsys):
    """Every remote step has a time limit: a target whose emerge hangs (here for 30 s; the limit
    lowered to 3 s) fails its row, the other target installs."""
    _, good = world.new_target("hung-good")
    world.cli("setup-target", config=good)
    hung_root, _ = world.new_target("hung")
    hanging = world.base / "hanging-bin"
    hanging.mkdir()
    (hanging / "emerge").write_text("#!/bin/sh\nexec sleep 30\n")
    (hanging / "emerge").chmod(0o755)
    both = world.base / "hung.conf"
    both.write_text(good.read_text() + (
        f"\n[target hung]\nhost = {world.sshd.host}\nssh-port = {world.sshd.port}\n"
        f"ssh-options = {world.sshd.ssh_options}\nroot = {hung_root}\npath = {hanging}:{world.portage_bin}\n"
        "tree = own\n"))
    monkeypatch.setattr(gb, "REMOTE_QUERY_TIMEOUT", 3)
    monkeypatch.setenv("PATH", f"{world.portage_bin}:{os.environ['PATH']}")
    code = gb.main(["-c", str(both), "--color=n", "--all", "install", "app-misc/hello"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "1 of 2 target(s) failed: hung" in err and "did not finish within 3 s" in err, err
    table = out[out.index("target "):]
    assert re.search(r"hung-good\s+\d+\.\ds\s+ok", table), table


def test_several_binhost_environments_served_side_by_side(world):
    """A target with its own binhost-root gets its own environment, served under /<name>/."""
    port = free_port()
    root_a, config_a = world.new_target("env-a", port=port, pkgdir=world.pkgdir)
    root_b, config_b = world.new_target("env-b", use="-loud", port=port, pkgdir=world.pkgdir)
    binhost_b = world.base / "binhost-b"
    write_portage_config(binhost_b, extra_make_conf='USE="-loud"\n')
    binhost_section = config_a.read_text().split("[target")[0].replace(f"pkgdir = {world.pkgdir}\n", "")
    target_a = "[target" + config_a.read_text().split("[target", 1)[1]
    target_b = "[target" + config_b.read_text().split("[target", 1)[1] + f"binhost-root = {binhost_b}\n"
    config = world.base / "environments.conf"
    config.write_text(binhost_section + "\n" + target_a + "\n" + target_b)
    world.cli("--target", "env-b", "build", "app-misc/greet", config=config)
    assert list((binhost_b / "var/cache/binpkgs").rglob("greet-*.gpkg.tar"))
    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}")
    server = subprocess.Popen([sys.executable, SCRIPT, "-c", config, "serve"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port(port, proc=server)
        world.cli("--target", "env-a", "setup-target", config=config)
        world.cli("--target", "env-b", "setup-target", config=config)
        entry_b = (root_b / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
        assert f"sync-uri = http://127.0.0.1:{port}/binhost-b/" in entry_b
        assert f"sync-uri = http://127.0.0.1:{port}/binhost/" in (
            root_a / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
        world.cli("--target", "env-a", "install", "app-misc/hello-app", config=config)
        world.cli("--target", "env-b", "install", "app-misc/greet", config=config)
    finally:
        stop_process(server)
    assert run([world.installed(root_a, "usr/bin/hello-app")]).stdout == "hello-app from binhost\n"
    assert world.installed(root_b, "usr/share/greet/use.txt").read_text() == "quiet\n"
    # Commands without a target must be told which environment they mean.
    result = world.cli("list", config=config, check=False)
    assert result.returncode == 2 and "several binhost environments" in result.stderr


def test_clean_never_deletes_outside_pkgdir_nor_without_a_package_database(world):
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-clean-safety-"))
    try:
        root = base / "r"
        write_portage_config(root)
        config = base / "c.conf"
        config.write_text(f"[binhost]\nroot = {root}\n")
        pkgdir = root / "var/cache/binpkgs"
        outside = base / "outside.gpkg.tar"
        outside.write_text("not a package of ours")
        (pkgdir / "Packages").write_text("VERSION: 0\nTIMESTAMP: 1\n\nCPV: app-misc/gone-1\n"
                                         "PATH: ../../../../outside.gpkg.tar\nSIZE: 21\n\n")
        refused = world.cli("clean", config=config, check=False)
        assert refused.returncode == 1 and "no package database" in refused.stderr
        (eroot(root, world.eprefix) / "var/db/pkg/app-misc/hello-1.1").mkdir(parents=True)
        world.cli("clean", config=config)
        assert outside.read_text() == "not a package of ours"
    finally:
        shutil.rmtree(base, ignore_errors=True)
