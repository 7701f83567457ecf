"""Shared fixtures and helpers for the gentoo-binhost.py test suite.

Integration tests drive real components: Portage 3.0.83 from PyPI (installed in
the project's .venv, a *prefix* install: EPREFIX is the venv directory), a real
OpenSSH sshd on 127.0.0.1 and real gpg. Read ../shared/reference/
portage-on-debian.md (or the README) for the recipe; traps found while writing
these fixtures that are not in those notes (all reproduced here):

* PKGDIR, DISTDIR and PORTAGE_TMPDIR are NOT prefixed: `portageq envvar
  PKGDIR` says /var/cache/binpkgs, the real machine's. Every config written
  below sets all three inside its own root.
* Downloaded binary packages do not go to the target's PKGDIR. A named
  binrepos.conf entry caches them in its `location`, default
  ${EPREFIX}/var/cache/binhost/<name>: the HOST's EPREFIX (the shared,
  persistent venv), not ROOT. Set `location` per test (write_binrepo does).
  The fetched index is cached at $EROOT/var/cache/edb/binhost/<host>/Packages,
  keyed by host name WITHOUT the port. If `location` equals PKGDIR, Portage
  injects downloads into PKGDIR as before.
* emerge.log/emerge-fetch.log and the ebuild metadata cache (edb/dep) always
  go to the host's <venv>/var/log and <venv>/var/cache/edb, whatever ROOT is.
* `portageq get_repos /` fails here ("only supports <eroot>s ending in
  '<venv>'"): portageq's <eroot> argument must be ROOT+EPREFIX. Worse, for
  get_repos/get_repo_path/repos_config portageq forces PORTAGE_CONFIGROOT to
  that EROOT, so it reads <ROOT><venv>/etc/portage, not <ROOT>/etc/portage,
  and silently reports the built-in "gentoo" defaults. write_portage_config(
  ..., eprefix=...) adds a link so both agree. `portageq envvar` is fine.
* With the recipe's sshd_config, `scp` fails ("subsystem request failed ...
  Connection closed"): OpenSSH 9.x scp uses SFTP, so sshd needs a
  `Subsystem sftp` line (internal-sftp below).
* Non-interactive ssh on this machine runs root's ~/.bashrc, so the remote
  PATH is the login user's (pyenv, cargo...), never the venv: remote Portage
  commands need PATH=<venv>/bin:... or absolute paths.
* The packaged default repos.conf always adds a broken [gentoo] section; its
  "!!! ... /var/db/repos/gentoo" warnings on stderr are expected noise.

`make test` runs the files in two processes (pytest-xdist, --dist loadfile). Each has its own
session fixtures (sshd, world, chroot copy, temporary directories). What they share is safe to
share: the venv's own /etc/portage (written atomically, the same content from both), the chroot
image cache (built under a lock), and the prefix's package database and metadata cache (Portage
locks them). A test that changes something global must use names of its own (ports from
free_port, unique package or target names).
"""

import contextlib
import fcntl
import importlib.util
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------
# Locations and the "skip or fail" policy
# ---------------------------------------------------------------------------

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_DIR = TESTS_DIR.parent
SCRIPT = PROJECT_DIR / "gentoo-binhost.py"
#: The tiny ebuild repository (repo name ``binhost-test``) the tests build from.
REPO = TESTS_DIR / "repo"
REPO_NAME = "binhost-test"

#: On CI (.ci/run) missing prerequisites are failures, not skips.
REQUIRE_INTEGRATION = os.environ.get("GENTOO_BINHOST_REQUIRE_INTEGRATION") == "1"

#: make.conf lines every Portage config in the tests needs (root, no portage
#: user, no sandbox binaries on Debian).
PORTAGE_FEATURES = (
    "-sandbox -usersandbox -userpriv -usersync -ipc-sandbox "
    "-network-sandbox -pid-sandbox -mount-sandbox"
)


def need(condition, reason):
    """Skip the test unless ``condition`` holds; fail instead on CI.

    Returns ``condition`` so it can be used inline.
    """
    if not condition:
        if REQUIRE_INTEGRATION:
            pytest.fail("integration prerequisite missing: " + reason, pytrace=False)
        pytest.skip(reason)
    return condition


# ---------------------------------------------------------------------------
# The order test files start in
# ---------------------------------------------------------------------------

#: Files whose first set-up on a new machine is long and runs alone in one process: started
#: first, so the other processes run the rest meanwhile (the arm64 image: about 5 minutes).
STARTED_FIRST = ("test_arm64_build.py",)


def pytest_configure(config):
    # pytest-xdist hands out files by their number of tests, which would start STARTED_FIRST last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """STARTED_FIRST, then the files with the most tests first (what pytest-xdist does by itself),
    each file's tests in their own order."""
    def file_of(item):
        return item.nodeid.split("::", 1)[0]
    counts = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1
    items.sort(key=lambda item: (item.path.name not in STARTED_FIRST, -counts[file_of(item)], file_of(item)))


# ---------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------

_MAX_SHOWN = 20000  # characters of stdout/stderr shown in a failure message


def _tail(text, limit=_MAX_SHOWN):
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > limit:
        return "[... %d characters cut ...]\n" % (len(text) - limit) + text[-limit:]
    return text


def _describe(argv, returncode, stdout, stderr, what="exit code %s"):
    shown = " ".join(shlex.quote(str(a)) for a in argv) if not isinstance(argv, str) else argv
    return (
        "command failed (" + (what % returncode) + "):\n  " + shown
        + "\n--- stdout ---\n" + _tail(stdout)
        + "\n--- stderr ---\n" + _tail(stderr)
    )


def run(argv, env=None, check=True, *, cwd=None, input=None, timeout=900,
        inherit_env=True, **kwargs):
    """Run ``argv`` and return a CompletedProcess with text stdout/stderr.

    ``env`` holds variables *added to* os.environ (values converted with str);
    pass ``inherit_env=False`` to run with exactly ``env``. With ``check``
    (default) a non-zero exit, like a timeout, raises AssertionError showing
    argv, exit code, stdout and stderr.
    """
    argv = [str(a) for a in argv]
    full_env = dict(os.environ) if inherit_env else {}
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    try:
        proc = subprocess.run(
            argv, env=full_env, cwd=cwd, input=input, timeout=timeout,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, errors="replace", **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(_describe(
            argv, timeout, exc.stdout, exc.stderr, "timed out after %ss")) from None
    if check and proc.returncode != 0:
        raise AssertionError(_describe(argv, proc.returncode, proc.stdout, proc.stderr))
    return proc


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range: a port
    the kernel hands out (bind to 0) may be taken meanwhile as the local port of another test
    process's connection (its ssh, its fetches), and a server of ours could then not listen there."""
    ephemeral_from = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200 if ephemeral_from > 2048 else 0):
        port = random.randrange(max(1024, ephemeral_from - 16384), ephemeral_from)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, host="127.0.0.1", timeout=15.0, proc=None):
    """Wait until ``host:port`` accepts TCP connections.

    If ``proc`` (a Popen) exits meanwhile, fail early. Returns True/False.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(proc, timeout=10):
    """Terminate a Popen we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextlib.contextmanager
