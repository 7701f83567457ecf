"""Coverage: everything the target merges comes from OUR binhost, compiled here with the target's
flags, in the four situations where that used to fail:

(a) a dependency the binhost root has installed without a binary (a stage3's package),
(b) a target configuration with FEATURES=getbinpkg and another binhost in binrepos.conf,
(c) a relative make.profile link into the ebuild repository,
(d) a target with getuto and no keyring yet.

Real components throughout: Portage from PyPI, the session's sshd (the `world` fixture), gpg,
getuto (../shared/third-party/getuto), our `serve` or `transport = tunnel`. Every binhost root
and every target has its own PKGDIR, in a mkdtemp directory under world.base made 0755 (Portage
verifies signatures as `nobody`).

How "compiled on our binhost" is proven, for each installed package:
* the target's vdb has BINPKGMD5 (installed from a binary, not compiled there) and BUILD_ID;
* OUR PKGDIR holds <cpv>-<BUILD_ID>.gpkg.tar and its MD5 is that BINPKGMD5;
* the build flags: every CFLAGS here carries -frecord-gcc-switches and a harmless marker option
  (-frandom-seed=NAME; gcc records no -D options) naming who chose them (the target's make.conf,
  a stage3's generic build, the other binhost), with
  FEATURES=nostrip so the installed executable keeps the recorded switches; the vdb's CFLAGS
  and the executable's bytes name the target's marker and no other.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import (PROJECT_DIR, REPO, REPO_NAME, binhost_serving, eroot, free_port, http_server, need,
                      portage_env, run, write_binrepo, write_portage_config)

# shared/ lies beside the checkout (on CI too, beside its clone).
GETUTO_DIR = PROJECT_DIR.parent / "shared" / "third-party" / "getuto"

#: In the target's CFLAGS, so in every build our binhost makes for it after `config pull`.
TARGET_MARK = "-frandom-seed=gb-target-flags"
#: In the binhost root's own make.conf before the pull: what a stage3's packages were built with.
STAGE3_MARK = "-frandom-seed=gb-stage3-generic"
#: The other binhost's generic builds.
GENERIC_MARK = "-frandom-seed=gb-other-binhost-generic"
ALL_MARKS = (TARGET_MARK, STAGE3_MARK, GENERIC_MARK)


def flags(mark):
    """make.conf lines: CFLAGS with ``mark`` recorded in the objects, binaries not stripped."""
    return (f'CFLAGS="-O2 -pipe -frecord-gcc-switches {mark}"\n'
            'CXXFLAGS="${CFLAGS}"\n'
            'FEATURES="${FEATURES} nostrip"\n')


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

class Binhost:
    """A fresh binhost root (own PKGDIR) and a config file with it and one target."""

    def __init__(self, world, name, make_conf="", tunnel=True, base=None):
        self.world = world
        self.name = name
        self.base = Path(base or tempfile.mkdtemp(prefix=f"cov-{name}-", dir=world.base))
        self.base.chmod(0o755)  # Portage verifies as nobody
        self.root = self.base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.port = free_port()
        self.config = self.base / "gentoo-binhost.conf"
        write_portage_config(self.root, extra_make_conf=make_conf)
        # gpg-home short: gpg-agent's socket path in it is limited to 107 bytes.
        section = f"[binhost]\nroot = {self.root}\ngpg-home = {self.base}/g\n"
        if tunnel:
            section += f"transport = tunnel\ntunnel-port = {free_port()}\n"
        else:
            section += f"url = http://127.0.0.1:{self.port}/\nbind = 127.0.0.1\nport = {self.port}\n"
        self.config.write_text(section)
        self.target = None

    def add_target(self, make_conf="", repo=REPO, path=None):
        """The target ROOT (own PKGDIR, USE=loud, verify keyring inside it) and its section."""
        self.target = self.base / "target"
        write_portage_config(self.target, repo=repo, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n' + make_conf))
        sshd = self.world.sshd
        with open(self.config, "a") as config:
            config.write(f"\n[target {self.name}]\nhost = {sshd.host}\nssh-port = {sshd.port}\n"
                         f"ssh-options = {sshd.ssh_options}\nroot = {self.target}\n"
                         f"path = {path or self.world.portage_bin}\ntree = own\n")
        return self.target

    def cli(self, *args, **options):
        return self.world.cli(*args, config=self.config, **options)

    def serving(self):
        return binhost_serving(self.config, self.port)

    def packages(self, name="*"):
        return sorted(self.pkgdir.rglob(f"{name}-[0-9]*.gpkg.tar"))

    def installed(self, path, root=None):
        return eroot(root or self.target, self.world.eprefix) / path

    def doctor(self, *atoms):
        result = self.cli("doctor", "--json", *atoms, check=False)
        try:
            return {r["check"]: r for r in json.loads(result.stdout)}
        except ValueError:
            raise AssertionError(f"doctor printed no JSON:\n{result.stdout}\n{result.stderr}")


def output_of(result):
    return result.stdout + result.stderr


def assert_from_our_binhost(binhost, cpv, program=None):
    """``cpv`` is installed on the target from a binary package of binhost's PKGDIR, compiled with
    the target's flags (see the module docstring)."""
    vdb = binhost.installed(f"var/db/pkg/{cpv}")
    assert vdb.is_dir(), f"{cpv} is not installed on the target"
    md5 = vdb / "BINPKGMD5"
    assert md5.is_file(), f"{cpv} was compiled on the target, not installed from a binary"
    build_id = (vdb / "BUILD_ID").read_text().strip()
    category, pf = cpv.split("/")
    package = binhost.pkgdir / category / pf.rsplit("-", 1)[0] / f"{pf}-{build_id}.gpkg.tar"
    assert package.is_file(), (f"the target's {cpv} (build {build_id}) is not in our PKGDIR:"
                               f" {[str(p.relative_to(binhost.pkgdir)) for p in binhost.packages()]}")
    assert hashlib.md5(package.read_bytes()).hexdigest() == md5.read_text().strip(), \
        f"the target's {cpv} is another file than our {package.name}"
    cflags = (vdb / "CFLAGS").read_text()
    assert TARGET_MARK in cflags, f"{cpv} built with CFLAGS {cflags!r}, not the target's"
    assert not [mark for mark in ALL_MARKS if mark != TARGET_MARK and mark in cflags], cflags
    if program:
        data = binhost.installed(program).read_bytes()
        recorded = [mark for mark in ALL_MARKS if mark.encode() in data]
        assert recorded == [TARGET_MARK], f"{program} records the switches {recorded}"


