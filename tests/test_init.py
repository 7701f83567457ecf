"""init: a binhost root from a verified stage3, served by a local mirror on 127.0.0.1 with real
gpg signatures, real xz tarballs and real GNU tar extraction."""

import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import SCRIPT, need, run

BUILD = "20261120T170000Z"
NAME = f"stage3-amd64-openrc-{BUILD}.tar.xz"


def gpg_home(directory, name):
    directory.mkdir(mode=0o700)
    run(["gpg", "--homedir", directory, "--batch", "--passphrase", "", "--pinentry-mode", "loopback",
         "--quick-generate-key", f"{name} <{name}@example.invalid>", "ed25519", "sign", "never"])
    return directory


def sign(home, path, clear=False):
    mode = ["--clearsign"] if clear else ["--armor", "--detach-sign"]
    output = path.with_name(path.name + ".asc") if not clear else path.with_name(path.name + ".signed")
    run(["gpg", "--homedir", home, "--batch", "--yes", *mode, "--output", output, path])
    if clear:
        output.replace(path)


def offer_stage3(release, autobuilds, build, latest_name, tarball):
    """Offer tarball (already at autobuilds/build/NAME) as Gentoo's mirrors do, signed with the
    release key: NAME.DIGESTS with its BLAKE2B and SHA512 (clear-signed), NAME.asc (detached), and
    autobuilds/latest_name (clear-signed) naming it."""
    blake2b, sha512 = hashlib.blake2b(), hashlib.sha512()
    with open(tarball, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            blake2b.update(chunk)
            sha512.update(chunk)
    digests = tarball.with_name(tarball.name + ".DIGESTS")
    digests.write_text(f"# BLAKE2B HASH\n{blake2b.hexdigest()}  {tarball.name}\n"
                       f"# SHA512 HASH\n{sha512.hexdigest()}  {tarball.name}\n")
    sign(release, digests, clear=True)
    sign(release, tarball)
    latest = autobuilds / latest_name
    latest.write_text(f"# Latest as of Fri, 20 Nov 2026 17:00:00 +0000\n# ts=1795194000\n"
                      f"{build}/{tarball.name} {tarball.stat().st_size}\n")
    sign(release, latest, clear=True)


def tiny_stage3():
    """A real .tar.xz of a tiny root with a stage3's layout, owners and modes."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, content=b"", uid=0, gid=0, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
        for directory in ("./", "./etc", "./etc/portage", "./usr", "./usr/bin", "./var", "./var/db"):
            add(directory)
        add("./etc/os-release", tarfile.REGTYPE, 0o644, b'NAME=Gentoo\nID=gentoo\n')
        add("./etc/shadow", tarfile.REGTYPE, 0o640, b"root:*:1::::::\n", gid=42)
        add("./usr/bin/hello", tarfile.REGTYPE, 0o755, b"#!/bin/sh\necho hi\n")
        add("./var/db/owned-by-portage", tarfile.REGTYPE, 0o644, b"x", uid=250, gid=250)
        add("./bin", tarfile.SYMTYPE, 0o777, link="usr/bin")
    return data.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, gb):
    need(shutil.which("gpg") and shutil.which("xz"), "gpg and xz are needed")
    base = tmp_path_factory.mktemp("mirror")
    release = gpg_home(base / "release-gnupg", "release")
    other = gpg_home(base / "other-gnupg", "intruder")
    keyring = base / "gentoo-release.asc"
    keyring.write_text(run(["gpg", "--homedir", release, "--armor", "--export"]).stdout)
    autobuilds = base / "www/releases/amd64/autobuilds"
    (autobuilds / BUILD).mkdir(parents=True)
    tarball = autobuilds / BUILD / NAME
    tarball.write_bytes(tiny_stage3())
    payload = tarball.read_bytes()
    offer_stage3(release, autobuilds, BUILD, "latest-stage3-amd64-openrc.txt", tarball)
    server = gb.make_server("127.0.0.1", 0, str(base / "www"), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base": base, "url": f"http://127.0.0.1:{server.server_address[1]}", "keyring": keyring,
           "tarball": tarball, "release": release, "other": other, "payload": payload}
    server.shutdown()
    server.server_close()


def init(tmp_path, mirror_url, keyring, *extra, root=None):
    root = root or tmp_path / "binhost"
    config = tmp_path / "c.conf"
    if not config.exists():
        config.write_text(f"[binhost]\nroot = {root}\n")
    result = subprocess.run([sys.executable, str(SCRIPT), "-c", str(config), "--color=n", "init",
                             "--mirror", mirror_url, "--keyring", str(keyring), *extra],
                            capture_output=True, text=True, timeout=120)
    return result, root, config


def test_init_from_a_verified_stage3(tmp_path, mirror):
    result, root, config = init(tmp_path, mirror["url"], mirror["keyring"])
    assert result.returncode == 0, result.stderr
    assert "SHA512 and BLAKE2B match" in result.stdout or "BLAKE2B and SHA512 match" in result.stdout
    assert "PGP signature good" in result.stdout
    assert (root / "bin").is_symlink() and os.readlink(root / "bin") == "usr/bin"
    assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == 0o640
    assert (root / "etc/shadow").stat().st_gid == 42
    assert (root / "var/db/owned-by-portage").stat().st_uid == 250
    assert os.access(root / "usr/bin/hello", os.X_OK)
    assert (root / "var/cache/binpkgs").is_dir()
    text = config.read_text()
    assert f"stage3 = {NAME}" in text and "stage3-sha512 = " in text
    assert "config pull" in result.stdout
    # Nothing half-made is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".binhost.new")) == []
    again, _, _ = init(tmp_path, mirror["url"], mirror["keyring"])
    assert again.returncode == 1 and "is not empty" in again.stderr


def corrupt_copy(mirror, tmp_path, change):
    """A copy of the mirror with one thing changed; returns its URL and a stop function."""
    import importlib
    gb = importlib.import_module("gentoo_binhost")
    www = tmp_path / "www"
    shutil.copytree(mirror["base"] / "www", www)
    change(www / f"releases/amd64/autobuilds/{BUILD}")
    server = gb.make_server("127.0.0.1", 0, str(www), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.mark.parametrize("change, message", [
    ("flip", "does not match its DIGESTS"),
    ("resign", "PGP signature"),
    ("truncate", "does not match its DIGESTS"),
])
def test_a_bad_stage3_leaves_no_root(tmp_path, mirror, change, message):
    def apply(directory):
        tarball = directory / NAME
        data = bytearray(tarball.read_bytes())
        if change == "flip":
            data[len(data) // 2] ^= 0xFF
            tarball.write_bytes(bytes(data))
        elif change == "truncate":
            tarball.write_bytes(bytes(data[: len(data) // 2]))
        else:
            sign(mirror["other"], tarball)
    url, server = corrupt_copy(mirror, tmp_path, apply)
    try:
        result, root, _ = init(tmp_path, url, mirror["keyring"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not root.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".binhost.new")]


def test_missing_release_keys_is_a_clear_refusal(tmp_path, mirror):
    result, root, _ = init(tmp_path, mirror["url"], tmp_path / "no-such-keyring.asc")
    assert result.returncode == 1 and "--no-verify-pgp" in result.stderr
    assert not root.exists()


def test_an_interrupted_download_resumes(tmp_path, mirror):
    payload = mirror["payload"]
    half = len(payload) // 2
    # A server that cuts the connection halfway through the tarball.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def cut_once():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:half])
    threading.Thread(target=cut_once, daemon=True).start()
    cut_url = f"http://127.0.0.1:{listener.getsockname()[1]}/{NAME}"
    # The DIGESTS and .asc come from the real mirror, next to the tarball.
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(mirror["tarball"].with_name(NAME + ".DIGESTS"), local)
    import importlib
    gb = importlib.import_module("gentoo_binhost")
    output = gb.Output(color=False, verbosity=0)
    destination = str(tmp_path / NAME)
    with pytest.raises(gb.BinhostError, match="interrupted"):
        gb.download(cut_url, destination, gb.Runner(output), output, {"sha512": None})
    listener.close()
    assert os.path.getsize(destination + ".partial") == half
    digests = gb.download(f"{mirror['url']}/releases/amd64/autobuilds/{BUILD}/{NAME}", destination,
                          gb.Runner(output), output, {"sha512": None, "blake2b": None})
    assert Path(destination).read_bytes() == payload
    assert digests["sha512"] == hashlib.sha512(payload).hexdigest()
    assert digests["blake2b"] == hashlib.blake2b(payload).hexdigest()
    assert not os.path.exists(destination + ".partial")


@pytest.mark.parametrize("facts, expected", [
    (("x86_64", "x86_64-pc-linux-gnu", "openrc", "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0"),
     ("amd64", "openrc")),
    (("x86_64", "x86_64-pc-linux-gnu", "systemd", "default/linux/amd64/23.0/systemd"), ("amd64", "systemd")),
    (("x86_64", "x86_64-gentoo-linux-musl", "openrc", "default/linux/amd64/23.0/musl"), ("amd64", "musl")),
    (("x86_64", "x86_64-pc-linux-gnu", "openrc", "default/linux/amd64/23.0/no-multilib"),
     ("amd64", "nomultilib-openrc")),
    (("aarch64", "aarch64-unknown-linux-gnu", "systemd", "default/linux/arm64/23.0/systemd"), ("arm64", "systemd")),
    (("x86_64", "x86_64-pc-linux-gnu", "openrc", "default/linux/amd64/23.0/no-multilib/hardened"),
     ("amd64", "hardened-nomultilib-openrc")),
    (("x86_64", "x86_64-gentoo-linux-musl", "openrc", "default/linux/amd64/23.0/musl/hardened"),
     ("amd64", "musl-hardened")),
])
def test_like_target_picks_the_matching_variant(gb, facts, expected):
    arch, variant, reasons = gb.stage3_variant(*facts)
    assert (arch, variant) == expected and reasons


@pytest.mark.parametrize("facts, expected, why", [
    # A Raspberry Pi with a 64-bit kernel and a 32-bit userland: uname -m says aarch64.
    (("aarch64", "armv7a-unknown-linux-gnueabihf", "openrc", "default/linux/arm/23.0/armv7a", "arm"),
     ("arm", "openrc"), "Portage's ARCH is arm (uname -m says aarch64: the kernel's)"),
    (("aarch64", "armv7a-unknown-linux-gnueabihf", "openrc", "default/linux/arm/23.0/armv7a", ""),
     ("arm", "openrc"), "its CHOST armv7a-unknown-linux-gnueabihf is arm (uname -m says aarch64: the kernel's)"),
    (("aarch64", "aarch64-unknown-linux-musl", "openrc", "default/linux/arm64/23.0/musl", "arm64"),
     ("arm64", "musl"), "aarch64 is arm64"),
    # A word that is no arch name is not taken (it ends up in the mirror's URL).
    (("x86_64", "", "openrc", "", "../../etc"), ("amd64", "openrc"), "x86_64 is amd64"),
])
def test_like_target_takes_the_userlands_arch_over_the_kernels(gb, facts, expected, why):
    arch, variant, reasons = gb.stage3_variant(*facts)
    assert (arch, variant) == expected and reasons[0] == why, reasons


def test_parse_latest_and_digests(gb):
    latest = f"# Latest as of ...\n# ts=1\n{BUILD}/{NAME} 123\n"
    assert gb.parse_latest(latest) == (f"{BUILD}/{NAME}", 123)
    assert gb.parse_latest(latest, "amd64", "openrc") == (f"{BUILD}/{NAME}", 123)
    with pytest.raises(gb.BinhostError):
        gb.parse_latest(latest, "amd64", "systemd")  # another variant's list
    with pytest.raises(gb.BinhostError):
        gb.parse_latest(f"../../{NAME} 1\n", "amd64", "openrc")
    digests = f"# BLAKE2B HASH\nabc  {NAME}\ndef  {NAME}.CONTENTS.gz\n# SHA512 HASH\n123  {NAME}\n"
    assert gb.parse_digests(digests, NAME) == {"blake2b": "abc", "sha512": "123"}


def test_a_forged_clearsignature_is_refused(gb, tmp_path, mirror):
    """gpg quotes unknown armor headers on stderr: status text there must not count."""
    output = gb.Output(color=False, verbosity=0)
    keys = gb.TrustedKeys(Path(mirror["keyring"]).read_bytes(), "Gentoo's release keys", gb.Runner(output))
    try:
        plain = tmp_path / "latest.txt"
        plain.write_text(f"{BUILD}/evil.tar.xz 1\n")
        stored = run(["gpg", "--homedir", mirror["other"], "--batch", "--armor", "--store", "--output", "-",
                      plain]).stdout
        forged = stored.replace("-----BEGIN PGP MESSAGE-----\n",
                                "-----BEGIN PGP MESSAGE-----\nFoo: [GNUPG:] VALIDSIG x\n")
        with pytest.raises(gb.BinhostError):
            keys.verified_text(forged.encode(), "latest")
        with pytest.raises(gb.BinhostError, match="not PGP-signed"):
            keys.verified_text(b"unsigned text\n", "latest")
    finally:
        keys.close()


def test_an_unsigned_digests_file_is_refused(tmp_path, mirror):
    def strip_signature(directory):
        digests = directory / (NAME + ".DIGESTS")
        text = digests.read_text()
        body = text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----")[0]
        digests.write_text(body)
    url, server = corrupt_copy(mirror, tmp_path, strip_signature)
    try:
        result, root, _ = init(tmp_path, url, mirror["keyring"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and "DIGESTS is not PGP-signed" in result.stderr
    assert not root.exists()


def test_pretend_shows_the_extraction_and_changes_nothing(tmp_path, mirror):
    config = tmp_path / "c.conf"
    root = tmp_path / "binhost"
    config.write_text(f"[binhost]\nroot = {root}\n")
    result = subprocess.run([sys.executable, str(SCRIPT), "-c", str(config), "--color=n", "-p", "init",
                             "--mirror", mirror["url"], "--keyring", str(mirror["keyring"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tar --extract --preserve-permissions '--xattrs-include=*.*' --numeric-owner --xz" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.conf"]