def binhost_serving(config, port):
    """``gentoo-binhost.py -c config serve`` running (on ``port``, as the config says) for the
    duration; stopped on exit."""
    server = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(config), "serve"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for_port(port, proc=server), server.stderr.read()
        yield server
    finally:
        stop_process(server)


@contextlib.contextmanager
def http_server(directory, port=None):
    """Serve ``directory`` with ``python3 -m http.server`` on 127.0.0.1.

    Yields the base URL ("http://127.0.0.1:PORT/"); stops the server on exit.
    The access log (stderr) is kept in ``<directory>/../http-PORT.log`` only if
    that parent is writable; otherwise it is discarded.
    """
    port = port or free_port()
    log_path = Path(directory).resolve().parent / ("http-%d.log" % port)
    try:
        log = open(log_path, "w")
    except OSError:
        log = open(os.devnull, "w")
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
             str(port), "--directory", str(directory)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            if not wait_for_port(port, proc=proc):
                raise AssertionError("http.server on port %d did not start (see %s)"
                                     % (port, log_path))
            yield "http://127.0.0.1:%d/" % port
        finally:
            stop_process(proc)


# ---------------------------------------------------------------------------
# Portage
# ---------------------------------------------------------------------------

def eroot(root, eprefix):
    """EROOT = ROOT + EPREFIX as a Path: where emerge merges files for ROOT."""
    return Path(root) / str(eprefix).lstrip("/")


def portage_env(portage_bin, root=None, **extra):
    """Environment additions for running Portage tools.

    PATH gets ``portage_bin`` first; with ``root``, ROOT and PORTAGE_CONFIGROOT
    are set to it (trailing slash, as Portage normalises it). ``extra`` is
    added verbatim (values converted with str). Use as ``run(..., env=...)``.
    """
    env = {
        "PATH": os.pathsep.join([str(portage_bin), os.environ.get("PATH", "/usr/bin:/bin")]),
        "PORTAGE_USERNAME": "root",
        "PORTAGE_GRPNAME": "root",
    }
    if root is not None:
        root = str(root).rstrip("/") + "/"
        env["ROOT"] = root
        env["PORTAGE_CONFIGROOT"] = root
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _replace_symlink(link, target):
    """Make ``link`` a symlink to ``target``; atomic, untouched if already so."""
    link = Path(link)
    if link.is_symlink():
        if os.readlink(str(link)) == str(target):
            return
    elif link.is_dir():
        shutil.rmtree(str(link))
    tmp = link.with_name(".%s.tmp-%d" % (link.name, os.getpid()))
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(str(tmp), str(link))