def install_as_stage3_package(world, root, atom, mark=STAGE3_MARK):
    """Install ``atom`` into ``root`` the way a stage3 has its packages: a plain emerge, no
    --buildpkg, so no binary package is left anywhere."""
    run(["emerge", "--oneshot", "--quiet-build=y", atom],
        env=portage_env(world.portage_bin, root, CFLAGS=f"-O2 -pipe -frecord-gcc-switches {mark}",
                        FEATURES="-buildpkg -getbinpkg", PORTAGE_BINHOST=""),
        timeout=600)


# ------------------------------------------------------------------------------------------------
# (a) A dependency installed in the binhost root without a binary
# ------------------------------------------------------------------------------------------------

def stage3_situation(world, name):
    """Binhost root with app-misc/hello-1.1 installed (stage3-like, no binary), the target's
    configuration pulled, a signing key, and a target that trusts it and has nothing installed."""
    binhost = Binhost(world, name, make_conf=flags(STAGE3_MARK))
    install_as_stage3_package(world, binhost.root, "app-misc/hello")
    assert binhost.installed("var/db/pkg/app-misc/hello-1.1", root=binhost.root).is_dir()
    assert not binhost.packages(), "a stage3's packages come without binaries"
    binhost.add_target(make_conf=flags(TARGET_MARK))
    binhost.cli("config", "pull")
    binhost.cli("keygen")
    binhost.cli("setup-target")
    assert not list(binhost.installed("var/db/pkg").glob("*/*")), "the target starts empty"
    return binhost


def test_dependency_installed_without_a_binary_is_built_for_the_target(world):
    binhost = stage3_situation(world, "stage3")

    # doctor already sees the gap, and why.
    coverage = binhost.doctor("app-misc/hello-app")["coverage"]
    assert coverage["status"] == "FAIL", coverage
    assert "0 of 2 packages from the binhost" in coverage["detail"], coverage
    assert "app-misc/hello-1.1 (installed in the binhost root without a binary" in coverage["detail"]

    result = binhost.cli("emerge", "app-misc/hello-app")
    shown = output_of(result)
    assert "would merge 2 package(s): 0 with a binary here, 2 to build" in shown, shown
    hello_line = next((line for line in shown.splitlines() if "app-misc/hello-1.1" in line
                       and "(" in line), "")
    assert "installed in the binhost root without a binary" in hello_line, shown
    assert re.search(r"app-misc/hello-app-1\.0\S*\s+\(no binary yet\)", shown), shown

    assert_from_our_binhost(binhost, "app-misc/hello-app-1.0", "usr/bin/hello-app")
    assert_from_our_binhost(binhost, "app-misc/hello-1.1", "usr/bin/hello")
    assert run([binhost.installed("usr/bin/hello-app")]).stdout == "hello-app from binhost\n"
    assert run([binhost.installed("usr/bin/hello")]).stdout == "hello from binhost\n"
    assert "app-misc/hello-app" in binhost.installed("var/lib/portage/world").read_text()
    # The rebuild is what the binhost root has installed now: the target's build, not the stage3's.
    binhost_cflags = binhost.installed("var/db/pkg/app-misc/hello-1.1/CFLAGS", root=binhost.root)
    assert TARGET_MARK in binhost_cflags.read_text()


def test_pretend_emerge_prints_the_plan_and_builds_nothing(world):
    binhost = stage3_situation(world, "stage3-pretend")
    index_before = (binhost.pkgdir / "Packages").read_text() if (binhost.pkgdir / "Packages").exists() else None

    result = binhost.cli("--pretend", "emerge", "app-misc/hello-app")
    shown = output_of(result)
    assert "would merge 2 package(s): 0 with a binary here, 2 to build" in shown, shown
    hello_line = next((line for line in shown.splitlines() if "app-misc/hello-1.1" in line
                       and "(" in line), "")
    assert "installed in the binhost root without a binary" in hello_line, shown
    assert re.search(r"app-misc/hello-app-1\.0\S*\s+\(no binary yet\)", shown), shown
    # The commands it would run: the build of exactly these two, then the install.
    build = next((line for line in result.stdout.splitlines() if "--getbinpkg=n" in line), "")
    assert "=app-misc/hello-app-1.0::binhost-test" in build and "=app-misc/hello-1.1::binhost-test" in build, \
        result.stdout
    assert "--getbinpkg=n" in build, build
    assert any("--getbinpkgonly" in line for line in result.stdout.splitlines()), result.stdout

    assert not binhost.packages(), "--pretend built something"
    after = (binhost.pkgdir / "Packages").read_text() if (binhost.pkgdir / "Packages").exists() else None
    assert after == index_before
    assert not list(binhost.installed("var/db/pkg").glob("*/*")), "--pretend installed something"
    # The binhost root still has only the stage3's build.
    cflags = binhost.installed("var/db/pkg/app-misc/hello-1.1/CFLAGS", root=binhost.root).read_text()
    assert STAGE3_MARK in cflags and TARGET_MARK not in cflags


# ------------------------------------------------------------------------------------------------
# (b) FEATURES=getbinpkg and a second binhost in the target's configuration
# ------------------------------------------------------------------------------------------------

def test_getbinpkg_and_another_binhost_do_not_replace_our_build(world):
    # The other binhost: a generic build of greet (same version, same USE, other CFLAGS), unsigned,
    # served by python -m http.server and named `localhost` (Portage caches indexes per host name).
    other = Binhost(world, "generic", make_conf='USE="loud"\n' + flags(GENERIC_MARK))
    other.cli("build", "--oneshot", "app-misc/greet")
    generic_packages = other.packages("greet")
    assert len(generic_packages) == 1

    binhost = Binhost(world, "getbinpkg", tunnel=False)
    target = binhost.add_target(make_conf=flags(TARGET_MARK) + 'FEATURES="${FEATURES} getbinpkg"\n')
    with http_server(other.pkgdir) as generic_url:
        generic_url = generic_url.replace("127.0.0.1", "localhost")
        # Priority 1, as a stage3's entry for Gentoo's binhost: it loses ties against ours (10).
        write_binrepo(target, "generic", generic_url, priority=1, verify_signature=False)
        binhost.cli("config", "pull")
        pulled = binhost.root / "etc/portage"
        assert "getbinpkg" in (pulled / "make.conf").read_text()
        assert generic_url in (pulled / "binrepos.conf/generic.conf").read_text()
        binhost.cli("keygen")
        with binhost.serving():
            binhost.cli("setup-target")
            doctor = binhost.doctor("app-misc/greet")
            result = binhost.cli("emerge", "app-misc/greet")
        log = (other.pkgdir.parent / ("http-%s.log" % generic_url.rstrip("/").rsplit(":", 1)[1])).read_text()

    shown = output_of(result)
    assert "would merge 1 package(s): 0 with a binary here, 1 to build" in shown, shown
    build = shown[shown.index(">>> Building in"):shown.index(">>> Installing on")]
    assert "Emerging (1 of 1) app-misc/greet-1.0" in build, build
    assert "Emerging binary" not in build, "the build downloaded the other binhost's package:\n" + build
    assert not re.search(r"GET /\S*greet", log), "something fetched the generic greet:\n" + log
    ours = binhost.packages("greet")
    assert len(ours) == 1, ours
    assert hashlib.md5(ours[0].read_bytes()).digest() != hashlib.md5(generic_packages[0].read_bytes()).digest()
    assert_from_our_binhost(binhost, "app-misc/greet-1.0", "usr/bin/greet")
    assert run([binhost.installed("usr/bin/greet")]).stdout == "HELLO FROM GREET\n"
    assert binhost.installed("usr/share/greet/use.txt").read_text() == "loud\n"

    others = doctor.get("other binhosts")
    assert others and others["status"] == "WARN" and generic_url in others["detail"], doctor