def _write_file(path, text):
    """Write ``text`` to ``path`` atomically; untouched if already equal.

    Concurrent test runs share the host config in the venv: never let an
    emerge read a half-written make.conf.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(str(path))
    elif path.is_file():
        try:
            if path.read_text() == text:
                return
        except (OSError, UnicodeDecodeError):
            pass
    tmp = path.with_name(".%s.tmp-%d" % (path.name, os.getpid()))
    tmp.write_text(text)
    os.replace(str(tmp), str(path))


def write_portage_config(config_root, *, repo=REPO, extra_make_conf="", profile="default",
                         eprefix=None, chroot=None, var_root=None):
    """Write a complete Portage configuration under ``config_root/etc/portage``.

    * ``make.profile`` -> ``<repo>/profiles/<profile>`` (absolute symlink)
    * ``repos.conf/binhost-test.conf``: [DEFAULT] main-repo, [binhost-test]
      location = repo (a directory, as on real systems; a plain file left by
      someone else is replaced)
    * ``make.conf``: FEATURES without sandboxes, PORTAGE_USERNAME/GRPNAME=root,
      PORTAGE_TMPDIR=<root>/var/tmp, DISTDIR=<root>/var/cache/distfiles,
      PKGDIR=<root>/var/cache/binpkgs, CFLAGS="-O2 -pipe", then
      ``extra_make_conf`` (later assignments win, so it can override these).

    Creates those directories. Overwrites only the files it names, so it is
    idempotent. Returns the Path of ``config_root/etc/portage``.

    With ``eprefix`` (the ``eprefix`` fixture), also links
    ``<config_root><eprefix>/etc/portage`` -> ``config_root/etc/portage``:
    portageq's <eroot> commands (get_repos, get_repo_path, repos_config...)
    force PORTAGE_CONFIGROOT=<eroot> = ROOT+EPREFIX, so without the link they
    see Portage's built-in defaults instead of this config. On a real system
    EROOT == ROOT and no link is needed. Do not pass it for the host config.

    ``var_root`` (default: ``config_root``) is the directory PORTAGE_TMPDIR,
    DISTDIR and PKGDIR are put under (``var_root/var/tmp``...): "/" gives a
    real host's /var/tmp, /var/cache/distfiles, /var/cache/binpkgs.

    With ``chroot`` (a host directory), ``config_root``, ``repo``, ``eprefix``
    and ``var_root`` are paths *inside* that chroot: files are written under
    ``chroot/<config_root>/etc/portage`` and every path written into them
    (make.profile target, repository location, PORTAGE_TMPDIR...) is the
    chroot-internal one, so Portage run by ``chroot CHROOT ...`` finds them.
    The return value is then the host Path. See write_chroot_portage_config().
    """
    if chroot is None:
        config_root = Path(config_root)
        repo = Path(repo).resolve()

        def host(path):
            return path
    else:
        config_root, repo = Path(config_root), Path(repo)

        def host(path):
            return chroot_host_path(chroot, path)
    var_root = config_root if var_root is None else Path(var_root)
    if chroot is not None:
        for inside in (config_root, repo, var_root):
            if not inside.is_absolute():
                raise ValueError("paths inside a chroot must be absolute: %s" % inside)
    etc = config_root / "etc" / "portage"
    host(etc).mkdir(parents=True, exist_ok=True)

    tmpdir = var_root / "var" / "tmp"
    distdir = var_root / "var" / "cache" / "distfiles"
    pkgdir = var_root / "var" / "cache" / "binpkgs"
    for d in (tmpdir, distdir, pkgdir):
        host(d).mkdir(parents=True, exist_ok=True)

    _replace_symlink(host(etc) / "make.profile", repo / "profiles" / profile)

    repos_conf = host(etc) / "repos.conf"
    if repos_conf.is_symlink() or repos_conf.is_file():
        repos_conf.unlink()
    repos_conf.mkdir(exist_ok=True)
    _write_file(
        repos_conf / (REPO_NAME + ".conf"),
        "[DEFAULT]\n"
        "main-repo = %s\n"
        "\n"
        "[%s]\n"
        "location = %s\n"
        "auto-sync = no\n" % (REPO_NAME, REPO_NAME, repo)
    )

    _write_file(
        host(etc) / "make.conf",
        "# Written by tests/conftest.py write_portage_config()\n"
        'FEATURES="%s"\n'
        'PORTAGE_USERNAME="root"\n'
        'PORTAGE_GRPNAME="root"\n'
        'PORTAGE_TMPDIR="%s"\n'
        'DISTDIR="%s"\n'
        'PKGDIR="%s"\n'
        'CFLAGS="-O2 -pipe"\n'
        'CXXFLAGS="${CFLAGS}"\n'
        'CLEAN_DELAY="0"\n'
        'EMERGE_WARNING_DELAY="0"\n'
        % (PORTAGE_FEATURES, tmpdir, distdir, pkgdir)
        + (extra_make_conf.rstrip("\n") + "\n" if extra_make_conf else "")
    )

    if eprefix and str(eprefix).strip("/"):
        eroot_etc = eroot(host(config_root), eprefix) / "etc"
        eroot_etc.mkdir(parents=True, exist_ok=True)
        _replace_symlink(eroot_etc / "portage", etc.resolve() if chroot is None else etc)
    return host(etc)


def write_binrepo(config_root, name, sync_uri, *, priority=10, verify_signature=False,
                  location=None, extra=""):
    """Write ``config_root/etc/portage/binrepos.conf/<name>.conf``.

    ``location`` (where emerge caches downloaded packages) defaults to
    ``config_root/var/cache/binhost/<name>``: Portage's own default is
    ``${EPREFIX}/var/cache/binhost/<name>``, i.e. inside the shared venv here,
    not under ROOT and not in PKGDIR. ``%`` in values must be written ``%%``.
    Returns the Path of the file.
    """
    config_root = Path(config_root)
    directory = config_root / "etc" / "portage" / "binrepos.conf"
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    if location is None:
        location = config_root / "var" / "cache" / "binhost" / name
    path = directory / (name + ".conf")
    _write_file(path, 
        "[%s]\n"
        "sync-uri = %s\n"
        "priority = %d\n"
        "verify-signature = %s\n"
        "location = %s\n" % (name, sync_uri, priority,
                              "true" if verify_signature else "false", location)
        + (extra.rstrip("\n") + "\n" if extra else "")
    )
    return path


# ---------------------------------------------------------------------------
# A chroot standing in for a Gentoo host (the ``host_chroot`` fixture)
# ---------------------------------------------------------------------------
#
# A Debian bookworm minbase chroot with gcc, gpg, zstd... and Portage 3.0.83 in
# a venv at /opt/portage (a prefix install: EPREFIX=/opt/portage, so files
# merge into ROOT/opt/portage/...). Built once with debootstrap into a cache
# (~45 s, ~540 MB) and copied for each test session. Traps:
#
# * The chroot cannot reach PyPI (TLS interception: only the host's pip config
#   knows the CA and the indexes), so the wheel is downloaded on the host and
#   installed in the chroot with --no-index.
# * Portage verifies signatures as `nobody`: every parent of the chroot must
#   be o+x, so it lives in /tmp/gentoo-binhost-chroot-* (0755), never in a
#   pytest tmp dir (0700).
# * Never delete a chroot that has something mounted in it: with /dev rbound,
#   `rm -rf` would delete the host's device nodes. remove_chroot() unmounts
#   everything under it first and then uses `rm -rf --one-file-system`.

CHROOT_SUITE = "bookworm"
CHROOT_PACKAGES = (
    "python3", "python3-venv", "gpg", "gpg-agent", "gpgconf", "zstd", "xz-utils",
    "bzip2", "gcc", "libc6-dev", "make", "patch", "rsync",
)
CHROOT_PORTAGE = "portage==3.0.83"
#: Where Portage is inside the chroot (EPREFIX) and its tools.
CHROOT_EPREFIX = "/opt/portage"
CHROOT_PORTAGE_BIN = CHROOT_EPREFIX + "/bin"
#: tests/repo is copied to this chroot-internal location.
CHROOT_REPO = "/var/db/repos/" + REPO_NAME
#: PATH for commands run inside the chroot.
CHROOT_PATH = CHROOT_PORTAGE_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"
#: Everything that makes a cache: a cache whose marker says otherwise is rebuilt. The mirror
#: is not part of it (any mirror of the suite gives the same chroot).
CHROOT_RECIPE = "debootstrap --variant=minbase --include=%s %s\npip %s\n" % (
    ",".join(CHROOT_PACKAGES), CHROOT_SUITE, CHROOT_PORTAGE)
_CHROOT_MARKER = "complete"
_CHROOT_COPY_PREFIX = "gentoo-binhost-chroot-"


APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")


def _deb822_stanzas(text):
    """The stanzas of a deb822 file as dicts {lower-case field: value} (comments dropped,
    continuation lines joined)."""
    stanzas, current, field = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, field = {}, None
        elif line[0] in " \t" and field:
            current[field] += " " + line.strip()
        elif ":" in line:
            field, value = line.split(":", 1)
            field = field.strip().lower()
            current[field] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _main_archive_uri_in_deb822(text, suite):
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        if suite not in stanza.get("suites", "").split():
            continue
        uris = stanza.get("uris", "").split()
        if uris:
            return uris[0]
    return None


def _main_archive_uri_in_list(text, suite):
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2 and words[1] == suite:
            return words[0]
    return None


def debian_mirror(suite=None, sources_list=None, sources_dir=None):
    """The first ``deb`` URI of Debian's main archive for ``suite`` (default CHROOT_SUITE) in
    this machine's apt sources: deb822 stanzas of ``sources.list.d/*.sources`` whose Suites
    include the suite itself (not ``-security`` nor ``-updates``), then ``deb URI SUITE ...``
    lines of ``sources.list`` and ``sources.list.d/*.list``. Disabled files (any other name,
    such as ``*.disabled``) and stanzas with ``Enabled: no`` are skipped. None when there is none.
    The project never names a registry's host itself: debootstrap uses the machine's mirror."""
    suite = suite or CHROOT_SUITE
    sources_list = Path(sources_list or APT_SOURCES_LIST)
    sources_dir = Path(sources_dir or APT_SOURCES_DIR)
    candidates = [(path, _main_archive_uri_in_deb822)
                  for path in sorted(sources_dir.glob("*.sources"))]
    candidates.append((sources_list, _main_archive_uri_in_list))
    candidates += [(path, _main_archive_uri_in_list) for path in sorted(sources_dir.glob("*.list"))]
    for path, find in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        uri = find(text, suite)
        if uri:
            return uri.rstrip("/")
    return None


def chroot_mirror():
    """debian_mirror(), or skip (fail on CI) when the apt sources name none."""
    mirror = debian_mirror()
    need(mirror is not None, "no Debian mirror in the apt sources")
    return mirror


def _recipe_without_mirror(marker_text):
    """A cache marker's recipe with the mirror left out of its debootstrap line: markers
    written before the mirror came from the apt sources named it as the last word."""
    lines = marker_text.split("\n")
    if lines and lines[0].startswith("debootstrap "):
        words = lines[0].split(" ")
        if len(words) == 5 and "://" in words[-1]:
            lines[0] = " ".join(words[:-1])
    return "\n".join(lines)


def chroot_cache_dir(arch=None):
    """The chroot cache: $GENTOO_BINHOST_TEST_CACHE, else
    ~/.cache/gentoo-binhost-tests/chroot-bookworm-v1. The chroot is its
    ``root`` subdirectory; a ``complete`` file marks a finished cache. Debian's
    ``arch`` (arm64) when not this machine's: a sibling named after it."""
    env = os.environ.get("GENTOO_BINHOST_TEST_CACHE")
    cache = (Path(env).expanduser().absolute() if env
             else Path.home() / ".cache" / "gentoo-binhost-tests" / "chroot-bookworm-v1")
    return cache.with_name(f"{cache.name}-{arch}") if arch else cache


#: An emulated root also has distcc's client: its compiles can go to a helper's cross compiler.
CHROOT_PACKAGES_EMULATED = ("distcc",)


def chroot_packages(arch=None):
    return CHROOT_PACKAGES + (CHROOT_PACKAGES_EMULATED if arch else ())


def chroot_recipe(arch=None):
    if not arch:
        return CHROOT_RECIPE
    return (f"arch {arch} (debootstrap --foreign, second stage emulated)\n" + CHROOT_RECIPE
            + "with " + ",".join(CHROOT_PACKAGES_EMULATED) + "\n")


def chroot_host_path(chroot, inside):
    """The host path of chroot-internal path ``inside`` (absolute or not)."""
    return Path(chroot) / str(inside).lstrip("/")


def _unescape_mountinfo(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path):
    """Mount points (str, shallowest first) at or below ``path``, from
    /proc/self/mountinfo."""
    base = os.path.realpath(str(path))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                point = _unescape_mountinfo(fields[4])
                if point == base or point.startswith(base.rstrip("/") + "/"):
                    found.append(point)
    return sorted(set(found), key=lambda p: (p.count("/"), p))


def umount_under(path):
    """Unmount everything at or below ``path`` (``umount -R -l``, outermost
    first); AssertionError if something is still mounted afterwards."""
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return
        top = [p for p in points
               if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in points)]
        for point in top:
            # Slave first: an unmount must never propagate to the host's own /dev or /sys.
            run(["mount", "--make-rslave", point], check=False)
            run(["umount", "-R", "-l", point], check=False)
    left = mounts_under(path)
    assert not left, "still mounted under %s: %s" % (path, left)


def processes_inside(chroot):
    """Processes whose root directory is chroot (a build left running in there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(chroot):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def remove_chroot(path):
    """Unmount everything under ``path``, then delete it (never crossing into
    another file system)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    umount_under(path)
    run(["rm", "-rf", "--one-file-system", path])


@contextlib.contextmanager
def chroot_mounts(chroot):
    """Mount /proc (new proc), /sys and /dev (recursive binds made slaves, so
    unmounting them never propagates to the host) in ``chroot``; ``umount -R``
    them on exit, whatever happens."""
    chroot = Path(chroot)
    mounted = []
    try:
        for name, argv in (
            ("proc", ["mount", "-t", "proc", "proc"]),
            ("sys", ["mount", "--rbind", "--make-rslave", "/sys"]),  # slave in the same call
            ("dev", ["mount", "--rbind", "--make-rslave", "/dev"]),
        ):
            target = chroot / name
            target.mkdir(exist_ok=True)
            run(argv + [target])
            mounted.append(target)
        yield chroot
    finally:
        for target in reversed(mounted):
            run(["mount", "--make-rslave", target], check=False)
            if run(["umount", "-R", target], check=False).returncode != 0:
                run(["umount", "-R", "-l", target], check=False)
        umount_under(chroot)


def write_chroot_portage_config(chroot_root, config_root_inside, extra_make_conf="", *,
                                repo_inside=CHROOT_REPO, eprefix=None):
    """write_portage_config() for a ROOT inside the chroot ``chroot_root``.

    ``config_root_inside`` is chroot-internal (e.g. "/binhost"): the files land
    on the host at ``chroot_root/binhost/etc/portage`` and every path in them
    is chroot-internal (PORTAGE_TMPDIR=/binhost/var/tmp, PKGDIR=
    /binhost/var/cache/binpkgs, repository at ``repo_inside``, the copy of
    tests/repo). ``eprefix=CHROOT_EPREFIX`` adds the portageq link (see
    write_portage_config). Returns the host Path of that etc/portage.
    """
    return write_portage_config(config_root_inside, repo=repo_inside,
                                extra_make_conf=extra_make_conf, eprefix=eprefix,
                                chroot=chroot_root)


def _chroot_argv(chroot, argv, env=None):
    """``chroot CHROOT env -i PATH=... HOME=/root [K=V...] argv``."""
    words = ["PATH=" + CHROOT_PATH, "HOME=/root", "LC_ALL=C.UTF-8"]
    words += ["%s=%s" % (k, v) for k, v in (env or {}).items()]
    return ["chroot", str(chroot), "env", "-i"] + words + [str(a) for a in argv]


def build_chroot_cache(cache, arch=None):
    """Build the chroot cache at ``cache`` (see chroot_cache_dir()).

    Builds into a temporary sibling and renames it into place only once the
    ``complete`` marker is written, so an interrupted run never leaves a
    half-made cache (its leftovers are removed by the next build). Returns a
    dict of timings in seconds.
    """
    cache = Path(cache)
    tmp = Path(tempfile.mkdtemp(dir=str(cache.parent), prefix=cache.name + ".tmp-"))
    timings = {}
    mirror = chroot_mirror()
    try:
        os.chmod(str(tmp), 0o755)
        root = tmp / "root"
        start = time.monotonic()
        run([shutil.which("debootstrap") or "/usr/sbin/debootstrap", "--variant=minbase"]
            + ([f"--arch={arch}", "--foreign"] if arch else [])
            + ["--include=" + ",".join(chroot_packages(arch)), CHROOT_SUITE, root, mirror],
            timeout=1800)
        if arch:  # its programs run through qemu-user (binfmt_misc with the F flag)
            run(["chroot", root, "/debootstrap/debootstrap", "--second-stage"], timeout=1800)
        timings["debootstrap"] = time.monotonic() - start
        umount_under(root)  # debootstrap unmounts its /proc and /sys, but be sure

        start = time.monotonic()
        wheels = root / "tmp" / "wheels"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-d", wheels, CHROOT_PORTAGE], timeout=600)
        run(_chroot_argv(root, ["python3", "-m", "venv", CHROOT_EPREFIX]))
        run(_chroot_argv(root, [CHROOT_PORTAGE_BIN + "/pip", "install", "--quiet",
                                "--disable-pip-version-check", "--no-index",
                                "--find-links", "/tmp/wheels", CHROOT_PORTAGE]))
        shutil.rmtree(str(wheels))
        for tool in PORTAGE_TOOLS:
            assert (root / CHROOT_PORTAGE_BIN.lstrip("/") / tool).exists(), \
                "%s missing in the chroot's %s" % (tool, CHROOT_PORTAGE_BIN)
        timings["portage"] = time.monotonic() - start

        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (tmp / _CHROOT_MARKER).write_text(chroot_recipe(arch))
        os.rename(str(tmp), str(cache))
    finally:
        if tmp.exists():
            remove_chroot(tmp)
    return timings


def ensure_chroot_cache(cache=None, arch=None):
    """The chroot cache directory, built first if missing or made from another
    recipe. Concurrent runs wait for each other (a lock file beside it).
    Returns (cache Path, timings dict: empty when the cache was reused)."""
    cache = Path(cache or chroot_cache_dir(arch))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(str(cache.parent / ("." + cache.name + ".lock")), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = cache / _CHROOT_MARKER
        if marker.is_file() and _recipe_without_mirror(marker.read_text()) == chroot_recipe(arch):
            return cache, {}
        # Holding the lock: leftovers of interrupted builds and stale caches can go.
        for stale in cache.parent.glob(cache.name + ".tmp-*"):
            remove_chroot(stale)
        mirror = chroot_mirror()
        parsed = urllib.parse.urlsplit(mirror)
        try:
            socket.create_connection(
                (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                timeout=10).close()
            online = True
        except (OSError, TypeError):
            online = False
        need(online, "no network to %s: cannot build the chroot cache %s" % (mirror, cache))
        remove_chroot(cache)
        return cache, build_chroot_cache(cache, arch)


def copy_of_chroot_image(destination, arch=None):
    """A binhost root: a copy of the cached debootstrap + PyPI Portage image (ensure_chroot_cache)
    at destination, world-readable (Portage verifies as `nobody`)."""
    cache, _timings = ensure_chroot_cache(arch=arch)
    run(["cp", "-a", str(cache / "root") + "/.", destination])
    Path(destination).chmod(0o755)
    return Path(destination)


def _process_alive(pid):
    """True if ``pid`` runs (a zombie, which a container's init may never
    reap, counts as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _remove_stale_chroot_copies(parent):
    """Remove /tmp/gentoo-binhost-chroot-<pid>-* left (maybe still mounted)
    by test runs that were killed: their pid no longer runs."""
    for old in Path(parent).glob(_CHROOT_COPY_PREFIX + "*"):
        try:
            pid = int(old.name[len(_CHROOT_COPY_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _process_alive(pid):
            remove_chroot(old)


class HostChroot:
    """A per-session copy of the cached chroot (see the ``host_chroot`` fixture)."""

    portage_bin_inside = CHROOT_PORTAGE_BIN
    eprefix_inside = CHROOT_EPREFIX
    repo_inside = CHROOT_REPO

    def __init__(self, path, timings):
        self.path = Path(path)      # host path of the chroot's "/"
        self.timings = timings      # seconds: debootstrap, portage (only when built), copy

    def host_path(self, inside_path):
        """Host Path of the chroot-internal path ``inside_path``."""
        return chroot_host_path(self.path, inside_path)

    def argv(self, argv, env=None):
        """``chroot PATH env -i PATH=<portage bin>:... HOME=/root [env] argv``."""
        return _chroot_argv(self.path, argv, env)

    def run(self, argv, env=None, **kwargs):
        """run() ``argv`` inside the chroot with a clean environment (``env`` added).
        Mount /proc, /sys, /dev first (``with chroot.mounts():``) for Portage."""
        return run(self.argv(argv, env), **kwargs)

    def mounts(self):
        """Context manager: chroot_mounts(self.path)."""
        return chroot_mounts(self.path)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gb():
    """The gentoo-binhost.py script imported as module ``gentoo_binhost``."""
    spec = importlib.util.spec_from_file_location("gentoo_binhost", str(SCRIPT))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentoo_binhost"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("gentoo_binhost", None)
        raise
    return module


@pytest.fixture(scope="session")
def test_repo():
    """Path of the binhost-test ebuild repository (tests/repo). Read-only:
    copy it (shutil.copytree) before changing anything."""
    return REPO


PORTAGE_TOOLS = ("emerge", "portageq", "emaint", "gpkg-sign")


def find_portage_bin():
    """The directory holding Portage's tools (PORTAGE_TOOLS): next to sys.executable
    (the venv's bin) or emerge's on PATH. None when neither has them all."""
    candidates = [Path(sys.executable).parent]
    which = shutil.which("emerge")
    if which:
        candidates.append(Path(which).parent)
    for cand in candidates:
        if all((cand / t).exists() for t in PORTAGE_TOOLS):
            return cand
    return None


def portage_eprefix(python):
    """portage.const.EPREFIX (a str) as reported by ``python``, the interpreter with Portage."""
    proc = run([python, "-c", "import portage.const; print(portage.const.EPREFIX)"])
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def portage_bin():
    """Directory holding emerge, portageq, emaint, gpkg-sign, quickpkg, python."""
    found = find_portage_bin()
    need(found is not None, "Portage tools (%s) not found next to %s or on PATH; run `make deps`"
         % (", ".join(PORTAGE_TOOLS), sys.executable))
    return found


@pytest.fixture(scope="session")
def portage_python(portage_bin):
    """The Python interpreter that has Portage installed (the venv's)."""
    py = portage_bin / "python"
    return py if py.exists() else Path(sys.executable)


@pytest.fixture(scope="session")
def eprefix(portage_python):
    """portage.const.EPREFIX (a str: the venv directory) as Portage reports it."""
    value = portage_eprefix(portage_python)
    need(value.startswith("/"), "Portage reports no usable EPREFIX: %r" % value)
    return value


@pytest.fixture(scope="session")
def host_portage(eprefix, test_repo):
    """Configure the prefix install's own /etc/portage (<eprefix>/etc/portage).

    Every ``ROOT=X PORTAGE_CONFIGROOT=X emerge`` also reads it for the "/"
    tree. Points it at tests/repo with the same generic make.conf; idempotent.
    Returns the Path of <eprefix>/etc/portage.
    """
    return write_portage_config(Path(eprefix), repo=test_repo)


@pytest.fixture(scope="session")
def host_chroot():
    """A real chroot standing in for a Gentoo host, shared by the session.

    Debian bookworm (minbase + python3, gpg, zstd, gcc, make...) with Portage
    3.0.83 in a venv at /opt/portage (``.portage_bin_inside``, EPREFIX
    ``.eprefix_inside``), copied (``cp -a``) from the cache (built first if
    needed: ensure_chroot_cache) to /tmp/gentoo-binhost-chroot-<pid>-XXXX
    (0755), and deleted at the end after unmounting anything left under it.

    Configured like a host: tests/repo at /var/db/repos/binhost-test and the
    prefix install's own config in /opt/portage/etc/portage (PORTAGE_TMPDIR
    /var/tmp, DISTDIR /var/cache/distfiles, PKGDIR /var/cache/binpkgs). Write
    configs for ROOTs inside it with write_chroot_portage_config(). Mount
    /proc, /sys, /dev with ``with host_chroot.mounts():`` before running
    Portage (``host_chroot.run([...])``). Shared by every test of the
    session: use your own directories in it.

    Returns a HostChroot: .path, .portage_bin_inside, .eprefix_inside,
    .repo_inside, .timings, .host_path(inside), .argv(), .run(), .mounts().
    """
    need(os.geteuid() == 0, "the chroot fixture needs root")
    need(shutil.which("debootstrap") or Path("/usr/sbin/debootstrap").exists(),
         "debootstrap missing (apt-get install debootstrap)")
    need(shutil.which("chroot") and shutil.which("mount") and shutil.which("umount"),
         "chroot/mount/umount missing")
    cache, timings = ensure_chroot_cache()

    parent = Path("/tmp")
    _remove_stale_chroot_copies(parent)
    path = Path(tempfile.mkdtemp(dir=str(parent),
                                 prefix="%s%d-" % (_CHROOT_COPY_PREFIX, os.getpid())))
    try:
        os.chmod(str(path), 0o755)
        start = time.monotonic()
        run(["cp", "-a", str(cache / "root") + "/.", path])
        timings["copy"] = time.monotonic() - start
        os.chmod(str(path), 0o755)

        chroot = HostChroot(path, timings)
        resolv = chroot.host_path("/etc/resolv.conf")
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        with contextlib.suppress(OSError):
            shutil.copyfile("/etc/resolv.conf", str(resolv))
        repo = chroot.host_path(CHROOT_REPO)
        repo.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(str(REPO), str(repo), symlinks=True)
        write_portage_config(CHROOT_EPREFIX, repo=CHROOT_REPO, var_root="/", chroot=path)
        yield chroot
    finally:
        remove_chroot(path)


class SSHServer:
    """A running throwaway sshd on 127.0.0.1 (see the ``sshd`` fixture)."""

    def __init__(self, port, key, known_hosts, directory, log, config):
        self.port = port
        self.host = "root@127.0.0.1"
        self.key = key                   # Path: client private key
        self.known_hosts = known_hosts   # Path: contains the server host key
        self.dir = directory             # Path: everything of this sshd
        self.log = log                   # Path: sshd -E log
        self.sshd_config = config        # Path
        # Path: an ssh_config with a "Host binhost-target" alias (ssh -F FILE binhost-target)
        self.client_config = directory / "ssh_config"
        self.alias = "binhost-target"

    @property
    def ssh_options(self):
        """Options (without -p) as one string for shlex.split / a shell."""
        return " ".join(shlex.quote(a) for a in self.ssh_option_list)

    @property
    def ssh_option_list(self):
        return [
            "-i", str(self.key),
            "-o", "IdentitiesOnly=yes",
            "-o", "UserKnownHostsFile=%s" % self.known_hosts,
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
        ]

    def ssh_argv(self, *command):
        """argv for ``ssh -p PORT OPTIONS root@127.0.0.1 -- command...``.

        The remote side runs the words through a shell: quote them yourself
        (shlex.quote) when they contain shell syntax.
        """
        argv = ["ssh", "-p", str(self.port)] + self.ssh_option_list + [self.host]
        if command:
            argv += ["--"] + [str(c) for c in command]
        return argv

    def log_text(self):
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def start_sshd(directory, extra_config=""):
    """Run a real OpenSSH sshd on 127.0.0.1:<free port>, its files in ``directory``.

    Root login with a throwaway ed25519 key only; the host key is pre-put in
    ``known_hosts`` so clients use StrictHostKeyChecking=yes. Yields an
    SSHServer (.port, .host, .key, .known_hosts, .ssh_options, .ssh_argv())
    once a real ssh login works; stops sshd on exit. ``extra_config`` is appended
    to sshd_config (e.g. ``SetEnv`` lines for the sessions). Needs root, /usr/sbin/sshd,
    ssh and ssh-keygen (the ``sshd`` fixture checks them; callers outside pytest
    must check themselves).
    """
    sshd_bin = Path("/usr/sbin/sshd")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hostkey, client = d / "ssh_host_ed25519_key", d / "client_ed25519"
    for key in (hostkey, client):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "binhost-test",
             "-f", key])
    authorized = d / "authorized_keys"
    authorized.write_text((d / "client_ed25519.pub").read_text())
    authorized.chmod(0o600)

    port = free_port()
    host_pub = (d / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = d / "known_hosts"
    known_hosts.write_text("[127.0.0.1]:%d %s %s\n" % (port, host_pub[0], host_pub[1]))

    log, pidfile, config = d / "sshd.log", d / "sshd.pid", d / "sshd_config"
    config.write_text(
        "Port %d\n"
        "ListenAddress 127.0.0.1\n"
        "HostKey %s\n"
        "AuthorizedKeysFile %s\n"
        "PidFile %s\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "UseDNS no\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "X11Forwarding no\n"
        "AllowTcpForwarding yes\n"
        "MaxStartups 100:30:200\n"
        "MaxSessions 50\n"
        "LogLevel VERBOSE\n"
        "Subsystem sftp internal-sftp\n"
        % (port, hostkey, authorized, pidfile)
        + extra_config
    )
    (d / "ssh_config").write_text(
        "Host binhost-target\n"
        "    HostName 127.0.0.1\n"
        "    Port %d\n"
        "    User root\n"
        "    IdentityFile %s\n"
        "    IdentitiesOnly yes\n"
        "    UserKnownHostsFile %s\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n"
        "    LogLevel ERROR\n" % (port, client, known_hosts)
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    run([sshd_bin, "-t", "-f", config])

    proc = subprocess.Popen(
        [str(sshd_bin), "-D", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = SSHServer(port, client, known_hosts, d, log, config)
    try:
        if not wait_for_port(port, proc=proc):
            raise AssertionError("sshd did not start; log:\n" + server.log_text())
        run(server.ssh_argv("true"), timeout=30)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """Start a real OpenSSH sshd on 127.0.0.1:<free port> for the session.

    Root login with a throwaway ed25519 key only; the host key is pre-put in
    ``known_hosts`` so clients use StrictHostKeyChecking=yes. Returns an
    SSHServer (.port, .host, .key, .known_hosts, .ssh_options, .ssh_argv()).
    See start_sshd().
    """
    need(Path("/usr/sbin/sshd").exists(), "/usr/sbin/sshd missing (apt-get install openssh-server)")
    need(shutil.which("ssh") and shutil.which("ssh-keygen"), "ssh/ssh-keygen missing")
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


# ---------------------------------------------------------------------------
# The end-to-end world: a binhost root with packages built, signed and served
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def own_world(prefix, portage_bin, eprefix, sshd):
    """A World in a directory of its own, removed afterwards (for a module's own binhost and
    targets). Portage verifies signatures as nobody: every directory above the roots is 0755."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    try:
        yield World(base, portage_bin, eprefix, sshd), base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class World:
    """A binhost root with packages built, signed and served, plus helpers to add targets."""

    def __init__(self, base, portage_bin, eprefix, sshd):
        self.base = base
        self.portage_bin = portage_bin
        self.eprefix = eprefix
        self.sshd = sshd
        self.binhost = base / "binhost"
        self.pkgdir = self.binhost / "var/cache/binpkgs"
        self.port = free_port()
        self.config = base / "gentoo-binhost.conf"

    def binhost_section(self, pkgdir=None, port=None, gpg_home=None):
        lines = [f"root = {self.binhost}", f"url = http://127.0.0.1:{port or self.port}/",
                 "bind = 127.0.0.1", f"port = {port or self.port}"]
        if pkgdir:
            lines.append(f"pkgdir = {pkgdir}")
        if gpg_home:
            lines.append(f"gpg-home = {gpg_home}")
        return "[binhost]\n" + "\n".join(lines) + "\n"

    def cli(self, *args, config=None, check=True, timeout=600):
        env = {"PATH": f"{self.portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
        return run([sys.executable, SCRIPT, "-c", config or self.config] + list(args), env=env,
                   check=check, timeout=timeout)

    def new_target(self, name, use="loud", port=None, pkgdir=None, signing_config=None, extra_binhost="",
                   sshd=None):
        """A target ROOT with the binhost's profile and repository, and a config file for it
        (its [binhost] section copied from signing_config, else the world's)."""
        root = self.base / f"target-{name}"
        write_portage_config(root, extra_make_conf=(
            f'USE="{use}"\nBINPKG_GPG_VERIFY_GPG_HOME="{root}/etc/portage/gnupg"\n'))
        source = Path(signing_config or self.config).read_text()
        binhost = source.split("[target")[0]
        if port or pkgdir:
            extra = "".join(line + "\n" for line in binhost.splitlines()
                            if line.startswith(("signing-key", "gpg-home")))
            binhost = self.binhost_section(pkgdir=pkgdir, port=port) + extra
        binhost = binhost.rstrip("\n") + "\n" + extra_binhost
        config = self.base / f"{name}.conf"
        sshd = sshd or self.sshd
        # tree = own: this target's live tree is tests/repo itself, the binhost's too; following the
        # binhost's snapshot (tests/test_one_tree.py) needs a tree of its own.
        config.write_text(binhost + f"\n[target {name}]\nhost = {sshd.host}\n"
                          f"ssh-port = {sshd.port}\nssh-options = {sshd.ssh_options}\n"
                          f"root = {root}\npath = {self.portage_bin}\ntree = own\n")
        return root, config

    def installed(self, root, path):
        return eroot(root, self.eprefix) / path


@pytest.fixture(scope="session")
def binfmt_aarch64():
    """This machine's binfmt_misc, mounted, with qemu-user-static's aarch64 entry registered (as
    systemd-binfmt registers it at boot on Debian). Left so: test files in other processes use it
    too, and it is what the machine's own qemu-user-static means to have."""
    return register_qemu_aarch64()


def register_qemu_aarch64():
    """binfmt_aarch64's work (make bench uses it too)."""
    need(os.geteuid() == 0, "mounting binfmt_misc needs root")
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    need(conf.is_file(), "Debian's qemu-user-static (make system-deps installs it)")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        mounted = run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False)
        need(mounted.returncode == 0 or (binfmt / "status").exists(),
             f"binfmt_misc cannot be mounted here: {mounted.stderr.strip()}")
    if not (binfmt / "qemu-aarch64").exists():
        line = next(line for line in conf.read_text().splitlines() if line.startswith(":"))
        with contextlib.suppress(FileExistsError):  # another test process registered it meanwhile
            (binfmt / "register").write_text(line)
    return binfmt


@pytest.fixture(scope="session")
def world(portage_bin, eprefix, host_portage, sshd):
    # Portage verifies signatures as `nobody`, which cannot enter pytest's 0700 temporary dirs.
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-e2e-"))
    base.chmod(0o755)
    try:
        yield from populate_world(World(base, portage_bin, eprefix, sshd))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def populate_world(world):
    write_portage_config(world.binhost, extra_make_conf='USE="loud"\n')
    world.config.write_text(world.binhost_section())

    # Built before a key exists: unsigned, with a warning; `sign` fixes that afterwards.
    built = world.cli("build", "app-misc/hello-app", "app-misc/greet")
    assert "No signing key configured" in built.stderr
    packages = sorted(world.pkgdir.rglob("*.gpkg.tar"))
    assert len(packages) == 3
    world.cli("keygen")
    assert "signing-key = " in world.config.read_text()
    world.cli("sign")
    assert all(is_signed(package) for package in packages)

    with binhost_serving(world.config, world.port):
        yield world


def is_signed(path):
    with tarfile.open(path) as archive:
        return any(name.endswith(".sig") for name in archive.getnames())


def install_from(gb, world, pkgdir, name, atom="app-misc/hello", extra_binhost="", sshd=None,
                 scheme="http", **server_options):
    """Serve pkgdir in this process, set up a new target for it, try to install atom there.
    Returns (target root, the install's CompletedProcess, the binrepos entry written)."""
    server = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0),
                            **server_options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root, config = world.new_target(name, port=server.server_address[1], pkgdir=pkgdir,
                                        extra_binhost=extra_binhost, sshd=sshd)
        config.write_text(config.read_text().replace("url = http://", f"url = {scheme}://"))
        world.cli("setup-target", config=config)
        entry = (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
        return root, world.cli("install", atom, config=config, check=False), entry
    finally:
        server.shutdown()
        server.server_close()


GENTOO_LIKE_TOOLS = ("emerge", "emaint", "portageq", "gpkg-sign", "ebuild")


def gentoo_like_tools(root):
    """What a stage3 has and the debootstrap image lacks, configuration aside: Portage's tools on
    PATH (/usr/local/bin), its prefix reading /etc/portage, /var/tmp and the cache directories.
    Returns root/etc/portage."""
    root = Path(root)
    etc = root / "etc/portage"
    etc.mkdir(parents=True, exist_ok=True)
    prefix_etc = root / CHROOT_EPREFIX.lstrip("/") / "etc/portage"
    if prefix_etc.is_dir() and not prefix_etc.is_symlink():
        shutil.rmtree(prefix_etc)
    prefix_etc.parent.mkdir(parents=True, exist_ok=True)
    if not prefix_etc.is_symlink():
        prefix_etc.symlink_to("/etc/portage")
    for tool in GENTOO_LIKE_TOOLS:
        link = root / "usr/local/bin" / tool
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(f"{CHROOT_EPREFIX}/bin/{tool}")
    for directory in ("var/tmp", "var/cache/distfiles", "var/cache/binpkgs"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    return etc


def configure_gentoo_like_root(root, repo, extra_make_conf=""):
    """Make a copy of the debootstrap image (ensure_chroot_cache) look like a Gentoo system to build
    in: the configuration in /etc/portage (Portage's prefix, /opt/portage, reads it there through
    a link), Portage's tools in /usr/local/bin, a relative make.profile into ``repo`` (a build host
    path, bind-mounted at the same path by a chroot build), its own PORTAGE_TMPDIR, DISTDIR and
    PKGDIR. ``repo`` must exist (a copy of tests/repo)."""
    root, repo = Path(root), Path(repo)
    etc = gentoo_like_tools(root)
    # Relative, as on a real system: it resolves inside the root, where the repository is mounted.
    (etc / "make.profile").symlink_to(os.path.relpath(repo / "profiles/default", "/etc/portage"))
    (etc / "repos.conf").mkdir()
    (etc / "repos.conf/binhost-test.conf").write_text(
        f"[DEFAULT]\nmain-repo = binhost-test\n\n[binhost-test]\nlocation = {repo}\n")
    (etc / "make.conf").write_text(
        'FEATURES="-sandbox -usersandbox -userpriv -usersync -ipc-sandbox -network-sandbox'
        ' -pid-sandbox -mount-sandbox"\nPORTAGE_USERNAME="root"\nPORTAGE_GRPNAME="root"\n'
        'PORTAGE_TMPDIR="/var/tmp"\nDISTDIR="/var/cache/distfiles"\nCFLAGS="-O2 -pipe"\n'
        'CLEAN_DELAY="0"\nEMERGE_WARNING_DELAY="0"\n' + extra_make_conf)


TINY_EBUILD = """EAPI=8
DESCRIPTION="{description} (binhost test package)"
HOMEPAGE="https://example.invalid/{name}"
S="${{WORKDIR}}"
LICENSE="MIT"
SLOT="{slot}"
KEYWORDS="amd64"
IUSE="{iuse}"
RDEPEND="{rdepend}"
BDEPEND="{bdepend}"

src_install() {{
	insinto /usr/share/{name}
	newins - version <<<"${{PV}}"
	newins - built <<<"${{PVR}} ${{USE}}"
}}
"""


def tiny_ebuild(name, description="A tiny package", slot="0", iuse="", rdepend="", bdepend=""):
    """An ebuild that compiles nothing: it installs /usr/share/NAME/version (PV) and built (PVR and
    USE), so a test can tell which build a target got."""
    return TINY_EBUILD.format(name=name, description=description, slot=slot, iuse=iuse, rdepend=rdepend,
                              bdepend=bdepend)


def slow_ebuild(marker, sleeper="sleep", seconds=300):
    """An ebuild whose compile touches ``marker`` (a path as the build sees it) and then runs
    ``sleeper seconds``: a build to interrupt, known to have started."""
    return ('EAPI=8\nDESCRIPTION="Takes its time (interrupt tests)"\nHOMEPAGE="https://example.invalid/slow"\n'
            'S="${WORKDIR}"\nLICENSE="MIT"\nSLOT="0"\nKEYWORDS="amd64"\n'
            f"src_compile() {{\n\ttouch {marker} || die\n\t{sleeper} {seconds}\n}}\n")