# ------------------------------------------------------------------------------------------------
# (c) A relative make.profile
# ------------------------------------------------------------------------------------------------

RELATIVE_PROFILE = f"../../var/db/repos/{REPO_NAME}/profiles/default"


def relative_profile_situation(world, name):
    """A target whose make.profile is ../../var/db/repos/binhost-test/profiles/default, its
    repository at ROOT/var/db/repos/binhost-test (repos.conf names that absolute location), and a
    binhost root (stage3-like: an etc/portage of its own) with the target's configuration pulled."""
    binhost = Binhost(world, name, make_conf=flags(STAGE3_MARK))
    target_root = binhost.base / "target"
    repository = target_root / "var/db/repos" / REPO_NAME
    shutil.copytree(REPO, repository, symlinks=True)
    binhost.add_target(make_conf=flags(TARGET_MARK), repo=repository)
    profile = target_root / "etc/portage/make.profile"
    profile.unlink()
    profile.symlink_to(RELATIVE_PROFILE)
    assert profile.resolve() == (repository / "profiles/default").resolve()
    assert f"location = {repository}\n" in (
        target_root / f"etc/portage/repos.conf/{REPO_NAME}.conf").read_text()

    pull = binhost.cli("config", "pull")
    copied = binhost.root / "etc/portage/make.profile"
    assert os.readlink(copied) == RELATIVE_PROFILE
    assert copied.exists(), (f"the binhost's make.profile -> {RELATIVE_PROFILE} does not resolve after"
                             f" config pull:\n{output_of(pull)}")
    link = binhost.root / "var/db/repos" / REPO_NAME
    assert link.is_symlink() and link.resolve() == repository.resolve(), output_of(pull)
    return binhost, pull


def test_relative_make_profile_resolves_after_pull(world):
    binhost, pull = relative_profile_situation(world, "relprofile")
    assert "does not resolve" not in output_of(pull)
    binhost.cli("keygen")
    binhost.cli("setup-target")

    result = binhost.cli("emerge", "app-misc/hello-app")
    assert "Your current profile is invalid" not in output_of(result)
    assert_from_our_binhost(binhost, "app-misc/hello-app-1.0", "usr/bin/hello-app")
    assert_from_our_binhost(binhost, "app-misc/hello-1.1", "usr/bin/hello")
    assert run([binhost.installed("usr/bin/hello-app")]).stdout == "hello-app from binhost\n"

    binhost.cli("build", "--oneshot", "app-misc/greet")
    assert len(binhost.packages("greet")) == 1

    report = binhost.doctor("app-misc/hello-app")
    assert report["profile"]["status"] == "OK", report["profile"]
    assert report["configuration"]["status"] == "OK", report["configuration"]
    assert report["coverage"]["status"] == "OK", report["coverage"]


def test_doctor_fails_an_unresolved_profile_and_config_pull_repairs_it(world):
    binhost, _ = relative_profile_situation(world, "relprofile-repair")
    link = binhost.root / "var/db/repos" / REPO_NAME
    link.unlink()
    report = binhost.doctor()
    assert report["profile"]["status"] == "FAIL", report["profile"]
    assert "does not resolve" in report["profile"]["detail"], report["profile"]
    assert "config pull" in report["profile"]["detail"], report["profile"]

    # What doctor advises must work, also when the configuration itself is unchanged.
    binhost.cli("config", "pull")
    assert link.is_symlink(), ("config pull with an unchanged configuration did not link the"
                               " repository make.profile points into")
    assert (binhost.root / "etc/portage/make.profile").exists()
    assert binhost.doctor()["profile"]["status"] == "OK"


# ------------------------------------------------------------------------------------------------
# (d) getuto on the target, no keyring yet
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def short_base():
    """A 0755 directory with a short path, removed afterwards: getuto's gpg-agent puts its
    sockets in ROOT/etc/portage/gnupg.getuto.tmp, and a socket path may have at most 107 bytes."""
    base = Path(tempfile.mkdtemp(prefix="gbc-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def colon_records(listing, kinds):
    return [line.split(":") for line in listing.splitlines() if line.split(":")[0] in kinds]


def test_getuto_runs_first_then_our_key_is_lsigned(world, short_base):
    need((GETUTO_DIR / "getuto").is_file(), f"{GETUTO_DIR}/getuto missing")
    need(shutil.which("openssl"), "getuto needs openssl")
    binhost = Binhost(world, "getuto", base=short_base)
    target = binhost.add_target(make_conf=flags(TARGET_MARK),
                                path=f"{GETUTO_DIR}:{world.portage_bin}")
    binhost.cli("config", "pull")
    binhost.cli("keygen")
    binhost.cli("build", "--oneshot", "app-misc/hello")

    # A throwaway "Gentoo release key", where getuto reads it: ${ROOT}/usr/share/openpgp-keys.
    scratch = binhost.base / "release-gnupg"
    scratch.mkdir(mode=0o700)
    gpg_scratch = ["gpg", "--homedir", scratch, "--batch", "--no-tty"]
    try:
        run(gpg_scratch + ["--passphrase", "", "--quick-generate-key",
                           "Gentoo Linux Release Engineering (Test Key) <releng@gentoo.invalid>",
                           "ed25519", "sign", "never"])
        release_fpr = next(r[9] for r in colon_records(
            run(gpg_scratch + ["--with-colons", "--list-keys"]).stdout, ("fpr",)))
        keys = target / "usr/share/openpgp-keys"
        keys.mkdir(parents=True)
        (keys / "gentoo-release.asc").write_text(run(gpg_scratch + ["--armor", "--export", release_fpr]).stdout)
    finally:
        run(["gpgconf", "--homedir", scratch, "--kill", "all"], check=False)

    home = target / "etc/portage/gnupg"
    assert not home.exists()
    setup = binhost.cli("setup-target")
    shown = output_of(setup)
    assert "getuto set up" in shown, shown
    assert "lsigned with getuto's local key" in shown, shown
    assert "accepts packages signed by" in shown, shown

    # getuto's keyring: its pass file and local key, and the release key lsigned (full validity).
    assert (home / "pass").is_file() and (home / "mykeyid").is_file(), sorted(p.name for p in home.iterdir())
    local_fprs = (home / "mykeyid").read_text().split()
    gpg = ["gpg", "--homedir", home, "--batch", "--no-tty"]
    listing = run(gpg + ["--with-colons", "--list-keys", release_fpr]).stdout
    assert [r[1] for r in colon_records(listing, ("pub", "uid"))] and all(
        r[1] in ("f", "u") for r in colon_records(listing, ("pub", "uid"))), listing

    # Our key: lsigned by getuto's local key, valid, and not a second ultimately trusted key.
    ours = next(line.split("=", 1)[1].strip() for line in binhost.config.read_text().splitlines()
                if line.startswith("signing-key"))
    sigs = run(gpg + ["--with-colons", "--check-sigs", ours]).stdout
    lsigs = [r for r in colon_records(sigs, ("sig",)) if r[10].endswith("l")]
    assert any(local.endswith(r[4]) for r in lsigs for local in local_fprs), sigs
    assert all(r[1] in ("f", "u") for r in colon_records(sigs, ("pub",))), sigs
    trust = run(gpg + ["--export-ownertrust"]).stdout
    assert f"{ours}:6:" not in trust, trust
    assert f"{release_fpr}:6:" not in trust, "getuto lsigns the release keys, it does not trust them"

    binhost.cli("install", "app-misc/hello")
    assert_from_our_binhost(binhost, "app-misc/hello-1.1", "usr/bin/hello")
    assert run([binhost.installed("usr/bin/hello")]).stdout == "hello from binhost\n"
