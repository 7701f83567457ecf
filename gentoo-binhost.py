#!/usr/bin/env python3
"""gentoo-binhost.py: build binary packages on this machine for another Gentoo machine.

The binhost is a separate Portage environment (default /binhost, a stage3) holding a copy of the
target's configuration. Packages are built in it (chroot, or ROOT= where this CPU cannot run the
target's code) with the target's USE and CFLAGS: everything the target would merge, so that it
compiles nothing. Complete builds are published from PKGDIR over HTTP, and the target installs
them with `emerge --getbinpkgonly`, run over ssh.

Examples:
    gentoo-binhost.py add-target laptop root@laptop.lan   # everything below, step by step, once
    gentoo-binhost.py emerge -uDN @world          # build what laptop would merge, then install it
    gentoo-binhost.py init --like-target          # the binhost root from a verified stage3
    gentoo-binhost.py init --host-chroot /srv/gentoo --like-target   # no Gentoo here: a Gentoo
                                                  # chroot to build in, the binhost root inside
    gentoo-binhost.py config pull                 # the target's /etc/portage and world, here
    gentoo-binhost.py cpu                         # the target's -march=native, spelt out
    gentoo-binhost.py keygen                      # a signing key for the binhost
    gentoo-binhost.py setup-target                # point the target's binrepos.conf at us
    gentoo-binhost.py doctor                      # does the binhost build what the target would?
    gentoo-binhost.py serve                       # serve PKGDIR (leave it running)
    gentoo-binhost.py build '>=dev-lang/python-3.12'
    gentoo-binhost.py --target laptop install -av app-editors/vim
    gentoo-binhost.py --all install -uDN @world   # every target, with a summary
    gentoo-binhost.py --pretend emerge vim        # show the plan and every command, run none
    gentoo-binhost.py build --for-target -uDN @world   # build what the target would merge, only
    gentoo-binhost.py update                      # sync, build every target's world, publish, clean
    gentoo-binhost.py history                     # what each publication changed
    gentoo-binhost.py rollback                    # serve the previous publication again

Configuration: /etc/gentoo-binhost.conf (or -c FILE, or $GENTOO_BINHOST_CONFIG); see README.md.
Only the Python standard library is used, so this one file can be copied anywhere and run.
"""

import argparse
import base64
import configparser
import contextlib
import copy
import datetime
import difflib
import email.utils
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import json
import math
import os
import posixpath
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

# The file, low level to high:
# - Infrastructure: constants, errors, Output (the terminal), file helpers (under(): the one path
#   mapper), the configuration, the Runner (every process and every change to files, so --pretend
#   lives there), signals, the HTTP server and the tunnel's watch.
# - Pure parsers, text in and values out: make.conf, CPU flags, what emerge and our scripts print,
#   the Packages index.
# - The binhost environment: where Portage runs (BuildHost: mounts, confinement, emulation), the
#   binhost root's configuration (make.conf, repositories), Portage's environment and the build
#   lock, the package store (env.packages: the index, publications, retired builds, holds, the one
#   publish), the build methods (env.method: root or chroot from BUILD_METHODS, EMULATED_METHOD for
#   a root of another architecture), one Environment per binhost root (Config.environments()),
#   holding one BuildHost per build method and its mounts for the command (env.host), signing,
#   building.
# - The targets: the two sides behind one interface (script, read): a target's Remote (env.remote:
#   ssh, its route to PKGDIR while serving() holds, what its emerge would merge: plan, a
#   TargetPlan) and the binhost's LocalShell; coverage, the tree a target follows (TargetTrees),
#   the gate (build_until_covered), installing, setting targets up.
# - Capabilities: CPU flags, configuration parity, list and clean, update, doctor, init,
#   onboarding (add-target, remove-target).
# - Serving, then the command line: build_parser, cmd_<verb>, main().
# A new capability goes with its kind: a check of a target's plan in TargetPlan, what targets are
# offered in PackageStore, a way to build beside the entries of BUILD_METHODS, a file change
# through the Runner.

# ------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------

VERSION = "0.1.0"
PROG = "gentoo-binhost.py"
CONFIG_ENV = "GENTOO_BINHOST_CONFIG"
DEFAULT_CONFIG = "/etc/gentoo-binhost.conf"
DEFAULT_ROOT = "/binhost"
DEFAULT_BIND = "0.0.0.0"
DEFAULT_PORT = 8080
DEFAULT_SSH_PORT = 22
# Seconds a client may stay silent before serve drops its connection.
DEFAULT_CLIENT_TIMEOUT = 30

# Name of our entry in the target's /etc/portage/binrepos.conf/ directory.
BINREPOS_NAME = "gentoo-binhost"
# Gentoo's official binhost entry (binrepos.conf/gentoobinhost.conf in a stage3) has priority 1;
# a higher number wins, so our packages are preferred.
BINREPOS_PRIORITY = 10

# Commands whose remaining arguments belong to emerge, untouched.
EMERGE_PASSTHROUGH = ("build", "install", "emerge")
# Global options that take a value (needed to find the command word before argparse runs).
GLOBAL_OPTIONS_WITH_VALUE = ("-c", "--config", "--target", "--color")  # --all takes none

CONFIG_KEYS = {
    "binhost": ("root", "pkgdir", "url", "bind", "port", "signing-key", "gpg-home", "tls-cert",
                "tls-key", "auth-file", "transport", "tunnel-port", "timeout", "stage3", "stage3-sha512",
                "stage3-installed", "distcc-hosts", "build-method", "publish-keep", "distdir"),
    "target": ("host", "ssh-port", "ssh-options", "root", "path", "binhost-root", "build-method", "tree"),
    "host": ("chroot", "path"),
}

# The Gentoo host environment of a build machine without Gentoo ([host] chroot): its binhost
# environment lives inside it, by default in this directory.
HOST_CHROOT_BINHOST = "binhost"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/bin"
# The only variables of ours a command in the host chroot sees, besides the ones we set.
# (Portage's own overrides as on Gentoo; not the locale: a fresh stage3 has generated none.)
CHROOT_PASSED_VARIABLES = ("TERM", "COLUMNS", "LINES", "NOCOLOR", "FEATURES", "MAKEOPTS",
                           "EMERGE_DEFAULT_OPTS", "PORTAGE_NICENESS", "http_proxy", "https_proxy",
                           "ftp_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY")
# What a command in the host chroot needs, as the Handbook mounts it: (directory, command).
# Slave propagation, set by the same mount call, keeps unmounting inside from reaching the host's
# own /sys and /dev (where / is shared, as with systemd).
CHROOT_MOUNTS = (
    ("proc", ["mount", "--types", "proc", "proc", "{}"]),
    ("sys", ["mount", "--rbind", "--make-rslave", "/sys", "{}"]),
    ("dev", ["mount", "--rbind", "--make-rslave", "/dev", "{}"]),  # with /dev/pts and /dev/shm
    ("run", ["mount", "--bind", "--make-slave", "/run", "{}"]),
)
UNMOUNT_ATTEMPTS = 10
# Seconds an interrupted command gets to stop by itself before it is killed.
STOP_GRACE_SECONDS = 10
# Capabilities a host chroot needs (linux/capability.h bit numbers).
CAP_SYS_CHROOT, CAP_SYS_ADMIN = 18, 21
# A repository snapshot older than this is worth a warning (the targets are likely newer).
SNAPSHOT_WARN_DAYS = 30

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# A command stopped by a signal exits with 128 + its number, as a shell reports it.
EXIT_SIGNAL_BASE = 128
SSH_CONNECTION_FAILED = 255
COMMAND_NOT_FOUND = 127

# Published indexes live in PKGDIR/.published/<ID>/ (a dot directory, never served as it is):
# `current` links to the one serve (and nginx) answers /Packages with. Portage rewrites
# PKGDIR/Packages after every package it builds; targets never see that working index while a
# publication exists. Package files are never copied: with binpkg-multi-instance each build is a
# file of its own, so every file an older publication names stays in place until clean.
PUBLISHED_DIR = ".published"
CURRENT_PUBLICATION = "current"
DEFAULT_PUBLISH_KEEP = 5

# A staged publication is served at /[ENV/]_staged/<token>/ (its index; packages as under /)
# while the gate asks the targets about it; only then does it become a publication.
STAGED_URL_DIR = "_staged"
STAGED_PREFIX = ".staged-"
STAGED_TOKEN = re.compile(r"[A-Za-z0-9]{16,64}")
# In the publications directory: the package files clean has given up, "PATH MD5" a line. The
# MD5 tells a retired build from a new one at the same path (without binpkg-multi-instance).
RETIRED_LIST = "retired"
# In the publications directory: the rollbacks' holds (JSON), and per target the packages it had
# installed when it was last asked (clean keeps their binaries).
HOLDS_FILE = "holds.json"
INSTALLED_DIR = "installed"

# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class BinhostError(Exception):
    """An expected failure: main() prints it as one `!!!` line and exits with exit_code."""

    exit_code = EXIT_FAILURE


class UsageError(BinhostError):
    """Bad command line or configuration."""

    exit_code = EXIT_USAGE


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C so that cleanups (unmounting) run; main() exits
    with 128 + the signal's number (143, 129)."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


class CannotSign(BinhostError):
    """The signing key cannot sign unattended (a passphrase not cached in gpg-agent)."""


# ------------------------------------------------------------------------------------------------
# Output: the only writer to the terminal
# ------------------------------------------------------------------------------------------------


def color_wanted(choice, stream):
    if choice is not None:
        return choice
    if os.environ.get("NO_COLOR") or os.environ.get("NOCOLOR", "").lower() in ("yes", "true", "1"):
        return False
    return stream.isatty() and os.environ.get("TERM") != "dumb"


class Output:
    """Portage-style messages: ` * ` info and warnings, `>>>` actions, `!!!` errors."""

    COLORS = {"good": "\033[32;01m", "warn": "\033[33;01m", "bad": "\033[31;01m", "reset": "\033[0m"}

    def __init__(self, color=None, verbosity=1, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = color_wanted(color, self.out)
        self.verbosity = verbosity
        self.lock = threading.Lock()

    def _paint(self, kind, text):
        if not self.color:
            return text
        return f"{self.COLORS[kind]}{text}{self.COLORS['reset']}"

    def _write(self, stream, line, end="\n"):
        with self.lock:
            stream.write(line + end)
            stream.flush()

    def info(self, message):
        if self.verbosity > 0:
            self._write(self.out, f" {self._paint('good', '*')} {message}")

    def warn(self, message):
        self._write(self.err, f" {self._paint('warn', '*')} {message}")

    def action(self, message):
        if self.verbosity > 0:
            self._write(self.out, f"{self._paint('good', '>>>')} {message}")

    def error(self, message):
        self._write(self.err, f"{self._paint('bad', '!!!')} {message}")

    def progress(self, line, done=False):
        """Rewrite the current terminal line (download progress)."""
        self._write(self.out, "\n" if done else f"\r{line}", end="")

    def check(self, status, name, detail):
        """One doctor line: OK, WARN or FAIL in Portage's colors, the check, what it found."""
        color = {"OK": "good", "WARN": "warn", "FAIL": "bad"}[status]
        self.text(f"{self._paint(color, status.ljust(4))} {name}: {detail}", always=True)

    def debug(self, message):
        if self.verbosity > 1:
            self._write(self.err, f" {self._paint('good', '*')} {message}")

    def text(self, text, always=False):
        """Program output that is the point of the command (a key, a config entry, a command)."""
        if self.verbosity > 0 or always:
            self._write(self.out, text, end="" if text.endswith("\n") or not text else "\n")


def format_command(argv, env=None):
    """The exact command line, environment first, as a user could paste it into a shell; but
    the confinement program, a constant of this file, by name (a command is one line)."""
    words = [shlex.quote(f"{key}={value}") for key, value in (env or {}).items()]
    return " ".join(words + ['"$CONFINE_PROGRAM"' if word is CONFINE_PROGRAM else shlex.quote(str(word))
                             for word in argv])


def unified_diff(old, new, name):
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=f"{name} (current)", tofile=f"{name} (new)")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------------
# File helpers
# ------------------------------------------------------------------------------------------------


def read_text(path):
    """A file's text ("" when missing); bytes that are not UTF-8 survive a write_file round trip."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def symlink_below(base, path):
    """The first symbolic link on the way from base down to path (path included), or None."""
    current = base
    for part in os.path.relpath(path, base).split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            return current
    return None


def check_no_symlink_below(base, path):
    """The configuration in the binhost root came from a target: never write through a symlink
    in it (etc/portage/package.use -> /etc/cron.d, say)."""
    link = symlink_below(base, path)
    if link:
        raise BinhostError(f"{link} is a symbolic link (to {os.readlink(link)}): refusing to"
                           f" write or mount {path} through it; replace the link with a real file or"
                           " directory")


def under(root, path):
    """Our path for path as root sees it (root None: this machine's own): the one mapper between
    a chroot's paths (the host chroot's, the binhost root's) and this machine's."""
    return os.path.join(root, path.lstrip("/")) if root else path


MAX_SYMLINKS = 40


def resolved_under(root, path):
    """Our path for path (one of ours, under root) with each link on the way followed as root
    sees it: an absolute link names root's own path. path itself without root."""
    if not root:
        return path
    inside = "/" + os.path.relpath(path, root)
    for _ in range(MAX_SYMLINKS):
        parts = inside.strip("/").split("/")
        for index in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:index])
            if os.path.islink(under(root, prefix)):
                target = os.readlink(under(root, prefix))
                base = target if target.startswith("/") else os.path.join(os.path.dirname(prefix), target)
                inside = os.path.normpath("/".join([base] + parts[index:]))
                break
        else:
            break
    return under(root, inside)


def open_inside(root, parts, absolute_from_root=False):
    """A descriptor of root/parts..., or None when it does not exist or leads out of root. Each
    component is opened relative to its directory with O_NOFOLLOW; a symlink met on the way is
    resolved by hand when it stays inside root (its `..` never above it, never absolute; with
    absolute_from_root, root is a chroot's and an absolute link starts from it)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang us
    try:
        descriptor = os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    except OSError:
        return None
    parents, pending, links = [], list(parts), 0
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not parents:
                    return None
                os.close(descriptor)
                descriptor = parents.pop()
                continue
            try:
                child = os.open(part, flags, dir_fd=descriptor)
            except OSError as error:
                if error.errno != errno.ELOOP:
                    return None
                try:
                    target = os.readlink(part, dir_fd=descriptor)
                except OSError:
                    return None
                links += 1
                if links > MAX_SYMLINKS or (target.startswith("/") and not absolute_from_root):
                    return None
                while target.startswith("/") and parents:  # back to root
                    os.close(descriptor)
                    descriptor = parents.pop()
                pending[:0] = target.split("/")
                continue
            parents.append(descriptor)
            descriptor = child
        result, descriptor = descriptor, None
        return result
    finally:
        for leftover in parents + ([descriptor] if descriptor is not None else []):
            os.close(leftover)


def read_bytes_inside(directory, relative, absolute_from_root=False, size=1 << 20):
    """The first size bytes (a MiB) of directory/relative (b"" when missing or not a regular file), never through
    a link that leads out of directory: a repository inside the binhost root is written by its
    sync, and a link there that is absolute means a path of the chroot, not of this machine."""
    try:
        descriptor = open_inside(directory, relative.split("/"), absolute_from_root=absolute_from_root)
    except ValueError:  # a NUL in a name
        return b""
    if descriptor is None:
        return b""
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a directory; a FIFO would never end
        os.close(descriptor)
        return b""
    with os.fdopen(descriptor, "rb") as handle:
        try:
            return handle.read(size)
        except OSError:
            return b""


def read_inside(directory, relative, absolute_from_root=False):
    """read_bytes_inside's bytes as text ("" when missing)."""
    return read_bytes_inside(directory, relative, absolute_from_root).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


class HostSettings:
    """[host]: where Portage runs when this machine is not Gentoo (a Gentoo chroot), else here."""

    def __init__(self, section, config_path):
        chroot = section.get("chroot", "")
        self.chroot = os.path.abspath(chroot) if chroot else None
        if self.chroot == "/":
            raise UsageError(f"{config_path}: [host] chroot = /: leave the key out to build on this"
                             " machine itself")
        self.path = section.get("path", "")
        for directory in filter(None, self.path.split(":")):
            if not directory.startswith("/"):
                raise UsageError(f"{config_path}: [host] path = {self.path}: {directory} must be an"
                                 " absolute path inside the host chroot")
        if self.path and not self.chroot:
            raise UsageError(f"{config_path}: [host] path without chroot: path is searched inside"
                             " the host chroot; set chroot = DIR too")


def default_gpg_home(config_path):
    """/etc/gentoo-binhost/gnupg for /etc/gentoo-binhost.conf: named after the configuration, so
    two configurations in one directory have keys of their own."""
    directory, name = os.path.split(os.path.abspath(config_path))
    stem = os.path.splitext(name)[0]
    return os.path.join(directory, stem if stem != name else f"{name}.d", "gnupg")


def parse_build_method(value, config_path, section):
    if value not in ("", "auto", "chroot", "root"):
        raise UsageError(f"{config_path}: [{section}] build-method = {value}: use chroot, root or auto")
    return value


def parse_port(value, config_path, section, key):
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"{config_path}: [{section}] {key} = {value} is not a port number (0-65535)")
    return port


class BinhostSettings:
    def __init__(self, section, config_path, host=None):
        self.config_path = config_path
        host = host or HostSettings({}, config_path)
        self.host_chroot, self.host_path = host.chroot, host.path
        default_root = (os.path.join(self.host_chroot, HOST_CHROOT_BINHOST) if self.host_chroot
                        else DEFAULT_ROOT)
        self.root = os.path.abspath(section.get("root") or default_root)
        self.pkgdir = os.path.abspath(section.get("pkgdir") or os.path.join(self.root, "var/cache/binpkgs"))
        self.bind = section.get("bind") or DEFAULT_BIND
        self.port = parse_port(section.get("port", str(DEFAULT_PORT)), config_path, "binhost", "port")
        url = section.get("url", "")
        if url and not url.startswith(("http://", "https://")):
            raise UsageError(f"{config_path}: [binhost] url = {url}: use http://HOST:PORT/ or https://...")
        # Without a url, the default follows the port actually served (see target_url).
        self.url = url if not url or url.endswith("/") else url + "/"
        self.signing_key = section.get("signing-key", "")
        # Beside the configuration, never inside a binhost root, where builds run as root.
        self.gpg_home = os.path.abspath(section.get("gpg-home") or default_gpg_home(config_path))
        # Set when the config has several binhost environments: served under /<env_name>/.
        self.env_name = None
        self.distcc_hosts = section.get("distcc-hosts", "")
        # Downloads shared by chroot builds: only this directory of the build machine is ever bound
        # at the target's DISTDIR (never a place the target's make.conf names here).
        self.distdir = os.path.abspath(section["distdir"]) if section.get("distdir") else ""
        self.build_method = parse_build_method(section.get("build-method", ""), config_path, "binhost")
        keep = section.get("publish-keep", str(DEFAULT_PUBLISH_KEEP))
        if not keep.isdigit() or int(keep) < 1:
            raise UsageError(f"{config_path}: [binhost] publish-keep = {keep}: use a number of publications (1 or more)")
        self.publish_keep = int(keep)
        self.tls_cert = section.get("tls-cert", "")
        self.tls_key = section.get("tls-key", "")
        self.auth_file = section.get("auth-file", "")
        self.transport = section.get("transport", "http")
        if self.transport not in ("http", "tunnel"):
            raise UsageError(f"{config_path}: [binhost] transport = {self.transport}: use http or tunnel")
        self.tunnel_port = parse_port(section.get("tunnel-port", str(self.port)), config_path,
                                      "binhost", "tunnel-port")
        try:
            self.client_timeout = float(section.get("timeout", DEFAULT_CLIENT_TIMEOUT))
        except ValueError:
            self.client_timeout = 0
        if not (math.isfinite(self.client_timeout) and self.client_timeout > 0):
            raise UsageError(f"{config_path}: [binhost] timeout = {section.get('timeout')}:"
                             " use a number of seconds")


class TargetSettings:
    def __init__(self, name, section, config_path):
        self.name = name
        self.config_path = config_path
        self.host = section.get("host", "")
        if not self.host:
            raise UsageError(f"{config_path}: [target {name}] has no 'host' key: add host = user@hostname")
        self.ssh_port = parse_port(section.get("ssh-port", str(DEFAULT_SSH_PORT)), config_path,
                                   f"target {name}", "ssh-port")
        try:
            self.ssh_options = shlex.split(section.get("ssh-options", ""))
        except ValueError as error:
            raise UsageError(f"{config_path}: [target {name}] ssh-options: {error}") from None
        self.root = section.get("root", "/") or "/"
        if not self.root.startswith("/"):
            raise UsageError(f"{config_path}: [target {name}] root = {self.root} must be an absolute path")
        self.path = section.get("path", "")
        binhost_root = section.get("binhost-root", "")
        self.binhost_root = os.path.abspath(binhost_root) if binhost_root else None
        self.build_method = parse_build_method(section.get("build-method", ""), config_path, f"target {name}")
        # binhost: the target follows the binhost's ebuild snapshot; own (or no key): its own tree.
        self.tree = section.get("tree", "")
        if self.tree not in ("", "binhost", "own"):
            raise UsageError(f"{config_path}: [target {name}] tree = {self.tree}: use binhost (the target follows"
                             " the binhost's snapshot) or own (it keeps its own)")

    @property
    def portage_config_dir(self):
        return posixpath.join(self.root, "etc/portage")

    @property
    def portage_environment(self):
        """ROOT and PORTAGE_CONFIGROOT for the target's emerge when its root is not /."""
        return {"ROOT": self.root, "PORTAGE_CONFIGROOT": self.root} if self.root.rstrip("/") else {}


class Config:
    """The parsed configuration file: one [binhost] section and any number of [target NAME]."""

    def __init__(self, path, binhost, targets, runner, output):
        self.path = path
        self.binhost = binhost
        self.targets = targets
        self.runner, self.output = runner, output  # every environment's
        self._by_root = {}  # {root: Environment}: one per root for the command, never remade

    def environments(self):
        """{name: Environment} of every binhost environment. With one (the usual case) its
        PKGDIR is served at /; with several (targets with their own binhost-root), each is served
        under /<basename of its root>/. Signing key and server settings are shared. One
        Environment per root for the whole command (targets added meanwhile keep it), so what was
        decided about it, and a setting changed through it, stays."""
        roots = [self.binhost.root] + sorted({target.binhost_root for target in self.targets.values()
                                              if target.binhost_root} - {self.binhost.root})
        environments = {}
        for root in roots:
            if root not in self._by_root:
                settings = self.binhost if root == self.binhost.root else copy.copy(self.binhost)
                self._by_root[root] = Environment(settings, self.runner, self.output)
            env = self._by_root[root]
            settings = env.settings
            if len(roots) == 1:
                settings.env_name = None
                return {None: env}
            if root != self.binhost.root:
                settings.root, settings.pkgdir = root, os.path.join(root, "var/cache/binpkgs")
                methods = {target.build_method for target in self.targets.values()
                           if target.binhost_root == root and target.build_method}
                if len(methods) > 1:
                    raise UsageError(f"{self.path}: the targets built in {root} ask for different"
                                     f" build-method values ({', '.join(sorted(methods))}): one per environment")
                settings.build_method = methods.pop() if methods else settings.build_method
            settings.env_name = os.path.basename(root.rstrip("/")) or "root"
            if settings.env_name.startswith("."):
                raise UsageError(f"{self.path}: binhost root {root}: a name starting with '.' cannot be"
                                 " served; rename the directory")
            if settings.env_name in environments:
                raise UsageError(f"{self.path}: two binhost roots are both named"
                                 f" '{settings.env_name}': their URLs would clash; rename one")
            environments[settings.env_name] = env
        return environments

    def environment_for(self, target=None):
        """The binhost environment a target's packages are built in ([binhost] root's without one)."""
        root = target.binhost_root or self.binhost.root if target else self.binhost.root
        return next(env for env in self.environments().values() if env.root == root)

    def environment_for_command(self, target_name):
        """The environment of --target NAME, else the only one there is."""
        if target_name is not None:
            return self.environment_for(self.target(target_name))
        environments = self.environments()
        if len(environments) == 1:
            return next(iter(environments.values()))
        raise UsageError(f"{self.path}: several binhost environments ({', '.join(sorted(environments))}):"
                         " choose one with --target NAME")

    def target(self, name=None):
        if name is not None:
            if name not in self.targets:
                known = ", ".join(sorted(self.targets)) or "none"
                raise UsageError(f"{self.path}: no [target {name}] section (configured targets: {known})")
            return self.targets[name]
        if not self.targets:
            raise UsageError(f"{self.path}: no target configured: add one with '{PROG} add-target NAME [USER@]HOST'")
        if len(self.targets) > 1:
            raise UsageError(f"{self.path}: several targets configured ({', '.join(sorted(self.targets))}):"
                             " choose one with --target NAME")
        return next(iter(self.targets.values()))


def check_inside_chroot(config):
    """Builds run inside the host chroot, so everything Portage touches must be in there too."""
    chroot = config.binhost.host_chroot
    places = [("[binhost] root", config.binhost.root), ("[binhost] pkgdir", config.binhost.pkgdir)]
    places += [(f"[target {target.name}] binhost-root", target.binhost_root)
               for target in config.targets.values() if target.binhost_root]
    for what, place in places:
        relative = os.path.relpath(place, chroot)
        if relative == "." and what.endswith("root"):
            raise UsageError(f"{config.path}: {what} = {place} is the host chroot itself: the binhost"
                             f" root is a separate environment inside it (default"
                             f" {os.path.join(chroot, HOST_CHROOT_BINHOST)})")
        if relative == ".." or relative.startswith("../"):
            raise UsageError(f"{config.path}: {what} = {place} is outside the host chroot {chroot}:"
                             f" builds run inside it, so put it under {chroot} (the default root is"
                             f" {os.path.join(chroot, HOST_CHROOT_BINHOST)})")


def load_config(path, runner, host_chroot=None):
    """The configuration in path, its environments' commands run by runner; host_chroot (init
    --host-chroot DIR) stands for [host] chroot."""
    # `key = value  ; note` as in the README: a ; or # after white space starts a comment.
    parser = configparser.ConfigParser(interpolation=None, default_section="gentoo-binhost-no-defaults",
                                       inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        pass
    except PermissionError:
        raise UsageError(f"{path}: permission denied: run as root or pass -c FILE") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory: pass the configuration file with -c FILE") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: is it the configuration file?") from None
    except configparser.MissingSectionHeaderError as error:
        raise UsageError(f"{path} line {error.lineno}: {error.line.strip()!r} comes before any section: start"
                         " the file with [binhost]") from None
    except configparser.ParsingError as error:
        lineno = error.errors[0][0]
        line = read_text(path).splitlines()[lineno - 1]
        raise UsageError(f"{path} line {lineno}: {line.strip()!r} is neither a section header ([binhost],"
                         " [target NAME]) nor key = value: fix or remove it") from None
    except (configparser.DuplicateSectionError, configparser.DuplicateOptionError) as error:
        raise UsageError(f"{path} line {error.lineno}: {str(error).split(': ', 1)[-1]}: keep one") from None
    except configparser.Error as error:
        first_line = str(error).splitlines()[0]
        raise UsageError(f"{path}: {first_line}") from None
    sections, targets = {"binhost": {}, "host": {}}, {}
    for section_name in parser.sections():
        kind, _, name = section_name.partition(" ")
        name = name.strip()
        if kind not in CONFIG_KEYS or (kind == "target") != bool(name):
            raise UsageError(f"{path}: unknown section [{section_name}]: use [binhost], [host]"
                             " or [target NAME]")
        section = dict(parser.items(section_name))
        for key in section:
            if key not in CONFIG_KEYS[kind]:
                raise UsageError(f"{path}: [{section_name}] unknown key '{key}'"
                                 f" (known keys: {', '.join(CONFIG_KEYS[kind])})")
        if kind == "target":
            targets[name] = section
        else:
            sections[kind] = section
    if host_chroot:
        sections["host"] = dict(sections["host"], chroot=host_chroot)
    host = HostSettings(sections["host"], path)
    target_settings = {name: TargetSettings(name, section, path) for name, section in targets.items()}
    config = Config(path, BinhostSettings(sections["binhost"], path, host), target_settings, runner,
                    runner.output)
    if host.chroot:
        check_inside_chroot(config)
    return config


def set_config_values(text, section, values):
    """Return the INI text with `key = value` set in [section], keeping comments and layout."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if (match := configparser.ConfigParser.SECTCRE.match(line.strip()))
                  and match.group("header").strip() == section), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines.append(f"[{section}]")
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    pending = dict(values)
    for i in range(start + 1, end):
        # ConfigParser accepts `key = value` and `key: value`, keys in any case.
        key = re.split(r"[=:]", lines[i], 1)[0].strip().lower()
        if key in pending and not lines[i].lstrip().startswith((";", "#")):
            comment = re.search(r"\s+[;#].*$", re.split(r"[=:]", lines[i], 1)[-1])
            lines[i] = f"{key} = {pending.pop(key)}" + (comment.group(0) if comment else "")
    insert_at = end
    while insert_at > start + 1 and not lines[insert_at - 1].strip():
        insert_at -= 1
    lines[insert_at:insert_at] = [f"{key} = {value}" for key, value in pending.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Runner: the only caller of subprocess, and the writer of every change --pretend shows; signals
# ------------------------------------------------------------------------------------------------


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signal_handlers(numbers, handler):
    """handler for the signals numbers while the block runs, their previous handlers after it
    (outside the main thread nothing changes: Python sets handlers only there)."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {number: signal.signal(number, handler) for number in numbers} if on_main_thread else {}
    try:
        yield
    finally:
        for number, restored in previous.items():
            signal.signal(number, restored)


class ProcessGroup:
    """A build and everything it starts, in a process group of its own. A signal sent to this
    tool alone (a service manager's SIGTERM, `kill PID` from a script) is passed on to the whole
    group; the build lock and the chroot's mounts are released only when the group is empty.
    On a terminal, the group becomes the foreground job while it runs, so Ctrl-C reaches all of
    it and `emerge --ask` can still read its answer."""

    def __init__(self):
        self.terminal = None
        with contextlib.suppress(OSError, AttributeError, ValueError):
            descriptor = sys.stdin.fileno()
            if os.isatty(descriptor) and os.tcgetpgrp(descriptor) == os.getpgrp():
                self.terminal = descriptor
        self.received = []
        self.signalled_at = None
        self.pgid = None

    def enter(self):
        """In the child, before exec: a group of its own, in the terminal's foreground."""
        os.setpgid(0, 0)
        if self.terminal is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            with contextlib.suppress(OSError):
                os.tcsetpgrp(self.terminal, os.getpgrp())
            signal.signal(signal.SIGTTOU, signal.SIG_DFL)

    def forward(self, signum, _frame):
        self.received.append(signum)
        self.signalled_at = self.signalled_at or time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, self.passed_on(signum))

    @staticmethod
    def passed_on(signum):
        """SIGHUP is passed on as SIGTERM: unshare (a confined build's parent) dies of SIGHUP at
        once, and its namespace with it, before the build could stop by itself."""
        return signal.SIGTERM if signum == signal.SIGHUP else signum

    def wait(self, process, input):
        """communicate() with signals passed on, then wait for the rest of the group."""
        self.pgid = process.pid
        with contextlib.suppress(OSError):  # the parent's side of the race with enter()
            os.setpgid(self.pgid, self.pgid)
            self.take_terminal(self.pgid)
        with signal_handlers(FORWARDED_SIGNALS, self.forward):
            try:
                while True:
                    try:
                        output = process.communicate(input, timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        input = None  # sent already: communicate() refuses it a second time
                        # emerge waits for a job that ignores the signal passed on: all of it gets
                        # SIGKILL once the grace period is over.
                        if self.signalled_at and time.monotonic() > self.signalled_at + STOP_GRACE_SECONDS:
                            with contextlib.suppress(ProcessLookupError, PermissionError):
                                os.killpg(self.pgid, signal.SIGKILL)
                self.drain()
                return output
            finally:
                self.take_terminal(os.getpgrp())

    def take_terminal(self, pgid):
        if self.terminal is not None:
            with contextlib.suppress(OSError), signal_handlers((signal.SIGTTOU,), signal.SIG_IGN):
                os.tcsetpgrp(self.terminal, pgid)

    def members(self):
        """Live processes of the group (zombies a container's init never reaps do not count)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(self.pgid) and fields[0] != "Z":
                found.append(int(entry))
        return found

    def drain(self):
        """After the command exited: its leftovers (ebuild processes whose parent is gone) get
        the signal that stopped it, or SIGTERM, then SIGKILL after a grace period."""
        if not self.members():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, self.passed_on(self.received[-1]) if self.received else signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.members():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pgid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE_SECONDS
            time.sleep(0.05)

    def raise_if_interrupted(self, returncode):
        """A signal passed on ends this tool too, once the group is gone. On a terminal, Ctrl-C
        went to the group alone: its exit status tells."""
        signum = self.received[0] if self.received else None
        if signum is None and self.terminal is not None and returncode in (
                -signal.SIGINT, EXIT_SIGNAL_BASE + signal.SIGINT):
            signum = signal.SIGINT
        if signum == signal.SIGINT:
            raise KeyboardInterrupt()
        if signum is not None:
            raise Terminated(signum)


def shell_scripts():
    """{NAME: text} of the sh scripts this tool runs on either side."""
    return {name: value for name, value in globals().items() if name.endswith("_SCRIPT")}


def program_missing(name):
    return BinhostError(f"{name} not found: install it or add its directory to PATH")


def as_text(data):
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def timestamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


class Runner:
    """Runs commands from argv lists, and makes every change to files (write_file, make_directory,
    remove, rename, ...). Under --pretend, commands that change something are shown shell-quoted
    with their environment and not run, a change to a file as its shell command (a written file
    as a diff); read-only queries still run. Not through it: what read-only queries need under
    --pretend too (the chroot's mount records and locks, throwaway GnuPG homes, probe files), and
    what streams into a place of its own before a rename through it: a download's partial file, a
    package signed in place, the signing key's files moved out of a root; a new root's mode."""

    def __init__(self, output, pretend=False):
        self.output = output
        self.pretend = pretend
        self.running = None  # the command running now, to pass SIGTERM on to
        self.secrets = set()  # passwords shown as ******** wherever a command or file is shown
        self.backed_up = set()  # one backup per file and run: the user's version, not our first step

    def abbreviated(self, argv, env=None):
        """argv as shown under --pretend: our sh scripts by name (-v shows them whole), here or
        inside the command line ssh sends to a target."""
        if self.output.verbosity > 1:
            return self.masked(format_command(argv, env))
        named = []
        for name, script in shell_scripts().items():
            quoted = shlex.quote(script)  # longer than the script (it has lines to quote): never in it
            if script in argv or any(quoted in word for word in argv):
                argv = [word.replace(quoted, f'"${name}"') for word in argv]
                named.append(name)
        shown = self.masked(format_command(argv, env))
        for name in named:
            shown = shown.replace(shlex.quote(shell_scripts()[name]), f'"${name}"')
            self.output.info(f"${name}: a sh script of {PROG} (-v shows it)")
        return shown

    def masked(self, text):
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "********")
        return text

    def terminate_running(self):
        """Ask the running command to stop (it cleans up its own children, as emerge does)."""
        process = self.running
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.terminate()

    def run(self, argv, env=None, *, changes=True, capture=False, input=None, check=True,
            describe=None, cwd=None, binary=False, own_group=False, timeout=None):
        """Run argv with env added to ours. Returns a CompletedProcess (None under --pretend for
        commands that change something). With check, a non-zero exit raises BinhostError.
        own_group (builds): the command and everything it starts run in a process group of their
        own, which SIGINT, SIGTERM and SIGHUP sent to this tool alone are passed on to; the call
        returns only when every process of that group is gone."""
        argv = [str(word) for word in argv]
        if self.pretend and changes:
            self.output.text(self.abbreviated(argv, env), always=True)
            return None
        self.output.debug(f"Running: {self.masked(format_command(argv, env))}")
        full_env = dict(os.environ, **env) if env else None
        text = not binary and (isinstance(input, str) or (capture and not isinstance(input, bytes)))
        group = ProcessGroup() if own_group and threading.current_thread() is threading.main_thread() \
            else None
        try:
            with subprocess.Popen(
                    argv, env=full_env, cwd=cwd, stdin=subprocess.PIPE if input is not None else None,
                    stdout=subprocess.PIPE if capture else None,
                    stderr=subprocess.PIPE if capture else None,
                    encoding="utf-8" if text else None, errors="replace" if text else None,
                    preexec_fn=group.enter if group else None) as process:
                self.running = process
                try:
                    if group:
                        stdout, stderr = group.wait(process, input)
                    else:
                        stdout, stderr = process.communicate(input, timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
                    raise BinhostError(f"{describe or argv[0]} did not finish within {timeout} s:"
                                       " stopped it") from None
                except BaseException as error:
                    if isinstance(error, KeyboardInterrupt):
                        # Ctrl-C reached the command too (SIGTERM is passed on): let it clean up.
                        with contextlib.suppress(BaseException):
                            process.wait(timeout=STOP_GRACE_SECONDS)
                    process.kill()
                    raise
                finally:
                    self.running = None
            result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
        except FileNotFoundError:
            raise program_missing(argv[0]) from None
        except PermissionError:
            raise BinhostError(f"{argv[0]} is not executable: check its permissions") from None
        if group:
            group.raise_if_interrupted(process.returncode)
        if check and result.returncode != 0:
            detail = ": " + last_line(as_text(result.stderr)) if capture and result.stderr else ""
            raise BinhostError(f"{describe or argv[0]} failed (exit {result.returncode}){detail}")
        return result

    def start(self, argv):
        """Start a long-running helper (an ssh tunnel) in the background; None under --pretend."""
        argv = [str(word) for word in argv]
        if self.pretend:
            self.output.text(format_command(argv), always=True)
            return None
        self.output.debug(f"Starting: {format_command(argv)}")
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise program_missing(argv[0]) from None

    def read(self, argv, env=None, input=None, check=True, describe=None):
        """Run a read-only query and return its CompletedProcess with captured text output."""
        return self.run(argv, env, changes=False, capture=True, input=input, check=check, describe=describe)

    def write_file(self, path, content, mode=None, backup=True, mtime=None, diff=True):
        """Write content (text, or bytes) to path atomically (temp file, then rename), keeping a
        timestamped backup of a different existing file (once per file and run) and its mode
        (else `mode`, default 0644), with the modification time mtime when given. Returns False
        when the file already had this content (and mtime). Under --pretend: shown, with the
        change of a text (unless diff is False: bookkeeping of ours), not written."""
        binary = isinstance(content, bytes)
        try:
            with open(path, "rb") as handle:
                current = handle.read()
            current = current if binary else current.decode("utf-8", "surrogateescape")
            current_mtime = int(os.stat(path).st_mtime)
        except FileNotFoundError:
            current = current_mtime = None
        if current == content and mtime in (None, current_mtime):
            return False
        if self.pretend:
            self.output.info(f"Would write {path}" + (":" if diff and not binary else ""))
            if diff and not binary:
                self.output.text(self.masked(unified_diff(current, content, path)), always=True)
            return True
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        if current is not None and backup and os.path.realpath(path) not in self.backed_up:
            backup_path, number = f"{path}.{timestamp()}.bak", 1
            while os.path.lexists(backup_path):  # two runs in one second keep both versions
                backup_path, number = f"{path}.{timestamp()}-{number}.bak", number + 1
            shutil.copy2(path, backup_path)
            self.backed_up.add(os.path.realpath(path))
            self.output.info(f"Saved the previous {path} as {backup_path}")
        if mode is None:
            mode = stat.S_IMODE(os.stat(path).st_mode) if current is not None else 0o644
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(content if binary else content.encode("utf-8", "surrogateescape"))
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, mode)
            if mtime is not None:
                os.utime(temporary, (mtime, mtime))
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return True

    # The other changes to files, each shown as its shell command under --pretend, and not made.

    def change(self, argv, making):
        """making() changes files as argv would (its result returned); under --pretend argv is shown
        instead. A failure is one error naming argv."""
        if self.pretend:
            self.output.text(format_command(argv), always=True)
            return None
        self.output.debug(f"Doing: {format_command(argv)}")
        try:
            return making()
        except OSError as error:
            raise BinhostError(f"{format_command(argv)} failed: {error.strerror or error}") from None

    def make_directory(self, path, mode=None):
        """mkdir -p path, the last one with mode when given."""
        def make():
            os.makedirs(path, exist_ok=True)
            if mode is not None:
                os.chmod(path, mode)
        self.change(["mkdir", "-p"] + (["-m", f"{mode:o}"] if mode is not None else []) + [path], make)

    def make_staging_directory(self, parent, prefix, mode):
        """A new directory of a random name in parent, with mode; under --pretend the name it would get."""
        def make():
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
            os.chmod(staging, mode)  # not masked by the umask
            return staging
        return (self.change(["mktemp", "-d", "-p", parent, f"{prefix}XXXXXXXX"], make)
                or os.path.join(parent, f"{prefix}XXXXXXXX"))

    def remove(self, path):
        """rm -f path: a file or a link (nothing when it is gone already)."""
        def unlink():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.change(["rm", "-f", path], unlink)

    def remove_directory(self, path):
        """rmdir path: an empty directory."""
        self.change(["rmdir", path], lambda: os.rmdir(path))

    def remove_tree(self, path, ignore_errors=True):
        """rm -rf path, a directory of ours, and everything in it."""
        self.change(["rm", "-rf", path], lambda: shutil.rmtree(path, ignore_errors=ignore_errors))

    def rename(self, source, destination):
        """mv -T source destination, in one step (replacing a file or link there)."""
        self.change(["mv", "-T", source, destination], lambda: os.replace(source, destination))

    def symlink(self, target, path):
        self.change(["ln", "-s", target, path], lambda: os.symlink(target, path))


def find_program(name, hint):
    path = shutil.which(name)
    if not path:
        raise BinhostError(f"{name} not found in PATH: {hint}")
    return path


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def terminate_as_interrupt(runner):
    def interrupt(signum, _frame):
        for number in TERMINATING_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        if os.getpgrp() == os.getpid():
            # Our own job (a shell's, a service's): stop all of it, as Ctrl-C on a terminal would,
            # so no build process is left running in the chroot.
            os.killpg(0, signum)
        else:
            runner.terminate_running()
        raise Terminated(signum)

    return signal_handlers(TERMINATING_SIGNALS, interrupt)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then interrupt."""
    received = []
    with signal_handlers(FORWARDED_SIGNALS, lambda signum, _frame: received.append(signum)):
        yield
    if received:
        raise Terminated(received[0]) if received[0] != signal.SIGINT else KeyboardInterrupt()


# ------------------------------------------------------------------------------------------------
# HTTP server: what targets download from, and the ssh tunnel's watch
# ------------------------------------------------------------------------------------------------

HTTP_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
                400: "Bad Request",
                401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
                505: "HTTP Version Not Supported"}
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 100
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")
CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}


class HttpDate:
    """The Date header, formatted once per second instead of once per request."""

    def __init__(self):
        self.second, self.text = None, ""

    def now(self):
        second = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        if second != self.second:
            self.second, self.text = second, email.utils.formatdate(second, usegmt=True)
        return self.text


BODY_CHUNK = 4 * 1024 * 1024
TLS_BODY_CHUNK = 256 * 1024


def drop_at_once(connection):
    """Close with a reset: what the send buffer still holds (megabytes) is not trickled out to
    the client being dropped."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def content_type(path):
    name = os.path.basename(path)
    if name == "Packages":
        return "text/plain; charset=utf-8"
    if name.endswith(".gz"):
        return "application/gzip"
    return "application/octet-stream"


class BinhostRequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves regular files under PKGDIR, read-only, the way Portage's fetcher needs them.

    The generic request parsing of http.server (an email.message per request) costs more than
    sending the file; this handler reads the request line and headers itself, answers only GET
    and HEAD, and writes each header block with one call."""

    protocol_version = "HTTP/1.1"
    server_version = f"gentoo-binhost/{VERSION}"
    # Headers and body go out in separate calls: without TCP_NODELAY the tail of each response
    # waits for the client's delayed ACK.
    disable_nagle_algorithm = True

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.timeout = self.server.client_timeout
        else:
            # Kernel-side timeouts: a Python socket timeout costs a poll() before every recv/send.
            seconds = self.server.client_timeout
            value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        super().setup()

    def handle_one_request(self):
        self.close_connection = True
        # The socket timeout bounds each recv; the server's header watch bounds the request line
        # and headers together, so a client trickling a byte at a time cannot hold its slot.
        self.server.watch_header(self.connection)
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                return
            self.raw_requestline = line
            self.requestline = line.decode("latin-1").rstrip("\r\n")
            parts = self.requestline.split()
            if len(line) > MAX_REQUEST_LINE or len(parts) != 3:
                self.command, self.request_version = "", "HTTP/1.0"
                self.reply_plain(400)
                return
            self.command, self.path, self.request_version = parts
            self.headers = {}
            while True:
                header = self.rfile.readline(MAX_REQUEST_LINE + 1)
                if header in (b"\r\n", b"\n", b""):
                    break
                if len(self.headers) >= MAX_HEADERS or len(header) > MAX_REQUEST_LINE:
                    self.reply_plain(431)
                    return
                name, _, value = header.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if not self.server.header_complete(self.connection) or header == b"":
                return  # too slow, or gone: the connection was shut down
            connection = self.headers.get("connection", "").lower()
            if self.request_version == "HTTP/1.1":
                self.close_connection = connection == "close"
            elif self.request_version == "HTTP/1.0":
                self.close_connection = connection != "keep-alive"
            else:
                self.reply_plain(505)
                return
            if self.command not in ("GET", "HEAD"):
                self.close_connection = True
                self.reply_plain(405, [("Allow", "GET, HEAD")])
            elif self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers:
                # A body we do not read would be parsed as the next request.
                self.close_connection = True
                self.reply_plain(400)
            elif self.authorized():
                self.serve_file()
            else:
                self.reply_plain(401, [("WWW-Authenticate", 'Basic realm="gentoo-binhost"')])
        except (OSError, ssl.SSLError):  # timeouts (EAGAIN), resets, TLS errors: drop the client
            self.close_connection = True
        finally:
            self.server.header_complete(self.connection)

    def authorized(self):
        accepted = self.server.authorizations
        if not accepted:
            return True
        offered = self.headers.get("authorization", "").encode("latin-1", "replace")
        # Compare with every entry, so timing does not tell which user exists.
        return sum(hmac.compare_digest(offered, expected) for expected in accepted) > 0

    def send_head(self, code, headers, length):
        lines = [f"HTTP/1.1 {code} {HTTP_REASONS[code]}",
                 f"Date: {self.server.http_date.now()}",
                 f"Server: {self.server_version}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if code != 304:
            lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.log_request(code, length)

    def reply_plain(self, code, headers=()):
        body = f"{code} {HTTP_REASONS[code]}\n".encode()
        self.send_head(code, [("Content-Type", "text/plain; charset=utf-8")] + list(headers), len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def path_parts(self):
        """The decoded, non-empty segments of the request path (query and fragment dropped)."""
        raw_path = self.path.split("?", 1)[0].split("#", 1)[0]
        return [part for part in urllib.parse.unquote(raw_path).split("/") if part]

    def open_requested(self):
        """(descriptor, name) of the regular file or directory the request path names inside
        PKGDIR, or (None, None). Opened component by component relative to PKGDIR, a symlink
        never followed by the kernel: one that stays inside (the old All/ layout) is resolved
        here, one that leads out is refused. Decided on every request, never from a cache: a
        symlink placed after a 404 is judged like any other."""
        parts = self.path_parts()
        if any(part.startswith(".") or "\0" in part or "\\" in part for part in parts):
            return None, None
        self.root = self.server.document_root
        if self.server.environments is not None:
            # Several binhost environments: /<name>/... is the PKGDIR of environment <name>.
            if not parts or parts[0] not in self.server.environments:
                return None, None
            self.root = self.server.environments[parts[0]]
            parts = parts[1:]
        if len(parts) > 2 and parts[0] == STAGED_URL_DIR and STAGED_TOKEN.fullmatch(parts[1]):
            # A staged publication the gate asks a target about: its own index, PKGDIR's packages.
            token, parts = parts[1], parts[2:]
            if parts in (["Packages"], ["Packages.gz"]):
                return open_inside(self.root, [PUBLISHED_DIR, STAGED_PREFIX + token, parts[0]]), parts[0]
        elif parts in (["Packages"], ["Packages.gz"]) and os.path.lexists(
                os.path.join(self.root, PUBLISHED_DIR, CURRENT_PUBLICATION)):
            # Targets get the last complete build's index, not the one a running build rewrites.
            parts = [PUBLISHED_DIR, CURRENT_PUBLICATION, parts[0]]
        return open_inside(self.root, parts), parts[-1] if parts else ""

    def serve_file(self):
        descriptor, name = self.open_requested()
        if descriptor is None:
            # Portage falls back from Packages.gz to Packages only on a 404, never on a 403.
            self.reply_plain(404)
            return
        try:
            info = os.fstat(descriptor)
            if stat.S_ISDIR(info.st_mode) and self.server.listings:
                self.serve_listing(descriptor)
                return
            if not stat.S_ISREG(info.st_mode):
                self.reply_plain(404)
                return
            size, mtime = info.st_size, int(info.st_mtime)
            last_modified = ("Last-Modified", email.utils.formatdate(mtime, usegmt=True))
            if self.not_modified_since(mtime):
                self.send_head(304, [last_modified], 0)
                return
            byte_range = self.requested_range(size)
            if byte_range == "unsatisfiable":
                self.send_head(416, [("Content-Range", f"bytes */{size}")], 0)
                return
            start, end = byte_range or (0, size - 1)
            length = max(0, end - start + 1)
            # Never Content-Encoding for .gz: a client would hand Portage the decompressed file.
            headers = [("Content-Type", content_type(name)), last_modified, ("Accept-Ranges", "bytes")]
            if byte_range:
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            # Header and body leave in full packets together (nginx's tcp_nopush): measured faster
            # for big packages (make bench).
            cork = self.command == "GET" and length > 65536 and not isinstance(self.connection, ssl.SSLSocket)
            if cork:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            self.send_head(206 if byte_range else 200, headers, length)
            if self.command == "GET" and length:
                self.send_body(descriptor, start, length)
            if cork:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        finally:
            os.close(descriptor)

    def send_body(self, descriptor, offset, length):
        """The file's bytes, dropping a client that reads slower than the server's floor over
        each window, or not at all for the client timeout. Without TLS the socket is written
        without blocking, so the floor is checked at least once a second whatever the client
        does (a blocking sendfile would wait for a trickling reader chunk after chunk)."""
        rate, window = self.server.download_floor
        progress = {"started": time.monotonic(), "sent": 0}

        def check(sent):
            now = time.monotonic()
            progress["sent"] += sent
            if now - progress["started"] >= window:
                if progress["sent"] < rate * (now - progress["started"]):
                    drop_at_once(self.connection)
                    raise ConnectionAbortedError(f"slower than {rate} bytes/s over {window} s: dropped")
                progress["started"], progress["sent"] = now, 0

        if isinstance(self.connection, ssl.SSLSocket):
            while length > 0:  # the socket's timeout bounds each chunk
                chunk = os.pread(descriptor, min(length, TLS_BODY_CHUNK), offset)
                if not chunk:
                    raise ConnectionResetError("file shrank")
                self.connection.sendall(chunk)
                offset, length = offset + len(chunk), length - len(chunk)
                check(len(chunk))
            return
        waiting = select.poll()
        waiting.register(self.connection, select.POLLOUT)
        idle_since = time.monotonic()
        self.connection.setblocking(False)
        try:
            while length > 0:
                try:
                    sent = os.sendfile(self.connection.fileno(), descriptor, offset, min(length, BODY_CHUNK))
                except BlockingIOError:
                    sent = None
                if sent == 0:
                    raise ConnectionResetError("file shrank or client went away")
                if sent:
                    offset, length, idle_since = offset + sent, length - sent, time.monotonic()
                    check(sent)
                    continue
                waiting.poll(1000)
                check(0)
                if time.monotonic() - idle_since > self.server.client_timeout:
                    drop_at_once(self.connection)
                    raise TimeoutError("the client stopped reading")
        finally:
            self.connection.setblocking(True)

    def serve_listing(self, descriptor):
        """A plain HTML index of a directory (only with serve --index): its regular files and
        directories, no dotfiles, no symlinks."""
        clean = "/" + "".join(urllib.parse.quote(part) + "/" for part in self.path_parts())
        if not self.path.split("?", 1)[0].endswith("/"):
            # Built from the checked parts: `//evil.example` must not become an open redirect.
            self.send_head(301, [("Location", clean)], 0)
            return
        with os.scandir(descriptor) as listing:
            names = [entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
                     for entry in sorted(listing, key=lambda item: item.name)
                     if not entry.name.startswith(".")
                     and (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False))]
        entries = [f'<a href="{urllib.parse.quote(name)}">{html.escape(name)}</a>' for name in names]
        title = html.escape(urllib.parse.unquote(clean))
        body = (f"<!DOCTYPE html>\n<title>{title}</title>\n<h1>{title}</h1>\n<pre>\n"
                + "\n".join(entries) + "\n</pre>\n").encode()
        self.send_head(200, [("Content-Type", "text/html; charset=utf-8")], len(body))
        if self.command == "GET":
            self.wfile.write(body)

    def not_modified_since(self, mtime):
        header = self.headers.get("if-modified-since")
        if not header or "range" in self.headers:
            return False
        try:
            since = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            return False
        if since.tzinfo is None:
            since = since.replace(tzinfo=datetime.timezone.utc)
        # Exact, as nginx's default (if_modified_since exact): Portage asks with its copy's
        # TIMESTAMP + 5 s, so "not newer than that" would hide an index rewritten within 5 s.
        return int(since.timestamp()) == mtime

    def requested_range(self, size):
        """(start, end) for one satisfiable `bytes=` range, "unsatisfiable", or None for the whole."""
        unit, _, spec = self.headers.get("range", "").partition("=")
        if unit.strip() != "bytes" or "," in spec:
            return None
        first, dash, last = spec.strip().partition("-")
        if not dash:
            return None
        try:
            if first:
                start = int(first)
                end = int(last) if last else size - 1
            else:
                start, end = max(0, size - int(last)), size - 1
        except ValueError:
            return None
        if start < 0 or start >= size or (first and last and end < start):
            return "unsatisfiable"
        return start, min(end, size - 1)

    def log_request(self, code="-", size="-"):
        self.server.answered += 1
        if self.server.access_log:
            # Clients choose the request line: no terminal escape sequences into the log.
            request_line = self.requestline.translate(CONTROL_CHARACTERS)
            self.server.output.text(f'{self.client_address[0]} - - [{self.log_date_time_string()}]'
                                    f' "{request_line}" {code} {size}')

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """http.server's own messages (none on our request path) go to the access log too."""
        if self.server.access_log:
            self.server.output.text(f"{self.client_address[0]} - - {format % args}")


# Connections one client address may hold at once (a target fetches with one or a few).
MAX_CONNECTIONS_PER_CLIENT = 32
HEADER_WATCH_INTERVAL = 0.25
# A download slower than this over each window is dropped: a slow reader holds a slot, and enough
# of them would hold every slot. (A real target on a bad link still gets far more.)
MIN_DOWNLOAD_RATE = 1024  # bytes per second
DOWNLOAD_RATE_WINDOW = 30  # seconds
# Told to a client when every slot is busy and no waiting connection could make room.
BUSY_REPLY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def client_key(address):
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one host gets a
    whole /64 and could otherwise take every slot from its addresses)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class BinhostServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, document_root, output, *, ssl_context=None, authorizations=(),
                 client_timeout=30, max_connections=256, access_log=True, listings=False,
                 download_floor=(MIN_DOWNLOAD_RATE, DOWNLOAD_RATE_WINDOW)):
        if isinstance(document_root, dict):  # {environment name: its PKGDIR}
            self.environments = {name: os.path.realpath(path) for name, path in document_root.items()}
            self.document_root = "/nonexistent"
        else:
            self.environments = None
            self.document_root = os.path.realpath(document_root)
        self.output = output
        self.ssl_context = ssl_context
        self.authorizations = [value.encode("latin-1") for value in authorizations]
        self.client_timeout = client_timeout
        self.access_log = access_log
        self.answered = 0  # requests answered: add-target's proof that the target reached us
        self.listings = listings
        self.http_date = HttpDate()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_per_client = max(1, min(MAX_CONNECTIONS_PER_CLIENT, max_connections // 4))
        self.download_floor = download_floor  # (bytes per second, window in seconds)
        self.clients = {}  # address -> open connections
        self.header_deadlines = {}  # connection -> when its request line and headers must be in
        self.watch_lock = threading.Lock()
        self.closing = threading.Event()
        super().__init__(address, BinhostRequestHandler)
        threading.Thread(target=self.drop_slow_headers, name="binhost-header-watch", daemon=True).start()

    def watch_header(self, connection):
        with self.watch_lock:
            self.header_deadlines[connection] = time.monotonic() + self.client_timeout

    def header_complete(self, connection):
        """Stop watching; False when the watch had already dropped the connection."""
        with self.watch_lock:
            return self.header_deadlines.pop(connection, None) is not None

    def drop_waiting(self, chosen):
        """Stop watching the connections chosen({connection: deadline}) lists, and shut them down."""
        with self.watch_lock:
            dropped = chosen(self.header_deadlines)
            for connection in dropped:
                del self.header_deadlines[connection]
        for connection in dropped:  # the blocked read returns, and the handler gives up
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def drop_slow_headers(self):
        while not self.closing.wait(HEADER_WATCH_INTERVAL):
            now = time.monotonic()
            self.drop_waiting(lambda deadlines: [each for each in deadlines if deadlines[each] < now])

    def server_close(self):
        self.closing.set()
        super().server_close()

    def handle_error(self, request, client_address):
        """One line instead of socketserver's traceback: a broken request must not flood stderr."""
        error = sys.exc_info()[1]
        self.output.warn(f"{client_address[0]}: request failed: {error!r}")

    def process_request(self, request, client_address):
        # One address (an IPv6 /64) cannot take every slot: past its share, its new connections
        # are closed.
        address = client_key(client_address[0])
        with self.watch_lock:
            if self.clients.get(address, 0) >= self.max_per_client:
                self.shutdown_request(request)
                return
            self.clients[address] = self.clients.get(address, 0) + 1
        # Bounding connections: while every slot is busy, the connection that has waited longest
        # for its request line or headers (idle keep-alive, or a slow client from elsewhere)
        # makes room. The accept loop never waits longer than that: with no room, a 503.
        if not self.slots.acquire(blocking=False):
            self.drop_waiting(lambda deadlines: [min(deadlines, key=deadlines.get)] if deadlines else [])
            if not self.slots.acquire(timeout=0.1):
                self.refuse_busy(request)
                self.forget_client(address)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            self.forget_client(address)
            raise

    def refuse_busy(self, request):
        if self.ssl_context is None:  # a fresh socket's send buffer is empty: this never blocks
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(BUSY_REPLY)
        self.shutdown_request(request)

    def forget_client(self, address):
        with self.watch_lock:
            self.clients[address] -= 1
            if not self.clients[address]:
                del self.clients[address]

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
            self.forget_client(client_key(client_address[0]))

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        # The TLS handshake runs in the connection's thread, so a slow client cannot stall accept(),
        # and within the header deadline, so a slow one cannot hold its slot either.
        request.settimeout(self.client_timeout)
        self.watch_header(request)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        finally:
            self.header_complete(request)
        with tls:
            super().finish_request(tls, client_address)


def make_server(bind, port, document_root, output, **options):
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    server_class = type("BinhostServerV6", (BinhostServer,), {"address_family": family})
    try:
        return server_class((bind, port), document_root, output, **options)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise BinhostError(f"port {port} on {bind} is already in use: stop the other server or"
                               " choose another with --port") from None
        raise BinhostError(f"cannot listen on {bind}:{port}: {error.strerror}") from None


def tls_context(env):
    if not env.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(env.tls_cert, env.tls_key or None)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"cannot load TLS certificate {env.tls_cert} / key"
                         f" {env.tls_key or '(in the certificate file)'}: {error}") from None
    return context


def read_credentials(env):
    """user:password lines of the auth file; blank lines and # comments are skipped."""
    if not env.auth_file:
        return []
    try:
        with open(env.auth_file, encoding="utf-8") as handle:
            if os.fstat(handle.fileno()).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UsageError(f"auth file {env.auth_file} can be read or changed by its group or"
                                 f" other users: its passwords are secrets; chmod 600 {env.auth_file}")
            lines = [line.strip() for line in handle]
    except OSError as error:
        raise UsageError(f"cannot read auth file {env.auth_file}: {error.strerror}") from None
    credentials = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        # Portage does not percent-decode credentials in sync-uri: they must be URL-safe as they are.
        if not colon or not user or not password or any(c in line for c in "@/ \t?#"):
            raise UsageError(f"{env.auth_file}:{number}: expected user:password without"
                             " spaces, '@', '/', '?' or '#'")
        credentials.append((user, password))
    if not credentials:
        raise UsageError(f"auth file {env.auth_file} has no user:password line")
    return credentials


def basic_authorizations(credentials):
    return ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            for user, password in credentials]


@contextlib.contextmanager
def stop_on_sigterm(server):
    """SIGTERM ends serve_forever() normally: shutdown() must come from another thread, and an
    exception raised at an arbitrary point of the accept loop could leave it half-done."""
    def stop(_signum, _frame):
        threading.Thread(target=server.shutdown, name="binhost-stop", daemon=True).start()

    with signal_handlers((signal.SIGTERM,), stop):
        yield


def start_server(environments, output, bind, port, access_log=True, listings=False, tunnel=False):
    """A server for every binhost environment of the configuration (Config.environments())."""
    missing = [env.pkgdir for env in environments.values() if not os.path.isdir(env.pkgdir)]
    if len(missing) == len(environments):
        raise BinhostError(f"PKGDIR {missing[0]} does not exist: build packages first,"
                           f" or set pkgdir = in [binhost] of {next(iter(environments.values())).config_path}")
    for pkgdir in missing:
        output.warn(f"PKGDIR {pkgdir} does not exist yet: its targets get 404s until it is built")
    env = next(iter(environments.values()))  # server settings are shared
    document_root = env.pkgdir if None in environments else {
        name: each.pkgdir for name, each in environments.items()}
    return make_server(bind, port, document_root, output,
                       ssl_context=None if tunnel else tls_context(env),
                       authorizations=basic_authorizations(read_credentials(env)),
                       client_timeout=env.client_timeout, access_log=access_log,
                       listings=listings)


@contextlib.contextmanager
def background_server(environments, output, bind, port, access_log=False, tunnel=True):
    """A server thread for the duration of one command (through the tunnel, or on the
    configured port when nothing serves it)."""
    server = start_server(environments, output, bind, port, access_log, tunnel=tunnel)
    thread = threading.Thread(target=server.serve_forever, name="binhost-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def watch_tunnel(process, server, output):
    """Stop serving when the tunnel dies: without it no target can reach us."""
    process.wait()
    if process.returncode != -signal.SIGTERM:  # not our own stop
        output.warn(f"ssh tunnel exited (exit {process.returncode})")
    server.shutdown()


# ------------------------------------------------------------------------------------------------
# Pure parsers: text in, values out (make.conf, CPU flags, emerge's output, the package index)
# ------------------------------------------------------------------------------------------------


# ---- make.conf: its assignments, read and edited in place, and EMERGE_DEFAULT_OPTS -------------

class _Assignment:
    """One `NAME=value` of a make.conf: where its value is, and how it is quoted."""

    def __init__(self, name, start, end, quote):
        self.name, self.start, self.end, self.quote = name, start, end, quote  # value span


def _assignments(text):
    """The assignments of a make.conf (bash-like syntax) in order, skipping comments and never
    looking inside a quoted value (which may span lines)."""
    found, pos, length = [], 0, len(text)
    name_re = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)=")
    while pos < length:
        match = name_re.match(text, pos)
        line_end = text.find("\n", pos)
        line_end = length if line_end < 0 else line_end
        if not match or match.start(1) > line_end:
            pos = line_end + 1
            continue
        start = match.end()
        quote = text[start] if start < length and text[start] in "\"'" else ""
        if quote:
            end = start + 1
            while end < length and text[end] != quote:
                end += 2 if quote == '"' and text[end] == "\\" else 1
            end = min(end + 1, length)
        else:
            end = start
            while end < length and not text[end].isspace() and text[end] != "#":
                end += 1
        found.append(_Assignment(match.group(1), start, end, quote))
        next_line = text.find("\n", end)
        pos = length if next_line < 0 else next_line + 1
    return found


def _unquote(value, quote):
    if quote and len(value) >= 2 and value.endswith(quote):
        return value[1:-1]
    return value[1:] if quote else value  # an unterminated quote: the file ends inside it


def _appended(text, lines):
    """text with lines added at its end, on a line of their own."""
    return text + ("" if not text or text.endswith("\n") else "\n") + lines


def _requote(inner, quote):
    """The value text for `inner`: the original quotes, or double quotes when it needs some."""
    if quote:
        return quote + inner + quote
    return '"' + inner + '"' if re.search(r"\s", inner) else inner


_CACHE_PARAMS = ("l1-cache-size=", "l1-cache-line-size=", "l2-cache-size=")


# Boolean -m options users set on purpose that say nothing about the CPU: set_common_flags
# keeps them. Every other -mFOO/-mno-FOO word in a *FLAGS variable is taken for a CPU feature
# (what a -march=native expansion or an earlier `cpu --apply` wrote) and replaced.
NON_CPU_M_OPTIONS = frozenset("""
    16 32 64 x32 80387 red-zone omit-leaf-frame-pointer stackrealign soft-float hard-float
    general-regs-only ieee-fp fancy-math-387 push-args fentry record-mcount nop-mcount
    align-double sseregparm rtd vzeroupper stv accumulate-outgoing-args inline-all-stringops
    inline-stringops-dynamically align-stringops tls-direct-seg-refs cld 8bit-idiv
    direct-extern-access indirect-branch-register indirect-branch-cs-prefix relax-cmpxchg-loop
    long-double-64 long-double-80 long-double-128 96bit-long-double 128bit-long-double
    manual-endbr skip-rax-setup mitigate-rop force-drap dispatch-scheduler prefer-avx128
    outline-atomics strict-align pc-relative-literal-loads track-speculation
    low-precision-div low-precision-sqrt low-precision-recip-sqrt
""".split())


_BOOLEAN_M = re.compile(r"-m(no-)?([A-Za-z0-9][A-Za-z0-9_.+-]*)")


def _boolean_state(flag):
    """(feature name, "enabled"/"disabled") of -mFOO / -mno-FOO, or None for -mFOO=VALUE."""
    match = _BOOLEAN_M.fullmatch(flag)
    if not match:
        return None
    return match.group(2), "disabled" if match.group(1) else "enabled"


def _is_cpu_word(word):
    if word.startswith(("-march=", "-mcpu=", "-mtune=")):
        return True
    if word.startswith("--param=") and word[len("--param="):].startswith(_CACHE_PARAMS):
        return True
    state = _boolean_state(word)
    return state is not None and state[0] not in NON_CPU_M_OPTIONS


def _edit_words(inner, flags, mode):
    """`inner` (a variable's value, without quotes) with its CPU words removed.

    mode "strip": nothing is inserted; "replace": `flags` go where the first CPU word was;
    "append": the same, or at the end when there was no CPU word. Other words, and the line
    breaks of a value spanning lines, stay as they were.
    """
    pieces = re.split(r"(\s+)", inner)  # word, blank, word, blank, ... (words at even indexes)
    words = list(range(0, len(pieces), 2))
    remove = []
    for position, index in enumerate(words):
        word = pieces[index]
        if _is_cpu_word(word):
            remove.append(index)
        elif word == "--param" and position + 1 < len(words):
            following = words[position + 1]
            if pieces[following].startswith(_CACHE_PARAMS):
                remove += [index, following]
    if not remove:
        if mode != "append" or not flags:
            return inner
        stripped = inner.rstrip()
        return (stripped + " " if stripped else "") + " ".join(flags) + inner[len(stripped):]
    first, gone, insert = min(remove), set(remove), mode != "strip" and flags
    for index in remove:
        if index == first and insert:
            continue
        # Take one neighbouring blank along, never a line break.
        for blank in (index - 1, index + 1):
            if 0 <= blank < len(pieces) and blank not in gone and "\n" not in pieces[blank]:
                gone.add(blank)
                break
    if insert:
        pieces[first] = " ".join(flags)
        gone.remove(first)
    return "".join(piece for index, piece in enumerate(pieces) if index not in gone)


def _has_cpu_words(inner):
    return _edit_words(inner, [], "strip") != inner


def _references(inner, names):
    return any(re.search(r"\$\{?%s\b" % name, inner) for name in names)


def make_conf_value(text, name):
    """The value make.conf gives name: its last assignment, with references to name itself
    (NAME="${NAME} ...") expanded."""
    value = ""
    for assignment in _assignments(text):
        if assignment.name == name:
            raw = _unquote(text[assignment.start:assignment.end], assignment.quote)
            previous = value
            value = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), lambda _match: previous, raw).strip()
    return value


# Variables whose value can carry CPU flags, the first one preferred (stage3 make.conf layout).
FLAGS_VARIABLES = ("COMMON_FLAGS", "CFLAGS", "CXXFLAGS", "FCFLAGS", "FFLAGS")


def set_common_flags(make_conf_text, flags):
    """make.conf text with the CPU flags replaced by `flags` (a list of words, or a string).

    CPU words are -march=, -mcpu=, -mtune=, the l1/l2 cache --params and -mFOO/-mno-FOO
    features (not the NON_CPU_M_OPTIONS such as -mno-omit-leaf-frame-pointer); every other word
    (-O2 -pipe ${COMMON_FLAGS} -mfpmath=sse ...), comment and line stays. `flags` go where the
    first CPU word was, else at the end of the value. The variable edited is COMMON_FLAGS, or
    CFLAGS when there is no COMMON_FLAGS; of several assignments, the last one that carries
    CPU words and whose value reaches the final one (later ones reference the variable), else
    the last. CFLAGS/CXXFLAGS/FCFLAGS/FFLAGS lose their own CPU words (which would override
    ours, -march=native meaning the binhost's CPU) when their value includes the edited
    variable's (CFLAGS="${COMMON_FLAGS} ..."), and get them replaced by `flags` otherwise.
    With neither COMMON_FLAGS nor CFLAGS, the stage3 block (COMMON_FLAGS="-O2 -pipe FLAGS"
    and the four *FLAGS="${COMMON_FLAGS}") is appended. Quoting ("..." or '...') is kept; a
    value spanning lines keeps its line breaks. Applying the same flags twice changes nothing.
    """
    flags = flags.split() if isinstance(flags, str) else list(flags)
    assignments = [a for a in _assignments(make_conf_text) if a.name in FLAGS_VARIABLES]
    primary = next((name for name in ("COMMON_FLAGS", "CFLAGS")
                    if any(a.name == name for a in assignments)), None)
    if primary is None:
        return _appended(make_conf_text, 'COMMON_FLAGS="%s"\n' % " ".join(["-O2", "-pipe"] + flags)
                         + "".join('%s="${COMMON_FLAGS}"\n' % name for name in FLAGS_VARIABLES[1:]))

    inner_of = {id(a): _unquote(make_conf_text[a.start:a.end], a.quote) for a in assignments}
    own = [a for a in assignments if a.name == primary]
    carrying = [a for index, a in enumerate(own) if _has_cpu_words(inner_of[id(a)])
                and all(_references(inner_of[id(later)], [primary]) for later in own[index + 1:])]
    target = (carrying or own)[-1]
    # Variables that get the primary's value, directly or through another one
    # (CXXFLAGS="${CFLAGS}" with CFLAGS="${COMMON_FLAGS}").
    inheriting, grown = {primary}, True
    while grown:
        grown = {a.name for a in assignments if _references(inner_of[id(a)], sorted(inheriting))} - inheriting
        inheriting |= grown

    edits = []
    for assignment in assignments:
        inner = inner_of[id(assignment)]
        # The primary's other assignments, and the variables inheriting it, get the flags through
        # the target: they only lose their own CPU words.
        mode = "append" if assignment is target else "strip" if assignment.name in inheriting else "replace"
        new = _edit_words(inner, flags, mode)
        if new != inner:
            edits.append((assignment, _requote(new, assignment.quote)))
    for assignment, value in reversed(edits):
        make_conf_text = make_conf_text[:assignment.start] + value + make_conf_text[assignment.end:]
    return make_conf_text


def set_cpu_flags(text, flags, kind, variable="CPU_FLAGS_X86"):
    """`text` with variable (CPU_FLAGS_X86, CPU_FLAGS_ARM) set to `flags` (a list of names, or a string).

    kind "make.conf": every VARIABLE=... assignment gets the value (quotes kept), or
    VARIABLE="..." is appended. kind "package.use" (cpuid2cpuflags' recommended
    `*/* CPU_FLAGS_X86: ...` in package.use/00cpu-flags): the variable's group of every
    `*/*` line is replaced (a leading -* reset is kept), or such a line is appended.
    Per-package lines (dev-libs/foo CPU_FLAGS_X86: -avx2) are the user's and stay.
    """
    flags = flags.split() if isinstance(flags, str) else list(flags)
    value = " ".join(flags)
    if kind == "make.conf":
        found = [a for a in _assignments(text) if a.name == variable]
        for assignment in reversed(found):
            text = (text[:assignment.start] + _requote(value, assignment.quote or '"')
                    + text[assignment.end:])
        return text if found else _appended(text, f'{variable}="{value}"\n')
    if kind != "package.use":
        raise ValueError("unknown kind %r (make.conf or package.use)" % kind)

    lines, replaced = text.splitlines(keepends=True), False
    for index, line in enumerate(lines):
        body = line.rstrip("\r\n")
        words = body.split("#", 1)[0].split()
        if len(words) < 2 or words[0] != "*/*" or variable + ":" not in words:
            continue
        group = words.index(variable + ":")
        end = next((i for i in range(group + 1, len(words)) if words[i].endswith(":")),
                   len(words))
        reset = ["-*"] if "-*" in words[group + 1:end] else []
        comment = " #" + body.split("#", 1)[1] if "#" in body else ""
        new_words = words[:group + 1] + reset + flags + words[end:]
        lines[index] = " ".join(new_words) + comment + line[len(body):]
        replaced = True
    text = "".join(lines)
    return text if replaced else _appended(text, f"*/* {variable}: {value}\n")


# EMERGE_DEFAULT_OPTS travels with the target's make.conf into the binhost root. Every emerge we
# run (the plan, the build, the gate, the install) gets the same filtered value in its environment,
# so the four answer one question, and the binhost's make.conf stays an exact copy. Dropped: what
# asks (kept for an install on a terminal), what changes the lines a plan is read from, what
# decides whether binaries are written or used (ours decide), what only pretends or fetches, and
# what writes the configuration. Everything else is kept: --jobs, --load-average, --with-bdeps,
# --exclude, --changed-deps, --keep-going, ...
EMERGE_OPTS_ASKING = frozenset({"--ask", "--ask-enter-invalid"})
EMERGE_OPTS_DROPPED = frozenset({
    "--columns", "--quiet-repo-display", "--tree", "--unordered-display", "--changelog", "--quiet",
    "--verbose", "--verbose-conflicts", "--verbose-slot-rebuilds", "--color", "--nospinner", "--alert",
    "--quiet-fail", "--buildpkg", "--buildpkgonly", "--buildpkg-exclude", "--usepkg", "--usepkgonly",
    "--usepkg-exclude", "--usepkg-exclude-live", "--getbinpkg", "--getbinpkgonly", "--binpkg-respect-use",
    "--binpkg-changed-deps", "--rebuilt-binaries", "--rebuilt-binaries-timestamp", "--pretend",
    "--fetchonly", "--fetch-all-uri", "--autounmask-write", "--autounmask-continue", "--search",
    "--searchdesc", "--regex-search-auto", "--ignore-default-opts"})
# Short forms: -a -p -f -t -q -v -l -b -B -k -K -g -G.
EMERGE_SHORT_OPTIONS = {"a": "--ask", "p": "--pretend", "f": "--fetchonly", "t": "--tree", "q": "--quiet",
                        "v": "--verbose", "l": "--changelog", "b": "--buildpkg", "B": "--buildpkgonly",
                        "k": "--usepkg", "K": "--usepkgonly", "g": "--getbinpkg", "G": "--getbinpkgonly"}
# Options whose value may be the next word (others take one only as y/n or a number).
EMERGE_OPTS_WITH_VALUE = frozenset({
    "--buildpkg-exclude", "--exclude", "--usepkg-exclude", "--rebuild-exclude", "--rebuild-ignore",
    "--reinstall-atoms", "--useoldpkg-atoms", "--getbinpkg-exclude", "--getbinpkg-include", "--backtrack",
    "--config-root", "--root", "--sysroot", "--prefix", "--accept-properties", "--accept-restrict",
    "--rebuilt-binaries-timestamp", "--reinstall", "--with-bdeps", "--with-test-deps", "--color",
    "--jobs", "--load-average", "--deep", "--binpkg-respect-use", "--binpkg-changed-deps"})
OPTIONAL_OPTION_VALUE = re.compile(r"y|n|yes|no|true|false|[0-9.]+", re.IGNORECASE)


def filter_emerge_default_opts(value, interactive=False):
    """EMERGE_DEFAULT_OPTS as our emerge runs may use it (see above); interactive: an install on
    a terminal, where --ask can be answered."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    dropped = EMERGE_OPTS_DROPPED | (frozenset() if interactive else EMERGE_OPTS_ASKING)
    kept, position = [], 0
    while position < len(words):
        word, position = words[position], position + 1
        following = words[position] if position < len(words) else None
        if word.startswith("--"):
            name = word.partition("=")[0]
            option = [word]
            if "=" not in word and following is not None and not following.startswith("-") and (
                    name in EMERGE_OPTS_WITH_VALUE or OPTIONAL_OPTION_VALUE.fullmatch(following)):
                option.append(following)
                position += 1
            if name not in dropped:
                kept += option
        elif re.fullmatch(r"-[A-Za-z0-9]+", word):
            letters = [letter for letter in re.findall(r"j[0-9]*|[A-Za-z0-9]", word[1:])
                       if EMERGE_SHORT_OPTIONS.get(letter) not in dropped]
            if letters:
                kept.append("-" + "".join(letters))
                if letters[-1] == "j" and following is not None and following.isdigit():
                    kept.append(following)
                    position += 1
        else:
            kept.append(word)
    return shlex.join(kept)


# ---- CPU flags: gcc's answers about -march=native, /proc/cpuinfo, cpuid2cpuflags ---------------

def _cc1_program(word):
    return word == "cc1" or word.endswith("/cc1")


def parse_cc1_flags(cc1_line):
    """The code generation options of gcc's cc1 command line, in order.

    Keeps every -m word (-march=, -mcpu=, -mtune=, -mFEATURE, -mno-FEATURE, -mabi=...) and the
    --param options (a two-word `--param NAME=VALUE` becomes the single word --param=NAME=VALUE,
    which gcc also accepts, so every item is one make.conf word). Given the whole `gcc -v`
    output, only the cc1 line is read ([] without one); a single line without the cc1 program
    (bare flags) is read as it is. Words such as `-o /dev/null` or -dumpbase are skipped.
    """
    lines = [line for line in cc1_line.splitlines() if line.strip()]
    found = [line for line in lines if _cc1_program(line.split()[0])]
    if not found and len(lines) != 1:
        return []
    words = (found or lines)[0].split()
    flags = []
    for index, word in enumerate(words):
        if word.startswith(("-m", "--param=")):
            flags.append(word)
        elif word == "--param" and index + 1 < len(words):
            flags.append("--param=" + words[index + 1])
    return flags


# "  -mavx2   [enabled]", "  -march=   znver3", "  -mbranch-cost=<0,5>   3", "  -mabi=ABI  lp64":
# the option (with its '='), an optional placeholder glued to it, then the state or value.
_HELP_OPTION = re.compile(r"\s+(-[^\s=<]+=?)"
                          r"(?:<[^>]*>|\[[^\]]*\](?=\s|$)|[A-Z]+(?=\s|$))?"
                          r"(?:\s+(.*))?")


def enabled_target_options(help_text):
    """{option: state} from `gcc -Q --help=target` output.

    Booleans map to "enabled" or "disabled" ("-mavx2": "enabled"); options taking a value keep
    their `=` and map to the value ("-march=": "znver3", "-mcpu=": ""); value placeholders such
    as <0,5>, ABI or [none,...] are dropped. Aliases map to what they stand for ("-msse5":
    "-mavx"). Only the option block is read (it ends at the first empty line, before the
    "Known valid arguments" lists). A value gcc wrapped onto the next line is joined back.
    """
    options, last, started = {}, None, False
    for line in help_text.splitlines():
        line = line.rstrip()
        if not line.strip():
            if started:
                break
            continue
        if line.startswith("  -"):
            match = _HELP_OPTION.fullmatch(line)
            if not match:
                continue
            started = True
            value = (match.group(2) or "").strip()
            if value in ("[enabled]", "[disabled]", "[default]", "[ignored]"):
                value = value[1:-1]
            last = match.group(1)
            options[last] = value
        elif started and last is not None and line.startswith(" "):
            # A continuation: gcc wrapped a long value. It breaks after '-' or '+' inside a word.
            value = options[last]
            joiner = "" if not value or value[-1] in "-+," else " "
            options[last] = value + joiner + line.strip()
    return options


# -m words of the cc1 line that belong to the ABI the toolchain was built for (CHOST,
# multilib), not to the CPU: putting them into COMMON_FLAGS would break 32-bit multilib builds.
ABI_OPTIONS = ("-m16", "-m32", "-m64", "-mx32", "-mlittle-endian", "-mbig-endian", "-mabi=")

# gcc options that are aliases of two ISA levels, not features of their own. -msse4 enables
# SSE4.1 *and* SSE4.2 (plus POPCNT); -mno-sse4 disables SSE4.1 and everything above.
# `gcc -Q --help=target` lists -msse4 and a separate -mno-sse4 entry, and reading "-mno-sse4
# [disabled]" as "-msse4 wanted" made resolve-march-native emit -msse4 on SSE4.1-only CPUs
# (issues #177, #197): binaries then died with SIGILL on SSE4.2 instructions.
SSE4_ALIASES = {"-msse4": "-msse4.2", "-mno-sse4": "-mno-sse4.1"}


def resolve_native_flags(cc1_line, baseline_help="", native_help=""):
    """The explicit flags equivalent to -march=native (-mcpu=native), as resolve-march-native does.

    `cc1_line` is what `gcc -v ... -march=native` passed to cc1. The result is its -march=X (or
    -mcpu=X) followed only by the -mFOO/-mno-FOO flags whose state differs from what X implies
    according to `baseline_help` (`gcc -Q --help=target -march=X`). Without help texts every
    feature flag of the cc1 line is kept: longer, but exactly equivalent. Always:

    * --param cache sizes are dropped (tuning hints, not ISA), and so are ABI words (-m64,
      -mabi=lp64, -mlittle-endian: they come with the toolchain);
    * -mtune=X is dropped when X is the arch; a different one (-march=k8-sse3 -mtune=k8,
      -mtune=generic on CPUs gcc does not know) is kept: it also selects __tune_*__ macros;
    * -msse4/-mno-sse4 are never emitted (see SSE4_ALIASES), and a -mno-FOO=VALUE (invalid:
      resolve-march-native once printed -mno-branch-cost=2, #127) is dropped;
    * a flag is kept, whatever the baseline says, when `native_help` contradicts the cc1 line
      for it: the help display is then unreliable for that option (gcc 12 shows -mhle
      "[enabled]" even with -mno-hle), so it cannot prove the flag redundant either;
    * features that native_help and baseline_help show in different states but the cc1 line
      does not mention are added (as resolve-march-native does), booleans only.

    Returns [] when gcc could not name the CPU (the cc1 line has no -march=/-mcpu=, as with
    some aarch64 cores): -march=native then meant gcc's defaults. Raises ValueError when
    `cc1_line` holds no cc1 command (gcc missing or failing on the target) and no flags.
    """
    flags = parse_cc1_flags(cc1_line)
    if not flags and not any(_cc1_program(line.split()[0])
                             for line in cc1_line.splitlines() if line.strip()):
        raise ValueError("no cc1 command line in gcc's -v output")
    baseline = enabled_target_options(baseline_help)
    native = enabled_target_options(native_help)

    arch_flags = [flag for flag in flags if flag.startswith(("-march=", "-mcpu="))]
    if not arch_flags:
        return []
    arch_name = arch_flags[0].split("=", 1)[1].split("+", 1)[0]
    # Features the cc1 line sets, so that the help texts cannot add them a second time.
    mentioned = {state[0] for state in map(_boolean_state, flags) if state}

    result = []
    for flag in flags:
        if flag.startswith(("--param", *ABI_OPTIONS)) or flag == "-mtune=" + arch_name:
            continue
        if flag.startswith(("-march=", "-mcpu=", "-mtune=")):
            result.append(flag)
            continue
        if flag in SSE4_ALIASES:
            # Never in real cc1 lines (the driver uses -msse4.1/-msse4.2); if present, keep its
            # meaning unless the explicit level is given anyway.
            flag = SSE4_ALIASES[flag]
            if _boolean_state(flag)[0] in mentioned:
                continue
        state = _boolean_state(flag)
        if state is None:
            if flag.startswith("-mno-"):
                continue  # -mno-branch-cost=2 and the like: gcc rejects them
            option, _, value = flag.partition("=")
            if baseline.get(option + "=") != value:
                result.append(flag)
            continue
        name, wanted = state
        implied = baseline.get("-m" + name)
        shown_native = native.get("-m" + name)
        help_unreliable = shown_native in ("enabled", "disabled") and shown_native != wanted
        if implied != wanted or help_unreliable:
            result.append(flag)

    for option, shown_native in native.items():
        name = option[2:]
        # Not the separate "-mno-FOO" entries of the help (they mirror -mFOO), nor the aliases.
        if (option.startswith("-mno-") or option in SSE4_ALIASES or option.endswith("=")
                or name in mentioned or option in ABI_OPTIONS
                or shown_native not in ("enabled", "disabled")):
            continue
        implied = baseline.get(option)
        if implied in ("enabled", "disabled") and implied != shown_native:
            result.append(option if shown_native == "enabled" else "-mno-" + name)

    return list(dict.fromkeys(result))


# Gentoo's USE_EXPAND values of CPU_FLAGS_X86 (profiles/desc/cpu_flags_x86.desc, 2025).
CPU_FLAGS_X86_NAMES = frozenset("""
    3dnow 3dnowext aes avx avx_vnni avx2 avx512_4fmaps avx512_4vnniw avx512_bf16 avx512_bitalg
    avx512_fp16 avx512_vbmi2 avx512_vnni avx512_vp2intersect avx512_vpopcntdq avx512bw avx512cd
    avx512dq avx512er avx512f avx512ifma avx512pf avx512vbmi avx512vl bmi1 bmi2 f16c fma3 fma4
    mmx mmxext padlock pclmul popcnt rdrand sha sse sse2 sse3 sse4_1 sse4_2 sse4a ssse3
    vpclmulqdq xop
""".split())

# /proc/cpuinfo flags whose CPU_FLAGS_X86 name differs (the bracketed names in
# cpu_flags_x86.desc, and cpuid2cpuflags' CPUID table). Every other flag maps to itself when it
# is in CPU_FLAGS_X86_NAMES. Careful: cpuinfo's "ssse3" is SSSE3, SSE3 is "pni"; "sha" is not
# a cpuinfo flag (it is "sha_ni"); "3dnowprefetch" is not 3DNow!; ABM implies POPCNT on AMD.
CPUINFO_TO_CPU_FLAGS_X86 = {
    "fma": ("fma3",),
    "pni": ("sse3",),
    "pclmulqdq": ("pclmul",),
    "sha_ni": ("sha",),
    "phe": ("padlock",),
    "abm": ("popcnt",),
    "sse": ("sse", "mmxext"),  # MMXEXT is a subset of SSE (Intel CPUs do not list mmxext)
}


def cpu_flags_x86_from_cpuinfo(flags_line):
    """Sorted CPU_FLAGS_X86 names from the `flags : ...` line of an x86 /proc/cpuinfo.

    Also takes the bare list of flags. An ARM `Features : ...` line gives [] (its "aes" or
    "sha2" are not x86 features).
    """
    name, colon, rest = flags_line.partition(":")
    if colon:
        if name.strip() != "flags":
            return []
        flags_line = rest
    mapped = {each for flag in flags_line.split() for each in CPUINFO_TO_CPU_FLAGS_X86.get(flag, (flag,))}
    return sorted(mapped & CPU_FLAGS_X86_NAMES)


# CPU_FLAGS_ARM as cpuid2cpuflags sets it (src/arm.c, 2025), from the kernel's names for the
# hwcap bits it tests, which /proc/cpuinfo's Features line prints: {flag: features it needs}.
# aarch64 has every 32-bit unit (neon is asimd there); a 32-bit kernel names its own.
CPU_FLAGS_ARM_AARCH64 = {
    "edsp": (), "thumb": (), "neon": ("asimd",), "neon-fp16": ("asimd",), "vfp": ("asimd",),
    "vfpv3": ("asimd",), "vfpv4": ("asimd",), "vfp-d32": ("asimd",), "asimd": ("asimd",),
    "aes": ("aes",), "sha1": ("sha1",), "sha2": ("sha2",), "crc32": ("crc32",), "sm4": ("sm4",),
    "asimddp": ("asimddp",), "asimdfhm": ("asimdfhm",), "asimdhp": ("asimdhp",), "sve": ("sve",),
    "sve2": ("sve2",), "i8mm": ("i8mm",)}
CPU_FLAGS_ARM_32 = {
    "edsp": ("edsp",), "iwmmxt": ("iwmmxt",), "neon": ("neon",), "neon-fp16": ("neon", "half"),
    "thumb": ("thumb",), "vfp": ("vfp",), "vfpv3": ("vfpv3",), "vfpv4": ("vfpv4",), "vfp-d32": ("vfpd32",),
    "asimddp": ("asimddp",), "asimdfhm": ("asimdfhm",), "asimdhp": ("asimdhp",), "i8mm": ("i8mm",),
    "aes": ("aes",), "sha1": ("sha1",), "sha2": ("sha2",), "crc32": ("crc32",)}
# The architecture versions each `uname -m` (its endianness letter off) implies, and thumb2 from v6t2.
ARM_SUBARCH_FLAGS = {"aarch64": "v4 v5 v6 v7 v8 thumb2", "armv8": "v4 v5 v6 v7 v8 thumb2",
                     "armv7": "v4 v5 v6 v7 thumb2", "armv6": "v4 v5 v6", "armv5tej": "v4 v5",
                     "armv5te": "v4 v5", "armv5t": "v4 v5", "armv4t": "v4", "armv4": "v4"}


def cpu_flags_arm_from_cpuinfo(features_line, machine):
    """Sorted CPU_FLAGS_ARM names from the `Features : ...` line of an arm or aarch64
    /proc/cpuinfo and `uname -m`, as cpuid2cpuflags derives them from the same hwcap bits. A
    32-bit userland under a 64-bit kernel reads 32-bit names while uname says aarch64: an
    ARMv8 CPU in its 32-bit state."""
    features = set(features_line.partition(":")[2].split() if ":" in features_line else features_line.split())
    machine = machine.strip()
    machine = machine[:-1] if machine.endswith(("l", "b")) and machine != "aarch64" else machine
    if not features or machine not in ARM_SUBARCH_FLAGS:
        return []
    if machine == "aarch64" and "asimd" not in features and features & {"neon", "vfp", "edsp", "half"}:
        machine = "armv8"
    table = CPU_FLAGS_ARM_AARCH64 if machine == "aarch64" else CPU_FLAGS_ARM_32
    names = {flag for flag, needed in table.items() if set(needed) <= features}
    if machine == "armv8" and "neon" in features:
        names.add("asimd")
    return sorted(names | set(ARM_SUBARCH_FLAGS[machine].split()))


def parse_cpuid2cpuflags(output, variable="CPU_FLAGS_X86"):
    """The names cpuid2cpuflags printed for `variable` (`CPU_FLAGS_X86: aes avx ...`), sorted.

    cpuid2cpuflags prints CPU_FLAGS_ARM on arm: asking for CPU_FLAGS_X86 then gives [].
    """
    for line in output.splitlines():
        name, colon, rest = line.partition(":")
        if colon and name.strip() == variable:
            return sorted(set(rest.split()))
    return []


def missing_isa(target_flags, host_flags):
    """CPU_FLAGS_X86 names the target has and the build host lacks, sorted.

    Non-empty means the binhost's CPU cannot run the target's code: anything a build runs
    (tests, code generators, an optimised python) may die with SIGILL.
    """
    target_flags = target_flags.split() if isinstance(target_flags, str) else target_flags
    host_flags = host_flags.split() if isinstance(host_flags, str) else host_flags
    return sorted(set(target_flags) - set(host_flags))


# gcc 12 says "bad value 'x' for '-march=' switch", older ones "bad value (x) for -march= switch".
UNKNOWN_GCC_FLAG = re.compile(r"(?:unrecognized command[- ]line option|bad value \(?['‘]?([^'’)]*)['’]?\)? for)"
                              r"\s*['‘]?([^'’\s]*)")


# ---- what emerge and our scripts print: merge lists, Portage's complaints, ==sections ----------

_SECTION_MARKER = re.compile(r"==([A-Za-z0-9_.-]+)")


def parse_sections(text):
    """{name: text} of the `==name` sections printed by CPU_PROBE_SCRIPT.

    Shell start-up files may print before the script: anything before the first marker is
    ignored. A section's text has no trailing newline; a repeated name keeps the last one.
    """
    sections, lines = {}, None
    for line in text.splitlines():
        line = line.rstrip("\r")
        marker = _SECTION_MARKER.fullmatch(line)
        if marker:
            lines = sections[marker.group(1)] = []
        elif lines is not None:
            lines.append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


PLAN_LINE = re.compile(r"\[(?P<kind>ebuild|binary)(?P<marks>[^\]]*)\]\s+(?P<atom>\S+)(?P<rest>.*)$")
FLAG_GROUP = re.compile(r'\b([A-Z][A-Z0-9_]*)="([^"]*)"')
# " to EROOT/": where a line merges when that is not / (lines for / have no such words).
PLAN_ROOT = re.compile(r"\sto (/\S*)")
# What Portage prints on every run in some set-ups and that says nothing about the packages.
PORTAGE_NOISE = re.compile(r"repos\.conf|[Rr]epositor|repo_name|layout\.conf|masters ="
                           r"|binrepos\.conf is missing"
                           r"|Problems have been detected with your world file|emaint --check world"
                           r"|^!!!\s*$")
# What emerge reports with exit status 0 that still means the target cannot get what it asked for:
# an argument or @world entry it cannot resolve, an update it skips.
UNRESOLVED = re.compile(r"masked or don't exist:\n(?P<missing>[^\n]+)"
                        r"|update has been skipped due to unsatisfied dependencies:[ \t]*\n\s*(?P<skipped>[^\n]+)")


# A CPV's version (PMS 3.2), and a binary's -BUILD_ID after it.
VERSION_SUFFIX = re.compile(r"-[0-9]+(\.[0-9]+)*[a-z]?(_(alpha|beta|pre|rc|p)[0-9]*)*(-r[0-9]+)?(-[0-9]+)?$")


def cpv_package_name(cpv):
    """app-misc/foo of app-misc/foo-1.2-r3 (and of a binary's app-misc/foo-1.2-r3-4)."""
    return VERSION_SUFFIX.sub("", cpv, count=1)


class PlannedPackage:
    """One package the target would merge: its CPV, slot, repository and USE as it wants them,
    the marks of its line ("N", "U", "r" for a slot-operator rebuild, ...) and the ROOT it goes to
    when the line names one."""

    def __init__(self, cpv, slot, repository, flags, marks="", root=None):
        self.cpv, self.slot, self.repository, self.flags = cpv, slot, repository, flags
        self.marks, self.root = marks, root
        self.reason = None  # why the target's binary-only emerge would not merge it from here
        self.buildable = True  # whether a build here can change that
        self.held = False  # held back by a rollback: not offered, on purpose

    @property
    def atom(self):
        return "=" + self.cpv + (f"::{self.repository}" if self.repository else "")

    @property
    def slot_rebuild(self):
        """Portage merges it again because a dependency's sub-slot changed (`r` in its marks)."""
        return "r" in self.marks

    @property
    def package_name(self):
        return cpv_package_name(self.cpv)


def parse_merge_list(text, kind="ebuild"):
    """The [ebuild ...] (or [binary ...]) lines of `emerge --pretend --verbose` output."""
    packages = []
    for line in text.splitlines():
        match = PLAN_LINE.match(line.strip())
        if not match or match.group("kind") != kind:
            continue
        atom, _, repository = match.group("atom").partition("::")
        cpv, _, slot = atom.partition(":")
        flags = {}
        for name, words in FLAG_GROUP.findall(match.group("rest")):
            prefix = "" if name == "USE" else name.lower() + "_"
            for word in words.split():
                # (forced), (-masked), changed*, new%
                word = word.strip("(){}").rstrip("*%").strip("(){}")
                if word:
                    flags[prefix + word.lstrip("-")] = not word.startswith("-")
        root = PLAN_ROOT.search(match.group("rest"))
        packages.append(PlannedPackage(cpv, slot, repository, flags, match.group("marks"),
                                       root.group(1) if root else None))
    return packages


def for_root(packages, root):
    """The packages of a plan that go to root: a target whose ROOT is not / also gets lines for
    / (its own build dependencies, without "to ..."), which are not what it installs. A line's
    EROOT is ROOT with Portage's EPREFIX (Gentoo Prefix) appended."""
    wanted = root.rstrip("/") + "/"
    if wanted == "/":
        return [package for package in packages if package.root in (None, "/")]
    return [package for package in packages
            if package.root is not None and (package.root.rstrip("/") + "/").startswith(wanted)]


def portage_complaints(text):
    """What Portage objected to, in its own words (its repository warnings left out); the
    package names it lists under a `!!!` heading are kept with it."""
    complaints, listing = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            listing = False
            continue
        if re.fullmatch(r"(\* )?(https?://\S+|For more information about .*)", stripped):
            continue  # where the Handbook explains it, not what happened
        if stripped.startswith(("!!!", "emerge: there are no", "- ", "[blocks")) or "masked by" in stripped:
            listing = stripped.startswith("!!!")
            if not PORTAGE_NOISE.search(stripped):
                complaints.append(stripped.lstrip("! ").strip())
        elif listing and re.fullmatch(r"[\w+.-]+/[\w+.-]+\S*", stripped):
            complaints.append(stripped)
    return complaints


def fetch_outcome(text):
    """(tool, exit code) from FETCH_INDEX_SCRIPT's output (shell start-up noise before it)."""
    found = re.findall(r"^(wget|curl|none) (\d+)$", text or "", re.MULTILINE)
    return found[-1] if found else ("none", "127")


def section_status(sections, name):
    """The exit status printed after a section; what came back is the target's: anything but a
    number is a failure, never a traceback."""
    value = sections.get(f"{name}-exit", "")
    return int(value) if re.fullmatch(r"\d{1,3}", value) else 1


# ---- the Packages index: the one parser of its entries; Gentoo versions (PMS 3.3) --------------

def index_fields(block):
    """{field: value} of one block of a Packages index."""
    return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)


def index_blocks(index_text):
    """(header, [(fields, block text)]) of a Packages index: the one parser of its entries."""
    header, *blocks = index_text.split("\n\n") if index_text else [""]
    entries = [(fields, block.strip("\n")) for fields, block in ((index_fields(block), block) for block in blocks)
               if fields.get("CPV")]
    return header, entries


def entry_path(fields):
    """Where an index entry's package file is, relative to PKGDIR (old indexes omit PATH)."""
    return fields.get("PATH") or fields["CPV"] + ".tbz2"


def index_entries(index_text):
    """The entries of a Packages index as dicts of their fields (the header block left out)."""
    return [fields for fields, _ in index_blocks(index_text)[1]]


def index_keeping(index_text, wanted):
    """The index with only the entries whose fields wanted(fields) accepts."""
    header, *blocks = index_text.split("\n\n")
    kept = [block for block in blocks if not block.strip() or wanted(index_fields(block))]
    return "\n\n".join([header] + kept)


# Portage asks for the index with If-Modified-Since = its copy's TIMESTAMP + this many seconds
# (TIMESTAMP_TOLERANCE in portage/util/_urlopen.py).
PORTAGE_TIMESTAMP_TOLERANCE = 5


def index_timestamp(index_text):
    """The TIMESTAMP of an index's header, 0 when it has none."""
    match = re.search(r"^TIMESTAMP: *(\d+)$", index_text.split("\n\n", 1)[0], re.MULTILINE)
    return int(match.group(1)) if match else 0


def with_timestamp(index_text, stamp):
    return re.sub(r"^TIMESTAMP: *\d*$", f"TIMESTAMP: {stamp}", index_text, count=1, flags=re.MULTILINE)


def next_timestamp(at_least, earlier):
    """A TIMESTAMP from at_least on, later than every earlier one and never exactly
    PORTAGE_TIMESTAMP_TOLERANCE after one: a target holding that index would ask with that very
    date (If-Modified-Since) and get a 304."""
    stamp = max([at_least] + [each + 1 for each in earlier])
    while any(stamp - each == PORTAGE_TIMESTAMP_TOLERANCE for each in earlier):
        stamp += 1
    return stamp


def gzip_bytes(text, mtime):
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=mtime) as stream:
        stream.write(text.encode("utf-8", "surrogateescape"))
    return compressed.getvalue()


VERSION_PARTS = re.compile(r"(?P<numbers>[0-9]+(?:\.[0-9]+)*)(?P<letter>[a-z]?)"
                           r"(?P<suffixes>(?:_(?:alpha|beta|pre|rc|p)[0-9]*)*)(?:-r(?P<revision>[0-9]+))?")
SUFFIX_ORDER = {"alpha": 0, "beta": 1, "pre": 2, "rc": 3, "p": 5}  # no suffix ranks 4


def _compare(left, right):
    return (left > right) - (left < right)


def compare_versions(left, right):
    """Below, equal to or above 0 as Gentoo orders the versions left and right."""
    one, other = VERSION_PARTS.fullmatch(left), VERSION_PARTS.fullmatch(right)
    if not one or not other:
        return _compare(left, right)
    numbers, others = one.group("numbers").split("."), other.group("numbers").split(".")
    result = _compare(int(numbers[0]), int(others[0]))
    for mine, theirs in zip(numbers[1:], others[1:]):
        if result:
            return result
        # A component with a leading zero compares as a decimal fraction (1.01 < 1.1).
        result = (_compare(mine.rstrip("0"), theirs.rstrip("0")) if mine[0] == "0" or theirs[0] == "0"
                  else _compare(int(mine), int(theirs)))
    result = result or _compare(len(numbers), len(others)) or _compare(one.group("letter"), other.group("letter"))
    if result:
        return result
    suffixes = re.findall(r"_([a-z]+)([0-9]*)", one.group("suffixes"))
    other_suffixes = re.findall(r"_([a-z]+)([0-9]*)", other.group("suffixes"))
    for (kind, number), (other_kind, other_number) in zip(suffixes, other_suffixes):
        result = _compare(SUFFIX_ORDER[kind], SUFFIX_ORDER[other_kind]) or _compare(int(number or 0),
                                                                                  int(other_number or 0))
        if result:
            return result
    if len(suffixes) != len(other_suffixes):
        longer, sign = (suffixes, 1) if len(suffixes) > len(other_suffixes) else (other_suffixes, -1)
        return sign if longer[min(len(suffixes), len(other_suffixes))][0] == "p" else -sign
    return _compare(int(one.group("revision") or 0), int(other.group("revision") or 0))


def cpv_version(cpv):
    return cpv[len(cpv_package_name(cpv)) + 1:]


def offered_builds(index_text):
    """What an index offers, as a set of builds (PATH, MD5): a field Portage drops or adds when it
    rewrites its index (REPO_REVISIONS, say) changes nothing for a target."""
    return {(entry_path(fields), fields.get("MD5", "")) for fields in index_entries(index_text)}


def set_changes(old_text, new_text):
    """(added, updated, removed) CPVs of the index new_text compared with old_text."""
    new, old = ({fields["CPV"]: fields for fields in index_entries(text)} for text in (new_text, old_text))
    updated = [cpv for cpv in set(new) & set(old)
               if (new[cpv].get("MD5"), new[cpv].get("BUILD_ID")) != (old[cpv].get("MD5"), old[cpv].get("BUILD_ID"))]
    return sorted(set(new) - set(old)), sorted(updated), sorted(set(old) - set(new))


# ------------------------------------------------------------------------------------------------
# The binhost environment: where Portage runs, its package store, its build methods, building
# ------------------------------------------------------------------------------------------------


# ---- emulation: a binhost root of another architecture, its programs run by qemu-user ----------

# ELF (e_machine, class, byte order) -> (Gentoo's ARCH, qemu-user's name for it); others are named
# by their numbers.
ELF_ARCHES = {(62, 2, 1): ("amd64", "x86_64"), (3, 1, 1): ("x86", "i386"), (183, 2, 1): ("arm64", "aarch64"),
              (40, 1, 1): ("arm", "arm"), (21, 2, 1): ("ppc64", "ppc64le"), (21, 2, 2): ("ppc64", "ppc64"),
              (20, 1, 2): ("ppc", "ppc"), (243, 2, 1): ("riscv", "riscv64"), (22, 2, 2): ("s390", "s390x"),
              (258, 2, 1): ("loong", "loongarch64")}
# Run without emulation: a 64-bit kernel runs its 32-bit relative's programs itself (an arm64 CPU
# without AArch32, the newest cores, needs a qemu-arm entry in binfmt_misc like any other).
NATIVELY_RUN = {("x86", "amd64"), ("arm", "arm64")}
BINFMT_MISC = "/proc/sys/fs/binfmt_misc"


def elf_identity(header):
    """(e_machine, class, byte order) of an ELF header, or None."""
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[5] not in (1, 2):
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big"), header[4], header[5]


def elf_architecture(header):
    """(ARCH, qemu name) of an ELF header, or None."""
    identity = elf_identity(header)
    if identity is None:
        return None
    return ELF_ARCHES.get(identity, (f"ELF machine {identity[0]} ({32 * identity[1]}-bit,"
                                     f" {'little' if identity[2] == 1 else 'big'}-endian)", None))


def program_header(root, path, size=128):
    """The first bytes of a program in a root (its links resolved inside it), b"" if unreadable."""
    return read_bytes_inside(root, path.strip("/"), absolute_from_root=True, size=size)


def foreign_architecture(root):
    """(the root's ARCH, qemu name, its /bin/sh's header, this machine's ARCH, whether this machine
    runs its programs by itself) when the programs of a root are of another architecture (ELF
    machine, class or byte order) than this machine's; else None."""
    header = program_header(root, "/bin/sh")
    if elf_identity(header) is None:
        return None
    try:
        with open("/proc/self/exe", "rb") as handle:
            ours = handle.read(64)
    except OSError:
        return None
    if elf_identity(ours) in (None, elf_identity(header)):
        return None
    theirs, ours = elf_architecture(header), elf_architecture(ours)
    return theirs[0], theirs[1], header, ours[0], (theirs[0], ours[0]) in NATIVELY_RUN


def emulation_problem(header, arch, qemu, binfmt_misc=None):
    """None when binfmt_misc runs programs with this header inside a chroot (a handler with the
    fix-binary flag, F, which opens its interpreter before the chroot hides it), else what to do.
    Returns (None, handler description) or (problem, None)."""
    binfmt_misc = binfmt_misc or BINFMT_MISC
    status = read_text(os.path.join(binfmt_misc, "status")).strip() if os.path.isdir(binfmt_misc) else ""
    if not status:
        return (f"binfmt_misc is not mounted: mount -t binfmt_misc binfmt_misc {binfmt_misc} (as root;"
                " systemd's proc-sys-fs-binfmt_misc.automount does it at boot)"), None
    if status != "enabled":
        return f"binfmt_misc is disabled: echo 1 > {binfmt_misc}/status (as root)", None
    install = (f"install qemu-user with static programs and their binfmt_misc entries with the fix-binary flag:"
               f" on Debian 'apt install qemu-user-static' (then 'systemctl restart systemd-binfmt'); on Gentoo"
               f" app-emulation/qemu with USE=static-user and QEMU_USER_TARGETS=\"{qemu or '...'}\", then its binfmt"
               " service ('rc-service qemu-binfmt start', or 'systemctl restart systemd-binfmt'), registering"
               " with the F flag (its flags setting, e.g. QEMU_BINFMT_FLAGS in /etc/conf.d/qemu-binfmt)")
    matching = []  # (enabled, has F, entry, interpreter, flags)
    for entry in sorted(os.listdir(binfmt_misc)):
        if entry in ("status", "register"):
            continue
        fields = {}
        for line in read_text(os.path.join(binfmt_misc, entry)).splitlines():
            key, _, value = line.replace(":", " ", 1).partition(" ") if line.startswith("flags:") else line.partition(" ")
            fields[key.strip()] = value.strip()
        if "magic" not in fields:  # an extension entry (.jar)
            continue
        try:
            magic, offset = bytes.fromhex(fields["magic"]), int(fields.get("offset", "0"))
            mask = bytes.fromhex(fields["mask"]) if fields.get("mask") else b"\xff" * len(magic)
        except ValueError:
            continue
        window = header[offset:offset + len(magic)]
        if len(window) < len(magic) or any(a & m != b & m for a, b, m in zip(window, magic, mask)):
            continue
        flags = fields.get("flags", "")
        matching.append(("enabled" in fields, "F" in flags, entry, fields.get("interpreter", "?"), flags))
    for enabled, fixed, entry, interpreter, flags in sorted(matching, reverse=True):
        if enabled and fixed:
            return None, f"{interpreter} (binfmt_misc {entry}, flags {flags})"
        if enabled:
            return (f"the binfmt_misc entry {entry} runs {arch} programs with {interpreter}, but without the"
                    f" fix-binary flag (F): inside the binhost root that path does not exist. Register it with F:"
                    f" {install}"), None
        return f"the binfmt_misc entry {entry} for {arch} programs is disabled: echo 1 > {binfmt_misc}/{entry}", None
    return f"no binfmt_misc entry runs {arch} programs on this machine: {install}", None


# ---- the build host: this machine, or a Gentoo host chroot -------------------------------------

def mount_table():
    """[(mount ID, mount point, shared)] of this process's mount namespace, in mount order
    (mountinfo's octal escapes such as \\040 decoded)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) > 6:
            point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4])
            optional = fields[6:fields.index("-")] if "-" in fields else []
            table.append((fields[0], point, any(tag.startswith("shared:") for tag in optional)))
    return table


def mount_points():
    return [point for _, point, _ in mount_table()]


def mount_id(point):
    """The ID of the mount on top at point, or None."""
    return next((identity for identity, mounted, _ in reversed(mount_table()) if mounted == point), None)


def check_chroot_privileges(chroot, euid=None, capabilities=None):
    """A host chroot needs root, CAP_SYS_CHROOT (chroot) and CAP_SYS_ADMIN (mount): say which
    one is missing instead of letting chroot or mount fail obscurely."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise BinhostError(f"the chroot {chroot} needs root (chroot and mount): run {PROG} as root")
    if capabilities is None:  # this process's CapEff bit mask; when unknown, nothing is checked
        match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", read_text("/proc/self/status"), re.MULTILINE)
        if not match:
            return
        capabilities = int(match.group(1), 16)
    for bit, name, use in ((CAP_SYS_CHROOT, "CAP_SYS_CHROOT", "chroot into"),
                           (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "mount /proc, /sys and /dev in")):
        if not capabilities & (1 << bit):
            raise BinhostError(f"this process lacks {name}, so it cannot {use} the chroot {chroot}"
                               f" (a container started without it?): give it {name} (docker/podman:"
                               f" --cap-add {name[4:]}) or run {PROG} on the machine itself")


class HostMounts:
    """/proc, /sys, /dev (with /dev/pts and /dev/shm) and /run mounted in a chroot (the host chroot,
    or the binhost root for a chroot build, with its repositories and DISTDIR bound too) while
    commands run there. Builds share them: the first one in mounts what is missing, the last one
    out unmounts what we mounted. Each mount we make is recorded with its mount ID (a state file
    in the chroot), so mounts a killed build left behind are removed by the next one, and a
    mount someone else made, even at the same place later, is never touched."""

    def __init__(self, chroot, runner, output, binds=tuple):
        self.chroot, self.runner, self.output = chroot, runner, output
        self.state_dir = os.path.join(chroot, "var/cache/gentoo-binhost")
        self.state_path = os.path.join(self.state_dir, "mounts")
        self.users = self.entered = None
        self.exclusive = ()  # places that must not be mounted already when this command enters
        # () -> [(place inside, host directory, read-only)]: the repositories and DISTDIR of a chroot
        # build, asked when mounting (config pull and a sync change them within one command).
        self.binds = binds

    @property
    def mounts(self):
        """[(place, mount command)]: as entered, while entered; else as the binds are now."""
        if self.entered is not None:
            return self.entered
        return list(CHROOT_MOUNTS) + [
            (inside.strip("/"), ["mount", "--bind", *(["-o", "ro"] if read_only else []), "--make-slave",
                                 source, "{}"])
            for inside, source, read_only in self.binds()]

    def prepare_bind_points(self):
        """A repository's place in the binhost root is a link for the root method (see
        link_repositories_into); the chroot method mounts the repository there instead."""
        for name, _command in self.mounts[len(CHROOT_MOUNTS):]:
            point = os.path.join(self.chroot, name)
            check_no_symlink_below(self.chroot, os.path.dirname(point))
            with contextlib.suppress(FileNotFoundError):  # another command entering meanwhile removed it
                if os.path.islink(point) and os.readlink(point) == "/" + name:
                    os.unlink(point)  # not the Runner's: mounted for read-only queries under --pretend too
            os.makedirs(point, exist_ok=True)

    def mount_point(self, name):
        point = os.path.join(self.chroot, name)
        # A link anywhere on the way could lead the mount out of the chroot.
        check_no_symlink_below(self.chroot, point)
        real = os.path.realpath(point)
        if not real.startswith(os.path.realpath(self.chroot) + os.sep):
            raise BinhostError(f"{point} is not inside {self.chroot}: refusing to mount there")
        return real

    def recorded(self, ours):
        """[(mount ID, point)] recorded and still mounted as we left them: ours (at a place of this
        command's list), or not (another command's list: a sync's view of a repository)."""
        allowed = {os.path.realpath(os.path.join(self.chroot, name)) for name, _ in self.mounts}
        present = {(identity, point) for identity, point, _ in mount_table()}
        recorded = [tuple(line.split(" ", 1)) for line in read_text(self.state_path).splitlines()
                    if " " in line]
        return [(identity, point) for identity, point in recorded
                if (point in allowed) == ours and (identity, point) in present]

    def record(self, mounts):
        """Records mounts, and keeps the records of other commands' places still mounted."""
        # Also under --pretend: the read-only queries it runs in the chroot mount for real.
        temporary = f"{self.state_path}.{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{identity} {point}\n" for identity, point in self.recorded(ours=False) + mounts))
        os.replace(temporary, self.state_path)

    @contextlib.contextmanager
    def guard(self):
        """Held while mounts are checked, made or removed: one process at a time does that."""
        os.makedirs(self.state_dir, exist_ok=True)
        with open(os.path.join(self.state_dir, "mounts.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def in_use(self):
        """Whether a build holds the mounts now (call with the guard held)."""
        with open(os.path.join(self.state_dir, "mounts.users"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def enter(self):
        check_chroot_privileges(self.chroot)
        self.entered = self.mounts  # unmounted as listed now, whatever the configuration says meanwhile
        try:
            self.prepare_bind_points()
            self.mount_missing()
        except BaseException:
            self.entered = None
            raise

    def mount_missing(self):
        with self.guard():
            if not self.in_use():  # what a killed command left is not used as it is (a sync's writable view)
                self.record(self.unmount(self.recorded(ours=True)))
            ours, new = self.recorded(ours=True), []
            present = set(mount_points())
            busy = [point for point in self.exclusive if point in present]
            if busy:  # the builds' read-only view, held by a query of ours, or a mount not ours
                raise BinhostError(f"{', '.join(busy)} is mounted (another command using {self.chroot}: doctor,"
                                   " config diff?): run this again once it has finished")
            try:
                for name, command in self.mounts:
                    point = self.mount_point(name)
                    if point in present:  # ours from before, or the user's: used as it is
                        continue
                    os.makedirs(point, exist_ok=True)
                    if self.runner.pretend and not new:
                        self.output.info(f"--pretend: mounting /proc, /sys, /dev and /run in {self.chroot}"
                                         " for the read-only queries it runs there, unmounted after them")
                    # Runs under --pretend too: only the queries it really runs get here.
                    self.runner.run([word.replace("{}", point) for word in command], capture=True,
                                    changes=False, describe=f"mounting /{name} in {self.chroot}")
                    new.append((mount_id(point), point))
                    self.record(ours + new)
            except BaseException:
                self.record(ours + self.unmount(new))
                raise
            # Shared while in use: the last one out sees no other holder.
            self.users = open(os.path.join(self.state_dir, "mounts.users"), "a")
            fcntl.flock(self.users, fcntl.LOCK_SH)

    def leave(self):
        with self.guard():
            fcntl.flock(self.users, fcntl.LOCK_UN)
            self.users.close()
            self.users = None
            try:
                if self.in_use():
                    self.output.debug(f"Another build still uses the mounts in {self.chroot}")
                    return
                self.record(self.unmount(self.recorded(ours=True)))
            finally:
                self.entered = None

    def unmount(self, mounts):
        """Unmount [(mount ID, point)], the last first; returns those still mounted."""
        remaining = []
        for identity, point in reversed(mounts):
            if mount_id(point) != identity:
                continue
            # Slave first: an unmount must never propagate to the host's own /dev or /sys.
            self.runner.run(["mount", "--make-rslave", point], capture=True, check=False, changes=False)
            if any(shared for _, mounted, shared in mount_table()
                   if mounted == point or mounted.startswith(point + "/")):
                self.output.error(f"{point} is still a shared mount: not unmounting it, as that would"
                                  f" reach the host's own mounts; reboot or check 'findmnt -R {point}'")
                remaining.append((identity, point))
                continue
            for _attempt in range(UNMOUNT_ATTEMPTS):  # a daemon told to quit may take a moment
                result = self.runner.run(["umount", "--recursive", point], capture=True, check=False,
                                         changes=False)
                if result.returncode == 0 or mount_id(point) != identity:
                    break
                time.sleep(0.2)
            if mount_id(point) == identity:
                # Something still has a file open in there (a daemon a build started): detach it
                # now, the kernel frees it when that process ends.
                self.output.warn(f"{point} is busy ({last_line(result.stderr)}): detaching it lazily")
                result = self.runner.run(["umount", "--recursive", "--lazy", point], capture=True,
                                         check=False, changes=False)
                if mount_id(point) == identity:
                    self.output.error(f"cannot unmount {point}: {last_line(result.stderr)}")
                    remaining.append((identity, point))
        return list(reversed(remaining))

    def show(self):
        """Under --pretend: the mount commands a build would run, and the unmounts after it."""
        present = set(mount_points())
        missing = [(name, command) for name, command in self.mounts
                   if self.mount_point(name) not in present]
        for name, command in missing:
            self.runner.run([word.replace("{}", os.path.join(self.chroot, name)) for word in command])
        return [os.path.join(self.chroot, name) for name, _ in missing]


# ---- confinement: what runs in a chroot cannot leave it ----------------------------------------
# Builds run the target's configuration as root. A plain chroot is no boundary: the build
# machine's files through /proc/*/root or open_by_handle_at, its block devices in /dev, its
# loopback services. So every command in a chroot runs in namespaces of its own (unshare, from
# util-linux), under this script, run by this tool's interpreter as their PID 1: a new /proc,
# a read-only /sys, a minimal /dev and an empty /run, lo only (--net), the chroot, and no
# capability that leaves or remounts it. When the kernel or a container refuses namespaces,
# commands run in the plain chroot, and build and doctor say so.
CONFINE_UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
                   "--ipc", "--uts"]
CONFINE_PROGRAM = r'''
import ctypes, fcntl, os, signal, socket, struct, sys, warnings  # os.execvp imports warnings
libc = ctypes.CDLL(None, use_errno=True)  # all loaded before the chroot: nothing is imported after it
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
# Kept: what Portage needs as root (chown/chmod, setuid/setgid for userpriv, setcap via setfcap, kill
# its portage-uid jobs, low ports in tests). Every other capability, today's or a future one, goes:
# SYS_ADMIN (mount, setns), SYS_CHROOT (the classic chroot escape), MKNOD (block devices),
# DAC_READ_SEARCH (open_by_handle_at opens any file of ROOT's file system, outside ROOT too),
# SYS_PTRACE, SYS_RAWIO, SYS_MODULE, NET_ADMIN, NET_RAW, SYS_TIME, SYS_BOOT, SYS_NICE, BPF...
KEEP = {0: "chown", 1: "dac_override", 3: "fowner", 4: "fsetid", 5: "kill", 6: "setgid",
        7: "setuid", 8: "setpcap", 10: "net_bind_service", 29: "audit_write", 31: "setfcap"}

def fail(what):
    raise OSError(ctypes.get_errno(), "%s: %s" % (what, os.strerror(ctypes.get_errno())))

def mount(source, target, fstype, flags, data=None):
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        fail("mount %s on %s" % (fstype or source, target))

def prctl(*args):
    if libc.prctl(*[ctypes.c_ulong(a) for a in (args + (0,) * 4)[:5]]) != 0:
        fail("prctl%r" % (args,))

def point(name):
    # A fresh mount point, never through a link (that could lead out of ROOT); what the tool
    # mounted there (the host's /proc, /sys, /dev, /run) is detached, in our namespace only.
    path = os.path.join(root, name)
    if os.path.islink(path) or not os.path.realpath(path).startswith(root + "/"):
        raise SystemExit("gentoo-binhost confine: %s is a link or leads out of %s" % (path, root))
    os.makedirs(path, exist_ok=True)
    while libc.umount2(path.encode(), 2) == 0:  # MNT_DETACH
        pass
    return path

if os.getpid() != 1 or sys.argv[2:3] != ["--"] or len(sys.argv) < 4:
    raise SystemExit("gentoo-binhost confine: run as unshare --pid --fork --mount ... -c HELPER ROOT -- ARGV...")
if " shared:" in open("/proc/self/mountinfo").read():  # our umounts must not reach the host
    raise SystemExit("gentoo-binhost confine: mounts are shared with the host: unshare --propagation private")
root, argv = os.path.realpath(sys.argv[1]), sys.argv[3:]

proc = point("proc")
mount("proc", proc, "proc", NOSUID | NODEV | NOEXEC)  # only this namespace's processes
for name in ("sys", "sysrq-trigger", "irq", "bus", "fs"):  # kernel knobs (core_pattern...): read-only
    if os.path.exists(os.path.join(proc, name)):
        mount(os.path.join(proc, name), os.path.join(proc, name), None, BIND | REC)
        mount("none", os.path.join(proc, name), None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | NOEXEC)
try:
    mount("sysfs", point("sys"), "sysfs", RDONLY | NOSUID | NODEV | NOEXEC)
except OSError as error:  # e.g. in a user namespace without --net: go on without /sys
    print("gentoo-binhost confine: no /sys: %s" % error, file=sys.stderr)
dev = point("dev")
mount("tmpfs", dev, "tmpfs", NOSUID | NOEXEC, "mode=755,size=64k")
for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                           ("urandom", 1, 9), ("tty", 5, 0)):
    node = os.path.join(dev, name)
    try:
        os.mknod(node, 0o20666, os.makedev(major, minor))
        os.chmod(node, 0o666)  # not masked by the umask
    except PermissionError:  # no CAP_MKNOD (user namespace): the host's node, bound
        open(node, "w").close()
        mount("/dev/" + name, node, None, BIND)
for name, fstype, flags, options in (("pts", "devpts", NOSUID | NOEXEC, "newinstance,ptmxmode=0666,mode=620,gid=5"),
                                     ("shm", "tmpfs", NOSUID | NODEV, "mode=1777")):
    os.mkdir(os.path.join(dev, name))
    try:
        mount(fstype, os.path.join(dev, name), fstype, flags, options)
    except OSError:  # gid 5 (tty) unmapped in a user namespace
        mount(fstype, os.path.join(dev, name), fstype, flags, options.replace(",gid=5", ""))
for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, os.path.join(dev, name))
run = point("run")
mount("tmpfs", run, "tmpfs", NOSUID | NODEV, "mode=755")  # not the host's sockets (systemd, docker)
os.mkdir(os.path.join(run, "lock"))  # /var/lock -> /run/lock
os.chmod(os.path.join(run, "lock"), 0o1777)

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # lo is down in a new network namespace
    flags = struct.unpack("16sH14x", fcntl.ioctl(sock, 0x8913, struct.pack("16sH14x", b"lo", 0)))[1]
    if not flags & 1:  # SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))
socket.sethostname("localhost")  # our UTS namespace: not the build machine's name (as Portage does)
os.chroot(root)
os.chdir("/")
# Out of the bounding set (no execve, of a setuid or file-capability binary either, brings them
# back), then out of our own sets; inheritable and ambient emptied, no new privileges on execve.
prctl(38, 1)  # PR_SET_NO_NEW_PRIVS: setuid() as root still works (userpriv), su/sudo gain nothing
for cap in range(64):
    if cap not in KEEP and libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        if ctypes.get_errno() != 22:  # EINVAL: past the kernel's last capability
            fail("dropping capability %d" % cap)
        break
prctl(47, 4)  # PR_CAP_AMBIENT_CLEAR_ALL
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) for caps 0-31, then 32-63
if libc.capget(header, data) != 0:
    fail("capget")
mask = sum(1 << cap for cap in KEEP) & (data[1] | data[4] << 32)
data[:] = [mask & 0xffffffff, mask & 0xffffffff, 0, mask >> 32, mask >> 32, 0]
if libc.capset(header, data) != 0:
    fail("capset")
prctl(4, 0)  # PR_SET_DUMPABLE 0: this init's /proc/1/* is out of its children's reach
if argv == ["--probe"]:  # the tool asks whether all of the above works here, nothing of ROOT's runs
    os._exit(0)

# As init: the command runs in a session of its own, so the terminal it may read (emerge --ask)
# is not its controlling terminal, and it cannot push input into the shell it came from (TIOCSTI);
# SIGINT/TERM/HUP the tool (or the terminal) sends to our group are passed on; orphans are reaped;
# we exit with the command's status, and the kernel then kills whatever is left in the namespace.
forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
child = os.fork()
if child == 0:
    try:
        os.setsid()
        for signum in forwarded + (signal.SIGTTOU, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)  # Python ignores SIGPIPE, SIGXFSZ; exec would keep it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        os.closerange(3, 65536)
        os.execvp(argv[0], argv)
    except BaseException as error:
        print("gentoo-binhost confine: %s: %s" % (argv[0], error), file=sys.stderr)
    os._exit(127)
def forward(signum, frame):
    try:
        os.killpg(child, signum)
    except OSError:
        pass
for signum in forwarded:
    signal.signal(signum, forward)
signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
while True:
    pid, status = os.wait()  # orphans too, until the command itself
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
'''
# Portage's own namespaces need CAP_SYS_ADMIN, which a confined build lacks: asked for, each
# phase would print "Unable to unshare: EPERM" (and go on); the confinement does their job.
CONFINED_FEATURES = "-ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox"


# ---- where Portage runs: this machine, the host chroot or the binhost root (BuildHost) ---------

class BuildHost:
    """Where Portage, gcc and the binhost's shell scripts run: this machine, the Gentoo host chroot
    of [host] chroot, or (method: a build method that runs Portage in the root) the binhost root
    itself, a chroot entered confined (CONFINE_PROGRAM, else `chroot DIR`) as `env -i VAR=...
    COMMAND`, with /proc, /sys, /dev and /run mounted, and what the method binds. Callers give host
    paths; in the chroot they become its own paths."""

    def __init__(self, env, method=None, trees_writable=False):
        self.env, self.runner, self.output = env, env.runner, env.output
        self.into_root = method is not None
        self.chroot, self.extra_path = (env.root, "") if self.into_root else (env.host_chroot, env.host_path)
        binds = (lambda: method.binds(env, trees_writable)) if method else tuple
        self.mounts = HostMounts(self.chroot, env.runner, env.output, binds) if self.chroot else None
        self.method, self.really_mounted, self.shown = method, False, False
        if self.chroot and not env.runner.pretend:
            check_chroot_privileges(self.chroot)  # before anything else fails less clearly
        self.check_usable()

    def check_usable(self):
        """Refuses, before anything runs, what cannot work here now: a bind the root's configuration
        names that cannot be made, programs of the root that nothing here runs (asked again before
        each mount: repos.conf and binfmt_misc may change meanwhile)."""
        if self.mounts:
            self.mounts.mounts  # reading the binds refuses one that cannot be made
        self.emulated_by  # refuses what nothing here can run

    @property
    def emulated_by(self):
        """What runs the binhost root's programs, when they are of another architecture (asked
        again before each mount: binfmt_misc is this machine's, and may change meanwhile)."""
        return self.method.emulator(self.env) if self.method else None

    @property
    def where(self):
        if self.into_root:
            return f"the binhost root {self.chroot}"
        return f"the host chroot {self.chroot}" if self.chroot else "this machine"

    def search_path(self):
        return ":".join(filter(None, [self.extra_path, CHROOT_PATH]))

    def inside(self, path):
        """The chroot's own name for a host path under it."""
        relative = os.path.relpath(path, self.chroot)
        if relative == ".." or relative.startswith("../"):
            raise BinhostError(f"{path} is outside {self.where}: put it inside")
        return "/" if relative == "." else "/" + relative

    def translate(self, word):
        word = str(word)
        if self.chroot and (word == self.chroot or word.startswith(self.chroot + "/")):
            return self.inside(word)
        return word

    def program(self, name, hint):
        """argv[0] for name: its full path here, or its path inside the chroot."""
        if not self.chroot:
            return find_program(name, hint)
        for directory in self.search_path().split(":"):
            candidate = posixpath.join(directory, name)
            if os.path.lexists(under(self.chroot, candidate)):
                return candidate
        raise BinhostError(f"{name} not found in {self.where} (PATH {self.search_path()}): {hint}")

    def confinement_problem(self):
        """None when commands in the chroot run confined (see CONFINE_PROGRAM), else why not:
        asked once per environment and command, by running `true` confined."""
        asked, key = self.env.decisions, ("confinement", self.chroot)
        if key not in asked:
            if not shutil.which("unshare"):
                asked[key] = "unshare (util-linux) not found"
            else:
                # Nothing of the root runs: a build can change the root, never this answer.
                result = self.runner.read(self.confined(["--probe"], offline=True), check=False,
                                          describe="unshare")
                problem = last_line(result.stderr) or f"exit {result.returncode}"
                if result.returncode != 0 and not problem.startswith("unshare:"):
                    raise BinhostError(f"commands cannot be confined in {self.where}: {problem}: a build"
                                       " there changed it? Look at it before building there again")
                asked[key] = None if result.returncode == 0 else problem
        return asked[key]

    def confined(self, inner, offline=False):
        return (CONFINE_UNSHARE + (["--net"] if offline else [])
                + ["--", sys.executable, "-I", "-c", CONFINE_PROGRAM, self.chroot, "--"] + inner)

    def command(self, argv, env=None, offline=False):
        """(argv, env) to hand to the Runner. offline: no network but lo (when confined)."""
        if not self.chroot:
            return [str(word) for word in argv], env
        passed = {name: os.environ[name] for name in CHROOT_PASSED_VARIABLES if name in os.environ}
        passed.update({"PATH": self.search_path(), "HOME": "/root"})
        passed.update({name: self.translate(value) for name, value in (env or {}).items()})
        confined = self.confinement_problem() is None
        if confined:
            passed["FEATURES"] = " ".join(filter(None, [passed.get("FEATURES", ""), CONFINED_FEATURES]))
        inner = (["env", "-i"] + [f"{name}={value}" for name, value in passed.items()]
                 + [self.translate(word) for word in argv])
        return (self.confined(inner, offline) if confined else ["chroot", self.chroot] + inner), None

    @contextlib.contextmanager
    def mounted(self, show_only=False):
        """The chroot's mounts for the duration (nothing to do without a chroot). With show_only
        (--pretend), the mount and unmount commands are shown, not run."""
        if not self.chroot or self.really_mounted or (show_only and self.shown):
            yield
            return
        self.check_usable()
        self.sync_resolv_conf()
        if show_only:
            shown = self.mounts.show()
            self.shown = True
            try:
                yield
            finally:
                self.shown = False
                for point in reversed(shown):
                    self.runner.run(["umount", "--recursive", point])
            return
        with terminate_as_interrupt(self.runner):
            self.mounts.enter()
            self.really_mounted = True
            try:
                yield
            finally:
                self.really_mounted = False
                with signals_deferred():  # unmounting half-way would help nobody
                    self.mounts.leave()

    def sync_resolv_conf(self):
        """Name resolution inside follows the host's (it changes on laptops and DHCP), once a command."""
        host_conf = read_text("/etc/resolv.conf")
        if host_conf and not self.env.decisions.get(("resolv.conf", self.chroot)):
            self.env.decisions["resolv.conf", self.chroot] = True
            self.runner.write_file(os.path.join(self.chroot, "etc/resolv.conf"), host_conf, backup=False)

    def run(self, argv, env=None, *, changes=True, offline=False, **options):
        argv, env = self.command(argv, env, offline)
        with self.mounted(show_only=self.runner.pretend and changes):
            return self.runner.run(argv, env, changes=changes, **options)

    def read(self, argv, env=None, input=None, check=True, describe=None):
        return self.run(argv, env, changes=False, capture=True, input=input, check=check, describe=describe)

    @contextlib.contextmanager
    def temporary_directory(self, prefix):
        """A scratch directory both sides see (a host path)."""
        parent = os.path.join(self.chroot, "tmp") if self.chroot else None
        with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as directory:
            yield directory


def chroot_session(env):
    """One mount of the chroot Portage runs in (the host chroot, or the binhost root with the
    chroot build method) for a series of commands in it, instead of a mount and an unmount
    around each (nothing to do when Portage runs on this machine)."""
    return env.host.mounted()  # which does nothing without a chroot


# ---- the binhost root as its configuration describes it: make.conf, repositories ---------------

def make_conf_texts(root):
    """The text of root's make.conf: a file, or the files of a make.conf/ directory in order. It
    came from a target: read through no link that leads out of the root (a link to this machine's
    files, a FIFO that would hang us, read as nothing)."""
    path = os.path.join(root, "etc/portage/make.conf")
    if os.path.isdir(path) and symlink_below(root, path) is None:
        return "\n".join(read_inside(root, f"etc/portage/make.conf/{name}", absolute_from_root=True)
                         for name in sorted(os.listdir(path)) if not name.startswith("."))
    return read_inside(root, "etc/portage/make.conf", absolute_from_root=True)


DEFAULT_REPOSITORY = "/var/db/repos/gentoo"


def repos_conf_files(configroot):
    """{etc/portage/repos.conf/...: text} under configroot (the file, or the files of the
    directory), read through no link out of configroot: in the binhost root it is a target's."""
    base = os.path.join(configroot, "etc/portage/repos.conf")
    paths = [base] if os.path.isfile(base) else sorted(
        os.path.join(directory, name) for directory, _dirs, names in os.walk(base) for name in names)
    relatives = (os.path.relpath(path, configroot) for path in paths)
    return {relative: read_inside(configroot, relative, absolute_from_root=True) for relative in relatives}


def repository_locations(members):
    """{name: location} from the repos.conf inside a configuration tar's members."""
    parser = configparser.ConfigParser(interpolation=None)
    for name, (kind, _mode, content) in sorted(members.items()):
        if kind == "file" and (name == "etc/portage/repos.conf" or name.startswith("etc/portage/repos.conf/")):
            with contextlib.suppress(configparser.Error):
                parser.read_string(content.decode("utf-8", "replace"))
    return {section: posixpath.normpath(parser[section]["location"]) for section in parser.sections()
            if parser[section].get("location", "").startswith("/")}


def configured_repositories(configroot):
    """{name: location} of the repos.conf under configroot/etc/portage (a file or a directory)."""
    return repository_locations({name: ("file", 0, text.encode("utf-8", "surrogateescape"))
                                 for name, text in repos_conf_files(configroot).items()})


# Where a target's configuration may make us mount or link something: never a system directory.
SYSTEM_PLACES = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt", "/proc",
                 "/root", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")


def safe_place(place):
    """A repository or DISTDIR path from a target's configuration, fit to be mounted or linked
    at inside the binhost root: absolute, normal, and deeper than a system directory."""
    return (place.startswith("/") and "$" not in place and posixpath.normpath(place) == place.rstrip("/")
            and place.rstrip("/") not in SYSTEM_PLACES and place.rstrip("/").count("/") >= 2
            and not place.startswith(("/proc/", "/sys/", "/dev/", "/run/")))


def holds_repository(directory):
    return any(os.path.isfile(os.path.join(directory, marker)) for marker in ("profiles/repo_name", "metadata/layout.conf"))


def repository_directory(env, location):
    """Where a repository the binhost root's configuration names is, seen from here: on the build
    host; else, on a build machine without it (no host chroot), inside the binhost root, when it
    is there, reached through no link (the root's own content is not this machine's)."""
    on_host = under(env.host_chroot, location)
    inside = under(env.root, location)
    if (not env.host_chroot and safe_place(location) and not os.path.isdir(on_host)
            and symlink_below(env.root, inside) is None and holds_repository(inside)):
        return inside
    return on_host


def binhost_repositories(env):
    """{repository name: its directory on the build host} as the binhost root's repos.conf (the
    target's copy) names them; Gentoo's at its default place unless named."""
    locations = dict({"gentoo": DEFAULT_REPOSITORY}, **configured_repositories(env.root))
    return {name: repository_directory(env, location) for name, location in locations.items()}


def repository_state(directory, root):
    """What a repository directory holds now: its git commit, else its snapshot's date
    (metadata/timestamp.chk), and the digest of its top Manifest (an rsync snapshot's) if any.
    One inside the binhost root (root) is read within itself only: a git worktree's gitdir there
    names a path of the chroot."""
    confined = os.path.realpath(directory).startswith(os.path.realpath(root) + os.sep)

    def read(relative):
        if confined:
            return read_inside(directory, relative)
        with contextlib.suppress(OSError, ValueError):  # ValueError: a NUL in a name
            return read_text(os.path.join(directory, relative))
        return ""

    state, git = {}, ".git"
    gitdir = read(git)
    if gitdir.startswith("gitdir: ") and not (confined and gitdir[len("gitdir: "):].startswith("/")):
        git = posixpath.normpath(gitdir[len("gitdir: "):].strip())  # a worktree's or submodule's
    head = read(os.path.join(git, "HEAD")).strip()
    if head.startswith("ref: "):  # never an empty ref: head is stripped
        ref = head[len("ref: "):]
        head = read(os.path.join(git, ref)).strip() or next(
            (line.split()[0] for line in read(os.path.join(git, "packed-refs")).splitlines()
             if line.endswith(" " + ref)), "")
    stamp = read_inside(directory, "metadata/timestamp.chk").strip().splitlines()
    if re.fullmatch(r"[0-9a-f]{40,64}", head):
        state["revision"] = f"git {head}"
    elif stamp:
        state["revision"] = f"timestamp {stamp[0]}"
    manifest = open_inside(directory, ["Manifest"])
    if manifest is not None and not stat.S_ISREG(os.fstat(manifest).st_mode):
        os.close(manifest)
    elif manifest is not None:
        with contextlib.suppress(OSError), os.fdopen(manifest, "rb") as handle:
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            state["manifest"] = "sha256 " + digest.hexdigest()
    return state


def repository_states(env):
    """{repository: repository_state} of the binhost's tree, as a publication records it."""
    return {name: repository_state(directory, env.root) for name, directory in sorted(binhost_repositories(env).items())
            if os.path.isdir(directory)}


def describe_snapshot(when):
    if when is None:
        return "an unreadable date"
    when = when.astimezone(datetime.timezone.utc) if when.tzinfo else when
    return when.strftime("%Y-%m-%d %H:%M UTC")


def describe_tree(states):
    """gentoo@2026-12-01 03:45 UTC, overlay@1a2b3c4d5e6f (history's words for a publication's trees)."""
    words = []
    for name, state in sorted(states.items()):
        kind, _, value = state.get("revision", "unknown").partition(" ")
        if kind == "timestamp":
            with contextlib.suppress(TypeError, ValueError):
                value = describe_snapshot(email.utils.parsedate_to_datetime(value))
        words.append(f"{name}@{value[:12] if kind == 'git' else value or 'unknown'}")
    return ", ".join(words)


def profile_repository(configroot):
    """Where make.profile's repository is inside configroot (e.g. /var/db/repos/gentoo for
    ../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0), or None."""
    link = os.path.join(configroot, "etc/portage/make.profile")
    if not os.path.islink(link):
        return None
    target = os.readlink(link)
    if target.startswith("/") or "/profiles" not in "/" + target:
        return None
    inside = os.path.normpath(os.path.join("/etc/portage", target))
    return inside.split("/profiles", 1)[0] or None


def repository_name(directory):
    """The name a repository directory gives itself (profiles/repo_name, else layout.conf's
    repo-name), or None."""
    name = read_inside(directory, "profiles/repo_name").strip().splitlines()
    if name:
        return name[0].strip()
    layout = re.search(r"^\s*repo-name\s*=\s*(\S+)", read_inside(directory, "metadata/layout.conf"), re.MULTILINE)
    return layout.group(1) if layout else None


def repositories_kept_in_root(env):
    """{name: location} of the repositories that live inside the binhost root: on a build machine
    without Gentoo (no host chroot) that builds with the chroot method, each one the root's
    repos.conf names (the target's) at a place this machine does not have, and Gentoo's when
    make.profile points into its default place. They are synced there, by the root's Portage."""
    if env.host_chroot:
        return {}
    configured = configured_repositories(env.root)
    if profile_repository(env.root) == DEFAULT_REPOSITORY and DEFAULT_REPOSITORY not in configured.values():
        configured.setdefault("gentoo", DEFAULT_REPOSITORY)
    return {name: location.rstrip("/") for name, location in configured.items()
            if safe_place(location) and not os.path.isdir(location)}


# ---- Portage's environment for what runs there: ROOT, EMERGE_DEFAULT_OPTS, distcc --------------

def check_binhost_root(env):
    root = env.root
    if not os.path.isdir(root):
        raise BinhostError(f"binhost root {root} does not exist: extract a stage3 there"
                           f" or set root = in [binhost] of {env.config_path}")
    if not os.path.isdir(os.path.join(root, "etc/portage")):
        raise BinhostError(f"binhost root {root} has no etc/portage: copy the target's /etc/portage"
                           f" to {root}/etc/portage")


def root_environment(env):
    """Portage on this machine, looking at the binhost root (for portageq and our scripts)."""
    root = env.root.rstrip("/") + "/"
    return {"ROOT": root, "PORTAGE_CONFIGROOT": root}


def emerge_default_opts(env, interactive=False):
    """The filtered EMERGE_DEFAULT_OPTS of the binhost root's make.conf (the target's copy)."""
    return filter_emerge_default_opts(make_conf_value(make_conf_texts(env.root), "EMERGE_DEFAULT_OPTS"),
                                      interactive)


def distcc_hosts(spec):
    """The helper hosts of a DISTCC_HOSTS value (options such as --randomize left out)."""
    return [word for word in spec.split() if not word.startswith("-")]


def distcc_slots(spec):
    """Parallel jobs for MAKEOPTS: each host's /N (distcc's default: 2 for localhost, 4 otherwise)."""
    total = 0
    for host in distcc_hosts(spec):
        limit = re.match(r"[^/]*/(\d+)", host)
        total += int(limit.group(1)) if limit else (2 if host.startswith("localhost") else 4)
    return max(total, 1)


def portage_environment(env):
    """Where Portage builds and what it builds with: binhost-only settings travel here, so the
    binhost's /etc/portage can stay an exact copy of the target's."""
    # Never another binhost's binaries: a copied make.conf often says FEATURES=getbinpkg, and
    # every stage3 names Gentoo's binhost in binrepos.conf (emerge also gets --getbinpkg=n).
    variables = dict(root_environment(env), PKGDIR=env.pkgdir, PORTAGE_BINHOST="",
                     EMERGE_DEFAULT_OPTS=emerge_default_opts(env))
    # Every build a file of its own: a publication names files a rebuild must not overwrite.
    # Builds never sign (a target's make.conf may ask to): the key stays out of their reach, and
    # this tool signs what they made (see sign_builds). What they read back from PKGDIR is what
    # they wrote themselves, so Portage need not verify it here.
    features = ["-getbinpkg", "binpkg-multi-instance", "-binpkg-signing", "-binpkg-request-signature",
                "binpkg-ignore-signature"]
    if env.signing_key:
        variables["BINPKG_FORMAT"] = "gpkg"
    if env.distcc_hosts:
        features.append("distcc")
        variables["DISTCC_HOSTS"] = env.distcc_hosts
        variables["MAKEOPTS"] = f"-j{distcc_slots(env.distcc_hosts)} -l{os.cpu_count() or 1}"
    # FEATURES is incremental: these add to make.conf's; one the user exported stays too.
    variables["FEATURES"] = " ".join(filter(None, [os.environ.get("FEATURES", "")] + features))
    return variables


def check_no_signing_in_builds(env):
    """Portage's package step (gpkg-helper) reads make.conf again, where a target's
    FEATURES=binpkg-signing comes back whatever the build's environment says: the build would
    sign with the target's key settings, or fail. Measured: no signing command makes it write a
    usable unsigned package then."""
    words = make_conf_value(make_conf_texts(env.root), "FEATURES").split()
    last = next((word for word in reversed(words) if word in ("binpkg-signing", "-binpkg-signing", "-*")), None)
    if last == "binpkg-signing":
        raise BinhostError(f"FEATURES in {env.root}/etc/portage/make.conf (the target's) has binpkg-signing,"
                           " which Portage's package step reads again in every build: the binhost signs its"
                           " packages itself (README: 'Signing outside the build'); remove binpkg-signing from"
                           " the target's make.conf, then run config pull")


DISTCC_PROBE_SOURCE = "int gentoo_binhost_probe;\n"
# The compiler proper (cc1, which runs on the helper) writes its version into the object's
# .comment section; __VERSION__ would not do: distcc preprocesses here.
GCC_VERSION_MARK = re.compile(rb"GCC: \([^)]*\) ([^\0]+)\0")


def check_distcc_helpers(env, build_host):
    """Before a long build: every helper compiles, with the same gcc as here, for this machine's
    architecture. The target's explicit -march flags travel to the helpers, so they need the gcc
    version, not the CPU. For a root of another architecture, Gentoo's ebuilds call the compiler
    by CHOST and distcc sends each compile under that name: a helper needs a cross compiler of
    that name, and the objects it returns must be of the root's machine."""
    distcc = build_host.program("distcc", "install distcc (sys-devel/distcc) for distcc-hosts")
    gcc = build_host.program("gcc", "the binhost builds with gcc")
    compiler, chost = "gcc", ""
    foreign = foreign_architecture(env.root)
    if foreign:
        portageq = build_host.program("portageq", "the binhost root must be a Gentoo system to build in")
        chost = build_host.read([portageq, "envvar", "CHOST"], root_environment(env), check=False,
                                describe="portageq envvar CHOST").stdout.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)+", chost):
            raise BinhostError(f"the binhost root's Portage names no CHOST ({chost!r}): distcc helpers compile"
                               " with ${CHOST}-gcc for a root of another architecture; check its make.profile")
        compiler = f"{chost}-gcc"
    with build_host.temporary_directory("gentoo-binhost-distcc.") as directory:
        source = os.path.join(directory, "version.c")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write(DISTCC_PROBE_SOURCE)

        def compiled(argv, variables, what):
            """(gcc version, ELF identity) of the object argv compiles."""
            target = os.path.join(directory, "version.o")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            result = build_host.run(argv + ["-c", source, "-o", target], variables, changes=False,
                                    capture=True, check=False)
            # What the root's programs wrote there is read through no link, as a regular file.
            data = read_bytes_inside(directory, "version.o") if result.returncode == 0 else b""
            if not data:
                if argv[0] == gcc:
                    raise BinhostError(f"{what} cannot compile: {last_line(result.stderr) or 'no object file'}")
                needs = (f" and does it have {compiler}, a compiler for the binhost root's {foreign[0]} (on Gentoo:"
                         f" crossdev --target {chost}, then distcc-config --update-masquerade-with-crossdev; on"
                         f" Debian: a gcc-*-linux-gnu* cross compiler package, and a link named {compiler} to it in"
                         " distccd's PATH and in /usr/lib/distcc)?" if foreign else "?")
                raise BinhostError(f"{what} cannot compile: {last_line(result.stderr) or 'no object file'}:"
                                   f" is distccd running there and allowing this host{needs}")
            match = GCC_VERSION_MARK.search(data)
            if not match:  # fail closed: two unreadable versions are not the same version
                raise BinhostError(f"{what}: cannot read the gcc version from the object it compiled"
                                   " (no 'GCC: (...) VERSION' comment): refusing it, as a gcc of another"
                                   " version would build different binaries")
            return match.group(1).decode(), elf_identity(data[:64])

        local, machine = compiled([gcc], None, "the binhost's gcc")
        for host in distcc_hosts(env.distcc_hosts):
            if host.startswith("localhost"):
                continue
            # No silent local fallback: the point is to learn what the helper itself runs.
            variables = {"DISTCC_HOSTS": host, "DISTCC_FALLBACK": "0", "DISTCC_SKIP_LOCAL_RETRY": "1",
                         "DISTCC_DIR": directory}
            remote, made_for = compiled([distcc, compiler], variables, f"distcc helper {host}")
            if made_for != machine:
                theirs = ELF_ARCHES.get(made_for, ("another architecture",))[0] if made_for else "no known machine"
                raise BinhostError(f"distcc helper {host} compiled for {theirs} with {compiler}, not for the"
                                   f" binhost root's {ELF_ARCHES.get(machine, ('architecture',))[0]}: give it a"
                                   f" {compiler} that is a compiler for the root's architecture")
            if remote != local:
                raise BinhostError(f"distcc helper {host} has {compiler} {remote}, the binhost's gcc {local}:"
                                   " helpers need the same gcc version (their CPU does not matter)")
            emulated = foreign and not foreign[4]
            env.output.info(f"distcc helper {host}: {compiler} {remote}, like the binhost"
                            + (f" root's ({foreign[0]}" if foreign else "")
                            + (": compiled natively there, not emulated here)" if emulated else ")" if foreign else ""))


# ---- the build lock: one build per binhost root at a time --------------------------------------

HELD_BUILD_LOCKS = set()  # the build locks this process holds (flock is per open file)


def build_lock_path(root):
    """Beside the root, not in it: init --force renames the root and remove-target --purge
    deletes it, both under this lock."""
    real = os.path.realpath(root)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real) or 'root'}.build.lock")


@contextlib.contextmanager
def locked(lock_path, note, busy):
    """The lock at lock_path for the duration, note written in it (what a waiting build says);
    busy(holder) first when another process holds it: it refuses, or the lock is waited for."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            busy(lock_file.read().strip() or "another process")  # as the holder wrote
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(note)
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.contextmanager
def root_replacement_lock(root, output, what):
    """The build lock of root, for init --force and remove-target --purge: taken at once or
    refused (a build is running), then no mount of a build may be left inside (resolved paths)."""
    def busy(holder):
        raise BinhostError(f"a build is running on {root} ({holder}): {what} when it is done")

    with locked(build_lock_path(root), f"pid {os.getpid()}, replacing or removing the root\n", busy):
        real = os.path.realpath(root)
        inside = [point for point in mount_points() if point == real or point.startswith(real + "/")]
        if inside:
            raise BinhostError(f"{root} has mounts inside ({', '.join(inside)}): {what} once they are"
                               " unmounted (doctor shows whose they are)")
        yield


@contextlib.contextmanager
def build_lock(env):
    """One build per binhost at a time: a second build waits for the first. Whatever changed
    PKGDIR under the lock leaves an index newer than before (see PackageStore.advance_index)."""
    lock_path = build_lock_path(env.root)
    if env.runner.pretend or lock_path in HELD_BUILD_LOCKS:  # update holds it around its builds
        yield
        return
    with locked(lock_path, f"pid {os.getpid()}\n", lambda holder: env.output.warn(
            f"Another build is running on {env.root} ({holder}); waiting for it"
            f" to finish (lock {lock_path})")):
        before = env.packages.index_state()
        HELD_BUILD_LOCKS.add(lock_path)
        try:
            yield
        finally:
            HELD_BUILD_LOCKS.discard(lock_path)
            with signals_deferred():  # a half-advanced index would be worse than none
                env.packages.advance_index(before)


# ---- the package store: PKGDIR, its index, publications, retired builds, holds -----------------

def is_retired(fields, retired):
    """Whether an index entry is a retired build (the same file, not a new build at its path)."""
    path = entry_path(fields)
    return path in retired and retired[path] in ("", fields.get("MD5", ""))


def hold_on(cpv, path, holds):
    """The hold that keeps a build (or a version) out of publications, or None: the build itself
    was withdrawn, or its version is newer than the rolled-back-to publication's."""
    name, version = cpv_package_name(cpv), cpv_version(cpv)
    for hold in holds["holds"]:
        if path is not None and path in hold["builds"]:
            return hold
        if name in hold["versions"] and (hold["versions"][name] is None
                                         or compare_versions(version, hold["versions"][name]) > 0):
            return hold
    return None


class StagedPublication:
    """An index written as the next publication would be, not yet served as the current one."""

    def __init__(self, directory, token, why, changed, meta):
        self.directory, self.token, self.why, self.changed, self.meta = directory, token, why, changed, meta

    @property
    def url_path(self):
        return f"{STAGED_URL_DIR}/{self.token}/"

    @property
    def text(self):
        return read_text(os.path.join(self.directory, "Packages"))


def all_packages(pkgdir, suffixes=(".gpkg.tar",)):
    return sorted(os.path.join(directory, name) for directory, _dirs, files in os.walk(pkgdir)
                  for name in files if name.endswith(suffixes))


def package_in(pkgdir, relative):
    """PKGDIR/relative, for a PATH a build wrote into the index: inside PKGDIR, through no link."""
    path = os.path.join(pkgdir, relative)
    if (relative.startswith("/") or ".." in relative.split("/")
            or os.path.realpath(path) != os.path.normpath(os.path.join(os.path.realpath(pkgdir), relative))):
        raise BinhostError(f"{path}: the index names a package outside {pkgdir} or through a link:"
                           " remove it and rebuild")
    return path


class PackageStore:
    """An environment's PKGDIR (env.packages): the index Portage writes there, read through the one
    parser above; the publications targets are served, made by publish(), the one way every
    command offers them something new; the retired builds clean gave up; the rollbacks' holds."""

    def __init__(self, env):
        self.env = env

    @property
    def pkgdir(self):
        return self.env.pkgdir

    def read_packages_index(self):
        """The entries of PKGDIR/Packages as dicts of their fields (the header block left out)."""
        path = os.path.join(self.pkgdir, "Packages")
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return index_entries(handle.read())
        except FileNotFoundError:
            raise BinhostError(f"{path} does not exist: build something first") from None

    def index_state(self):
        """(TIMESTAMP, mtime, content) of PKGDIR/Packages, or None when there is none."""
        path = os.path.join(self.pkgdir, "Packages")
        try:
            with open(path, "rb") as handle:
                content = handle.read()
                mtime = int(os.fstat(handle.fileno()).st_mtime)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return index_timestamp(content.decode("utf-8", "replace")), mtime, content

    def advance_index(self, before):
        """A target compares the index's date with its copy's: it reads a new index only when its
        TIMESTAMP (and Last-Modified, the file's mtime, which Portage sets to it) is later. Portage
        writes the current second, so two changes within one second, or an index rewritten exactly
        5 s later (which Portage's If-Modified-Since would match), would look unchanged: after a
        change, both move strictly past the previous ones (Packages.gz, when there is one, too)."""
        after = self.index_state()
        if after is None or before is None or after == before:
            return
        old_stamp, old_mtime, _ = before
        new_stamp, new_mtime, content = after
        stamp = next_timestamp(max(new_stamp, new_mtime), [old_stamp, old_mtime])
        if (stamp, stamp) == (new_stamp, new_mtime):
            return
        text = with_timestamp(content.decode("utf-8", "surrogateescape"), stamp)
        path = os.path.join(self.pkgdir, "Packages")
        self.env.runner.write_file(path, text, backup=False, mtime=stamp)
        if os.path.isfile(path + ".gz"):
            self.env.runner.write_file(path + ".gz", gzip_bytes(text, stamp), backup=False, mtime=stamp)

    def package_files(self):
        """{PATH: MD5} of the builds PKGDIR's index names (Portage adds each build as it is made)."""
        return {entry_path(fields): fields.get("MD5", "") for fields, _ in index_blocks(
            read_text(os.path.join(self.pkgdir, "Packages")))[1]}

    def package_records(self):
        """What list shows: one record per binary package, newest build of each CPV first, with its
        state: retired by clean, held back by a rollback, or neither."""
        records, retired, holds = [], self.retired_packages(), self.read_holds()
        for fields in self.read_packages_index():
            hold = hold_on(fields["CPV"], entry_path(fields), holds)
            size = int(fields["SIZE"]) if fields.get("SIZE", "").isdigit() else None
            built = int(fields["BUILD_TIME"]) if fields.get("BUILD_TIME", "").isdigit() else None
            records.append({
                "cpv": fields["CPV"], "size": size,
                "build_id": int(fields["BUILD_ID"]) if fields.get("BUILD_ID", "").isdigit() else 0,
                "build_time": datetime.datetime.fromtimestamp(built, datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ") if built is not None else None,
                "use": fields.get("USE", "").split(), "path": entry_path(fields),
                "state": ("retired" if is_retired(fields, retired) else
                          f"held back by rollback {hold['rollback']}" if hold else ""),
            })
        return sorted(records, key=lambda record: (record["cpv"], -record["build_id"]))

    def targets_installed(self):
        """Every CPV a target of this PKGDIR had installed when it was last asked (record_installed)."""
        directory = os.path.join(self.publications_dir(), INSTALLED_DIR)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return set()
        return {line.strip() for name in names for line in read_text(os.path.join(directory, name)).splitlines()
                if line.strip()}

    def publications_dir(self):
        return os.path.join(self.pkgdir, PUBLISHED_DIR)

    def publication_text(self, publication):
        """The index of a kept publication ("" for None: before the first one)."""
        if publication is None:
            return ""
        return read_text(os.path.join(self.publications_dir(), str(publication), "Packages"))

    def publication_ids(self):
        """The IDs of the kept publications, oldest first."""
        try:
            names = os.listdir(self.publications_dir())
        except FileNotFoundError:
            return []
        return sorted(int(name) for name in names if name.isdigit())

    def current_publication(self):
        """The ID targets are served now, or None before the first publication."""
        try:
            target = os.readlink(os.path.join(self.publications_dir(), CURRENT_PUBLICATION))
        except OSError:
            return None
        return int(target) if target.isdigit() else None

    def publication_entries(self, publication):
        """{CPV-BUILD_ID: fields} of a publication's index."""
        return {f"{fields['CPV']}-{fields.get('BUILD_ID', '0')}": fields
                for fields in index_entries(self.publication_text(publication))}

    def publication_meta(self, publication):
        try:
            return json.loads(read_text(os.path.join(self.publications_dir(), str(publication), "meta.json")) or "{}")
        except ValueError:
            return {}

    def retired_packages(self):
        """{PATH: MD5} of the retired package files."""
        lines = read_text(os.path.join(self.publications_dir(), RETIRED_LIST)).splitlines()
        return dict((line.split() + [""])[:2] for line in lines if line.strip())

    def write_retired(self, retired):
        path = os.path.join(self.publications_dir(), RETIRED_LIST)
        if retired or os.path.exists(path):
            self.env.runner.write_file(path, "".join(f"{each} {md5}\n" for each, md5 in sorted(retired.items())),
                                       backup=False)

    def read_holds(self):
        """The rollbacks' holds: [{rollback, from, to, builds: [PATH], versions: {CP: VERSION or None},
        cpvs: [CPV]}], and the builds released since the last publication ({"released": [PATH]})."""
        try:
            data = json.loads(read_text(os.path.join(self.publications_dir(), HOLDS_FILE)) or "{}")
        except ValueError:
            data = {}
        return {"holds": list(data.get("holds", [])), "released": list(data.get("released", []))}

    def write_holds(self, holds):
        self.env.runner.write_file(os.path.join(self.publications_dir(), HOLDS_FILE),
                                   json.dumps(holds, indent=1) + "\n", backup=False)

    def next_publication_text(self, produced=None, removed=()):
        """The index the next publication offers: the current publication's builds (their fields as
        PKGDIR's index has them now: sign rewrites files), the builds this command produced, and those
        a release gave back; without what it retires, retired builds and held ones. Before the first
        publication: what this command produced, or everything PKGDIR holds for a command that builds
        nothing (produced None: sign, clean). Builds an emerge left before it failed are not in it."""
        pkgdir = self.pkgdir
        header, in_pkgdir = index_blocks(read_text(os.path.join(pkgdir, "Packages")))
        by_path = {entry_path(fields): (fields, block) for fields, block in in_pkgdir}
        current = self.current_publication()
        holds, retired = self.read_holds(), self.retired_packages()
        if current is None:
            chosen = [(fields, block) for fields, block in in_pkgdir
                      if produced is None or entry_path(fields) in produced]
        else:
            published_header, published = index_blocks(self.publication_text(current))
            header = header or published_header
            chosen = [by_path.get(entry_path(fields)) or (fields, block) for fields, block in published
                      if entry_path(fields) in by_path or os.path.isfile(os.path.join(pkgdir, entry_path(fields)))]
        paths = {entry_path(fields) for fields, _ in chosen}
        for path in sorted(set(produced or ()) | set(holds["released"])):
            if path in by_path and path not in paths:
                chosen.append(by_path[path])
                paths.add(path)
        removed = set(removed)
        kept = [block for fields, block in chosen if entry_path(fields) not in removed
                and not is_retired(fields, retired) and hold_on(fields["CPV"], entry_path(fields), holds) is None]
        if not header or current is None and not kept:
            return ""
        header = re.sub(r"(?m)^PACKAGES: .*$", f"PACKAGES: {len(kept)}", header.strip("\n"))
        return "\n\n".join([header] + kept) + "\n\n"

    def stage_publication(self, why, index_text=None, produced=None, removed=(), meta=None):
        """Write the next publication's index (next_publication_text, or index_text: a rollback) in a
        directory of its own, with its TIMESTAMP (and the files' mtime, Last-Modified) later than every
        earlier publication's, never by exactly 5 s (Portage asks with its copy's TIMESTAMP + 5 s).
        None when there is nothing to publish, or under --pretend. Called under the build lock."""
        text = index_text if index_text is not None else self.next_publication_text(produced, removed)
        if not text:
            return None
        current = self.current_publication()
        changed = (index_text is not None or current is None
                   or offered_builds(text) != offered_builds(self.publication_text(current)))
        if self.env.runner.pretend:
            if changed:
                self.env.output.info(f"Would publish the index of {self.pkgdir} ({why})")
            return None
        directory = self.publications_dir()
        for leftover in glob.glob(os.path.join(directory, STAGED_PREFIX + "*")):  # of a killed run
            self.env.runner.remove_tree(leftover)
        ids = self.publication_ids()
        # Later than every kept publication (a target may hold any of them) and than the index served
        # before the first one.
        earlier = ([index_timestamp(self.publication_text(each)) for each in ids]
                   or [index_timestamp(read_text(os.path.join(self.pkgdir, "Packages")))])
        stamp = next_timestamp(int(time.time()), earlier)
        text = with_timestamp(text, stamp)
        token = secrets.token_hex(12)
        staging = os.path.join(directory, STAGED_PREFIX + token)
        self.env.runner.make_directory(staging, 0o755)
        try:
            for name, content in (("Packages", text), ("Packages.gz", gzip_bytes(text, stamp))):
                self.env.runner.write_file(os.path.join(staging, name), content, backup=False, mtime=stamp)
        except BaseException:
            self.env.runner.remove_tree(staging)
            raise
        if produced:  # the trees these builds came from (a rollback, clean or sign builds nothing)
            meta = dict(meta or {}, trees=repository_states(self.env))
        return StagedPublication(staging, token, why, changed, dict(meta or {}, published=stamp, why=why))

    def commit_publication(self, staged, prune=True):
        """Make a staged publication the current one, in one step: its directory renamed to the next
        ID, then `current` switched to it with a rename. Its set, description and changes against the
        publication before it are written once (meta.json), never recomputed. Nothing when it changes
        nothing."""
        if staged is None:
            return None
        if not staged.changed:
            self.discard_staged(staged)
            self.env.output.debug(f"Nothing new to publish: publication {self.current_publication()} has"
                                  " these packages")
            return None
        directory = self.publications_dir()
        ids, current = self.publication_ids(), self.current_publication()
        publication = (ids[-1] if ids else 0) + 1
        added, updated, removed = set_changes(self.publication_text(current), staged.text)
        meta = dict(staged.meta, id=publication, previous=current, added=added, updated=updated, removed=removed)
        self.env.runner.write_file(os.path.join(staged.directory, "meta.json"), json.dumps(meta) + "\n", backup=False)
        runner = self.env.runner
        runner.rename(staged.directory, os.path.join(directory, str(publication)))
        link, current_link = os.path.join(directory, f".{CURRENT_PUBLICATION}.{os.getpid()}"), os.path.join(
            directory, CURRENT_PUBLICATION)
        runner.remove(link)
        if os.path.isdir(current_link) and not os.path.islink(current_link):
            runner.remove_tree(current_link, ignore_errors=False)  # a copy of PKGDIR that followed the link (cp -r): ours to replace
        runner.symlink(str(publication), link)
        runner.rename(link, current_link)
        holds = self.read_holds()
        if holds["released"]:  # offered again now
            self.write_holds(dict(holds, released=[]))
        self.env.output.info(f"Published {self.pkgdir} as publication {publication} ({staged.why})")
        if prune:
            self.prune_publications()
        return publication

    def publish(self, why, produced=None, removed=(), index_text=None, prune=True, meta=None):
        """The one entry point of every command that publishes: the next publication (see
        next_publication_text), when it changes what targets are offered. Called under the build
        lock."""
        staged = self.stage_publication(why, index_text, produced, removed, meta)
        return self.commit_publication(staged, prune)

    def discard_staged(self, staged):
        if staged is not None and os.path.isdir(staged.directory):
            self.env.runner.remove_tree(staged.directory)

    def prune_publications(self):
        """Keep the newest publish-keep publications, the current one, and those a hold refers to."""
        current = self.current_publication()
        referred = {hold[key] for hold in self.read_holds()["holds"] for key in ("to", "from", "rollback")}
        ids = self.publication_ids()
        for old in ids[:-self.env.publish_keep] if len(ids) > self.env.publish_keep else []:
            if old != current and old not in referred:
                self.env.runner.remove_tree(os.path.join(self.publications_dir(), str(old)))
                self.env.output.debug(f"Removed publication {old} (publish-keep = {self.env.publish_keep})")

    def publication_set(self, publication):
        """{CPV-BUILD_ID: fields} of what a target can get from a publication: Portage's index names
        every build PKGDIR holds, and of builds with the same CPV and USE a target takes the newest."""
        newest = {}
        for key, fields in self.publication_entries(publication).items():
            variant = (fields["CPV"], " ".join(sorted(fields.get("USE", "").split())))
            build = int(fields.get("BUILD_ID", "0") or 0) if fields.get("BUILD_ID", "0").isdigit() else 0
            if variant not in newest or build > newest[variant][0]:
                newest[variant] = (build, key, fields)
        return {key: fields for _build, key, fields in newest.values()}

    def published_paths(self):
        """Every package file of a kept publication's set: clean never deletes those."""
        return {entry_path(fields) for publication in self.publication_ids()
                for fields in self.publication_set(publication).values()}

    def publication_history(self):
        """[{id, published, why, current, packages, added, updated, removed, held, holds, trees}], newest
        first: held is what a rollback held back when it was made, holds what it still holds.
        The changes are those written when it was published (against the publication before it);
        a publication from before they were written is compared with the kept one before it."""
        ids, current = self.publication_ids(), self.current_publication()
        active = {hold["rollback"]: hold for hold in self.read_holds()["holds"]}
        history = []
        for index, publication in enumerate(ids):
            meta = self.publication_meta(publication)
            if "added" in meta:
                added, updated, removed = meta["added"], meta["updated"], meta["removed"]
            else:
                previous = ids[index - 1] if index else None
                added, updated, removed = set_changes(self.publication_text(previous),
                                                      self.publication_text(publication))
            hold = active.get(publication)
            history.append({
                "id": publication, "current": publication == current, "why": meta.get("why", ""),
                "published": datetime.datetime.fromtimestamp(meta.get("published", 0), datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "packages": len(self.publication_entries(publication)),
                "added": added, "updated": updated, "removed": removed,
                "held": meta.get("held", []), "holds": sorted(hold["cpvs"]) if hold else [],
                "trees": meta.get("trees", {})})
        return list(reversed(history))

    def rollback(self, publication=None):
        """Publish an earlier publication's set again, as a new publication (targets only read a newer
        index), and hold back what it withdraws: every build the current set has and ID's does not,
        and every newer version of those packages, stay out of later publications until released."""
        ids, current = self.publication_ids(), self.current_publication()
        if publication is None:
            earlier = [each for each in ids if current is None or each < current]
            if not earlier:
                raise BinhostError(f"no publication before the current one ({current}) is kept in"
                                   f" {self.publications_dir()}: see '{PROG} history'")
            publication = earlier[-1]
        if publication not in ids:
            raise UsageError(f"publication {publication} is not kept (kept: {', '.join(map(str, ids)) or 'none'}):"
                             f" see '{PROG} history'")
        if publication == current:
            self.env.output.info(f"Publication {publication} is the current one: nothing changes")
            return None
        chosen = self.publication_set(publication)
        missing = [entry_path(fields) for fields in chosen.values()
                   if not os.path.isfile(os.path.join(self.pkgdir, entry_path(fields)))]
        if missing:
            raise BinhostError(f"publication {publication} names packages that are gone ({', '.join(missing[:5])}):"
                               " it cannot be published again")
        # Older builds that clean removed since are left out; the set's own builds are all there.
        text = index_keeping(self.publication_text(publication),
                             lambda fields: os.path.isfile(os.path.join(self.pkgdir, entry_path(fields))))
        chosen_paths = {entry_path(fields) for fields in chosen.values()}
        versions = {}
        for fields in chosen.values():
            name, version = cpv_package_name(fields["CPV"]), cpv_version(fields["CPV"])
            if name not in versions or compare_versions(version, versions[name]) > 0:
                versions[name] = version
        withdrawn = [fields for fields in (self.publication_set(current).values() if current else ())
                     if entry_path(fields) not in chosen_paths]
        with build_lock(self.env):
            new_id = (self.publication_ids() or [0])[-1] + 1
            hold = {"rollback": new_id, "from": current, "to": publication,
                    "builds": sorted(entry_path(fields) for fields in withdrawn),
                    "versions": {cpv_package_name(fields["CPV"]): versions.get(cpv_package_name(fields["CPV"]))
                                 for fields in withdrawn},
                    "cpvs": sorted({fields["CPV"] for fields in withdrawn})}
            if self.env.runner.pretend:
                self.env.output.info(f"Would publish publication {publication}'s set again"
                                     + (f", holding back {', '.join(hold['cpvs'])}" if withdrawn else ""))
                return None
            holds = self.read_holds()
            if withdrawn:
                self.write_holds(dict(holds, holds=holds["holds"] + [hold]))
            try:
                made = self.publish(f"rollback to publication {publication}", index_text=text,
                                    meta={"held": hold["cpvs"]})
            except BaseException:
                self.write_holds(holds)
                raise
        if withdrawn:
            self.env.output.info(f"Held back until '{PROG} release': {', '.join(hold['cpvs'])} (and newer versions):"
                                 " no later publication offers them, and no build makes them again")
        return made

    def release(self, atoms=()):
        """End the holds on atoms' packages (all holds without atoms); their builds still in PKGDIR
        are offered again by the next publication."""
        holds = self.read_holds()
        wanted = {cpv_package_name(atom.lstrip("=<>~").split(":")[0]) if re.search(r"-[0-9]", atom)
                  else atom.split(":")[0] for atom in atoms}
        kept, released_builds, released = [], [], []
        for hold in holds["holds"]:
            ending = set(hold["versions"]) & wanted if atoms else set(hold["versions"])
            builds = hold["builds"]
            ending_builds = [path for path in builds if not atoms or "/".join(path.split("/")[:2]) in ending]
            released += [cpv for cpv in hold["cpvs"] if cpv_package_name(cpv) in ending]
            released_builds += ending_builds
            rest = dict(hold, builds=[path for path in builds if path not in ending_builds],
                        versions={name: version for name, version in hold["versions"].items() if name not in ending},
                        cpvs=[cpv for cpv in hold["cpvs"] if cpv_package_name(cpv) not in ending])
            if rest["versions"] or rest["builds"]:
                kept.append(rest)
        unknown = wanted - {cpv_package_name(cpv) for cpv in released}
        if atoms and unknown:
            raise UsageError(f"no hold on {', '.join(sorted(unknown))}: see '{PROG} history' for what is held")
        if not released:
            self.env.output.info("Nothing is held back")
            return []
        offered = [path for path in released_builds if os.path.isfile(os.path.join(self.pkgdir, path))]
        if self.env.runner.pretend:
            self.env.output.info(f"Would release {', '.join(sorted(released))}")
            return released
        with build_lock(self.env):
            self.write_holds({"holds": kept, "released": sorted(set(holds["released"]) | set(offered))})
        self.env.output.info(f"Released {', '.join(sorted(released))}: the next publication offers them again"
                             f" ({len(offered)} build(s) still in PKGDIR), and later builds may make their newer"
                             " versions")
        return released

    def published_index_text(self):
        """The index targets are offered now: the current publication's, else PKGDIR's."""
        current = self.current_publication()
        return (self.publication_text(current) if current is not None
                else read_text(os.path.join(self.pkgdir, "Packages")))

    def indexed_packages(self):
        """The GPKGs PKGDIR's index names (not the empty file a failed build leaves behind)."""
        return sorted(package_in(self.pkgdir, path) for path in self.package_files() if path.endswith(".gpkg.tar"))

    def index_problems(self):
        """Differences between PKGDIR/Packages and the files: (missing or wrong size, not indexed)."""
        broken, indexed = [], set()
        for fields in self.read_packages_index():
            path = entry_path(fields)
            indexed.add(path)
            full = os.path.join(self.pkgdir, path)
            if not os.path.isfile(full):
                broken.append(f"{path} missing")
            elif fields.get("SIZE", "").isdigit() and int(fields["SIZE"]) != os.path.getsize(full):
                broken.append(f"{path} has {os.path.getsize(full)} bytes, the index says {fields['SIZE']}")
        on_disk = {os.path.relpath(path, self.pkgdir) for path in all_packages(self.pkgdir)}
        return broken, sorted(on_disk - indexed)

    def published_trees(self):
        """The trees the newest kept publication with builds was built from ({} before any)."""
        return next(filter(None, (self.publication_meta(publication).get("trees")
                                  for publication in reversed(self.publication_ids()))), {})


class PendingPublication:
    """What one command publishes in one environment, at its end: the builds it produced (of the
    emerges that succeeded) and what it retires."""

    def __init__(self, env, why):
        self.env, self.why = env, why
        self.produced, self.removed = set(), set()

    def stage(self, produced=()):
        return self.env.packages.stage_publication(self.why, produced=self.produced | set(produced),
                                                   removed=self.removed)

    def publish(self):
        return self.env.packages.publish(self.why, self.produced, self.removed, prune=False)


def refresh_index(env, host=None):
    """Rebuild PKGDIR/Packages; Portage trusts a stale index otherwise (pkgdir-index-trusted)."""
    host = host or env.host
    emaint = host.program("emaint", "put Portage's bin directory in PATH")
    host.run([emaint, "binhost", "--fix"], portage_environment(env), capture=True,
             describe="emaint binhost --fix")


# ---- the build methods: where Portage runs for an environment, and what each one needs ---------
# Each entry owns where its Portage runs (host), how the root's repositories reach that Portage
# (links, or binds and repositories kept in the root), what its emerge gets, and what it checks
# and prepares before a build; choose_build_method picks one per environment.

def make_conf_cpu_flags(root):
    """The -m words (-march=..., -mavx2, ...) of the CFLAGS-like variables in root's make.conf."""
    text, words = make_conf_texts(root), []
    for assignment in _assignments(text):
        if assignment.name in FLAGS_VARIABLES:
            value = _unquote(text[assignment.start:assignment.end], assignment.quote)
            words += [word for word in value.split() if word.startswith("-m") and word not in words]
    return words


def isa_this_cpu_lacks(flags, runner):
    """The instruction-set macros (__AVX512F__, ...) gcc defines for flags but not for this CPU's
    -march=native: code built with flags could die with SIGILL here. None if gcc cannot tell."""
    gcc = shutil.which("gcc")
    if not gcc:
        return None

    def macros(options):
        result = runner.read([gcc, *options, "-dM", "-E", "-x", "c", "/dev/null"], check=False)
        if result.returncode != 0:
            return None
        return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("#define ")}

    native = macros(["-march=native"])
    wanted = macros(flags) if flags else set()
    if native is None or wanted is None:
        return None
    # Feature macros are upper case (__AVX2__); arch and tuning names (__znver3__) are not.
    return sorted(name for name in wanted - native
                  if re.fullmatch(r"__[A-Z0-9_]+__|__ARM_FEATURE_[A-Z0-9_]+|__ARM_NEON[A-Z0-9_]*", name))


def root_has_program(root, name):
    return any(os.path.lexists(os.path.join(root, directory.lstrip("/"), name))
               for directory in CHROOT_PATH.split(":"))


# What a stage3 fills with programs, libraries and state: a writable download directory is never
# bound over them.
SYSTEM_CONTENT_PLACES = ("/etc", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec",
                         "/usr/include", "/usr/share", "/usr/src", "/var/db", "/var/lib", "/var/log")


def chroot_build_binds(env, trees_writable=False):
    """(place inside the binhost root, build host directory, read-only) for a chroot build: each
    repository the copied configuration names, at the place it names, and the profile's, read-only;
    a repository kept inside the root, onto itself read-only (writable for its sync: trees_writable,
    so a query that starts meanwhile finds it mounted and does not cover it read-only);
    [binhost] distdir, when set, read-write at the target's DISTDIR. The places come from a target:
    only what looks like what it claims is bound, and nothing it names is bound writable."""
    repositories = set(configured_repositories(env.root).values()) | {DEFAULT_REPOSITORY}
    profile_dir = profile_repository(env.root)
    if profile_dir:
        repositories.add(profile_dir)
    binds = []
    for place in sorted({place.rstrip("/") for place in repositories if safe_place(place)}):
        source = under(env.host_chroot, place)
        inside = under(env.root, place)
        is_repository = any(os.path.exists(os.path.join(source, marker))
                            for marker in ("profiles/repo_name", "metadata/layout.conf"))
        # config pull links each repository in for the root method: the mount replaces that link
        # (prepare_bind_points), which here resolves to the very source it names.
        linked_for_root_method = os.path.islink(inside) and os.readlink(inside) == place
        if os.path.isdir(source) and is_repository and (linked_for_root_method
                                                        or os.path.realpath(source) != os.path.realpath(inside)):
            binds.append((place, source, True))
    for place in sorted(set(repositories_kept_in_root(env).values()) - {place for place, _, _ in binds}):
        inside = under(env.root, place)
        if symlink_below(env.root, inside) is None and holds_repository(inside):
            binds.append((place, "{}", not trees_writable))  # "{}": the very mount point, as checked
    if env.distdir:
        text = make_conf_texts(env.root)
        distdirs = [_unquote(text[a.start:a.end], a.quote) for a in _assignments(text) if a.name == "DISTDIR"]
        distdir = (distdirs[-1] if distdirs else "/var/cache/distfiles").rstrip("/")
        # A repository kept in the root is this machine's nowhere: a writable DISTDIR must not reach it.
        kept_places = repositories_kept_in_root(env).values()
        if (not safe_place(distdir) or distdir in {place for place, _, _ in binds}
                or any(distdir.startswith(place + "/") or place.startswith(distdir + "/") for place in kept_places)
                or any(distdir == place or distdir.startswith(place + "/") for place in SYSTEM_CONTENT_PLACES)):
            raise BinhostError(f"DISTDIR = {distdir} in {env.root}/etc/portage/make.conf (the target's) is"
                               f" not a place to bind [binhost] distdir = {env.distdir} at (a system"
                               " directory, or a repository): set DISTDIR to a directory of its own on the"
                               " target, e.g. /var/cache/distfiles, and run config pull")
        if not os.path.isdir(env.distdir):
            raise BinhostError(f"[binhost] distdir = {env.distdir} does not exist: create it, or remove"
                               f" the key from {env.config_path}")
        binds.append((distdir, env.distdir, False))
    return binds


def kept_repositories(env):
    """The repositories the build method in use keeps inside the binhost root (asked only without
    a host chroot)."""
    if env.host_chroot:
        return {}
    return env.method[0].kept_repositories(env)


def link_repositories_into(env):
    """On a real system make.profile is a relative link into the ebuild repository
    (../../var/db/repos/gentoo/profiles/...); copied into the binhost root, it points into the
    binhost root, where a stage3 has no repository. Portage reads each repository where repos.conf
    says, on the build host (in the host chroot, with one): so each one gets a link at its place
    in the binhost root, and so does the profile's, to the build host's repository. The chroot
    method binds each repository over its link for the build (chroot_build_binds)."""
    chroot = env.host_chroot
    repositories = configured_repositories(env.root)
    wanted = {location.rstrip("/"): location.rstrip("/") for location in repositories.values() if safe_place(location)}
    wanted.setdefault(DEFAULT_REPOSITORY, DEFAULT_REPOSITORY)
    profile_dir = profile_repository(env.root)
    if profile_dir and profile_dir not in wanted and safe_place(profile_dir):
        # Its name inside the binhost root is the target's; the repository is the one of that name.
        same_name = [location for location in repositories.values()
                     if os.path.basename(location.rstrip("/")) == os.path.basename(profile_dir)]
        wanted[profile_dir] = same_name[0] if same_name else profile_dir
    for inside, location in sorted(wanted.items()):
        link = under(env.root, inside)
        check_no_symlink_below(env.root, os.path.dirname(link))  # a build in the root may have planted one
        mount_point = (os.path.isdir(link) and not os.path.islink(link) and not os.path.ismount(link)
                       and not os.listdir(link))
        if mount_point:
            env.runner.remove_directory(link)  # the empty mount point a chroot build left
        # Gentoo's repository is linked before it is synced in a host chroot; a build machine
        # without it keeps it inside the binhost root instead (repositories_kept_in_root).
        on_build_host = os.path.isdir(under(env.host_chroot, location)) or (location == DEFAULT_REPOSITORY and chroot)
        if (os.path.lexists(link) and not mount_point) or not on_build_host:
            continue
        if not os.path.isdir(os.path.dirname(link)):
            env.runner.make_directory(os.path.dirname(link))
        env.runner.symlink(location, link)
        if not env.runner.pretend:  # --pretend showed the command
            env.output.info(f"{link} -> {location} (the repository on {'the host chroot' if chroot else 'this machine'},"
                            " so the copied make.profile resolves)")
    profile = os.path.join(env.root, "etc/portage/make.profile")
    if (os.path.islink(profile) and not env.runner.pretend
            and not os.path.exists(resolved_under(env.host_chroot, profile))):
        if profile_dir in kept_repositories(env).values():
            env.output.info(f"{profile} -> {os.readlink(profile)} resolves once {profile_dir} is synced inside the"
                            " binhost root, which comes before any build there")
            return
        env.output.warn(f"{profile} -> {os.readlink(profile)} does not resolve: the repository it points into"
                        f" is not on {'the host chroot' if chroot else 'this machine'}; sync it there"
                        f" ('{PROG} doctor' checks this)")


class RootMethod:
    """build-method = root: the build host's Portage (this machine's, or the host chroot's) with
    ROOT= the binhost root. Each repository the root's configuration names is a link at its place
    in the root, to the build host's (link_repositories_into); build dependencies are merged into
    the binhost root too (--root-deps), and into the build host."""
    name = "root"
    emerge_options = ["--root-deps"]

    def host(self, env, trees_writable=False):
        return env.host_for()

    def kept_repositories(self, env):
        return {}

    def check(self, env, host):
        pass

    def prepare(self, env, variables):
        link_repositories_into(env)  # a chroot build may have left mount points where the links were


class ChrootMethod:
    """build-method = chroot: emerge inside the binhost root, entered confined (BuildHost). Each
    repository its configuration names is bound read-only at that place (chroot_build_binds); one
    this machine lacks is kept, and synced, inside the root (repositories_kept_in_root)."""
    name = "chroot"
    emerge_options = []  # ROOT is /: every dependency goes to the root anyway

    def host(self, env, trees_writable=False):
        return BuildHost(env, self, trees_writable)

    binds = staticmethod(chroot_build_binds)  # (env, trees_writable=False)

    def emulator(self, env):
        return None

    kept_repositories = staticmethod(repositories_kept_in_root)  # (env)

    def check(self, env, host):
        relative = os.path.relpath(env.pkgdir, env.root)
        if relative == ".." or relative.startswith("../"):
            raise BinhostError(f"pkgdir = {env.pkgdir} is outside the binhost root {env.root}:"
                               " builds run inside it (build-method = chroot), so put it inside, or set"
                               " build-method = root")
        host.program("gcc", "the binhost root must be a Gentoo system to build in (a stage3), or set"
                            " build-method = root")

    def prepare(self, env, variables):
        # The target's PORTAGE_TMPDIR is a place of the target (a tmpfs of its own, say), which
        # Portage refuses to build without: where this root has none, its /var/tmp serves.
        tmpdir = make_conf_value(make_conf_texts(env.root), "PORTAGE_TMPDIR") or "/var/tmp"
        inside = under(env.root, tmpdir)
        if not (safe_place(tmpdir) or tmpdir == "/tmp") or not os.path.isdir(inside) \
                or symlink_below(env.root, inside) is not None:
            variables["PORTAGE_TMPDIR"] = "/var/tmp"
            env.output.info(f"PORTAGE_TMPDIR = {tmpdir} (the target's) is no directory in the binhost root:"
                            " building in its /var/tmp")


class EmulatedMethod(ChrootMethod):
    """The chroot method for a binhost root of another architecture: its programs run here through
    qemu-user, which binfmt_misc starts (emulation_problem says what is missing); distcc helpers
    with a cross compiler can take the compiling (check_distcc_helpers)."""

    def emulator(self, env):
        foreign = foreign_architecture(env.root)
        if not foreign or foreign[4]:  # the root changed since the method was chosen (init --force)
            return None
        problem, emulated_by = emulation_problem(foreign[2], foreign[0], foreign[1])
        if problem:
            raise BinhostError(f"the binhost root {env.root} is {foreign[0]}, this machine {foreign[3]}:"
                               f" its programs run here emulated, but {problem}")
        return emulated_by


# By the build-method word that picks each (chroot picks the emulated one for a root of another
# architecture).
BUILD_METHODS = {"chroot": ChrootMethod(), "root": RootMethod()}
EMULATED_METHOD = EmulatedMethod()


def choose_build_method(env):
    """(method, why): one of BUILD_METHODS by its build-method word, chroot (emerge inside the
    binhost root) or root (ROOT= from the build host), as build-method says, else chosen from what
    the binhost root is now; chroot for a root of another architecture is the emulated method."""
    make_conf = os.path.join(env.root, "etc/portage/make.conf")
    with contextlib.suppress(OSError):
        make_conf = os.stat(make_conf).st_mtime
    missing = [name for name in ("emerge", "gcc") if not root_has_program(env.root, name)]
    decided_by = (env.root, env.build_method, env.pkgdir, make_conf, tuple(missing))
    chosen = env.decisions.get(decided_by)  # decided (and warned about) once
    if chosen:
        return chosen
    outside = os.path.relpath(env.pkgdir, env.root).split(os.sep)[0] == ".."
    foreign = foreign_architecture(env.root)
    if env.build_method in BUILD_METHODS:
        chosen = (env.build_method, f"build-method = {env.build_method} in {env.config_path}")
    elif foreign and not foreign[4] and not outside and not missing:
        chosen = ("chroot", f"the binhost root is {foreign[0]}, this machine {foreign[3]}: builds run in it"
                            " emulated (qemu-user through binfmt_misc)")
    else:
        try:
            flags = make_conf_cpu_flags(env.root)
        except OSError as error:  # the commands that need it say so more precisely
            missing, flags = [f"readable configuration ({error.strerror})"], []
        lacking = None if missing else isa_this_cpu_lacks(flags, env.runner)
        if missing:
            chosen = ("root", f"the binhost root has no {' and no '.join(missing)} in its PATH, so it is no"
                              " Gentoo system to build in yet")
        elif outside:
            chosen = ("root", "pkgdir lies outside the binhost root, where a chroot build cannot reach it")
        elif lacking is None:
            chosen = ("root", "gcc here cannot tell whether this CPU runs code built with the target's flags")
        elif lacking:
            chosen = ("root", f"this CPU lacks {' '.join(lacking[:8])}, which the target's flags"
                              f" ({' '.join(flags)}) use: programs built in the binhost root could not run here")
            env.output.warn(f"Building with the root method: {chosen[1]}. It compiles against this machine's"
                            " headers and libraries and puts build dependencies here too (README: 'Build"
                            " methods'); set build-method in the configuration to choose")
        else:
            chosen = ("chroot", "this CPU runs code built with the target's flags"
                                + (f" ({' '.join(flags)})" if flags else ""))
    if foreign and chosen[0] == "root":
        fix = ("put pkgdir inside the binhost root" if outside else
               f"set build-method = chroot in {env.config_path}, with emerge and gcc in the root (a stage3)")
        raise BinhostError(f"the binhost root {env.root} is {foreign[0]}, this machine {foreign[3]}: the root"
                           f" method ({chosen[1]}) runs this machine's Portage and gcc, which cannot build for it;"
                           f" {fix}: builds then run in the root (README: 'Building for another architecture')")
    method = EMULATED_METHOD if chosen[0] == "chroot" and foreign and not foreign[4] else BUILD_METHODS[chosen[0]]
    env.decisions[decided_by] = (method, chosen[1])
    return env.decisions[decided_by]


# ---- the Environment: one per binhost root for the command (Config.environments()) -------------

class Environment:
    """One binhost root as this command works on it, made once by Config.environments(): its
    settings ([binhost], with the root, PKGDIR and build-method of the targets built in it), read
    as env.root, env.pkgdir, ...; the Runner and Output every step on it uses; what was decided
    about it once (decisions: the build method, whether its chroot confines); where Portage runs
    for it (host; host_for: one BuildHost per build method for the command); its PKGDIR (packages);
    the targets built in it (remote(): one Remote each)."""

    def __init__(self, settings, runner, output):
        self.settings, self.runner, self.output = settings, runner, output
        self.decisions = {}  # {what it was decided from: the decision}, for this command
        self.remotes = {}  # {target name: (its settings, its Remote)}
        self.hosts = {}  # {(build method, trees writable): its BuildHost}, holding its mounts

    def __getattr__(self, name):  # only for what the object itself lacks: a setting
        if name == "settings" or name.startswith("__"):  # not made yet (a copy): no setting
            raise AttributeError(name)
        if hasattr(type(self), name):  # a property of ours: Python lands here when it raised one
            raise AttributeError(f"an AttributeError inside Environment.{name} (a bug, not a missing setting)")
        return getattr(self.settings, name)

    def __setattr__(self, name, value):
        if name not in ("settings", "runner", "output", "decisions", "remotes", "hosts"):  # a setting: env.settings
            raise AttributeError(f"Environment.{name}: change env.settings.{name}")
        super().__setattr__(name, value)

    @property
    def method(self):
        """(method, why): the build method, decided again only when what it depends on changed."""
        return choose_build_method(self)

    @property
    def host(self):
        """Where Portage runs for this environment: inside the binhost root (build-method chroot),
        else this machine or its host chroot."""
        return self.host_for(self.method[0])

    def host_for(self, method=None, trees_writable=False):
        """The one BuildHost of a build method for the command (None: the build host, this machine
        or its host chroot): a series of commands there shares its mounts, made on first use."""
        if (method, trees_writable) not in self.hosts:
            self.hosts[method, trees_writable] = method.host(self, trees_writable) if method else BuildHost(self)
        return self.hosts[method, trees_writable]

    @property
    def packages(self):
        return PackageStore(self)

    def remote(self, target):
        """The one Remote of a target built here, for the whole command: what it learnt of the target
        (the user ssh logs in as, a tunnel of ours there) is asked once."""
        if self.remotes.get(target.name, (None,))[0] is not target:
            self.remotes[target.name] = (target, Remote(target, self.runner, self.output, self))
        return self.remotes[target.name][1]


# ---- signing -----------------------------------------------------------------------------------

def gpg_command(home, *args):
    return ["gpg", "--homedir", home, "--batch", "--no-tty"] + list(args)


def stop_gpg_agent(home, runner):
    """A GnuPG home we used must not keep an agent running (and tests must not leak agents)."""
    if os.path.isdir(home) and shutil.which("gpgconf"):
        runner.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False, capture=True,
                   changes=False)


def gpg_read(runner, home, *args, input=None, check=True, describe=None):
    """A read-only gpg query in home; the agent it may start is stopped again, also on failure."""
    try:
        return runner.read(gpg_command(home, *args), input=input, check=check, describe=describe)
    finally:
        stop_gpg_agent(home, runner)


def colon_fingerprints(listing, record):
    """Primary-key fingerprints from `gpg --with-colons` output (`fpr` follows its `sec`/`pub`)."""
    fingerprints, expect = [], False
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "pub", "ssb", "sub"):
            expect = fields[0] == record
        elif fields[0] == "fpr" and expect:
            fingerprints.append(fields[9])
            expect = False
    return fingerprints


def secret_key_fingerprints(home, runner):
    if not os.path.isdir(home):
        return []
    result = gpg_read(runner, home, "--with-colons", "--list-secret-keys", check=False)
    return colon_fingerprints(result.stdout, "sec")


def generate_signing_key(env, passphrase_file=None, force=False):
    home = env.gpg_home
    existing = secret_key_fingerprints(home, env.runner)
    if existing and not force and not env.signing_key:
        # The key moved into place but the configuration was never written (an interrupted
        # keygen): that key is the binhost's.
        env.output.info(f"Adopting the signing key {existing[0]} in {home}, which the configuration"
                        " does not name yet (an interrupted keygen?)")
        env.settings.signing_key = existing[0]
        return existing[0]
    if existing and not force:
        raise BinhostError(f"a signing key already exists in {home} ({existing[0]}): keep it, or"
                           " replace it with keygen --force (targets must then trust the new key)")
    passphrase = ["--passphrase-file", passphrase_file] if passphrase_file else ["--passphrase", ""]
    user_id = f"gentoo-binhost signing key ({socket.gethostname()}) <root@{socket.gethostname()}>"

    def generate(gpg_home):
        return env.runner.run(gpg_command(gpg_home, "--pinentry-mode", "loopback", *passphrase,
                                          "--quick-generate-key", user_id, "ed25519", "sign", "never"),
                              capture=True, describe="gpg --quick-generate-key")

    if env.runner.pretend:
        # The key is made in a temporary home that becomes gpg-home; shown here as gpg-home.
        generate(home)
        env.output.info(f"Would create {home} (0700) with that key and record the key in {env.config_path}")
        return None
    staging = env.runner.make_staging_directory(os.path.dirname(home), ".gnupg-new.", 0o700)
    try:
        generate(staging)
        fingerprint = secret_key_fingerprints(staging, env.runner)[0]
        if os.path.exists(home):
            old = f"{home}.{timestamp()}.bak"
            env.runner.rename(home, old)
            env.output.info(f"Moved the previous key's GnuPG home to {old}")
        env.runner.rename(staging, home)
    except BaseException:
        stop_gpg_agent(staging, env.runner)
        env.runner.remove_tree(staging)
        raise
    env.settings.signing_key = fingerprint
    return fingerprint


def export_public_key(env):
    if not env.signing_key:
        adopt = " (it records the key already in gpg-home)" if secret_key_fingerprints(env.gpg_home, env.runner) else ""
        raise UsageError(f"no signing key configured in {env.config_path}: run '{PROG} keygen'{adopt}")
    result = gpg_read(env.runner, env.gpg_home, "--armor", "--export", env.signing_key,
                      describe="gpg --export")
    if "BEGIN PGP PUBLIC KEY BLOCK" not in result.stdout:
        raise BinhostError(f"signing key {env.signing_key} is not in {env.gpg_home}:"
                           f" run '{PROG} keygen --force' or fix gpg-home in {env.config_path}")
    return result.stdout


def enclosing_place(path, places):
    """The first of places (resolved) that path lies in, else None."""
    path = os.path.realpath(path)
    for place in filter(None, places):
        place = os.path.realpath(place)
        if path == place or path.startswith(place.rstrip("/") + "/"):
            return place
    return None


# What a GnuPG home's keys are; its configuration files (gpg.conf, gpg-agent.conf name programs
# gpg runs) are not taken from a place builds could write.
GNUPG_KEY_FILES = ("pubring.kbx", "pubring.gpg", "secring.gpg", "trustdb.gpg")
GNUPG_KEY_DIRECTORIES = {"private-keys-v1.d": ".key", "openpgp-revocs.d": ".rev"}


def open_regular(path, what=None, fix="remove it and rebuild", symlink_fix=None):
    """A regular file for reading (a package of PKGDIR, a key), never through a symlink (a build
    writes where it lies); what: how an error names it (path), fix (symlink_fix): what it says to do."""
    try:
        handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as error:
        raise BinhostError(f"{what or path}: {error.strerror} (a symlink?): {symlink_fix or fix}") from None
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise BinhostError(f"{what or path} is not a regular file: {fix}")
    return handle


def copy_key_material(home, destination, why):
    """Copy the keys of a GnuPG home builds could write, regular files only (never through a
    symlink: a build could have pointed one back into its root)."""
    def copy_file(source, target):
        with open_regular(source, f"{why}; {source}", "nothing was moved",
                          "nothing was moved; check it, or make a new key with keygen --force") as handle, \
                open(target, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
            shutil.copyfileobj(handle, out)

    for name in GNUPG_KEY_FILES:
        if os.path.lexists(os.path.join(home, name)):
            copy_file(os.path.join(home, name), os.path.join(destination, name))
    for name, suffix in GNUPG_KEY_DIRECTORIES.items():
        directory = os.path.join(home, name)
        if not os.path.lexists(directory):
            continue
        if os.path.islink(directory) or not os.path.isdir(directory):
            raise BinhostError(f"{why}; {directory} is not a directory (a symlink?): nothing was moved")
        os.mkdir(os.path.join(destination, name), 0o700)
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(suffix):
                copy_file(os.path.join(directory, entry), os.path.join(destination, name, entry))


def move_signing_home_out(config, runner, output):
    """A gpg-home inside a binhost root or the host chroot (where earlier versions kept it),
    in reach of every build's root phases, moves to the default beside the configuration: copied,
    checked to hold the key, recorded in the configuration, and only then removed there."""
    home = os.path.realpath(config.binhost.gpg_home)
    place = enclosing_place(home, [config.binhost.root, config.binhost.host_chroot]
                            + [target.binhost_root for target in config.targets.values()])
    if place is None:
        return
    destination = default_gpg_home(config.path)
    why = f"gpg-home {config.binhost.gpg_home} lies inside {place}, where builds run as root and could read the key"
    if os.path.lexists(destination):
        raise BinhostError(f"{why}, and {destination} exists already: move the key out yourself and set"
                           f" gpg-home in {config.path}")
    if runner.pretend:
        output.warn(f"{why}: would move it to {destination} and set gpg-home there in {config.path}")
        return
    if os.path.isdir(home):
        staging = runner.make_staging_directory(os.path.dirname(destination), ".gnupg-moving.", 0o700)
        try:
            copy_key_material(home, staging, why)
            key = config.binhost.signing_key
            if key and key not in secret_key_fingerprints(staging, runner):
                raise BinhostError(f"{why}; its copy lacks the signing key {key}, so nothing was moved:"
                                   f" check {home}")
            runner.rename(staging, destination)
        except BaseException:
            stop_gpg_agent(staging, runner)
            runner.remove_tree(staging)
            raise
    moved = os.path.isdir(home)
    runner.write_file(config.path, set_config_values(read_text(config.path), "binhost", {"gpg-home": destination}))
    config.binhost.gpg_home = destination
    for leftover in (home, home + "-verify"):  # the public keyring builds used to verify with
        if os.path.lexists(leftover):
            runner.remove_tree(leftover)
    if not moved:
        output.info(f"gpg-home is now {destination}, outside {place} (gpg-home in {config.path}); there was no"
                    f" key in {home}")
        return
    output.warn(f"Moved the signing key's GnuPG home out of {place}, where builds could read it:"
                f" {home} is now {destination} (gpg-home in {config.path}). Builds there could read the key"
                f" until now: rotate it ('{PROG} keygen --force', setup-target on every target, then sign --all)")
    for kept in glob.glob(glob.escape(home) + ".*.bak"):
        output.warn(f"{kept} (an earlier key's GnuPG home, from keygen --force) lies inside {place}: remove it")


class TrustedKeys:
    """A throwaway GnuPG home holding only the given public keys: a signature counts when one of
    them made it (Gentoo's release keys for a stage3, our own public key for our packages)."""

    def __init__(self, keys, source, runner):
        self.runner, self.source = runner, source
        self.home = tempfile.mkdtemp(prefix="gentoo-binhost-keys.")
        try:
            runner.run(gpg_command(self.home, "--import"), input=keys, capture=True, changes=False,
                       describe=f"gpg --import ({source})")
            listing = runner.read(gpg_command(self.home, "--with-colons", "--list-keys")).stdout
            self.fingerprints = set(colon_fingerprints(listing, "pub"))
            if not self.fingerprints:
                raise BinhostError(f"no public key in {source}: pass the right keyring")
        except BaseException:
            self.close()
            raise

    def close(self):
        stop_gpg_agent(self.home, self.runner)
        shutil.rmtree(self.home, ignore_errors=True)

    def good_signature(self, argv, input=None):
        """Run gpg with its machine-readable status in a file of its own (messages on stderr can
        quote attacker-chosen text such as armor headers); True for exactly one valid signature
        by one of the keys and no bad one. Returns (good, stdout)."""
        status_path = os.path.join(self.home, "status")
        result = self.runner.run(gpg_command(self.home, "--status-file", status_path, *argv), input=input,
                                 capture=True, check=False, changes=False, binary=True)
        with open(status_path, encoding="utf-8", errors="replace") as handle:
            status = [line.split() for line in handle if line.startswith("[GNUPG:] ")]
        valid = [words for words in status if words[1] == "VALIDSIG"]
        bad = [words for words in status if words[1] in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG",
                                                         "NO_PUBKEY")]
        good = (result.returncode == 0 and len(valid) == 1 and not bad
                and (valid[0][-1] in self.fingerprints or valid[0][2] in self.fingerprints))
        return good, result.stdout

    def verified_text(self, clearsigned, what):
        """The text of a clearsigned file, once its signature is good."""
        if not clearsigned.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
            raise BinhostError(f"{what} is not PGP-signed: refusing it")
        good, text = self.good_signature(["--decrypt"], input=clearsigned)
        if not good:
            raise BinhostError(f"the PGP signature of {what} is not valid for {self.source}: refusing it")
        return text.decode("utf-8", "replace")

    def verify_detached(self, signature_path, data_path, what):
        good, _ = self.good_signature(["--verify", signature_path, data_path])
        if not good:
            raise BinhostError(f"the PGP signature {os.path.basename(signature_path)} does not match"
                               f" {what} for {self.source}: refusing it")


# A GPKG is a plain tar of one directory: gpkg-1, metadata.tar.X, image.tar.X, Manifest. Signed,
# an armored detached signature follows each inner archive (Portage checks a remote package's
# metadata signature only when it is the next member) and the Manifest (each member's size,
# BLAKE2B and SHA512, last) is clear-signed: what Portage's gpkg-sign writes.
GPKG_VERSION = "gpkg-1"
GPKG_HASHES = {"BLAKE2B": hashlib.blake2b, "SHA512": hashlib.sha512}


def gpkg_tar_format(handle):
    """The container's tar format, as Portage tells it (a signed copy keeps it); None: no tar."""
    head = handle.read(512)
    handle.seek(0)
    if head[0x101:0x109] == b"ustar  \x00":
        return tarfile.GNU_FORMAT
    if head[0x101:0x109] == b"ustar\x0000":
        return tarfile.PAX_FORMAT if head[0x9C:0x9D] in (b"x", b"g") else tarfile.USTAR_FORMAT
    return None


def gpkg_inner_archives(archive, path):
    """(version member, inner archives) of a GPKG laid out as Portage requires: regular files
    with unique names in one directory, the version file among them."""
    members = archive.getmembers()
    names = [member.name for member in members]
    version = [member for member in members if member.name.endswith("/" + GPKG_VERSION)]
    if (len({name.split("/")[0] for name in names}) != 1 or len(set(names)) != len(names) or len(version) != 1
            or any(name.count("/") != 1 or not member.isfile() for name, member in zip(names, members))):
        raise BinhostError(f"{path} is not a GPKG as Portage writes it: remove it and rebuild")
    inner = [member for member in members
             if member is not version[0] and not member.name.endswith(("/Manifest", ".sig"))]
    return version[0], inner


def manifest_record(name, size, chunks):
    digests = {algorithm: new() for algorithm, new in GPKG_HASHES.items()}
    for chunk in chunks:
        for digest in digests.values():
            digest.update(chunk)
    return " ".join(["DATA", name, str(size)] + [word for algorithm, digest in digests.items()
                                                 for word in (algorithm, digest.hexdigest())])


def copy_chunks(source, destination):
    """Copy a stream, yielding each chunk on its way (hashed while copied)."""
    for chunk in iter(lambda: source.read(1 << 20), b""):
        destination.write(chunk)
        yield chunk


class PackageSigner:
    """Signs GPKGs with the binhost's key in gpg-home, here, outside every binhost root, and
    checks each signature against the public key alone before the signed file replaces the
    unsigned one."""

    def __init__(self, env):
        self.env, self.runner = env, env.runner
        self.keys = TrustedKeys(export_public_key(env).encode(),
                                f"the signing key {env.signing_key}", env.runner)
        self.gpg_variables = {}
        with contextlib.suppress(OSError):  # a passphrase is asked for by gpg-agent's pinentry
            self.gpg_variables["GPG_TTY"] = os.ttyname(sys.stdout.fileno())

    def close(self):
        self.keys.close()
        stop_gpg_agent(self.env.gpg_home, self.runner)

    def signature(self, how, data_path=None, data=None):
        argv = gpg_command(self.env.gpg_home, "--local-user", "0x" + self.env.signing_key,
                           "--digest-algo", "SHA512", "--armor", how, "--output", "-", *filter(None, [data_path]))
        return self.runner.run(argv, self.gpg_variables, input=data, capture=True, binary=True, changes=False,
                               describe=f"gpg {how}").stdout

    def sign(self, path):
        with open_regular(path) as handle:
            tar_format = gpkg_tar_format(handle)
            if tar_format is None:
                raise BinhostError(f"{path} is not a GPKG (no tar file): remove it and rebuild")
            descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
            try:
                with os.fdopen(descriptor, "wb") as out, tarfile.open(fileobj=handle) as old, \
                        tarfile.TarFile(fileobj=out, mode="w", format=tar_format) as new:
                    self.write_signed(old, new, path)
                before = os.fstat(handle.fileno())
                os.chmod(temporary, stat.S_IMODE(before.st_mode))
                # Portage's index notices a changed package by its size and its mtime in whole
                # seconds, and tar pads both versions to the same 10 KiB: the mtime must move.
                mtime = max(time.time(), int(before.st_mtime) + 1)
                os.utime(temporary, (mtime, mtime))
                self.check(temporary)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise

    def write_signed(self, old, new, path):
        version, inner = gpkg_inner_archives(old, path)
        directory = version.name.split("/")[0]
        new.addfile(copy.copy(version), old.extractfile(version))
        records = [manifest_record(GPKG_VERSION, version.size, [old.extractfile(version).read()])]
        for member in inner:
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".inner.") as spool:
                chunks = copy_chunks(old.extractfile(member), spool)
                records.append(manifest_record(os.path.basename(member.name), member.size, chunks))
                spool.flush()
                signature = self.signature("--detach-sign", data_path=spool.name)
                spool.seek(0)
                new.addfile(copy.copy(member), spool)
            info = tarfile.TarInfo(member.name + ".sig")
            info.size, info.mtime, info.mode = len(signature), int(time.time()), 0o644
            new.addfile(info, io.BytesIO(signature))
            records.append(manifest_record(os.path.basename(info.name), info.size, [signature]))
        manifest = self.signature("--clear-sign", data="".join(record + "\n" for record in records).encode())
        info = tarfile.TarInfo(f"{directory}/Manifest")
        info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o644
        new.addfile(info, io.BytesIO(manifest))

    def check(self, path):
        """Every member as the clear-signed Manifest records it, every inner archive's detached
        signature good for the public key: what a target's emerge checks."""
        # Scratch beside the package: an image may be larger than a tmpfs /tmp.
        with tarfile.open(path) as archive, tempfile.TemporaryDirectory(
                prefix=".gentoo-binhost-check.", dir=os.path.dirname(path)) as scratch:
            members = {os.path.basename(member.name): member for member in archive.getmembers()}
            manifest = archive.extractfile(members.pop("Manifest")).read()
            records = {line.split()[1]: line for line in
                       self.keys.verified_text(manifest, f"the Manifest of {path}").splitlines() if line.strip()}
            if set(records) != set(members):
                raise BinhostError(f"the signed Manifest of {path} does not list its members: not published")
            for name, member in members.items():
                data_path = os.path.join(scratch, "data")
                with open(data_path, "wb") as data:
                    record = manifest_record(name, member.size, copy_chunks(archive.extractfile(member), data))
                if record != records[name]:
                    raise BinhostError(f"{name} in {path} does not match its signed Manifest: not published")
                if name != GPKG_VERSION and not name.endswith(".sig"):
                    signature_path = os.path.join(scratch, "signature")
                    with open(signature_path, "wb") as signature:
                        signature.write(archive.extractfile(members[name + ".sig"]).read())
                    self.keys.verify_detached(signature_path, data_path, f"{name} in {path}")


def is_signed_gpkg(path):
    """A GPKG is signed when its Manifest is (checked without reading the image)."""
    try:
        with open_regular(path) as handle, tarfile.open(fileobj=handle) as archive:
            manifest = next((member for member in archive.getmembers() if member.name.endswith("/Manifest")), None)
            return manifest is not None and b"-----BEGIN PGP SIGNATURE-----" in archive.extractfile(manifest).read()
    except (tarfile.TarError, OSError) as error:
        raise BinhostError(f"{path} is not a readable GPKG ({error}): remove it and rebuild") from None


def sign_builds(env, host, packages):
    """Sign packages (paths relative to PKGDIR) here, then refresh the index, which names their
    old sizes and digests. The caller holds the build lock."""
    if env.runner.pretend:
        env.output.info(f"Would sign {len(packages)} package(s) with gpg here ({env.gpg_home}), check"
                        " each signature, and refresh the index")
        return
    signer = PackageSigner(env)
    try:
        for package in packages:
            if not package.endswith(".gpkg.tar"):
                env.output.warn(f"Not signed: {package} is no GPKG (the xpak format carries no signature; targets"
                                " that verify signatures ignore it): set BINPKG_FORMAT=gpkg")
                continue
            env.output.action(f"Signing {package}")
            signer.sign(package_in(env.pkgdir, package))
    finally:
        signer.close()
    refresh_index(env, host)


def sign_packages(env, resign=False):
    if not env.signing_key:
        raise UsageError(f"no signing key configured in {env.config_path}: run '{PROG} keygen'")
    if not os.path.isdir(env.pkgdir):
        raise BinhostError(f"PKGDIR {env.pkgdir} does not exist: build something first")
    host = env.host
    packages = [path for path in env.packages.indexed_packages() if resign or not is_signed_gpkg(path)]
    xpaks = [os.path.relpath(path, env.pkgdir) for path in all_packages(env.pkgdir, (".tbz2", ".xpak"))]
    for xpak in xpaks:
        env.output.warn(f"Cannot sign {xpak}: the xpak format carries no signature, and targets that verify"
                        " signatures ignore remote xpak packages. Rebuild it as a GPKG"
                        f" ('{PROG} build --oneshot =CATEGORY/PACKAGE-VERSION': signed builds use"
                        " BINPKG_FORMAT=gpkg), then remove the .tbz2/.xpak file and run sign again")
    if not packages:
        env.output.info(f"Every GPKG in {env.pkgdir} is already signed"
                        + (f"; {len(xpaks)} xpak package(s) cannot be (see above)" if xpaks else ""))
        return 0
    # A build may be writing PKGDIR.
    with build_lock(env), host.mounted(show_only=env.runner.pretend):
        sign_builds(env, host, [os.path.relpath(path, env.pkgdir) for path in packages])
        env.packages.publish(f"sign {len(packages)} package(s)")
    return len(packages)


def sign_test_message(env, message):
    return gpg_read(env.runner, env.gpg_home, "--armor", "--detach-sign", "--local-user",
                    env.signing_key, input=message, describe="gpg --detach-sign").stdout


# ---- building: the repositories synced, emerge in the binhost root, its builds signed ----------

def repository_sync(configroot):
    """{name: (auto-sync, whether it says how to sync)} as the repos.conf under configroot says:
    a repository without sync-type and sync-uri (a local overlay) is never synced, and naming it
    to emerge --sync would stop the sync of all. Gentoo's get both from Portage's own default."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    for text in repos_conf_files(configroot).values():
        with contextlib.suppress(configparser.Error):
            parser.read_string(text)
    return {name: (parser[name].get("auto-sync", "yes").strip().lower() in ("yes", "true"),
                   name == "gentoo" or bool(parser[name].get("sync-type", "").strip()
                                            and parser[name].get("sync-uri", "").strip()))
            for name in parser.sections()}


def sync_repositories(env, missing_only=False):
    """emerge --sync where the build's repositories are: the host chroot, else this machine; and,
    for those kept inside the binhost root (repositories_kept_in_root), there, by the root's own
    Portage, with its own verification of Gentoo's snapshot, under the build lock. missing_only
    (init, add-target, before a build): only the kept ones that are not there yet. Returns
    whether it synced inside the root."""
    kept = kept_repositories(env)
    on_host = [directory for name, directory in binhost_repositories(env).items() if name not in kept]
    # A machine without Gentoo has nothing to sync itself, unless it has some repository after all.
    if not missing_only and (not kept or any(os.path.isdir(directory) for directory in on_host)):
        host = env.host_for()
        emerge = host.program("emerge", "put Portage's bin directory in PATH")
        env.output.action(f"Syncing the ebuild repositories on {host.where}: emerge --sync")
        result = host.run([emerge, "--sync"], check=False, own_group=True)
        if result is not None and result.returncode != 0:
            raise BinhostError(f"emerge --sync failed on {host.where} (exit {result.returncode})")
    sync = repository_sync(env.root)
    names = []
    for name, location in sorted(kept.items()):
        inside = under(env.root, location)
        automatic, syncable = sync.get(name, (True, name == "gentoo"))
        if not automatic or (missing_only and holds_repository(inside)):
            continue
        if not syncable:
            if not holds_repository(inside):
                env.output.warn(f"{name} ({location}) is on neither this machine nor in the binhost root, and its"
                                f" repos.conf entry has no sync-type and sync-uri: put it at {inside}")
            continue
        check_no_symlink_below(env.root, os.path.dirname(inside))
        older_link = os.path.islink(inside) and os.readlink(inside) == location  # older versions made it
        if older_link:  # to this machine's missing location
            env.runner.remove(inside)
        if not (older_link and env.runner.pretend):
            check_no_symlink_below(env.root, inside)
        names.append(name)
    if env.runner.pretend:  # one command may ask twice: shown once
        names = [name for name in names if not env.decisions.get(("sync shown", name))]
        env.decisions.update({("sync shown", name): True for name in names})
    if not names:
        return False
    with build_lock(env):  # no build sees the tree half-written
        host = env.host_for(env.method[0], trees_writable=True)
        emerge = host.program("emerge", "the binhost root has no Portage: is it a stage3?")
        host.mounts.exclusive = [os.path.realpath(under(env.root, kept[name])) for name in names]
        env.output.action(f"Syncing {', '.join(names)} inside {host.where} (this machine has no such repository):"
                          f" emerge --sync {' '.join(names)}")
        result = host.run([emerge, "--sync"] + names, root_environment(env), check=False, own_group=True)
    if result is not None and result.returncode != 0:
        raise BinhostError(f"emerge --sync {' '.join(names)} failed in {host.where} (exit {result.returncode}):"
                           " its output above says why")
    return True


def build_packages(env, emerge_args, publish_after=True):
    method, why = env.method
    host = env.host  # refuses first what it cannot do (not root)
    check_binhost_root(env)
    # The first build after init on a build machine without Gentoo: its repositories into the root.
    sync_repositories(env, missing_only=True)  # the host mounts its view of them when the build starts
    method.check(env, host)
    emerge = host.program("emerge", "build runs Portage on this host: run it on Gentoo, put Portage's"
                                    " bin directory in PATH, or set up a Gentoo host chroot"
                                    f" ('{PROG} init --host-chroot DIR')")
    check_no_signing_in_builds(env)
    if not env.signing_key:
        env.output.warn(f"No signing key configured: building unsigned packages, which targets refuse"
                        f" by default. Run '{PROG} keygen' to sign.")
    variables = portage_environment(env)
    method.prepare(env, variables)
    # FEATURES=buildpkg, not --buildpkg: emerge applies the option to every root's configuration,
    # so the build dependencies the root method merges into / were also packaged into /'s own
    # PKGDIR (that configuration never sees ours: create_trees gives it an almost empty environment).
    variables["FEATURES"] += " buildpkg"
    argv = [emerge, *method.emerge_options, "--getbinpkg=n", "--getbinpkgonly=n"] + list(emerge_args)
    env.output.debug(f"Build method {method.name}: {why}")
    with build_lock(env), host.mounted(show_only=env.runner.pretend):
        if env.distcc_hosts and not env.runner.pretend:
            check_distcc_helpers(env, host)
        where = f" (inside {host.where})" if host.chroot else ""
        offline = False
        if host.chroot and host.confinement_problem():
            env.output.warn(f"Building without confinement in {host.where} ({host.confinement_problem()}): the"
                            " build's root phases can reach this machine's files, devices and loopback services"
                            " (README: 'Confinement')")
        elif host.chroot and not env.distcc_hosts:  # distcc helpers are reached over the network
            env.output.action(f"Fetching first, the build runs without network: {format_command(['emerge'] + argv[1:])}"
                              " --fetchonly")
            fetched = host.run(argv + ["--fetchonly", "--ask=n"], variables, check=False, own_group=True)
            if fetched is not None and fetched.returncode != 0:
                raise BinhostError(f"emerge failed on the binhost (exit {fetched.returncode}) fetching the sources"
                                   " (--fetchonly): see its output above; nothing was built")
            offline = True
        env.output.action(f"Building in {env.root}{where}: {format_command(['emerge'] + argv[1:])}")
        before = env.packages.package_files()
        result = host.run(argv, variables, check=False, own_group=True, offline=offline)
        if result is not None and result.returncode != 0:
            raise BinhostError(f"emerge failed on the binhost (exit {result.returncode}): see its output above;"
                               " nothing was published")
        # What this build produced: only a successful emerge's builds are ever published.
        produced = {path for path, md5 in env.packages.package_files().items() if before.get(path) != md5}
        if env.signing_key and produced:
            sign_builds(env, host, sorted(produced))
        if publish_after:
            env.packages.publish(f"build {' '.join(emerge_args)}", produced)
        return produced


# ------------------------------------------------------------------------------------------------
# The targets: their side, coverage, the tree they follow, the gate, installing, setting up
# ------------------------------------------------------------------------------------------------


# ---- the two sides: a target's Remote (ssh, its route to PKGDIR, its plan), our LocalShell -----

# Every remote step ends: a question (a plan of @world takes minutes on a small board) within an
# hour, a change (an install, a first push of a tree) within four; a silent connection sooner
# (ServerAlive). A hung target then fails its own row of update, and the others go on.
REMOTE_QUERY_TIMEOUT = 3600
REMOTE_CHANGE_TIMEOUT = 4 * 3600

# Asks, on the target, who answers on a port of its loopback (a serve --tunnel of ours holding
# it?): prints the answer's headers, nothing when nothing listens there.
TUNNEL_PROBE_SCRIPT = r"""
if command -v wget >/dev/null; then
    wget -q -S --spider -T 5 -t 1 "$1" 2>&1
elif command -v curl >/dev/null; then
    curl -sI -m 5 "$1" 2>&1
fi
exit 0
"""


def is_our_server(answer):
    """Whether a Server header names this tool's server."""
    return bool(answer) and answer.startswith(f"{PROG.split('.')[0]}/")


def missing_command(stderr, what):
    """The command a remote sh could not find, from its message (dash: 'sh: 1: NAME: not found',
    bash: 'sh: line 1: NAME: command not found')."""
    found = re.findall(r"([^\s:]+): (?:command )?not found", as_text(stderr or ""))
    return found[-1] if found else f"a command needed for {what}"


def script_succeeded(result, what, where):
    """The result of one of our sh scripts, or a one-line error with its last words."""
    if result is not None and result.returncode != 0:
        detail = last_line(as_text(result.stderr)) or last_line(as_text(result.stdout))
        raise BinhostError(f"{what} failed on {where} (exit {result.returncode})"
                           f"{': ' + detail if detail else ''}")
    return result


def who_answers(host, port, tls=False, timeout=5):
    """None when nothing listens on host:port (a wildcard address: on 127.0.0.1); else the Server
    header of its answer to HEAD /Packages ("" without one, or a description if it is not HTTP)."""
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    try:
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asking who it is
            connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request("HEAD", "/Packages")
            return connection.getresponse().getheader("Server", "")
        finally:
            connection.close()
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException) as error:
        return f"a program that does not answer HTTP ({error})"


# Asks the target to download our index, as Portage's fetchers would; the URL comes on stdin (with
# a password in it, an argv would show it to every user there). Prints "TOOL EXIT".
FETCH_INDEX_SCRIPT = r"""
if command -v wget >/dev/null; then
    wget -q -O /dev/null -i -; echo "wget $?"
elif command -v curl >/dev/null; then
    sed 's/.*/url = "&"/' | curl -fsS -o /dev/null --config - 2>/dev/null; echo "curl $?"
else
    echo "none 127"
fi
"""


# Exit codes with which wget and curl say the server answered with an HTTP error (a 404 before the
# first build).
FETCH_ANSWERED = {"wget": ("8",), "curl": ("22",)}
# What wget's and curl's exit codes mean for fetching our index, and the fix (their man pages).
FETCH_FAILURES = (
    ({"wget": ("4",), "curl": ("5", "6", "7", "28", "52", "55", "56")},
     "a network failure (no connection to the url's host and port): is serve running, and reachable"
     " from there (a firewall, NAT, the url's host name)? transport = tunnel needs no open port"),
    ({"wget": ("5",), "curl": ("35", "51", "53", "54", "58", "59", "60", "64", "66", "77", "80", "82", "83",
                               "90", "91")},
     "a TLS failure: the target must trust tls-cert (or its CA) and the url's host name must be in it"),
    ({"wget": ("6",), "curl": ("67",)},
     "the server refused the credentials: check auth-file here, then run setup-target again so the"
     " target's entry has them"),
    (FETCH_ANSWERED,
     "the server answered with an HTTP error (404: nothing published at that url, or another PKGDIR"
     " served there; 401: credentials): check url, auth-file and which PKGDIR is served"),
)


def describe_fetch_failure(tool, code):
    """What a failed download of our index means, with its fix."""
    if tool == "none":
        return ("neither wget nor curl, which Portage needs to download packages: install one there"
                " (emerge net-misc/wget)")
    for codes, meaning in FETCH_FAILURES:
        if code in codes.get(tool, ()):
            return meaning
    return f"{tool} failed (see its man page for exit {code}); try {tool} URL/Packages on the target"


# One ssh round trip: can the target download our index; what would the emerge arguments merge
# there, resolved from its own ebuild tree as if it built from source (every package with its
# USE); and what would its binary-only emerge merge. The binary-only plan is asked either against
# the target's own configuration (doctor: "live"), or against a staged index (the gate: the
# index this command is about to publish): then it gets a configuration root of its own, links to
# the target's /etc/portage with binrepos.conf copied and our entry's sync-uri pointed at the
# staged index, so the target's binrepos.conf and its cached copy of our published index stay
# untouched; Portage's cache of the staged index (kept per URL) is removed afterwards.
# $1: our binrepos entry, $2: the staged token, or "live", or "-" (no binary-only plan); stdin:
# the URL to fetch, then the binrepo URL for the binary-only plan. `==name` lines mark the
# sections; each emerge's own exit status follows it.
PLAN_SCRIPT = r"""
entry=$1 token=$2
shift 2
read -r fetch_url
read -r binary_url
trees= staged=
trap 'rm -rf ${trees:+"$trees"} ${staged:+"$staged"}' EXIT
if [ -n "${GB_STAGED_TREES:-}" ]; then
    # Plans from a staged snapshot take its profile too: the configuration with make.profile
    # pointing into the staged copy of the repository it points into (GB_STAGED_TREES: lines
    # LIVE<TAB>STAGED).
    config=${PORTAGE_CONFIGROOT:-/}
    config=${config%/}/etc/portage
    trees=$(mktemp -d) || exit 1
    mkdir -p "$trees/etc/portage" || exit 1
    for place in "$config"/* "$config"/.[!.]*; do
        [ -e "$place" ] || [ -L "$place" ] || continue
        [ "${place##*/}" = make.profile ] && continue
        ln -s "$place" "$trees/etc/portage/" || exit 1
    done
    if [ -e "$config/make.profile" ]; then
        profile=$(readlink -f "$config/make.profile")
        set -f
        saved_ifs=$IFS IFS='
'
        for pair in $GB_STAGED_TREES; do
            live=$(readlink -f "${pair%%	*}") || continue
            case $profile in "$live"/*) profile=${pair#*	}${profile#"$live"}; break ;; esac
        done
        IFS=$saved_ifs
        set +f
        ln -s "$profile" "$trees/etc/portage/make.profile" || exit 1
    fi
    PORTAGE_CONFIGROOT=$trees
    export PORTAGE_CONFIGROOT
fi
fetch_index() {
""" + FETCH_INDEX_SCRIPT + r"""
}
echo "==fetch"
printf '%s\n' "$fetch_url" | fetch_index
echo "==plan"
emerge "$@" --pretend --verbose --color=n --usepkg=n --getbinpkg=n --ask=n --quiet=n --nospinner \
    </dev/null 2>&1
status=$?
echo "==plan-exit"
echo "$status"
[ "$token" = - ] && exit 0
eroot=$(portageq envvar EROOT 2>/dev/null)
echo "==installed"
for installed in "${eroot%/}"/var/db/pkg/*/*; do
    [ -d "$installed" ] && echo "${installed#"${eroot%/}"/var/db/pkg/}"
done
binary() {
    emerge "$@" --pretend --verbose --color=n --getbinpkgonly --binpkg-respect-use=y --ask=n --quiet=n \
        --nospinner </dev/null 2>&1
    status=$?
    echo "==binary-exit"
    echo "$status"
}
if [ "$token" = live ]; then
    echo "==binary"
    binary "$@"
    exit 0
fi
config=${PORTAGE_CONFIGROOT:-/}
config=${config%/}/etc/portage
staged=$(mktemp -d) || exit 1
mkdir -p "$staged/etc/portage/binrepos.conf" || exit 1
for place in "$config"/* "$config"/.[!.]*; do
    [ -e "$place" ] || continue
    case ${place##*/} in binrepos.conf|make.profile) continue ;; esac
    ln -s "$place" "$staged/etc/portage/" || exit 1
done
if [ -e "$config/make.profile" ]; then
    ln -s "$(readlink -f "$config/make.profile")" "$staged/etc/portage/make.profile" || exit 1
fi
if [ -d "$config/binrepos.conf" ]; then
    cp -RL "$config/binrepos.conf/." "$staged/etc/portage/binrepos.conf/" || exit 1
elif [ -f "$config/binrepos.conf" ]; then
    cp -L "$config/binrepos.conf" "$staged/etc/portage/binrepos.conf/binrepos.conf" || exit 1
fi
# Read last (Portage reads the directory in order): our entry's sync-uri is the staged index.
(umask 077 && printf '[%s]\nsync-uri = %s\n' "$entry" "$binary_url" \
    > "$staged/etc/portage/binrepos.conf/zzzz-$entry-staged.conf") || exit 1
echo "==binary"
PORTAGE_CONFIGROOT=$staged binary "$@"
[ -n "$eroot" ] && [ -d "${eroot%/}/var/cache/edb/binhost" ] &&
    find "${eroot%/}/var/cache/edb/binhost" -type d -path "*/_staged/$token" -prune -exec rm -rf {} + 2>/dev/null
exit 0
"""


def target_url(env, tunnel, with_credentials=True, port=None, quoted=False):
    """The sync-uri a target uses: through the tunnel (plain HTTP: ssh encrypts it) or the
    configured url (default: this host, the port served), with the auth file's credentials
    (as they are: Portage does not decode them; quoted: percent-encoded, for wget and curl)."""
    if tunnel:
        url = f"http://127.0.0.1:{env.tunnel_port}/"
    else:
        scheme = "https" if env.tls_cert else "http"
        url = env.url or f"{scheme}://{socket.gethostname()}:{port or env.port}/"
    if env.env_name:
        url += urllib.parse.quote(env.env_name) + "/"
    credentials = read_credentials(env) if with_credentials else []
    if credentials:
        user, password = credentials[0]
        if quoted:
            user, password = urllib.parse.quote(user, safe=""), urllib.parse.quote(password, safe="")
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://{user}:{password}@{rest}"
    return url


def credentials_url(env, tunnel, quoted=False):
    """target_url with the auth file's credentials, which the runner then never shows."""
    for _user, password in read_credentials(env):
        env.runner.secrets.update({password, password.replace("%", "%%"), urllib.parse.quote(password, safe="")})
    return target_url(env, tunnel, quoted=quoted)


def fetch_problem(env, target, outcome, accept_unbuilt=False):
    """Why the target cannot download our index, with the fix, from its (tool, exit code); None
    when it could. Before the first build an HTTP error (a 404) is what a running server answers:
    accept_unbuilt takes it (a command's first question, before it builds)."""
    tool, code = outcome
    unbuilt = code in FETCH_ANSWERED.get(tool, ()) and not os.path.isfile(os.path.join(env.pkgdir, "Packages"))
    if code == "0" or (unbuilt and accept_unbuilt):
        return None
    if tool == "none":
        return f"{target.name} has {describe_fetch_failure(tool, code)}"
    hint = (f"{env.pkgdir} has no index yet: build something first ('{PROG} emerge -uDN @world')"
            if unbuilt else describe_fetch_failure(tool, code))
    return (f"{target.name} cannot download {target_url(env, env.transport == 'tunnel', with_credentials=False)}"
            f"Packages ({tool} exit {code}): {hint}")


class TargetPlan:
    """What the target answered: can it fetch our index, what would it merge from source (for
    its own ROOT), and what would its binary-only emerge say (the gate, doctor)."""

    def __init__(self, env, target, text):
        sections = parse_sections(text)
        self.env, self.target = env, target
        self.fetch = fetch_outcome(sections.get("fetch", ""))
        self.text = sections.get("plan", "")
        self.exit_code = section_status(sections, "plan")
        self.packages = for_root(parse_merge_list(self.text), target.root)
        self.binary = sections.get("binary")
        self.binary_exit = section_status(sections, "binary") if self.binary is not None else None
        self.installed = ({line.strip() for line in sections["installed"].splitlines()
                           if re.fullmatch(r"[\w+.-]+/[\w+.-]+", line.strip()) and "/-MERGING-" not in line}
                          if "installed" in sections else None)
        self.held = []  # the packages of the plan held back by a rollback
        self.trees = None  # the TargetTrees this plan was asked against (tree = binhost)

    def fetch_problem(self):
        """Why the target cannot download our index, or None: asked first, before anything is
        built, it takes an HTTP error before the first build."""
        return fetch_problem(self.env, self.target, self.fetch, accept_unbuilt=True)

    def problem(self):
        """Why the arguments cannot be resolved on the target, in Portage's words, or None."""
        unresolved = [f"masked or do not exist: {match.group('missing').strip()}" if match.group("missing")
                      else f"update skipped for unsatisfied dependencies: {match.group('skipped').strip()}"
                      for match in UNRESOLVED.finditer(self.text)]
        if self.exit_code == 0 and not unresolved:
            return None
        if self.exit_code == COMMAND_NOT_FOUND and re.search(r"\bemerge: (command )?not found", self.text):
            return (f"emerge not found on target {self.target.name}: install it there, or set path = in"
                    f" [target {self.target.name}] of {self.target.config_path}")
        complaints = [line for line in portage_complaints(self.text)
                      if not line.startswith(("Ebuilds for the following", "masked or don't exist", "The following update"))
                      and not any(line in reason for reason in unresolved)]
        reasons = unresolved + complaints or [last_line(self.text) or "no output"]
        return (f"emerge on {self.target.name} cannot resolve these arguments (exit {self.exit_code}):"
                f" {' | '.join(reasons[:6])}")

    def check(self):
        """The plan, or a one-line error with Portage's reason."""
        problem = self.problem()
        if problem:
            raise BinhostError(problem)
        return self.packages


def remote_emerge_environment(env, target, interactive=False):
    """The target's ROOT and PORTAGE_CONFIGROOT, and the filtered EMERGE_DEFAULT_OPTS."""
    return dict(target.portage_environment,
                EMERGE_DEFAULT_OPTS=emerge_default_opts(env, interactive))


class Remote:
    """One target's side: commands there, each an argv quoted with shlex for the remote shell
    (script, read, run); with the environment it is built in (env.remote), how it reaches PKGDIR
    while serving() holds, and what its emerge would merge (plan)."""

    def __init__(self, target, runner, output, env=None):
        self.target, self.runner, self.output, self.env = target, runner, output, env
        self.where = f"target {target.name}"
        self.tunnels_found = {}  # remote port -> held by a serve --tunnel of ours (asked once per command)
        self.forward = None  # while serving() holds a tunnel: ssh -R's (its port, ours)
        self.served = False  # whether serving() holds

    def ssh_base(self, tty=False):
        argv = ["ssh"] + (["-t"] if tty else [])
        if self.target.ssh_port != DEFAULT_SSH_PORT:
            argv += ["-p", str(self.target.ssh_port)]
        # After the user's options (ssh takes the first value given): a target that stops
        # answering ends the connection in about a minute instead of holding a nightly update.
        return argv + self.target.ssh_options + ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]

    @functools.cached_property
    def user(self):
        """The user ssh logs in as, as ssh itself resolves it (host string, -l, ssh_config)."""
        user = self.target.host.rpartition("@")[0]
        if not user:
            result = self.runner.read(self.ssh_base() + ["-G", "--", self.target.host], check=False)
            for line in result.stdout.splitlines():
                if line.startswith("user "):
                    user = line.split(None, 1)[1].strip()
        return user or os.environ.get("USER", "root")

    def command_line(self, argv, env=None):
        """One string for the remote shell: every word quoted, so `>=cat/pkg-1` stays an atom."""
        words = [] if self.user == "root" else ["sudo"]
        env = dict(env or {})
        if env or self.target.path:
            words.append("env")
            words += [shlex.quote(f"{key}={value}") for key, value in env.items()]
            if self.target.path:
                # The remote shell expands "$PATH"; our part of the word stays quoted.
                words.append(shlex.quote(f"PATH={self.target.path}:") + '"$PATH"')
        words += [shlex.quote(str(word)) for word in argv]
        return " ".join(words)

    def ssh_argv(self, argv, env=None, tty=False, forward=None):
        return (self.ssh_base(tty) + self.forward_options(forward)
                + ["--", self.target.host, self.command_line(argv, env)])

    @staticmethod
    def forward_options(forward):
        """ssh -R: the target reaches our 127.0.0.1:LOCAL on its own 127.0.0.1:REMOTE."""
        if forward is None:
            return []
        remote_port, local_port = forward
        return ["-o", "ExitOnForwardFailure=yes", "-R", f"{remote_port}:127.0.0.1:{local_port}"]

    def tunnel_argv(self, forward):
        return self.ssh_base() + ["-N"] + self.forward_options(forward) + ["--", self.target.host]

    def existing_tunnel(self, forward):
        """Whether a serve --tunnel of ours holds the target's end of forward already: the command
        then goes through that tunnel instead of failing to open its own on the same port. Another
        program there is named."""
        remote_port = forward[0]
        if remote_port not in self.tunnels_found:
            probe = self.runner.read(self.ssh_argv(["sh", "-c", TUNNEL_PROBE_SCRIPT, "gentoo-binhost",
                                                    f"http://127.0.0.1:{remote_port}/Packages"]), check=False)
            header = re.search(r"^\s*Server:\s*(\S+)", as_text(probe.stdout or ""), re.MULTILINE | re.IGNORECASE)
            answer = header.group(1) if header else None
            if answer and not is_our_server(answer):
                raise BinhostError(f"port {remote_port} on target {self.target.name} is taken by {answer}:"
                                   f" set tunnel-port in [binhost] of {self.target.config_path} to a free port"
                                   f" there, then run '{PROG} setup-target'")
            if answer:
                self.runner.output.info(f"A '{PROG} serve --tunnel' holds port {remote_port} on"
                                        f" {self.target.name} already: going through its tunnel")
            self.tunnels_found[remote_port] = bool(answer)
        return self.tunnels_found[remote_port]

    def run(self, argv, env=None, *, tty=False, changes=True, capture=False, input=None, what=None,
            forward=None, binary=False):
        """Run argv on the target; returns the CompletedProcess (None under --pretend)."""
        if forward is not None and self.existing_tunnel(forward):
            forward = None
        result = self.runner.run(self.ssh_argv(argv, env, tty, forward), changes=changes,
                                 capture=capture, input=input, check=False, binary=binary,
                                 timeout=REMOTE_CHANGE_TIMEOUT if changes else REMOTE_QUERY_TIMEOUT,
                                 describe=f"{what or argv[0]} on target {self.target.name}")
        if result is None:
            return None
        what = what or argv[0]
        if result.returncode == SSH_CONNECTION_FAILED:
            detail = f": {last_line(as_text(result.stderr))}" if capture and result.stderr else ""
            raise BinhostError(f"cannot reach target {self.target.name} ({self.target.host}) over ssh{detail}:"
                               f" check host, ssh-port and ssh-options in [target {self.target.name}]"
                               f" of {self.target.config_path}")
        if result.returncode == COMMAND_NOT_FOUND:
            missing = argv[0] if argv[0] != "sh" else missing_command(result.stderr, what)
            raise BinhostError(f"{missing} not found on target {self.target.name}: install it there,"
                               f" or set path = in [target {self.target.name}] of {self.target.config_path}")
        return result

    def script(self, script, *args, changes=True, what, input=None, binary=False):
        """Run a small POSIX sh script on the target with args as $1, $2, ..., and the target's
        ROOT and PORTAGE_CONFIGROOT (for portageq)."""
        result = self.run(["sh", "-c", script, "gentoo-binhost"] + [str(arg) for arg in args],
                          self.target.portage_environment,
                          changes=changes, capture=True, what=what, input=input, binary=binary)
        return script_succeeded(result, what, self.where)

    def read(self, argv, what=None):
        """A query there, with the target's ROOT and PORTAGE_CONFIGROOT; its output, or a one-line
        error with its last words."""
        return script_succeeded(self.run(argv, self.target.portage_environment, changes=False, capture=True,
                                         what=what), what or argv[0], self.where).stdout

    @contextlib.contextmanager
    def serving(self, temporary=True):
        """How the target reaches PKGDIR while the block runs: through a tunnel to a server of this
        command (forward); or the configured port, served by this command when nothing serves it
        (a running serve of ours is used as it is, another program is named). Not temporary
        (doctor, which reports a stopped server): only the tunnel's server."""
        env = self.env
        if self.served or (not temporary and env.transport != "tunnel"):
            yield
            return
        self.served = True
        try:
            if env.transport == "tunnel":
                # Asking the target (read-only) needs the server under --pretend too.
                with background_server({env.env_name: env}, env.output, "127.0.0.1", 0) as server:
                    self.forward = (env.tunnel_port, server.server_address[1])
                    yield
                return
            answer = who_answers(env.bind, env.port, tls=bool(env.tls_cert))
            if answer is None and not os.path.isdir(env.pkgdir):
                env.output.debug(f"Nothing serves port {env.port}, and there is no {env.pkgdir} to serve yet")
            elif answer is None and env.runner.pretend:
                env.output.info(f"Nothing serves port {env.port} here: this command would serve"
                                f" {env.pkgdir} there itself while it runs")
            elif answer is None:
                with background_server({env.env_name: env}, env.output, env.bind, env.port,
                                       tunnel=False) as server:
                    env.output.info(f"Serving {env.pkgdir} on {env.bind}:{server.server_address[1]} while"
                                    f" this command runs (no serve running; '{PROG} serve' serves it for good)")
                    yield
                return
            elif not is_our_server(answer):
                env.output.warn(f"Port {env.port} here is answered by {answer or 'a server that does not name itself'},"
                                f" not by '{PROG} serve': targets get what it serves")
            yield
        finally:
            self.served, self.forward = False, None

    def fetch_index(self):
        """(tool, exit code) of the target downloading our index (FETCH_INDEX_SCRIPT), through the
        tunnel while serving() holds one."""
        env = self.env
        url = credentials_url(env, env.transport == "tunnel", quoted=True) + "Packages"
        result = self.run(["sh", "-c", FETCH_INDEX_SCRIPT, "gentoo-binhost"], changes=False, capture=True,
                          input=url + "\n", forward=self.forward)
        return fetch_outcome(result.stdout)

    def fetch_problem(self):
        """Why the target cannot download our index now, or None."""
        return fetch_problem(self.env, self.target, self.fetch_index())

    def plan(self, emerge_args, binary=None, trees=None):
        """One ssh round trip: the target's TargetPlan for emerge_args (within serving()). binary:
        None (the source plan only), "live" (also the binary-only plan with the target's own
        configuration), or a StagedPublication (also the binary-only plan against it). trees: the
        staged snapshot the target plans from, instead of its live tree."""
        env, target = self.env, self.target
        tunnel = env.transport == "tunnel"
        url = credentials_url(env, tunnel)
        fetch_url = credentials_url(env, tunnel, quoted=True) + "Packages"
        token, binary_url = "-", ""
        if binary == "live":
            token = "live"
        elif binary is not None:
            token, binary_url = binary.token, (url + binary.url_path).replace("%", "%%")
        argv = ["sh", "-c", PLAN_SCRIPT, "gentoo-binhost", BINREPOS_NAME, token] + list(emerge_args)
        environment = dict(remote_emerge_environment(env, target), **(trees.environment if trees else {}))
        result = self.run(argv, environment, changes=False, capture=True,
                          what="asking the target what it would merge", input=f"{fetch_url}\n{binary_url}\n",
                          forward=self.forward)
        script_succeeded(result, "asking what emerge would merge", self.where)
        return TargetPlan(env, target, result.stdout)


class LocalShell:
    """The binhost side of a transfer: the same sh scripts and queries as on a target (script,
    read), run here (inside the host chroot, with one, where the binhost's repository paths mean
    what they say), with the binhost root as ROOT and PORTAGE_CONFIGROOT."""
    where = "the binhost"

    def __init__(self, env):
        self.host = env.host
        self.variables = root_environment(env)

    def script(self, script, *args, changes=True, what, input=None, binary=False):
        result = self.host.run(["sh", "-c", script, "gentoo-binhost"] + [str(arg) for arg in args],
                               self.variables, changes=changes, capture=True, input=input, check=False,
                               binary=binary)
        return script_succeeded(result, what, self.where)

    def read(self, argv, what=None):
        argv = [self.host.program(argv[0], "put Portage's bin directory in PATH")] + list(argv[1:])
        result = self.host.read(argv, self.variables, check=False, describe=what)
        return script_succeeded(result, what or os.path.basename(argv[0]), self.where).stdout


def has_option(args, option):
    return any(arg == option or arg.startswith(option + "=") for arg in args)


def emerge_pretends(args):
    """Whether emerge's own --pretend (-p, also in -pv) is among the arguments."""
    return any(word == "--pretend" or re.fullmatch(r"-[A-Za-z0-9]*p[A-Za-z0-9]*", word) for word in args)


def user_emerge_only_pretends(args):
    """Whether the user's own emerge arguments only show or fetch (-p, -f, --fetchonly):
    nothing is built, published or checked as installed then."""
    return emerge_pretends(args) or any(
        word in ("--fetchonly", "--fetch-all-uri") or re.fullmatch(r"-[A-Za-z0-9]*[fF][A-Za-z0-9]*", word)
        for word in args)


# ---- coverage: everything the target merges comes from here ------------------------------------

def describe_use_difference(entry, package):
    """The USE flags the target wants that a binary of the index has otherwise: "" (usable) when none."""
    use = set(entry.get("USE", "").split())
    return " ".join(("" if enabled else "-") + flag for flag, enabled in sorted(package.flags.items())
                    if (flag in use) != enabled)


def installed_in_binhost(env):
    """CPVs installed in the binhost root: its world and their dependencies, as built for the
    targets (the binhost's world is the union of theirs)."""
    host = env.host
    eroot = host.read([host.program("portageq", "put Portage's bin directory in PATH"), "envvar", "EROOT"],
                      root_environment(env), describe="portageq envvar EROOT").stdout.strip()
    eroot = under(host.chroot, eroot) if eroot else eroot
    vdb = os.path.join(eroot, "var/db/pkg")
    if not eroot or not os.path.isdir(vdb):
        raise BinhostError(f"no package database at {vdb}: clean keeps only what the binhost root has"
                           " installed, so it refuses to judge without one")
    installed = {f"{category}/{name}" for category in os.listdir(vdb)
                 if os.path.isdir(os.path.join(vdb, category))
                 for name in os.listdir(os.path.join(vdb, category))
                 if not name.startswith((".", "-MERGING-"))}
    if not installed:
        raise BinhostError(f"nothing is installed in {eroot}: clean would remove every package")
    return installed


def binary_reason(env, package, entries, installed_cache):
    """Why PKGDIR offers no usable binary of package (None when it does)."""
    if any(not describe_use_difference(entry, package) for entry in entries):
        return None
    if entries:
        return f"its binary has other USE (the target wants {describe_use_difference(entries[0], package)})"
    if "installed" not in installed_cache:
        try:
            installed_cache["installed"] = installed_in_binhost(env)
        except BinhostError:
            installed_cache["installed"] = set()
    return ("installed in the binhost root without a binary (the stage3's generic build): rebuilt"
            " with the target's flags" if package.cpv in installed_cache["installed"] else "no binary yet")


def offered_binaries(env, index_text=None):
    """{CPV: [index entries]} of what a publication offers: index_text's, or the next one's."""
    binaries = {}
    for entry in index_entries(env.packages.next_publication_text() if index_text is None else index_text):
        binaries.setdefault(entry["CPV"], []).append(entry)
    return binaries


def held_back(package, holds):
    """Mark package as held back by a rollback (not offered on purpose, not a failure)."""
    hold = hold_on(package.cpv, None, holds)
    if hold is not None:
        package.reason = f"held back by rollback {hold['rollback']}: '{PROG} release' ends it"
        package.held, package.buildable = True, False
    return hold is not None


def packages_to_build(env, packages):
    """The planned packages the next publication has no usable binary of, each with its reason."""
    binaries, cache, missing, holds = offered_binaries(env), {}, [], env.packages.read_holds()
    for package in packages:
        if held_back(package, holds):
            missing.append(package)
            continue
        package.reason = binary_reason(env, package, binaries.get(package.cpv, []), cache)
        if package.reason:
            missing.append(package)
    return missing


def binary_plan_gaps(env, plan, index_text):
    """The packages of plan's source plan its binary-only plan does not merge with the same version
    and USE from index_text's binaries, each with why (.reason) and whether a build here can
    change that (.buildable)."""
    merged = {}
    for binary in parse_merge_list(plan.binary or "", "binary"):
        merged.setdefault(binary.package_name, []).append(binary)
    binaries, cache, gaps = offered_binaries(env, index_text), {}, []
    complaints, holds = portage_complaints(plan.binary or ""), env.packages.read_holds()
    for package in plan.packages:
        if held_back(package, holds):
            gaps.append(package)
            continue
        chosen = [binary for binary in merged.get(package.package_name, [])
                  if binary.cpv == package.cpv or re.fullmatch(re.escape(package.cpv) + r"-\d+", binary.cpv)]
        if any(all(binary.flags.get(flag) == enabled for flag, enabled in package.flags.items()
                   if flag in binary.flags) for binary in chosen):
            continue
        reason = binary_reason(env, package, binaries.get(package.cpv, []), cache)
        others = [binary.cpv for binary in merged.get(package.package_name, []) if binary not in chosen]
        package.buildable = True
        if reason:
            package.reason = reason
        elif package.slot_rebuild:
            package.reason = ("a sub-slot rebuild (Portage's r mark): its binary was built against"
                              " the dependency's older sub-slot")
        elif others:
            package.reason = (f"the target's binary-only emerge takes {', '.join(others)} instead"
                              " (another binhost offers it?)")
            package.buildable = False
        else:
            package.reason = ("its binary is not taken by the target's binary-only emerge"
                              + (f": {' | '.join(complaints[:3])}" if complaints else
                                 " (built against other dependencies?)"))
        gaps.append(package)
    return gaps


def first_plan(env, target, emerge_args, binary=None, trees=None):
    """The first question of a command: a target that cannot fetch our index, or cannot resolve
    the arguments, stops it (under --pretend: a warning, and the rest is still shown)."""
    plan = None
    try:
        plan = env.remote(target).plan(emerge_args, binary, trees)
        problem = plan.fetch_problem() or plan.problem()
        if problem:
            raise BinhostError(problem)
    except BinhostError as error:
        if not env.runner.pretend:
            raise
        env.output.warn(f"{error} (--pretend goes on)")
    return plan


PACKAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9+_.-]*/[A-Za-z0-9_][A-Za-z0-9+_-]*")


def tree_lacks(env, packages):
    """{CPV: why} of the planned packages whose ebuild the binhost's tree does not have (the two
    sides' trees were synced at different times): a build here cannot make them."""
    repositories, lacking = binhost_repositories(env), {}
    for package in packages:
        name = package.package_name
        # The plan is the target's words: only a CATEGORY/PN (PMS 3.1) becomes a path here.
        if not package.repository or not PACKAGE_NAME.fullmatch(name):
            continue
        version = package.cpv[len(name) + 1:]
        location = repositories.get(package.repository)
        directory = os.path.join(location or "", name)
        if location is None or not os.path.isdir(location):
            lacking[package.cpv] = (f"the binhost has no repository {package.repository}: add it there"
                                    " as the target has it")
            continue
        prefix = name.split("/")[1] + "-"
        if os.path.isfile(os.path.join(directory, f"{prefix}{version}.ebuild")):
            continue
        versions = sorted((entry[len(prefix):-len(".ebuild")] for entry in (
            os.listdir(directory) if os.path.isdir(directory) else []) if entry.startswith(prefix)
            and entry.endswith(".ebuild") and VERSION_PARTS.fullmatch(entry[len(prefix):-len(".ebuild")])),
            key=functools.cmp_to_key(compare_versions))
        newer_there = versions and all(compare_versions(each, version) > 0 for each in versions)
        lacking[package.cpv] = ((f"the binhost's tree has {', '.join(versions)} only" if versions else
                                 "the binhost's tree does not have it")
                                + (": sync the target" if newer_there else
                                   ": sync the binhost's repositories (emerge --sync there)"))
    return lacking


# ---- one tree: a target follows the binhost's snapshot -----------------------------------------

# On a target, below its root: staged/NAME holds the snapshot the next publication is built from
# (its plans are asked against it), published/NAME the current publication's (the repository's
# sync-uri there, so the user's own emerge --sync follows it too), NAME.staged, NAME.published
# and NAME.live which revision each holds.
TARGET_TREES = "var/cache/gentoo-binhost/trees"
# Read after the target's own repos.conf files (Portage reads them in name order and the last
# value wins); never copied to the binhost, never compared.
OWN_REPOS_ENTRY = f"zz-{BINREPOS_NAME}.conf"
OWN_REPOS_MEMBER = f"etc/portage/repos.conf/{OWN_REPOS_ENTRY}"
REPOSITORY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # PMS 3.1.5: the only names that become paths
# What a snapshot leaves out, as Portage's own rsync does, and the binhost's git directory.
SNAPSHOT_EXCLUDES = ("/.git", "/distfiles", "/local", "/packages")
TREE_MARKS = ("staged", "published", "live")

# Reads, on the target: its repository configuration as Portage resolves it, the snapshot date
# of each live tree, our marks, and what repos.conf is.
TREE_STATE_SCRIPT = r"""
base=$1
eroot=$(portageq envvar EROOT) || exit 1
eroot=${eroot%/}
echo "==repos"
portageq repos_config "${eroot:-/}" || exit 1
echo "==stamps"
for name in $(portageq get_repos "${eroot:-/}"); do
    location=$(portageq get_repo_path "${eroot:-/}" "$name")
    if [ -d "$location" ]; then present=present; else present=absent; fi
    printf '%s\t%s\t%s\n' "$name" "$present" "$(head -n 1 "$location/metadata/timestamp.chk" 2>/dev/null)"
done
echo "==marks"
for mark in "$base"/*.staged "$base"/*.published "$base"/*.live; do
    if [ -f "$mark" ]; then printf '%s\t%s\n' "${mark##*/}" "$(head -n 1 "$mark")"; fi
done
config=${PORTAGE_CONFIGROOT:-/}
config=${config%/}/etc/portage/repos.conf
echo "==repos.conf"
if [ -L "$config" ]; then echo link; elif [ -d "$config" ]; then echo dir; elif [ -e "$config" ]; then echo file; else echo none; fi
exit 0
"""

# Writes one line into each mark file named: base, the staging place, then MARK NAME VALUE
# triples. The mark "date" is the staged copy's metadata/timestamp.chk instead, for a snapshot
# that has none: Portage's rsync asks the source for it.
WRITE_MARKS_SCRIPT = r"""
set -e
base=$1 place=$2
shift 2
mkdir -p "$base/$place" "$base/published"
while [ $# -ge 3 ]; do
    file="$base/$2.$1"
    if [ "$1" = date ]; then mkdir -p "$base/$place/$2/metadata"; file="$base/$place/$2/metadata/timestamp.chk"; fi
    printf '%s\n' "$3" > "$file.new"
    mv -f "$file.new" "$file"
    shift 3
done
"""

# Makes the staged snapshots the published ones (hard links: unchanged files cost nothing) and
# writes our repos.conf entry (on stdin) beside the target's own: base, repos.conf directory,
# entry name, then NAME REVISION LIVE-LOCATION triples. A staged copy at another revision than
# this run's (a later run staged since) stops it. The live timestamp.chk goes, as an interrupted
# sync leaves it: Portage's rsync then syncs whatever the two stamps say.
PROMOTE_SCRIPT = r"""
set -e
base=$1 confdir=$2 entry=$3
shift 3
(while [ $# -ge 3 ]; do  # every staged copy first: nothing moves unless all are this run's
    if [ "$(head -n 1 "$base/$1.staged" 2>/dev/null)" != "$2" ]; then
        echo "$base/staged/$1 is not the snapshot this run built from (another run staged since)" >&2
        exit 3
    fi
    shift 3
done)
while [ $# -ge 3 ]; do
    name=$1 live=$3
    shift 3
    mkdir -p "$base/published/$name"
    rsync --recursive --links --perms --times --omit-dir-times --delete \
        --link-dest="$base/staged/$name" "$base/staged/$name/" "$base/published/$name/"
    cp -f "$base/$name.staged" "$base/$name.published.new"
    mv -f "$base/$name.published.new" "$base/$name.published"
    if [ -n "$live" ] && [ -d "$live" ]; then rm -f "$live/metadata/timestamp.chk"; fi
done
mkdir -p "$confdir"
tmp="$confdir/.$entry.new.$$"
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$confdir/$entry"
trap - EXIT
"""

# Removes what following the binhost left on a target: base, repos.conf directory, entry name.
UNFOLLOW_SCRIPT = r"""
set -e
rm -f "$2/$3"
rm -rf "$1"
"""


def snapshot_date(stamp):
    """A metadata/timestamp.chk line as a datetime, or None."""
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return email.utils.parsedate_to_datetime(stamp.strip())
    return None


def snapshot_push_argv(source, destination, remote_shell=(), unchanged=None):
    """rsync of one repository into a staging copy: only what changed travels (size and time, as
    Portage's own rsync compares), files unchanged since the published copy (unchanged) become hard
    links to it, what the source lacks goes."""
    argv = (["rsync", "--recursive", "--links", "--safe-links", "--perms", "--times", "--omit-dir-times",
             "--delete", "--protect-args"] + list(remote_shell)
            + [f"--exclude={pattern}" for pattern in SNAPSHOT_EXCLUDES])
    if unchanged:
        argv.append(f"--link-dest={unchanged}")
    return argv + [source.rstrip("/") + "/", destination.rstrip("/") + "/"]


def rsync_destination(host, path):
    """USER@HOST:PATH for rsync, an IPv6 address in brackets (rsync reads HOST::PATH as a daemon)."""
    user, at, address = host.rpartition("@")
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{user}{at}{address}:{path}"


def own_repos_entry(base, followed):
    """Our repos.conf entry on the target: each followed repository syncs from its published
    snapshot there, with Portage's own rsync. Portage verifies no Manifest for a file:// source
    (its rsync module returns before that), but would still refresh its OpenPGP keys over the
    network first: the snapshot is the one the binhost's own sync verified, as its binaries are
    the binhost's."""
    text = (f"# Written by {PROG}: these repositories follow the binhost's snapshots (tree = binhost).\n"
            f"# '{PROG} remove-target' removes this file; the settings before it are in the other files here.\n")
    for name in followed:
        text += (f"\n[{name}]\nsync-type = rsync\nsync-uri = file://{posixpath.join(base, 'published', name)}\n"
                 "sync-rsync-vcs-ignore = true\nsync-rsync-verify-metamanifest = no\n")
    return text.replace("%", "%%")


class TargetTrees:
    """A target that follows the binhost's snapshot (tree = binhost): each repository both have
    is pushed into a staging copy there (rsync over our ssh: what changed only), its plans are
    asked against that copy, and only once the publication built from it is made does the
    target's live tree move to it, with Portage's own emerge --sync."""

    def __init__(self, env, target):
        self.env, self.target, self.runner, self.output = env, target, env.runner, env.output
        self.remote = env.remote(target)
        self.base = posixpath.join(target.root, TARGET_TREES)
        self.followed, self.states, self.marks = [], {}, {}
        self.place, self.live = "staged", {}  # where the copies are staged; {name: live location}
        self.environment = {}  # PORTAGE_REPOSITORIES for the plans: the staged copies

    def read(self):
        """(repository configuration, {name: (whether its tree exists, its snapshot date line)},
        {(name, mark): revision}, what repos.conf is) on the target."""
        result = self.remote.script(TREE_STATE_SCRIPT, self.base, changes=False,
                                    what="reading the repositories' state")
        sections = parse_sections(result.stdout)
        repos = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            repos.read_string(sections.get("repos", ""))
        except configparser.Error as error:
            raise BinhostError(f"{self.target.name}: portageq repos_config printed no repository"
                               f" configuration ({str(error).splitlines()[0]})") from None
        stamps = {fields[0]: (fields[1] == "present", fields[2]) for fields in (
            line.split("\t", 2) for line in sections.get("stamps", "").splitlines()) if len(fields) == 3}
        marks = {}
        for line in sections.get("marks", "").splitlines():
            file_name, _, revision = line.partition("\t")
            name, _, mark = file_name.rpartition(".")
            if mark in TREE_MARKS and REPOSITORY_NAME.fullmatch(name):
                marks[(name, mark)] = revision
        return repos, stamps, marks, sections.get("repos.conf", "none").strip()

    def stage(self, may_sync=True, private=False):
        """Push the binhost's snapshot of each repository the target has into its staging copy,
        and point the plans at those copies. A target whose tree is newer makes the binhost sync
        first (may_sync), never the target go back. private (a command that only shows, and takes
        no lock): a copy of its own, never the one a real run promotes, and no marks."""
        self.place = "pretend" if private else "staged"
        repos, stamps, self.marks, kind = self.read()
        if kind in ("file", "link"):
            confdir = posixpath.join(self.target.portage_config_dir, "repos.conf")
            raise BinhostError(f"{self.target.name}:{confdir} is a {'symlink' if kind == 'link' else 'file'},"
                               f" not a directory, so {PROG} cannot add its entry beside it: on the target run"
                               f" 'mv {confdir} {confdir}.old && mkdir {confdir} && mv {confdir}.old"
                               f" {confdir}/gentoo.conf', or set tree = own in [target {self.target.name}]")
        theirs = [name for name in repos.sections() if REPOSITORY_NAME.fullmatch(name)]
        for attempt in (1, 2):
            # The locations come from the target's configuration: only a directory that is the
            # repository of that name is ever read and sent (never, say, the signing key's).
            locations = dict({"gentoo": DEFAULT_REPOSITORY}, **configured_repositories(self.env.root))
            ours = {name: directory for name, directory in binhost_repositories(self.env).items()
                    if safe_place(locations.get(name, "")) and os.path.isdir(directory)
                    and repository_name(directory) == name}
            self.followed, newer = [name for name in theirs if name in ours], {}
            for name in self.followed:
                mine = (read_inside(ours[name], "metadata/timestamp.chk").strip().splitlines() or [""])[0]
                stamp = stamps.get(name, (False, ""))[1]
                target_date, binhost_date = snapshot_date(stamp), snapshot_date(mine)
                if target_date and binhost_date and target_date > binhost_date:
                    newer[name] = (stamp, mine)
            if not newer:
                break
            which = ", ".join(f"{name} ({target} there, {binhost} here)" for name, (target, binhost) in newer.items())
            if attempt == 2 or not may_sync:
                raise BinhostError(f"{self.target.name}'s tree is newer than the binhost's: {which}; the target's"
                                   " tree does not go back: sync the binhost's repositories from a mirror at least"
                                   " as new (emerge --sync there), then run this again")
            self.output.info(f"{self.target.name}'s tree is newer than the binhost's ({which}): syncing the binhost first")
            sync_repositories(self.env)
        lacking = [name for name in theirs if name not in ours and stamps.get(name, (False, ""))[0]]
        if lacking:
            self.output.warn(f"{self.target.name} has repositories the binhost does not: {', '.join(lacking)}:"
                             " they keep their own sync there, and what the target plans from them is reported"
                             " as not built (add them on the binhost as the target has them)")
        self.states = {name: repository_state(ours[name], self.env.root) for name in self.followed}
        if not self.followed:
            return self
        # As Portage's own sync trusts timestamp.chk: a staged copy at the binhost's snapshot
        # (its date and Manifest) is not walked again. A git checkout is: its HEAD does not say
        # whether its files were changed since.
        pushed = [name for name in self.followed if private or not self.current(name, "staged")]
        self.output.action(f"Staging the binhost's snapshot on {self.target.name} (not live):"
                           f" {describe_tree(self.states)}" + ("" if pushed else " (staged there already)"))
        # A push that is cut short leaves no mark claiming a revision.
        self.remote.script(WRITE_MARKS_SCRIPT, self.base, self.place, *[
            word for name in pushed if not private for word in ("staged", name, "{}")],
            changes=False, what="preparing the staging copies")
        # ssh compresses rsync's file list too (most of what a small change sends), not only the data.
        remote_shell = ["--rsh", shlex.join(self.remote.ssh_base() + ["-o", "Compression=yes"]),
                        "--rsync-path", self.remote.command_line(["rsync"])]
        for name in pushed:
            unchanged = posixpath.join(self.base, "published", name) if (name, "published") in self.marks else None
            if ours[name].startswith(self.env.root.rstrip("/") + "/"):  # kept in the root: checked again now
                check_no_symlink_below(self.env.root, ours[name])
            argv = snapshot_push_argv(ours[name], rsync_destination(self.target.host, posixpath.join(
                self.base, self.place, name)), remote_shell, unchanged)
            self.runner.run(argv, changes=False, describe=f"rsync of {name} to {self.target.name}",
                            timeout=REMOTE_CHANGE_TIMEOUT)
        now = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
        undated = [name for name in pushed if not os.path.isfile(os.path.join(ours[name], "metadata/timestamp.chk"))]
        self.remote.script(WRITE_MARKS_SCRIPT, self.base, self.place, *[
            word for name in self.followed if not private for word in ("staged", name, self.revision(name))],
            *[word for name in undated for word in ("date", name, now)],
            changes=False, what="recording the staged snapshot")
        self.live = {name: repos.get(name, "location", fallback="") for name in self.followed}
        for name in self.followed:
            repos.set(name, "location", posixpath.join(self.base, self.place, name))
        # Portage reads PORTAGE_REPOSITORIES with interpolation: a % in a value is written %%.
        escaped = configparser.ConfigParser(interpolation=None)
        escaped.read_dict({section: {key: value.replace("%", "%%") for key, value in repos.items(section, raw=True)}
                           for section in repos.sections()})
        escaped.read_dict({"DEFAULT": {key: value.replace("%", "%%") for key, value in repos.defaults().items()}})
        text = io.StringIO()
        escaped.write(text)
        # The profile too comes from the staged copy (PLAN_SCRIPT links make.profile into it).
        self.environment = {"PORTAGE_REPOSITORIES": text.getvalue(), "GB_STAGED_TREES": "\n".join(
            f"{self.live[name]}\t{posixpath.join(self.base, self.place, name)}" for name in self.followed
            if self.live[name])}
        return self

    def revision(self, name):
        return json.dumps(self.states.get(name, {}), sort_keys=True)

    def current(self, name, mark):
        """Whether the target's copy (mark: staged, live) is at the binhost's: only a dated snapshot's
        revision describes it whole."""
        return (self.states.get(name, {}).get("revision", "").startswith("timestamp ")
                and self.marks.get((name, mark)) == self.revision(name))

    def move(self):
        """The live tree moves to the staged snapshot: published there first (our repos.conf entry
        points Portage at it), then emerge --sync of those repositories on the target."""
        if not self.followed:
            return
        moving = [name for name in self.followed if not self.current(name, "live")]
        if not moving:
            self.output.info(f"{self.target.name}'s live tree is at the published snapshot already")
            return
        confdir = posixpath.join(self.target.portage_config_dir, "repos.conf")
        self.output.action(f"Moving {self.target.name}'s live tree to the published snapshot: emerge --sync"
                           f" {' '.join(moving)} there")
        self.remote.script(PROMOTE_SCRIPT, self.base, confdir, OWN_REPOS_ENTRY, *[
            word for name in moving for word in (name, self.revision(name), self.live.get(name, ""))],
            input=own_repos_entry(self.base, self.followed), what="publishing the staged snapshot")
        result = self.remote.run(["emerge", "--sync", "--quiet"] + moving, self.target.portage_environment,
                                 capture=True, what="emerge --sync")
        if result is None:
            return
        if result.returncode != 0:
            # Portage's own complaints about the configuration come first; the sync's last.
            said = [line.strip() for text in (result.stdout, result.stderr) for line in as_text(text).splitlines()]
            complaint = next((line for line in reversed(said) if line.startswith(("!!!", "rsync", ">>> SERVER"))),
                             next((line for line in reversed(said) if line), ""))
            raise BinhostError(f"emerge --sync {' '.join(moving)} failed on {self.target.name} (exit {result.returncode}):"
                               f" {complaint.strip()}; its live tree is where an interrupted emerge --sync leaves it,"
                               " and the next run moves it again")
        self.remote.script(WRITE_MARKS_SCRIPT, self.base, "staged", *[word for name in moving for word in (
            "live", name, self.revision(name))], what="recording the live snapshot")


# ---- the gate: build until the target's binary-only plan takes everything ----------------------

# Rounds of building what the target's binary-only plan still lacks, before giving up.
GATE_ROUNDS = 3


def package_arguments(emerge_args):
    """The positions of emerge_args that name packages or sets (not options, nor their values)."""
    return [position for position, word in enumerate(emerge_args) if not word.startswith("-")
            and not (position and emerge_args[position - 1] in EMERGE_OPTS_WITH_VALUE)]


def without_packages(emerge_args, names):
    """emerge_args with the packages named (CATEGORY/PN) left out: an argument naming one is
    dropped (emerge's --exclude does not apply to its arguments), --exclude keeps it out of sets
    and dependencies. None when no argument is left."""
    dropped = set()
    for position in package_arguments(emerge_args):
        word = emerge_args[position]
        atom = re.sub(r"(::.*|:[^/]*|\[.*\])$", "", word.lstrip("=<>~!"))
        name = cpv_package_name(atom) if word[:1] in "=<>~" else atom
        if any(name in (each, each.split("/")[1]) for each in names):
            dropped.add(position)
    kept = [word for position, word in enumerate(emerge_args) if position not in dropped]
    if not package_arguments(kept):
        return None
    return kept + [word for name in sorted(names) for word in ("--exclude", name)]


def describe_gaps(packages):
    return "; ".join(f"{package.cpv} ({package.reason})" for package in packages)


def record_installed(env, target, plan):
    """Keep what the target has installed, as its plan's answer listed it: clean keeps those
    binaries (a target that is not reached again keeps its last recorded set)."""
    if plan.installed is None:
        return
    env.runner.write_file(os.path.join(env.packages.publications_dir(), INSTALLED_DIR, target.name),
                          "".join(f"{cpv}\n" for cpv in sorted(plan.installed)), backup=False, diff=False)


def build_until_covered(env, target, emerge_args, pending, trees):
    """build_for_target's rounds: ask, build what is missing, ask again (the gate)."""
    env.output.action(f"Asking {target.name} what 'emerge {' '.join(emerge_args)}' would merge there")
    only_shown = env.runner.pretend or emerge_pretends(emerge_args)
    publishing = pending or PendingPublication(env, f"what {target.name} needs for 'emerge"
                                                    f" {' '.join(emerge_args)}'")
    built, produced = set(), set()
    absent = {}  # {CPV: PlannedPackage} the binhost's tree lacks: reported, the rest still built

    def offer(staged):
        """What was built is offered: now, or with pending at the command's end."""
        if staged is not None and pending is None:
            env.packages.commit_publication(staged, prune=True)
        elif pending is not None:
            pending.produced |= produced

    def incomplete(staged):
        """The rest is built: offered, then the stop."""
        offer(staged)
        raise BinhostError(f"{target.name}: incomplete: the binhost's tree lacks {len(absent)} package(s) of the"
                           f" plan: {describe_gaps(absent.values())};"
                           f" {'the rest was built and published' if built else 'the rest has binaries already'},"
                           " nothing was installed")

    with env.remote(target).serving():
        for round_number in range(GATE_ROUNDS + 2):  # one round more when the tree lacks something
            staged = None if only_shown else publishing.stage(produced)
            # Left out of the question: the binary-only emerge fails as a whole on one package it
            # has no binary of, and would hide whether the target gets the rest.
            asked = without_packages(emerge_args, {cpv_package_name(cpv) for cpv in absent}) if absent \
                else list(emerge_args)
            try:
                if round_number == 0:
                    plan = first_plan(env, target, asked, staged, trees)
                    if plan is None:
                        return None
                    record_installed(env, target, plan)
                else:
                    plan = env.remote(target).plan(asked, staged, trees)
                    plan.check()
                # staged None: nothing to stage yet, or only shown: the next publication's bookkeeping
                gaps = (packages_to_build(env, plan.packages) if staged is None
                        else binary_plan_gaps(env, plan, staged.text))
                missing = [package for package in gaps if not package.held]
                lacking, known = tree_lacks(env, missing), set(absent)
                for package in missing:
                    if package.cpv in lacking:
                        package.buildable, package.reason = False, lacking[package.cpv]
                        absent[package.cpv] = package
                buildable = [package for package in missing if package.buildable and package.cpv not in built]
                if round_number == 0 or missing:
                    env.output.info(f"{target.name} would merge {len(plan.packages)} package(s):"
                                    f" {len(plan.packages) - len(gaps)} with a binary here, {len(missing)} to build"
                                    + (f", {len(gaps) - len(missing)} held back" if len(gaps) > len(missing) else "")
                                    if round_number == 0 else f"{target.name} would still not get {len(missing)}"
                                    f" of {len(plan.packages)} package(s) from the binhost")
                    for package in gaps:
                        env.output.text(f"  {package.cpv}{':' + package.slot if package.slot else ''}"
                                        f"  ({package.reason})", always=True)
                plan.held = [package for package in gaps if package.held]
                if lacking and not only_shown:
                    if without_packages(emerge_args, {cpv_package_name(cpv) for cpv in absent}) is None:
                        incomplete(staged)  # nothing else asked for: its dependencies are of no use
                    if set(lacking) - known:
                        env.output.action(f"Asking {target.name} again, without what the binhost's tree lacks")
                        continue
                done = all(package.cpv in absent for package in missing)  # what the tree lacks aside
                if done and absent and not only_shown:
                    incomplete(staged)
                if done:
                    offer(staged)
                if done or emerge_pretends(emerge_args):
                    if emerge_pretends(emerge_args):
                        env.output.info("emerge's --pretend among the arguments: nothing is built")
                    return plan
                build_args = ["--oneshot", "--usepkg=n"] + [package.atom for package in buildable]
                if env.runner.pretend:
                    if buildable:
                        build_packages(env, build_args, publish_after=False)
                    return plan
                if not buildable or round_number == GATE_ROUNDS + bool(absent):
                    raise BinhostError(f"{target.name} would not get everything from the binhost:"
                                       f" {describe_gaps(missing)}; nothing was published or installed")
                before = env.packages.package_files()
                try:
                    produced |= build_packages(env, build_args, publish_after=False)
                except BinhostError as error:
                    made = {fields.get("CPV") for fields, _ in index_blocks(read_text(
                        os.path.join(env.pkgdir, "Packages")))[1]
                        if before.get(entry_path(fields)) != fields.get("MD5", "")}
                    unbuilt = [package.cpv for package in buildable if package.cpv not in made]
                    raise BinhostError(f"{error}; not built: {', '.join(unbuilt)}" + (
                        " (one of them failed, the rest were not reached)" if len(unbuilt) > 1 else "")) from None
                built.update(package.cpv for package in buildable)
                env.output.action(f"Asking {target.name} again: would its binary-only emerge now take everything?")
            finally:
                env.packages.discard_staged(staged)
    if only_shown:
        return None
    raise BinhostError(f"{target.name} would not get everything from the binhost: the binhost's tree lacks"
                       f" {describe_gaps(absent.values())}, and asking without them found more each time;"
                       " nothing was installed")


def build_for_target(env, target, emerge_args, pending=None, may_sync=True):
    """Ask the target what emerge_args would merge there and build here what it would not get
    from our binaries, until its binary-only plan (against the index this command publishes,
    staged) merges every package of its source plan with the same version and USE, held ones
    aside: the target then compiles nothing. Publishes only then; with pending (a command that
    builds for several targets), its builds join what the command publishes at its end. A target
    that follows the binhost's snapshot plans from it, staged there, and its live tree moves
    once the publication is made (with pending: by the caller, after its publication). Returns
    the plan (None under --pretend when the target could not be asked)."""
    only_shown = env.runner.pretend or emerge_pretends(emerge_args)
    with contextlib.nullcontext() if only_shown else build_lock(env):
        sync_repositories(env, missing_only=True)  # before anything reads them
        trees = None
        if target.tree == "binhost":
            try:
                trees = TargetTrees(env, target).stage(may_sync, private=only_shown)
            except BinhostError as error:
                if not env.runner.pretend:
                    raise
                env.output.warn(f"{error} (--pretend goes on with {target.name}'s live tree)")
        plan = build_until_covered(env, target, emerge_args, pending, trees)
        if plan is not None:
            plan.trees = trees
            if trees is not None and pending is None and not emerge_pretends(emerge_args):
                trees.move()
    return plan


# ---- installing on a target, and what it has then ----------------------------------------------

def install_answered_no(result, args, interactive, default_opts):
    """Whether emerge stopped because the user answered No at its --ask prompt: it then exits
    with 128 + SIGINT (a Ctrl-C would have reached this tool too)."""
    words = list(args) + shlex.split(default_opts)
    asks = interactive and (has_option(words, "--ask") and "--ask=n" not in words or any(
        re.fullmatch(r"-[A-Za-z0-9]*a[A-Za-z0-9]*", word) for word in words))
    return asks and result is not None and result.returncode == EXIT_SIGNAL_BASE + signal.SIGINT


# Where the install left each package of its plan: "CPV binary" (installed from a binary package),
# "CPV source" (compiled there), "CPV missing"; after "--", package names whose installed
# versions are wanted: "CPV installed".
INSTALLED_SCRIPT = r"""
eroot=$(portageq envvar EROOT) || exit 1
vdb=${eroot%/}/var/db/pkg
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    entry=$vdb/$1
    if [ -f "$entry/BINPKGMD5" ]; then echo "$1 binary"
    elif [ -d "$entry" ]; then echo "$1 source"
    else echo "$1 missing"; fi
    shift
done
[ $# -gt 0 ] && shift
for name in "$@"; do
    for entry in "$vdb/$name"-[0-9]*; do
        [ -d "$entry" ] && echo "${entry#"$vdb"/} installed"
    done
done
exit 0
"""


def held_names(holds):
    return sorted({name for hold in holds["holds"] for name in hold["versions"]})


def installed_states(remote, cpvs, holds):
    """({CPV: binary|source|missing}, [installed CPVs that holds hold back]) (INSTALLED_SCRIPT), in
    one ssh round trip."""
    result = remote.script(INSTALLED_SCRIPT, *cpvs, "--", *held_names(holds), changes=False,
                           what="checking what the target installed")
    lines = [line.partition(" ") for line in result.stdout.splitlines()]
    states = {cpv: state for cpv, _, state in lines if state in ("binary", "source", "missing")}
    return states, sorted({cpv for cpv, _, state in lines
                           if state == "installed" and hold_on(cpv, None, holds)})


def check_installed(env, target, plan):
    """After the install: did the target get every package of its plan (held ones aside), each
    from a binary? One ssh round trip; a one-line error naming what it lacks and the likely
    cause. Returns the held versions the target has installed."""
    remote = env.remote(target)
    holds = env.packages.read_holds()
    held = {package.cpv for package in plan.packages if held_back(package, holds)}
    wanted = [package.cpv for package in plan.packages if package.cpv not in held]
    states, installed_held = installed_states(remote, wanted, holds)
    missing = [cpv for cpv in wanted if states.get(cpv) != "binary"]
    if not missing:
        env.output.info(f"{target.name} has all {len(wanted)} package(s) of its plan, from binaries"
                        + (f" ({len(held)} held back)" if held else ""))
        return installed_held
    compiled = [cpv for cpv in missing if states.get(cpv) == "source"]
    offered = offered_binaries(env, env.packages.published_index_text())
    unpublished = [cpv for cpv in missing if cpv not in offered]
    cause = remote.fetch_problem() if env.transport == "http" or remote.forward else None
    cause = f": {cause}" if cause else ""
    if not cause and unpublished:
        cause = (f": not on the binhost yet ({', '.join(unpublished)}): '{PROG} emerge"
                 " ARGS' builds what the target's plan needs")
    if not cause:
        cause = (": compiled there, not installed from a binary" if compiled else
                 ": its binary-only emerge did not take them (see its output above;"
                 f" '{PROG} doctor' compares its plans)")
    raise BinhostError(f"{target.name} lacks what it asked for: {', '.join(missing)}{cause}")


def bring_back_held(env, target, installed_held, tty):
    """A target that installed a version a rollback holds back: Portage's binary-only emerge goes
    back by itself when another version is offered (measured); where it did not, an explicit
    --oneshot =CPV of the published version does; with none published, say so."""
    offered = offered_binaries(env, env.packages.published_index_text())
    for cpv in installed_held:
        name = cpv_package_name(cpv)
        versions = sorted((candidate for candidate in offered if cpv_package_name(candidate) == name),
                          key=functools.cmp_to_key(lambda one, other: compare_versions(cpv_version(one),
                                                                                      cpv_version(other))))
        if not versions:
            env.output.warn(f"{cpv} stays on {target.name}: a rollback holds it back and no other version of"
                            f" {name} is published ('{PROG} release {name}' offers it again)")
            continue
        argv = ["emerge", "--getbinpkgonly", "--oneshot", "--binpkg-respect-use=y", f"={versions[-1]}"]
        env.output.action(f"{target.name} has {cpv}, which a rollback holds back: back to {versions[-1]}:"
                          f" {format_command(argv)}")
        result = env.remote(target).run(
            argv, remote_emerge_environment(env, target, interactive=tty), tty=tty)
        if result is not None and result.returncode != 0:
            raise BinhostError(f"emerge failed on target {target.name} (exit {result.returncode}) going back"
                               f" from {cpv} to {versions[-1]}: see its output above")


def install_packages(env, target, emerge_args, plan=None, asked=False):
    """emerge --getbinpkgonly emerge_args on the target, then a check that it got its plan (asked
    first unless asked: given as plan, or it could not be had under --pretend)."""
    remote = env.remote(target)
    args = list(emerge_args)
    if not has_option(args, "--binpkg-respect-use"):
        # With --getbinpkgonly, Portage otherwise installs a binary built with other USE flags.
        args.insert(0, "--binpkg-respect-use=y")
    argv = ["emerge", "--getbinpkgonly"] + args
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    with remote.serving():
        if not asked:
            env.output.action(f"Asking {target.name} what 'emerge {' '.join(emerge_args)}' would merge there")
            plan = first_plan(env, target, emerge_args)
        env.output.action(f"Installing on {target.name} ({target.host}): {format_command(argv)}")
        variables = remote_emerge_environment(env, target, interactive=tty)
        forward = ((remote.forward[0], "LOCALPORT") if env.runner.pretend and remote.forward
                   else remote.forward)
        result = remote.run(argv, variables, tty=tty, forward=forward)
        if result is None:
            holds = env.packages.read_holds()
            if plan is not None and held_names(holds):  # what the real run would bring back
                bring_back_held(env, target, installed_states(remote, (), holds)[1], tty)
            return
        if install_answered_no(result, args, tty, variables["EMERGE_DEFAULT_OPTS"]):
            env.output.info(f"Nothing installed on {target.name}: emerge was told No")
            return
        if result.returncode != 0:
            cause = remote.fetch_problem() if env.transport == "http" else None  # the usual one
            raise BinhostError(f"emerge failed on target {target.name}" + (
                f": {cause}" if cause else f" (exit {result.returncode}): see its output above"))
        if plan is not None and not user_emerge_only_pretends(emerge_args):
            installed_held = check_installed(env, target, plan)
            if installed_held:
                bring_back_held(env, target, installed_held, tty)


# ---- setting a target up: binrepos.conf, the signing key ---------------------------------------

PROBE_SCRIPT = r"""
conf=$1/binrepos.conf
if [ -e "$conf" ] && [ ! -d "$conf" ]; then echo "kind file"; exit 0; fi
echo "kind dir"
if [ -f "$conf/$2" ]; then echo "content"; cat "$conf/$2"; fi
"""

# Writes stdin to $1/$2 (mode $4), the previous file kept as .$2.$3.bak beside it.
WRITE_FILE_SCRIPT = r"""
set -e
dir=$1 name=$2 stamp=$3 mode=${4:-0644}
mkdir -p "$dir"
tmp="$dir/.$name.new.$$"
trap 'rm -f "$tmp"' EXIT
(umask 077; cat > "$tmp")
chmod "$mode" "$tmp"
if [ -f "$dir/$name" ]; then cp -p "$dir/$name" "$dir/.$name.$stamp.bak"; chmod "$mode" "$dir/.$name.$stamp.bak"; fi
mv -f "$tmp" "$dir/$name"
trap - EXIT
"""

# getuto (app-portage/getuto) sets up the keyring only when it does not exist yet, lsigning
# Gentoo's release keys with a local key; if we created the directory first, Gentoo's own binary
# packages would never verify on that target again. So getuto runs first where it is installed.
TRUST_KEY_SCRIPT = r"""
set -e
home=$1 fpr=$2 key=$3
umask 022
if [ ! -d "$home" ] && [ "$home" = "${ROOT%/}/etc/portage/gnupg" ] && command -v getuto >/dev/null; then
    if ! said=$(getuto 2>&1); then
        echo "getuto failed ($(printf '%s\n' "$said" | grep . | tail -n 1)): run getuto on the target" >&2
        exit 5
    fi
    echo "getuto set up $home"
fi
mkdir -p "$home"
printf '%s\n' "$key" | gpg --homedir "$home" --batch --no-tty --quiet --no-autostart --import
if [ -f "$home/pass" ]; then
    gpg --homedir "$home" --batch --no-tty --yes --pinentry-mode loopback \
        --passphrase-file "$home/pass" --quick-lsign-key "$fpr"
    echo "lsigned with getuto's local key"
else
    printf '%s:6:\n' "$fpr" | gpg --homedir "$home" --batch --no-tty --quiet --no-autostart \
        --import-ownertrust
    echo "imported with ultimate trust"
fi
gpg --homedir "$home" --batch --no-tty --check-trustdb 2>/dev/null || true
chmod 0755 "$home"
for f in pubring.kbx pubring.gpg trustdb.gpg; do [ -f "$home/$f" ] && chmod go+r "$home/$f"; done
gpgconf --homedir "$home" --kill all 2>/dev/null || true
"""

# Verifies as Portage does: as `nobody` when possible, with the trustdb not rebuilt.
CHECK_SIGNATURE_SCRIPT = r"""
home=$1 message=$2 signature=$3
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
printf '%s' "$message" > "$tmp/message"
printf '%s\n' "$signature" > "$tmp/message.asc"
chmod 0755 "$tmp"; chmod 0644 "$tmp/message" "$tmp/message.asc"
drop=
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && id nobody >/dev/null 2>&1; then
    drop="setpriv --reuid=$(id -u nobody) --regid=$(id -g nobody) --clear-groups"
fi
$drop gpg --homedir "$home" --batch --no-tty --no-auto-check-trustdb --status-fd 1 \
    --verify "$tmp/message.asc" "$tmp/message" 2>/dev/null
"""


def binrepos_entry(url, verify_signature, target_root="/"):
    entry = (f"# Written by {PROG} setup-target; it rewrites this file.\n"
             f"[{BINREPOS_NAME}]\n"
             f"priority = {BINREPOS_PRIORITY}\n"
             f"sync-uri = {url.replace('%', '%%')}\n"
             f"verify-signature = {'true' if verify_signature else 'false'}\n")
    if target_root.rstrip("/"):
        # The download cache defaults to ${EPREFIX}/var/cache/binhost/NAME, outside ROOT.
        location = posixpath.join(target_root, "var/cache/binhost", BINREPOS_NAME)
        entry += f"location = {location.replace('%', '%%')}\n"
    return entry


def probe_target(remote):
    result = remote.script(PROBE_SCRIPT, remote.target.portage_config_dir, BINREPOS_NAME + ".conf",
                           changes=False, what="reading binrepos.conf")
    # Shell start-up files may print before us: find our markers instead of counting lines.
    lines = result.stdout.splitlines(keepends=True)
    kind = next((line.split()[1] for line in lines if line.startswith("kind ")), "dir")
    marker = next((i for i, line in enumerate(lines) if line == "content\n"), None)
    content = "".join(lines[marker + 1:]) if marker is not None else None
    return kind, content


def target_verify_home(remote):
    return remote.read(["portageq", "envvar", "BINPKG_GPG_VERIFY_GPG_HOME"],
                       "portageq envvar BINPKG_GPG_VERIFY_GPG_HOME").strip() or posixpath.join(
        remote.target.portage_config_dir, "gnupg")


def target_accepts_signature(env, remote, home):
    """None when gpg in the target's verify keyring accepts a signature by our key the way
    Portage checks it (valid, fully or ultimately trusted), else the reason it does not."""
    message = f"gentoo-binhost trust check {timestamp()} {env.signing_key}\n"
    try:
        signature = sign_test_message(env, message)
    except BinhostError as error:
        raise CannotSign(f"cannot make a test signature here ({error}): a passphrase-protected key"
                         " needs its passphrase in gpg-agent first") from None
    check = remote.run(["sh", "-c", CHECK_SIGNATURE_SCRIPT, "gentoo-binhost", home, message,
                        signature.strip()], changes=False, capture=True, what="gpg")
    status = check.stdout
    if "[GNUPG:] VALIDSIG" in status and ("TRUST_ULTIMATE" in status or "TRUST_FULLY" in status):
        return None
    return next((line for line in status.splitlines()
                 if any(word in line for word in ("NO_PUBKEY", "TRUST_UNDEFINED", "TRUST_NEVER",
                                                   "TRUST_MARGINAL", "BADSIG", "EXPKEYSIG", "ERRSIG"))),
                last_line(status)) or "no answer from gpg"


def trust_signing_key(env, remote):
    target = remote.target
    public_key = export_public_key(env)
    home = target_verify_home(remote)
    env.output.action(f"Trusting signing key {env.signing_key} in {target.name}:{home}")
    result = remote.script(TRUST_KEY_SCRIPT, home, env.signing_key, public_key.strip(),
                           what="importing the signing key")
    if result is None:
        return
    if "getuto set up" in result.stdout:
        env.output.info(f"getuto set up {target.name}:{home} first (Gentoo's release keys lsigned), as"
                        " emerge would have")
    env.output.info(f"Key {last_line(result.stdout)} on {target.name}")
    try:
        reason = target_accepts_signature(env, remote, home)
    except CannotSign as error:
        env.output.warn(f"Trust check on {target.name} skipped: {error}")
        return
    if reason is None:
        env.output.info(f"Verified: Portage on {target.name} accepts packages signed by {env.signing_key}")
        return
    raise BinhostError(f"target {target.name} does not accept the binhost's signature with {home}"
                       f" ({reason}): check that the directory is readable by nobody and the key trusted")


def setup_target(env, target, verify_signature=True):
    remote = env.remote(target)
    binrepos_dir = posixpath.join(target.portage_config_dir, "binrepos.conf")
    entry_path = posixpath.join(binrepos_dir, BINREPOS_NAME + ".conf")
    tunnel = env.transport == "tunnel"
    url = credentials_url(env, tunnel)
    shown_url = target_url(env, tunnel, with_credentials=False)
    kind, current = probe_target(remote)
    if kind == "file":
        raise BinhostError(
            f"{target.name}:{binrepos_dir} is a file, not a directory: on the target run"
            f" 'mv {binrepos_dir} {binrepos_dir}.old && mkdir {binrepos_dir} &&"
            f" mv {binrepos_dir}.old {binrepos_dir}/local.conf', then setup-target again")
    if verify_signature and not env.signing_key:
        raise UsageError(f"no signing key configured in {env.config_path}: run '{PROG} keygen'"
                         " first (or setup-target --no-verify-signature for an unsigned binhost)")
    if not verify_signature:
        env.output.warn(f"verify-signature = false: {target.name} will install packages from {shown_url}"
                        " without checking who built them; anyone on the network path can swap them")
    content = binrepos_entry(url, verify_signature, target.root)
    if current == content:
        env.output.info(f"{target.name}:{entry_path} already points to {shown_url}")
    else:
        if env.runner.pretend:
            env.output.info(f"Would write {target.name}:{entry_path}:")
            env.output.text(env.runner.masked(unified_diff(current, content, entry_path)), always=True)
        env.output.action(f"Writing {target.name}:{entry_path} (sync-uri = {shown_url})")
        # With a password in it, root only (emerge --info still prints it: see the README).
        mode = "0600" if env.auth_file else "0644"
        # The content on stdin: with a password in it, an argument would show it in ps to every user.
        remote.script(WRITE_FILE_SCRIPT, binrepos_dir, BINREPOS_NAME + ".conf", timestamp(), mode,
                      input=content, what=f"writing {entry_path}")
    if verify_signature:
        trust_signing_key(env, remote)
    if current is None and not target.tree:  # a new target follows the binhost's snapshot
        env.output.info(f"{target.name} is new here: writing tree = binhost to [target {target.name}] of"
                        f" {target.config_path}, so it plans from the binhost's snapshot (tree = own keeps its own)")
        env.runner.write_file(target.config_path, set_config_values(read_text(target.config_path),
                                                                    f"target {target.name}", {"tree": "binhost"}))
        target.tree = "binhost"


# ------------------------------------------------------------------------------------------------
# Capabilities: CPU flags, configuration parity, list and clean, update, doctor, init, onboarding
# ------------------------------------------------------------------------------------------------


# ---- CPU flags: what -march=native means on the target, as flags the binhost's gcc can use -----

# One ssh round trip to the target, run as `sh -c CPU_PROBE_SCRIPT`. Prints sections headed by
# `==name` lines; parse_sections() reads them. Everything may fail without failing the script:
# a missing section is diagnosed in Python, where the message can name the target.
# - LC_ALL=C: gcc translates "[enabled]"/"[disabled]" in --help output.
# - COLUMNS: gcc wraps --help=target output at the terminal width and so splits long values
#   such as aarch64's -mcpu=cortex-a720+crc+... over two lines (resolve-march-native #317).
# - aarch64 (and arm, ppc) detect the CPU with -mcpu=native; gcc versions that cannot name the
#   core expand it to nothing, so -march=native is tried next (resolve-march-native #136).
# - The baseline gets the cc1 line's -mtune when it differs from the arch (e.g. -march=pentium-m
#   -mtune=generic): otherwise tuning-derived options look like CPU differences.
# - `gcc -dumpfullversion` (gcc >= 7) gives 13.2.1 where -dumpversion may give only 13.
CPU_PROBE_SCRIPT = r"""
LC_ALL=C; export LC_ALL
COLUMNS=10000; export COLUMNS
set -f
machine=$(uname -m 2>/dev/null)
case $machine in
    aarch64*|arm*|ppc*|powerpc*) native=-mcpu=native ;;
    *) native=-march=native ;;
esac
cc1_line() {
    gcc -v -E -x c "$1" -c /dev/null -o /dev/null 2>&1 | awk '$1 ~ /(^|\/)cc1$/ { print; exit }'
}
has_arch() {
    case " $1 " in *" -march="*|*" -mcpu="*) return 0 ;; esac
    return 1
}
cc1=$(cc1_line "$native")
if ! has_arch "$cc1" && [ "$native" = -mcpu=native ]; then
    other=$(cc1_line -march=native)
    if has_arch "$other"; then native=-march=native; cc1=$other; fi
fi
base= tune=
for word in $cc1; do
    case $word in
        -march=*|-mcpu=*) [ -n "$base" ] || base=$word ;;
        -mtune=*) tune=$word ;;
    esac
done
base_name=${base#*=}; base_name=${base_name%%+*}
[ "${tune#-mtune=}" = "$base_name" ] && tune=
echo "==arch"
echo "$machine"
echo "==gcc"
gcc -dumpfullversion 2>/dev/null || gcc -dumpversion 2>/dev/null
echo "==cc1"
printf '%s\n' "$cc1"
echo "==baseline"
[ -n "$base" ] && gcc -Q --help=target $base $tune 2>/dev/null
echo "==native"
gcc -Q --help=target "$native" 2>/dev/null
echo "==cpuid2cpuflags"
command -v cpuid2cpuflags >/dev/null 2>&1 && cpuid2cpuflags 2>/dev/null
echo "==cpuinfo"
awk '/^(flags|Features)[ \t]*:/ { print; exit }' /proc/cpuinfo 2>/dev/null
exit 0
"""


class TargetCpu:
    """What the target's gcc and CPU report, resolved to flags for the binhost's make.conf."""

    def __init__(self, machine, gcc_version, common_flags, cpu_flags, cpu_flags_source):
        self.machine, self.gcc_version, self.common_flags = machine, gcc_version, common_flags
        self.cpu_flags, self.cpu_flags_source = cpu_flags, cpu_flags_source  # flags of cpu_flags_variable

    @property
    def is_x86(self):
        return self.machine in ("x86_64", "i386", "i486", "i586", "i686")

    @property
    def cpu_flags_variable(self):
        """CPU_FLAGS_X86, CPU_FLAGS_ARM (arm and arm64 both), or None (no such variable known)."""
        if self.is_x86:
            return "CPU_FLAGS_X86"
        return "CPU_FLAGS_ARM" if self.machine.startswith(("arm", "aarch64")) else None


def detect_target_cpu(env, target):
    sections = parse_sections(env.remote(target).script(CPU_PROBE_SCRIPT, changes=False,
                                                        what="detecting the CPU").stdout)
    cc1, gcc = sections.get("cc1", "").strip(), sections.get("gcc", "").strip()
    if not cc1:
        raise BinhostError(f"gcc on target {target.name} printed no cc1 line for -march=native:"
                           " is gcc installed there (and in path =)?")
    flags = resolve_native_flags(cc1, sections.get("baseline", ""), sections.get("native", ""))
    if not flags:
        raise BinhostError(f"gcc {gcc} on target {target.name} cannot name"
                           " its CPU: set COMMON_FLAGS in the binhost's make.conf by hand")
    cpu = TargetCpu(sections.get("arch", "").strip(), gcc, flags, [], "")
    cpuinfo = sections.get("cpuinfo", "")
    features = set(cpuinfo.partition(":")[2].split())
    # Under a 64-bit kernel, cpuid2cpuflags reads a 32-bit userland's hwcap bits as 64-bit ones.
    if cpu.cpu_flags_variable and not (cpu.machine == "aarch64" and features and "asimd" not in features):
        cpu.cpu_flags, cpu.cpu_flags_source = parse_cpuid2cpuflags(
            sections.get("cpuid2cpuflags", ""), cpu.cpu_flags_variable), "cpuid2cpuflags"
    if cpu.cpu_flags_variable and not cpu.cpu_flags:
        cpu.cpu_flags, cpu.cpu_flags_source = (cpu_flags_x86_from_cpuinfo(cpuinfo) if cpu.is_x86 else
                                               cpu_flags_arm_from_cpuinfo(cpuinfo, cpu.machine)), "/proc/cpuinfo"
    return cpu


def flags_the_binhost_gcc_accepts(flags, env):
    """The flags the binhost's gcc accepts (the host chroot's, with one). A newer gcc on the target
    names features an older one here does not know: an unknown -mno-X is dropped (this gcc cannot
    emit X anyway); an unknown -mX or -march value is an error, else the build would fail late and
    confusingly."""
    host = env.host
    gcc = host.program("gcc", "the binhost builds with gcc")
    flags = list(flags)
    while True:
        result = host.read([gcc] + flags + ["-E", "-x", "c", "/dev/null", "-o", "/dev/null"],
                             {"LC_ALL": "C"}, check=False)
        if result.returncode == 0:
            return flags
        match = next(filter(None, map(UNKNOWN_GCC_FLAG.search, result.stderr.splitlines())), None)
        if match is None:
            raise BinhostError(f"the binhost's gcc rejects the target's flags: {last_line(result.stderr)}")
        flag = f"{match.group(2)}{match.group(1)}" if match.group(1) else match.group(2)
        if not (flag.startswith("-mno-") and flag in flags):
            raise BinhostError(f"the binhost's gcc does not know {flag} (from the target's gcc): use the"
                               " same gcc version on both, or drop the flag from COMMON_FLAGS")
        env.output.warn(f"Dropping {flag}: the binhost's gcc does not know that feature at all")
        flags.remove(flag)


def host_cpu_flags(variable):
    """This machine's CPU flags of variable (CPU_FLAGS_X86, CPU_FLAGS_ARM), or None when it is of
    another architecture than the variable's."""
    host = TargetCpu(os.uname().machine, "", [], [], "")
    if host.cpu_flags_variable != variable:
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            line = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    return cpu_flags_x86_from_cpuinfo(line) if host.is_x86 else cpu_flags_arm_from_cpuinfo(line, host.machine)


def cpu_flags_location(env, variable="CPU_FLAGS_X86"):
    """Where the binhost copy (the target's configuration) keeps variable: (path, kind)."""
    portage_dir = os.path.join(env.root, "etc/portage")
    package_use = os.path.join(portage_dir, "package.use")
    if os.path.isdir(package_use):
        for name in sorted(os.listdir(package_use)):
            path = os.path.join(package_use, name)
            if os.path.isfile(path) and variable in open(path, encoding="utf-8", errors="replace").read():
                return path, "package.use"
    make_conf = os.path.join(portage_dir, "make.conf")
    if os.path.isfile(make_conf) and re.search(rf"^\s*{variable}\s*=",
                                               open(make_conf, encoding="utf-8").read(), re.M):
        return make_conf, "make.conf"
    return (package_use if os.path.isfile(package_use) else os.path.join(package_use, "00cpu-flags"),
            "package.use")


def cpu_report(env, target, apply=False):
    cpu = detect_target_cpu(env, target)
    cpu.common_flags = flags_the_binhost_gcc_accepts(cpu.common_flags, env)
    here = host_cpu_flags(cpu.cpu_flags_variable) if cpu.cpu_flags else None
    beyond = missing_isa(cpu.cpu_flags, here) if here is not None else []
    if beyond:
        env.output.warn(f"{target.name}'s CPU has {' '.join(beyond)}, this machine's does not: a"
                        " program built and run during a build (tests, code generators) may die with"
                        " SIGILL here")
    make_conf = os.path.join(env.root, "etc/portage/make.conf")
    new_make_conf = set_common_flags("" if os.path.isdir(make_conf) else read_text(make_conf),
                                     cpu.common_flags)
    common_line = next((line for line in new_make_conf.splitlines() if line.startswith("COMMON_FLAGS=")),
                       f'COMMON_FLAGS="{" ".join(cpu.common_flags)}"')
    env.output.info(f"{target.name}: {cpu.machine}, gcc {cpu.gcc_version}")
    env.output.text(common_line, always=True)
    variable = cpu.cpu_flags_variable if cpu.cpu_flags else None
    if variable:
        env.output.info(f"{variable} from {cpu.cpu_flags_source}:")
        env.output.text(f'{variable}="{" ".join(cpu.cpu_flags)}"', always=True)
    if not apply:
        return cpu
    check_binhost_root(env)
    if os.path.isdir(make_conf):
        raise BinhostError(f"{make_conf} is a directory: put the lines above into a file in it yourself")
    done = "would be set" if env.runner.pretend else "set"
    path, kind = cpu_flags_location(env, variable) if variable else (None, None)
    for destination in filter(None, (make_conf, path)):  # both checked before either is written
        check_no_symlink_below(env.root, destination)
    if env.runner.write_file(make_conf, new_make_conf):
        env.output.action(f"COMMON_FLAGS of {make_conf} {done} for {target.name}")
    if variable:
        if env.runner.write_file(path, set_cpu_flags(read_text(path), cpu.cpu_flags, kind, variable)):
            env.output.action(f"{variable} in {path} {done} for {target.name}")
    return cpu


# ---- configuration parity: config pull | push | diff -------------------------------------------

# Streams the Portage configuration of one side as a tar: <configroot>/etc/portage and the world
# files under <EROOT>, keeping symlinks (make.profile) and modes. What must not travel stays out:
# the keyring, our own binrepos and repos.conf entries (each side keeps its own), editor and
# etc-update leftovers.
CONFIG_TAR_SCRIPT = r"""
set -e
configroot=${1%/} own_entry=$2 own_repos=$3
eroot=$(portageq envvar EROOT)
eroot=${eroot%/}
[ -d "$configroot/etc/portage" ] || { echo "$configroot/etc/portage does not exist" >&2; exit 3; }
if [ -L "$configroot/etc/portage" ]; then
    echo "$configroot/etc/portage is a symlink: copy its target instead (set root = accordingly)" >&2
    exit 3
fi
set -- -C "${configroot:-/}" etc/portage
for f in world world_sets; do
    if [ -e "$eroot/var/lib/portage/$f" ]; then set -- "$@" -C "${eroot:-/}" "var/lib/portage/$f"; fi
done
exec tar -cf - --numeric-owner --exclude=etc/portage/gnupg \
    --exclude="etc/portage/binrepos.conf/$own_entry" --exclude="etc/portage/repos.conf/$own_repos" \
    --exclude='*~' --exclude='.*.sw[a-p]' \
    --exclude='*.bak' --exclude='._cfg[0-9][0-9][0-9][0-9]_*' --exclude='._mrg[0-9][0-9][0-9][0-9]_*' "$@"
"""

# Installs such a tar (on stdin) on one side: verified against its checksum first, so a cut
# transfer changes nothing; extracted beside the live configuration; the side's own keyring and
# binrepos entry carried over; then swapped in, the old one kept as a timestamped backup.
INSTALL_CONFIG_SCRIPT = r"""
set -e
configroot=${1%/} sum=$2 stamp=$3 own_entry=$4 own_repos=$5
eroot=$(portageq envvar EROOT)
eroot=${eroot%/}
mkdir -p "$configroot/etc"
stage=$(mktemp -d "$configroot/etc/.gentoo-binhost-config.XXXXXX")
trap 'rm -rf "$stage"' EXIT
trap 'exit 130' INT TERM HUP
cat > "$stage/stream.tar"
set -- $(sha256sum "$stage/stream.tar")
if [ "$1" != "$sum" ]; then
    echo "incomplete transfer (checksum mismatch): nothing was changed" >&2
    exit 3
fi
mkdir "$stage/new"
tar -xpf "$stage/stream.tar" --numeric-owner -C "$stage/new"
live="$configroot/etc/portage"
if [ -d "$live/gnupg" ]; then
    rm -rf "$stage/new/etc/portage/gnupg"  # never into a link the stream brought
    cp -a "$live/gnupg" "$stage/new/etc/portage/gnupg"
fi
if [ -f "$live/binrepos.conf/$own_entry" ] && [ ! -f "$stage/new/etc/portage/binrepos.conf" ]; then
    mkdir -p "$stage/new/etc/portage/binrepos.conf"
    rm -f "$stage/new/etc/portage/binrepos.conf/$own_entry"  # cp would write through a link there
    cp -p "$live/binrepos.conf/$own_entry" "$stage/new/etc/portage/binrepos.conf/"
fi
if [ -n "$own_repos" ] && [ -f "$live/repos.conf/$own_repos" ] && [ ! -L "$stage/new/etc/portage/repos.conf" ] \
        && [ ! -f "$stage/new/etc/portage/repos.conf" ]; then
    mkdir -p "$stage/new/etc/portage/repos.conf"
    rm -f "$stage/new/etc/portage/repos.conf/$own_repos"
    cp -p "$live/repos.conf/$own_repos" "$stage/new/etc/portage/repos.conf/"
fi
# Signals wait until the swap is done: the two renames must not be separated.
trap '' INT TERM HUP
swap() {
    backup="$(dirname "$2")/.$(basename "$2").$stamp.bak"
    if [ -e "$2" ] || [ -L "$2" ]; then mv -T "$2" "$backup"; fi
    mkdir -p "$(dirname "$2")"
    if ! mv -T "$1" "$2"; then
        [ -e "$backup" ] && mv -T "$backup" "$2"
        echo "could not move the new $2 into place: the old one is back" >&2
        exit 4
    fi
}
swap "$stage/new/etc/portage" "$live"
# A world file only replaces another world file: a side without one never empties the other's.
for f in world world_sets; do
    if [ -e "$stage/new/var/lib/portage/$f" ]; then
        swap "$stage/new/var/lib/portage/$f" "$eroot/var/lib/portage/$f"
    fi
done
echo "$configroot/etc/.portage.$stamp.bak"
"""


def read_config_tar(side, configroot):
    """The side's configuration as tar bytes (read-only, so it also runs under --pretend)."""
    return side.script(CONFIG_TAR_SCRIPT, configroot, BINREPOS_NAME + ".conf", OWN_REPOS_ENTRY, changes=False,
                       what="reading the Portage configuration", binary=True).stdout


def open_config_tar(tar_bytes):
    try:
        return tarfile.open(fileobj=io.BytesIO(tar_bytes))
    except tarfile.TarError:
        raise BinhostError("the configuration stream is not a tar: does a shell start-up file"
                           " (.bashrc) print something for non-interactive ssh sessions?") from None


def config_members(tar_bytes):
    """{name: (kind, mode, content)} of a configuration tar, content being bytes or a link target."""
    members = {}
    with open_config_tar(tar_bytes) as archive:
        for member in archive.getmembers():
            if member.isfile():
                members[member.name] = ("file", member.mode, archive.extractfile(member).read())
            elif member.issym():
                members[member.name] = ("symlink", member.mode, member.linkname)
            elif member.isdir():
                members[member.name] = ("directory", member.mode, None)
    # An empty directory changes nothing for Portage: the target's binrepos.conf/ that holds only
    # our own entry (which never travels), say. Left out, it is no difference and no change.
    return {name: value for name, value in members.items()
            if value[0] != "directory" or name == "etc/portage"
            or any(other.startswith(name + "/") for other in members)}


def describe_config_changes(old, new, old_label, new_label):
    """A unified diff of what installing `new` over `old` changes, symlinks and modes included."""
    lines = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None or after is None:
            kind, _mode, content = after or before
            lines.append(f"Only in {new_label if before is None else old_label}: {name} ({kind})\n")
            if kind == "file":
                text = content.decode("utf-8", "replace")
                lines.append(unified_diff(*(("", text) if before is None else (text, "")), name))
            continue
        if before[0] != after[0]:
            lines.append(f"{name}: {before[0]} in {old_label}, {after[0]} in {new_label}\n")
        elif before[0] == "symlink":
            lines.append(f"{name}: symlink to {before[2]} in {old_label}, to {after[2]} in {new_label}\n")
        else:
            if before[1] != after[1]:
                lines.append(f"{name}: mode {before[1]:04o} in {old_label}, {after[1]:04o} in {new_label}\n")
            if before[2] != after[2]:
                lines.append(unified_diff(as_text(before[2]), as_text(after[2]), name))
    return "".join(lines)


def rewrite_make_conf(tar_bytes, transform):
    """The tar with transform(text) applied to where CFLAGS live: make.conf (a file, or each file
    of a make.conf/ directory) and the env/ files package.env points at; returns (bytes, names
    changed)."""
    source = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    result, changed = io.BytesIO(), []
    with source, tarfile.open(fileobj=result, mode="w", format=source.format) as target:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if data is not None and (member.name == "etc/portage/make.conf"
                                     or member.name.startswith(("etc/portage/make.conf/",
                                                                "etc/portage/env/"))):
                text = data.decode("utf-8", "surrogateescape")
                new_text = transform(text)
                if new_text != text:
                    data = new_text.encode("utf-8", "surrogateescape")
                    member.size = len(data)
                    changed.append(member.name)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    return result.getvalue(), changed


NATIVE_CPU_FLAG = re.compile(r"(?<![^\s\"'])-m(?:arch|cpu)=native(?![^\s\"'])")
NATIVE_TUNE = re.compile(r"[ \t]*(?<![^\s\"'])-mtune=native(?![^\s\"'])")


def resolve_march_native_in(tar_bytes, env, target):
    """The binhost must not build for its own CPU: -march=native in the target's make.conf becomes
    the target's resolved flags."""
    if b"=native" not in tar_bytes:
        return tar_bytes
    flags = None

    def replace(text):
        nonlocal flags
        if not NATIVE_CPU_FLAG.search(text):
            return text
        if flags is None:
            resolved = detect_target_cpu(env, target).common_flags
            flags = " ".join(flags_the_binhost_gcc_accepts(resolved, env))
        return NATIVE_CPU_FLAG.sub(flags, NATIVE_TUNE.sub("", text))

    new_tar, changed = rewrite_make_conf(tar_bytes, replace)
    for name in changed:
        env.output.warn(f"{target.name}:{name} uses -march=native, which would mean the binhost's CPU here:"
                        f" the binhost copy gets {target.name}'s resolved flags instead: {flags}")
    return new_tar


# The parts of a Portage configuration that run commands during builds: bashrc hooks, env/ files
# (package.env), patches, make.conf (FETCHCOMMAND, PORTAGE_* hooks), sync hooks, a user profile's
# profile.bashrc.
EXECUTED_CONFIG = re.compile(r"etc/portage/(bashrc|env(/|$)|patches(/|$)|package\.env|make\.conf"
                             r"|postsync\.d(/|$)|repo\.postsync\.d(/|$)|profile(/|$))")


# What a target's configuration stream may hold: the rest is left out.
CONFIG_TAR_PLACES = ("etc/portage", "var/lib/portage/world", "var/lib/portage/world_sets")
# Each side keeps its own entry (setup-target writes it); the target's never travels.
OWN_BINREPOS_MEMBER = f"etc/portage/binrepos.conf/{BINREPOS_NAME}.conf"


def sanitized_config_tar(tar_bytes, target_name, output):
    """A target's configuration tar as the binhost accepts it: the binhost unpacks it as root,
    and a compromised target must not plant devices, setuid files or anything outside
    etc/portage and the world files there, nor make the binhost write through its symlinks.
    Only directories, regular files and symlinks pass; modes lose setuid, setgid and sticky bits
    and group and world write permission; everything is owned by root. etc/portage itself, or a
    member below a symlink, is refused."""
    source = open_config_tar(tar_bytes)
    result, symlinks, seen, loosened = io.BytesIO(), set(), set(), []
    with source, tarfile.open(fileobj=result, mode="w", format=tarfile.PAX_FORMAT) as clean:
        for member in source.getmembers():
            name = member.name
            where = f"{target_name}'s configuration: {name}"
            if (name.startswith("/") or posixpath.normpath(name) != name or ".." in name.split("/")
                    or not (name in CONFIG_TAR_PLACES or name.startswith("etc/portage/"))):
                output.warn(f"{where}: outside etc/portage and the world files: left out")
                continue
            if name == "etc/portage/gnupg" or name.startswith("etc/portage/gnupg/"):
                continue  # each side keeps its own keyring
            below = next((link for link in symlinks if name.startswith(link + "/")), None)
            if below or name in seen or (member.issym() and any(other.startswith(name + "/") for other in seen)):
                raise BinhostError(f"{where} lies below the symlink {below or name}, or comes twice:"
                                   " refusing a configuration that would make the binhost write through"
                                   " a link the target chose")
            seen.add(name)
            if name.startswith("var/lib/portage/") and not member.isfile():
                output.warn(f"{where}: a world file that is not a regular file: left out")
                continue
            if (member.issym() and name == "etc/portage/binrepos.conf") or name in (OWN_BINREPOS_MEMBER,
                                                                                  OWN_REPOS_MEMBER):
                output.warn(f"{where}: where the binhost keeps its own entry: left out")
                continue
            if name == "etc/portage" and not member.isdir():
                raise BinhostError(f"{where} is not a directory: refusing it")
            if not (member.isdir() or member.isfile() or member.issym()):
                output.warn(f"{where}: not a directory, regular file or symlink (a device, FIFO or hard"
                            " link): left out")
                continue
            if member.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
                output.warn(f"{where}: setuid, setgid or sticky bit dropped")
            if not member.issym() and member.mode & (stat.S_IWGRP | stat.S_IWOTH):
                loosened.append(name)
            # Only root may change what builds run as root: no group or world write bits here.
            member.mode &= 0o777 if member.issym() else 0o755
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            member.pax_headers = {}
            if member.issym():
                symlinks.add(name)
            clean.addfile(member, source.extractfile(member) if member.isfile() else None)
    if loosened:
        output.warn(f"{target_name}'s configuration: group and world write permission dropped from"
                    f" {len(loosened)} file(s) ({', '.join(loosened[:3])}{', ...' if len(loosened) > 3 else ''}):"
                    " on the binhost only root may change what builds run")
    return result.getvalue()


def fetch_both_configs(env, target):
    """(binhost side, remote, binhost tar, target tar); the target's as sanitized_config_tar()
    leaves it, so what a diff shows is what a pull installs."""
    check_binhost_root(env)
    binhost_side = LocalShell(env)
    remote = env.remote(target)
    target_tar = sanitized_config_tar(read_config_tar(remote, target.root), target.name, env.output)
    return binhost_side, remote, read_config_tar(binhost_side, env.root), target_tar


def sync_config(direction, env, target, show_only=False):
    """config pull (target -> binhost), push (binhost -> target) or diff (what pull would change)."""
    binhost_side, remote, binhost_tar, target_tar = fetch_both_configs(env, target)
    if direction in ("pull", "diff"):  # diff shows what a pull would change
        stream, destination = resolve_march_native_in(target_tar, env, target), binhost_tar
        labels = (f"binhost:{env.root}", f"{target.name}:{target.root}")
    else:
        stream, destination = binhost_tar, target_tar
        labels = (f"{target.name}:{target.root}", f"binhost:{env.root}")
    source, destination = config_members(stream), config_members(destination)
    changes = describe_config_changes(destination, source, *labels)
    if not changes:
        env.output.info(f"The Portage configuration of {target.name} and the binhost is identical")
        if direction == "pull":
            link_repositories_into(env)
        return False
    # A push changes another machine: always show how. A first pull can be long, so only on request,
    # but for the parts that run as root on the binhost during builds, shown every time.
    if show_only or env.runner.pretend or direction == "push":
        env.output.text(changes, always=True)
    elif direction == "pull":
        def runs_commands(members):
            return {name: value for name, value in members.items() if EXECUTED_CONFIG.match(name)}
        executed = describe_config_changes(runs_commands(destination), runs_commands(source), *labels)
        if executed:
            env.output.warn(f"What {target.name}'s configuration runs as root on the binhost during builds"
                            " changes (bashrc, env/, patches/, package.env, make.conf, hooks):")
            env.output.text(executed, always=True)
    if show_only:
        return True
    writer, configroot = (binhost_side, env.root) if direction == "pull" else (remote, target.root)
    env.output.action(f"Installing the configuration of {labels[1]} on {labels[0]}")
    if env.runner.pretend:
        env.output.info(f"Would check the stream against its SHA-256, unpack it beside {configroot}/etc/portage,"
                        f" keep that side's gnupg/ and {BINREPOS_NAME} entry, and swap it in (the old one"
                        " kept as etc/.portage.<date>.bak), with:")
    result = writer.script(INSTALL_CONFIG_SCRIPT, configroot, hashlib.sha256(stream).hexdigest(),
                           timestamp(), BINREPOS_NAME + ".conf", OWN_REPOS_ENTRY, input=stream, binary=True,
                           what="installing the Portage configuration")
    if result is not None:
        kept = last_line(as_text(result.stdout))
        env.output.info(f"Previous configuration kept as"
                        f" {under(binhost_side.host.chroot, kept) if direction == 'pull' else kept}")
    if direction == "pull":
        link_repositories_into(env)
    return True


# ---- what the binhost holds: list and clean ----------------------------------------------------

DEFAULT_KEEP = 2


def human_size(size):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def packages_to_clean(records, installed, keep, on_targets=frozenset()):
    """(record, reason) for each package clean removes: a CPV no longer installed in the binhost
    root nor on a target (as last recorded), or a build older than the newest `keep` of its CPV."""
    doomed, seen = [], {}
    for record in records:  # newest build of each CPV first
        seen[record["cpv"]] = seen.get(record["cpv"], 0) + 1
        if record["cpv"] not in installed and record["cpv"] not in on_targets:
            doomed.append((record, "no longer installed in the binhost root"))
        elif seen[record["cpv"]] > keep:
            doomed.append((record, f"older than the newest {keep} build(s)"))
    return doomed


def clean_packages(env, keep, pending=None):
    """Remove what clean's rules doom. Targets are served publications: first a new one without
    those packages is published (with pending: the command's one publication, its builds too),
    then the files go, but not those an older kept publication still names (rollback); they stay
    retired, left out of every new publication, until a later clean."""
    if keep < 1:
        raise UsageError("--keep needs at least 1")
    check_binhost_root(env)
    with build_lock(env):  # a build may be adding packages
        records = env.packages.package_records()
        doomed = packages_to_clean(records, installed_in_binhost(env), keep,
                                   env.packages.targets_installed())
        checksums = {entry_path(fields): fields.get("MD5", "") for fields in env.packages.read_packages_index()}
        # A retired path rebuilt since (same path, another file) is no longer retired.
        retired = {path: md5 for path, md5 in env.packages.retired_packages().items()
                   if checksums.get(path, md5) == md5}
        if not doomed and not retired:
            env.output.info(f"Nothing to clean in {env.pkgdir}")
            if pending is not None:
                pending.publish()
            return []
        freed = sum(record["size"] or 0 for record, _ in doomed)
        for record, reason in doomed:
            env.output.text(f"{record['path'] or record['cpv']}  ({reason})", always=True)
        verb = "Would free" if env.runner.pretend else "Freeing"
        env.output.info(f"{verb} {human_size(freed)} ({len(doomed)} package(s)), once no kept publication"
                        " names them")
        if env.runner.pretend:
            return doomed
        retired.update({record["path"]: checksums.get(record["path"], "") for record, _ in doomed})
        env.packages.write_retired(retired)
        # What the publications kept until now name stays; only then the oldest may go.
        removed, why = {record["path"] for record, _ in doomed}, f"clean: {len(doomed)} package(s) retired"
        if pending is not None:
            pending.removed |= removed
            pending.why += f"; {why}"
            pending.publish()
        else:
            env.packages.publish(why, removed=removed, prune=False)
        # Named before the prune: what the publication this clean replaced names stays until the
        # next clean (a target that fetched its index a moment ago may still be downloading).
        named = env.packages.published_paths()
        env.packages.prune_publications()
        pkgdir = os.path.realpath(env.pkgdir)
        for relative in sorted(set(retired) - named):
            path = os.path.realpath(os.path.join(pkgdir, relative))
            # The index is data: only package files inside PKGDIR are ever deleted.
            if (path.startswith(pkgdir + os.sep) and path.endswith((".gpkg.tar", ".tbz2", ".xpak"))
                    and os.path.isfile(path)):
                env.runner.remove(path)
        still = {path: md5 for path, md5 in retired.items() if path in named}
        env.packages.write_retired(still)
        if still:
            env.output.info(f"Keeping {len(still)} retired package(s) that an older kept publication names"
                            f" (publish-keep = {env.publish_keep}; '{PROG} history'): a later clean removes them")
        refresh_index(env)
    return doomed


# ---- update: sync, build every target's world, publish, clean ----------------------------------

WORLD_UPDATE = ["--update", "--deep", "--newuse", "@world"]


def coverage_summary(plan):
    """A summary row's words for a target whose plan passed the gate."""
    if plan is None:
        return "ok"
    count, held = len(plan.packages), len(plan.held)
    return (f"ok: {count - held} of {count} package(s) from the binhost"
            + (f", {held} held back by a rollback" if held else ""))


def update_environments(config, args, runner, output):
    """update: each environment synced, every target's world built (the coverage plan and the
    gate), signed and published, then cleaned; a summary row per target."""
    rows = []
    for env in config.environments().values():
        targets = [target for target in config.targets.values() if config.environment_for(target).root == env.root]
        if not targets:
            continue
        output.action(f"Environment {env.root}: {', '.join(target.name for target in targets)}")
        started, before = time.monotonic(), env.packages.current_publication()
        pending = PendingPublication(env, f"update for {', '.join(target.name for target in targets)}")
        try:
            failures, following = [], []
            with build_lock(env):  # one update at a time; builds nest in it
                if not args.no_sync:
                    sync_repositories(env)
                for target in targets:  # a target asleep at night must not stop the others
                    target_started = time.monotonic()
                    try:
                        plan = build_for_target(env, target, WORLD_UPDATE, pending=pending, may_sync=False)
                        rows.append((target.name, coverage_summary(plan), time.monotonic() - target_started))
                        if plan is not None and plan.trees is not None:
                            following.append((len(rows) - 1, plan.trees))
                    except BinhostError as error:
                        output.error(f"{target.name}: {error}")
                        failures.append(f"{target.name}: {error}")
                        rows.append((target.name, f"FAILED: {error}", time.monotonic() - target_started))
                # One publication: the builds of the targets that passed, and what clean retires
                # (not after a failure: what it left may be what the next run needs).
                try:
                    if failures:
                        pending.publish()
                    else:
                        clean_packages(env, DEFAULT_KEEP, pending)
                except BinhostError as error:
                    output.warn(f"clean skipped: {error}")
                    pending.publish()
                for row, trees in following:  # published: their live trees follow now
                    try:
                        trees.move()
                    except BinhostError as error:
                        output.error(f"{trees.target.name}: {error}")
                        failures.append(f"{trees.target.name}: {error}")
                        rows[row] = (rows[row][0], f"FAILED: {error}", rows[row][2])
            if failures:
                raise BinhostError("; ".join(failures))
            after = env.packages.current_publication()
            result = (f"ok: publication {after}" if after != before
                      else f"ok: nothing new (publication {after})" if after else "ok: nothing to publish")
        except BinhostError as error:
            output.error(f"{env.root}: {error}")
            result = f"FAILED: {error}"
        rows.append((env.root, result, time.monotonic() - started))
    if not rows:
        raise UsageError(f"{config.path}: no target configured: update builds what targets need")
    width = max(len(name) for name, _, _ in rows + [("target or environment", None, None)])
    output.text(f"{'target or environment':<{width}}  {'time':>7}  result", always=True)
    for name, result, seconds in rows:
        output.text(f"{name:<{width}}  {seconds:6.1f}s  {result}", always=True)
    failed = [name for name, result, _ in rows if not result.startswith("ok")]
    if failed:
        raise BinhostError(f"update failed for {len(failed)} of {len(rows)} row(s): {', '.join(failed)}")


# ---- doctor ------------------------------------------------------------------------------------

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_FREE_BYTES = 5 * 1024**3

REPO_TIMESTAMP_SCRIPT = r"""
for location in "$@"; do
    stamp=
    for name in metadata/timestamp.chk metadata/timestamp.x metadata/timestamp; do
        if [ -f "$location/$name" ]; then stamp=$(head -n 1 "$location/$name"); break; fi
    done
    printf '%s\t%s\n' "$location" "${stamp:-unknown}"
done
"""


class Doctor:
    """Runs the checks, one line each; any FAIL makes the exit code 1."""

    def __init__(self):
        self.results = []
        self.fingerprint = None  # of the target's configuration (and resolved CPU flags)
        self.binrepos_ok = None  # whether the target's binrepos entry points to us

    def report(self, status, check, detail):
        self.results.append({"check": check, "status": status, "detail": detail})

    def run(self, check, function, *args):
        try:
            function(self, *args)
        except BinhostError as error:
            self.report(FAIL, check, str(error))
        except (OSError, ValueError, LookupError, tarfile.TarError) as error:
            # One check that cannot run must not hide the others' results.
            self.report(FAIL, check, f"could not check: {error!r}: run doctor -v to see the commands it ran")

    @property
    def failed(self):
        return any(result["status"] == FAIL for result in self.results)


def portage_variables(text):
    """{name: value} from `portageq envvar -v` lines (NAME='value')."""
    values = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals:
            values[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def configuration_fingerprint(members):
    """A short hash of /etc/portage (make.conf with resolved CPU flags): targets with the same one
    can share a binhost environment (their worlds may differ: the binhost builds the union)."""
    digest = hashlib.sha256()
    for name, (kind, mode, content) in sorted(members.items()):
        if name.startswith("etc/"):
            digest.update(f"{name}\0{kind}\0{mode}\0".encode())
            digest.update(content if isinstance(content, bytes) else str(content).encode())
    return digest.hexdigest()[:16]


def doctor_binhost_root_shape(doctor, env):
    check_binhost_root(env)
    release = next((os.path.join(env.root, name) for name in ("etc/os-release", "usr/lib/os-release")
                    if os.path.isfile(os.path.join(env.root, name))), None)
    text = open(release, encoding="utf-8", errors="replace").read() if release else ""
    if "gentoo" in text.lower():
        doctor.report(OK, "binhost root", f"{env.root} is a Gentoo stage3")
    else:
        doctor.report(WARN, "binhost root", f"{env.root} has etc/portage but no Gentoo os-release:"
                                            " is it an extracted stage3?")


def doctor_build_method(doctor, env):
    method, why = env.method
    automatic_root = method.name == "root" and env.build_method not in BUILD_METHODS and "CPU lacks" in why
    doctor.report(WARN if automatic_root else OK, "build method", f"{method.name}: {why}")
    host = env.host
    if host.emulated_by:
        compiling = ("its compiles go to the distcc helpers (distcc-hosts), whose cross compiler runs natively"
                     if env.distcc_hosts else "distcc helpers with a cross compiler would take the compiling")
        doctor.report(OK, "emulation", f"the binhost root's programs run through {host.emulated_by}: builds are"
                                       f" slower than on a native machine; {compiling} (README: 'Building for"
                                       " another architecture')")
    if not host.chroot:
        doctor.report(WARN, "confinement", "none: the root method runs Portage on this machine itself, so a"
                                           " build's root phases can change it (README: 'Confinement')")
    elif host.confinement_problem():
        doctor.report(WARN, "confinement", f"builds in {host.where} run in a plain chroot"
                                           f" ({host.confinement_problem()}): their root phases can reach this"
                                           " machine's files, devices and loopback services; allow namespaces"
                                           " (unshare as root) to confine them")
    else:
        network = "with the network (distcc-hosts)" if env.distcc_hosts else "without network"
        doctor.report(OK, "confinement", f"builds in {host.where} run in namespaces of their own: their own"
                                         f" /proc, /dev and /run, {network}, no capability to leave")
    place = enclosing_place(env.gpg_home, [env.root, env.host_chroot])
    if place:
        doctor.report(WARN, "signing key", f"gpg-home {env.gpg_home} lies inside {place}, where builds"
                                           f" could read it: the next build, emerge, update, sign, keygen or"
                                           f" setup-target moves it to {default_gpg_home(env.config_path)}")


def doctor_portage_variables(doctor, env, remote, target):
    names = ["CHOST", "ARCH", "USE"]
    ours, remote_values = (portage_variables(side.read(["portageq", "envvar", "-v"] + names, "portageq envvar"))
                           for side in (LocalShell(env), remote))
    for name in names:
        mine, other = ours.get(name, ""), remote_values.get(name, "")
        if name == "USE":
            only_target = sorted(set(other.split()) - set(mine.split()))
            only_binhost = sorted(set(mine.split()) - set(other.split()))
            if only_target or only_binhost:
                doctor.report(FAIL, "USE", f"{target.name} has {' '.join(only_target) or 'nothing more'},"
                                           f" the binhost has {' '.join(only_binhost) or 'nothing more'}"
                                           " (USE_EXPAND flags such as cpu_flags_x86_* included): run"
                                           f" '{PROG} config pull' (and '{PROG} cpu --apply' for CPU flags)")
            else:
                doctor.report(OK, "USE", f"{len(mine.split())} flags, the same on both")
        elif mine != other:
            doctor.report(FAIL, name, f"binhost {mine!r}, {target.name} {other!r}: run '{PROG} config pull'")
        else:
            doctor.report(OK, name, mine)


def doctor_repositories(doctor, binhost_side, remote, ours, theirs, target, published=None):
    """Per repository: its snapshot on both sides, and the one the latest builds came from."""
    def built_from(name):
        return (f"; the latest published builds came from {describe_tree({name: published[name]})}"
                if published and name in published else "")

    if not theirs:
        doctor.report(WARN, "repositories", f"no repos.conf in {target.name}'s configuration")
        return
    local = binhost_side.script(REPO_TIMESTAMP_SCRIPT, *[ours.get(name, "/nonexistent") for name in theirs],
                                changes=False, what="reading repository timestamps")
    remote_result = remote.script(REPO_TIMESTAMP_SCRIPT, *theirs.values(), changes=False,
                                  what="reading repository timestamps")
    for name, ours_line, theirs_line in zip(theirs, local.stdout.splitlines(), remote_result.stdout.splitlines()):
        mine, other = ours_line.split("\t", 1)[1], theirs_line.split("\t", 1)[1]
        if name not in ours:
            doctor.report(FAIL, f"repository {name}", f"not configured on the binhost: run '{PROG} config pull',"
                                                      " with the repository synced on the build host")
        elif mine == other and mine != "unknown":
            doctor.report(OK, f"repository {name}", f"snapshot {mine} on both{built_from(name)}")
        elif mine == other:
            doctor.report(WARN, f"repository {name}", "no metadata/timestamp.chk on either side: cannot"
                                                      f" compare snapshots{built_from(name)}")
        elif target.tree == "binhost":
            doctor.report(OK, f"repository {name}", f"snapshot {mine} on the binhost, {other} on {target.name}, which"
                                                    f" follows the binhost's (see the tree rows){built_from(name)}")
        else:
            doctor.report(FAIL, f"repository {name}", f"snapshot {mine} on the binhost, {other} on"
                                                      f" {target.name}: sync both to the same snapshot, or set"
                                                      f" tree = binhost in [target {target.name}]{built_from(name)}")


def doctor_other_binhosts(doctor, members, target):
    """Other binhosts the target uses (a stage3 names Gentoo's): Portage takes the best version
    from any of them, and priority only decides between equal versions."""
    others = []
    for name, (kind, _mode, content) in sorted(members.items()):
        if kind != "file" or not (name == "etc/portage/binrepos.conf"
                                  or name.startswith("etc/portage/binrepos.conf/")):
            continue
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(configparser.Error):
            parser.read_string(content.decode("utf-8", "replace"))
        for section in parser.sections():
            uri = parser[section].get("sync-uri")
            if section != BINREPOS_NAME and uri:
                others.append(f"[{section}] {re.sub(r'//[^/@]*@', '//', uri)} in {name[len('etc/'):]}")
    if others:
        doctor.report(WARN, "other binhosts", f"{target.name} also fetches from {'; '.join(others)}: a"
                                              " newer or equal-version generic build there can be"
                                              " merged instead of ours (priority only breaks ties"
                                              " between equal versions); remove those files on the"
                                              f" target and run '{PROG} config pull', or keep them"
                                              " for what this binhost does not build")


def doctor_configuration(doctor, env, target):
    binhost_side, remote, binhost_tar, target_tar = fetch_both_configs(env, target)
    target_tar = resolve_march_native_in(target_tar, env, target)
    binhost, remote_members = config_members(binhost_tar), config_members(target_tar)
    doctor.fingerprint = configuration_fingerprint(remote_members)
    config_files = sorted(name for name in set(binhost) | set(remote_members)
                          if name.startswith("etc/") and binhost.get(name) != remote_members.get(name))
    if config_files:
        doctor.report(FAIL, "configuration", f"differs from {target.name} in {', '.join(config_files)}:"
                                             f" '{PROG} config diff' shows how, 'config pull' fixes it")
    else:
        doctor.report(OK, "configuration", f"identical to {target.name} (fingerprint"
                                           f" {configuration_fingerprint(binhost)})")
    world_lines = [set(as_text(members.get("var/lib/portage/world", ("", 0, b""))[2] or b"").split())
                   for members in (binhost, remote_members)]
    missing, extra = sorted(world_lines[1] - world_lines[0]), sorted(world_lines[0] - world_lines[1])
    if missing or extra:
        detail = "; ".join(part for part in (
            f"not on the binhost: {' '.join(missing)}" if missing else "",
            f"only on the binhost: {' '.join(extra)}" if extra else "") if part)
        doctor.report(FAIL, "world", f"{detail}: run '{PROG} config pull'")
    else:
        doctor.report(OK, "world", f"{len(world_lines[1])} entries, the same on both")
    profiles = [members.get("etc/portage/make.profile", ("", 0, "none"))[2] for members in (binhost, remote_members)]
    profile_path = os.path.join(env.root, "etc/portage/make.profile")
    if profiles[0] != profiles[1]:
        doctor.report(FAIL, "profile", f"binhost {profiles[0]}, {target.name} {profiles[1]}: run '{PROG} config pull'")
    elif os.path.exists(resolved_under(env.host_chroot, profile_path)):
        doctor.report(OK, "profile", f"{profiles[1]}")
    elif profile_repository(env.root) in kept_repositories(env).values():
        doctor.report(WARN, "profile", f"{profile_path} -> {profiles[0]} resolves once"
                                       f" {profile_repository(env.root)} is synced inside the binhost root:"
                                       f" the next build or '{PROG} update' does it")
    else:
        doctor.report(FAIL, "profile", f"{profile_path} -> {profiles[0]} does not resolve on the binhost:"
                                       f" '{PROG} config pull' links the repositories it points into"
                                       " (the repository must exist on the build host)")
    doctor_other_binhosts(doctor, remote_members, target)
    doctor_repositories(doctor, binhost_side, remote, repository_locations(binhost),
                       repository_locations(remote_members), target, env.packages.published_trees())
    doctor_portage_variables(doctor, env, remote, target)


def doctor_tree(doctor, env, target):
    """Whose ebuild tree the target plans from; following the binhost's: per repository the
    revision live there, staged there, published there, and the binhost's."""
    if target.tree != "binhost":
        if target.tree == "own":
            doctor.report(OK, "tree", f"own: {target.name} plans from its own tree (tree = own): sync it and the"
                                      " binhost's alike")
        else:
            doctor.report(WARN, "tree", f"{target.name} plans from its own tree, synced at other times than the"
                                        f" binhost's, so versions it plans may be gone here: set tree = binhost in"
                                        f" [target {target.name}] of {target.config_path} to follow the binhost's"
                                        " snapshot (tree = own keeps its own without this warning)")
        return
    repos, _stamps, marks, kind = TargetTrees(env, target).read()
    if kind in ("file", "link"):
        doctor.report(FAIL, "tree", f"{target.name}'s repos.conf is a {kind}, not a directory: {PROG} cannot add"
                                    " its entry beside it; make it a directory (the README's Troubleshooting)")
        return

    def shown(name, revision):
        if revision is None:
            return "none"
        with contextlib.suppress(ValueError, AttributeError, RecursionError):  # the target's words
            return describe_tree({name: json.loads(revision)}).split("@", 1)[1]
        return "unknown"

    followed = 0
    for name, directory in sorted(binhost_repositories(env).items()):
        if not os.path.isdir(directory) or not repos.has_section(name):
            continue
        followed += 1
        binhost = json.dumps(repository_state(directory, env.root), sort_keys=True)
        live, staged, published = (marks.get((name, mark)) for mark in ("live", "staged", "published"))
        detail = (f"{target.name} live {shown(name, live)}, staged {shown(name, staged)}, published"
                  f" {shown(name, published)}; the binhost's {shown(name, binhost)}")
        if live is not None and live == binhost and binhost != "{}":
            doctor.report(OK, f"tree {name}", detail)
        else:
            doctor.report(WARN, f"tree {name}", f"{detail}: the next '{PROG} emerge' or 'update' stages it, builds,"
                                                " publishes, then moves the live tree")
    if not followed:
        doctor.report(WARN, "tree", f"tree = binhost, but {target.name} has none of the binhost's repositories"
                                    f" configured: run '{PROG} config push', or set tree = own")


def doctor_binrepos(doctor, env, target):
    remote = env.remote(target)
    tunnel = env.transport == "tunnel"
    kind, current = probe_target(remote)
    expected = credentials_url(env, tunnel)
    shown = target_url(env, tunnel, with_credentials=False)
    entry = configparser.ConfigParser(interpolation=None)
    with contextlib.suppress(configparser.Error):
        entry.read_string(current or "")
    uri = entry.get(BINREPOS_NAME, "sync-uri", fallback=None)
    doctor.binrepos_ok = uri is not None and uri.replace("%%", "%").rstrip("/") == expected.rstrip("/")
    if kind == "file":
        doctor.report(FAIL, "binrepos", f"{target.name}: binrepos.conf is a file; run setup-target for how to fix")
    elif uri is None:
        doctor.report(FAIL, "binrepos", f"{target.name} has no binrepos entry for us: run '{PROG} setup-target'")
    elif not doctor.binrepos_ok:
        written = re.sub(r"//[^/@]*@", "//", uri.replace("%%", "%"))  # no password in reports
        doctor.report(FAIL, "binrepos", f"{target.name}'s sync-uri is {written}, not {shown}:"
                                        f" run '{PROG} setup-target'")
    else:
        doctor.report(OK, "binrepos", f"{target.name} fetches from {shown}")
        if re.match(r"[a-z]+://[^/@]*:[^/@]*@", uri):
            doctor.report(WARN, "credentials", f"{target.name}'s sync-uri holds a password, which Portage puts"
                                               " into wget's command line there while it downloads (ps shows it"
                                               " to local users): see Basic auth in the README for the alternatives")
        verify = entry.get(BINREPOS_NAME, "verify-signature", fallback="true")
        if verify.lower() in ("false", "no", "0"):
            doctor.report(WARN, "verify-signature", f"{target.name} installs unsigned packages")
    with remote.serving(temporary=False):
        problem = remote.fetch_problem()
    if problem:
        doctor.report(FAIL, "fetch", problem)
    else:
        doctor.report(OK, "fetch", f"{target.name} can download {shown}Packages")
    if env.signing_key and enclosing_place(env.gpg_home, [env.root, env.host_chroot]):
        doctor.report(WARN, "signing key", f"not checked: gpg-home {env.gpg_home} lies where builds could"
                                           " write it (see the row above)")
    elif env.signing_key:
        home = target_verify_home(remote)
        try:
            reason = target_accepts_signature(env, remote, home)
        except CannotSign as error:
            doctor.report(WARN, "signing key", str(error))
            return
        if reason is None:
            doctor.report(OK, "signing key", f"{target.name} trusts {env.signing_key}")
        else:
            doctor.report(FAIL, "signing key", f"{target.name} does not accept our signatures ({reason}):"
                                               f" run '{PROG} setup-target'")
    else:
        doctor.report(WARN, "signing key", f"none configured: run '{PROG} keygen'")


def doctor_pkgdir(doctor, env):
    if not os.path.isfile(os.path.join(env.pkgdir, "Packages")):
        doctor.report(WARN, "index", f"{env.pkgdir}/Packages does not exist yet: build something")
    else:
        broken, unindexed = env.packages.index_problems()
        if broken:
            doctor.report(FAIL, "index", f"{'; '.join(broken[:5])}: run 'emaint binhost --fix'"
                                         " with the binhost's ROOT/PORTAGE_CONFIGROOT/PKGDIR")
        elif unindexed:
            doctor.report(WARN, "index", f"not in the index: {', '.join(unindexed[:5])}")
        else:
            doctor.report(OK, "index", f"{env.pkgdir}/Packages matches the files")
    current = env.packages.current_publication()
    if current is not None:
        gone = [entry_path(fields) for fields in env.packages.publication_set(current).values()
                if not os.path.isfile(os.path.join(env.pkgdir, entry_path(fields)))]
        if gone:
            doctor.report(FAIL, "publication", f"publication {current}, which targets get, names missing files"
                                               f" ({', '.join(gone[:5])}): build again, or '{PROG} rollback'")
        else:
            doctor.report(OK, "publication", f"targets get publication {current}"
                                             f" ({len(env.packages.publication_entries(current))} packages)")
    free = shutil.disk_usage(env.pkgdir if os.path.isdir(env.pkgdir) else env.root).free
    doctor.report(OK if free >= MIN_FREE_BYTES else WARN, "disk", f"{free / 1024**3:.1f} GiB free")


def doctor_preflight(doctor, env, target, atoms):
    """The gate's comparison against what the target is offered now, in one ssh round trip: its
    binary-only plan (with its own configuration) must merge every package of its source plan
    with the same version and USE."""
    atoms = atoms or WORLD_UPDATE
    what = " ".join(atoms)
    # doctor reports a stopped server, so it starts none of its own, except behind the tunnel.
    with env.remote(target).serving(temporary=False):
        plan = env.remote(target).plan(atoms, binary="live")
    problem = plan.problem()
    if problem:
        doctor.report(FAIL, "coverage", f"{problem}: fix that on the target (emerge {what} must resolve)")
        return
    gaps = binary_plan_gaps(env, plan, env.packages.published_index_text())
    have = len(plan.packages) - len(gaps)
    if gaps:
        doctor.report(FAIL, "coverage", f"{have} of {len(plan.packages)} packages from the binhost; not"
                                        f" from here: {describe_gaps(gaps[:8])}: '{PROG} emerge {what}'"
                                        " builds what can be built")
    else:
        doctor.report(OK, "coverage", f"{have} of {len(plan.packages)} packages from the binhost")
    complaints = portage_complaints(plan.binary or "")
    if doctor.binrepos_ok is False:
        doctor.report(FAIL, "preflight", f"{target.name} has no working binrepos entry for this binhost"
                                         " (see binrepos above): emerge --getbinpkgonly would get nothing"
                                         f" from here: run '{PROG} setup-target'")
    elif plan.binary_exit or complaints or gaps:
        reasons = complaints + ([f"not on its merge list: {' '.join(p.cpv for p in gaps)}"] if gaps else [])
        doctor.report(FAIL, "preflight", f"emerge --getbinpkgonly {what} on {target.name} would not get"
                                         " everything from the binhost: "
                                         + " | ".join(reasons[:8] or [last_line(plan.binary or "")])
                                         + f": '{PROG} emerge {what}' builds and installs what can be built")
    else:
        doctor.report(OK, "preflight", f"{len(plan.packages)} package(s) to install, all from the binhost")


def parse_repository_timestamps(info_text):
    """{repository: timestamp text} from emerge --info: its "Repositories:" block lists each
    repository with an indented `timestamp:` line (metadata/timestamp.chk) when it has one."""
    stamps = dict(re.findall(r"^Timestamp of repository (\S+): (.+)$", info_text, re.MULTILINE))  # older
    lines = info_text.split("Repositories:", 1)[1].splitlines() if "Repositories:" in info_text else []
    name = None
    for line in lines:
        if line and not line[0].isspace():
            if "=" in line:  # the variables after the block
                break
            name = line.strip()
        elif name and line.strip().startswith("timestamp:"):
            stamps[name] = line.split(":", 1)[1].strip()
    return stamps


def repository_snapshots(host):
    """{repository: snapshot datetime or None} of the build host's own repositories."""
    emerge = host.program("emerge", "it comes with Portage")
    result = host.read([emerge, "--info", "--verbose=n"], {"LC_ALL": "C"}, check=False)
    snapshots = {}
    for name, stamp in parse_repository_timestamps(result.stdout or "").items():
        try:
            snapshots[name] = email.utils.parsedate_to_datetime(stamp)
        except (TypeError, ValueError):
            snapshots[name] = None
    return snapshots


def doctor_host_chroot(doctor, env):
    chroot = env.host_chroot
    if not os.path.isdir(chroot):
        doctor.report(FAIL, "host chroot", f"{chroot} does not exist: run '{PROG} init --host-chroot {chroot}'")
        return
    check_chroot_privileges(chroot)
    mounts = HostMounts(chroot, env.runner, env.output)
    with mounts.guard():
        ours, in_use = mounts.recorded(ours=True), mounts.in_use()
        others = [point for point in mount_points()
                  if point in {mounts.mount_point(name) for name, _ in CHROOT_MOUNTS}
                  and point not in {point for _, point in ours}]
    if ours and not in_use:
        doctor.report(WARN, "chroot mounts", f"left mounted by a build that did not finish:"
                                             f" {', '.join(point for _, point in ours)}: the next build"
                                             " in the chroot removes them")
    elif ours:
        doctor.report(OK, "chroot mounts", f"{len(ours)} in use by a running build")
    else:
        doctor.report(OK, "chroot mounts", "none left behind")
    if others:
        doctor.report(OK, "chroot mounts", f"mounted by someone else, used as they are and never"
                                           f" unmounted by {PROG}: {', '.join(sorted(set(others)))}")
    snapshots = repository_snapshots(env.host_for())
    if not snapshots:
        doctor.report(WARN, "snapshot", f"no repository in {chroot} has a snapshot date: run"
                                        f" '{PROG} init --host-chroot {chroot}' to sync it")
    now = datetime.datetime.now(datetime.timezone.utc)
    for name, when in sorted(snapshots.items()):
        age = (now - (when if when and when.tzinfo else now)).days if when else None
        if age is None or age > SNAPSHOT_WARN_DAYS:
            doctor.report(WARN, "snapshot", f"{name}: {describe_snapshot(when)}, older than"
                                            f" {SNAPSHOT_WARN_DAYS} days: sync with"
                                            f" '{PROG} init --host-chroot {chroot}'")
        else:
            doctor.report(OK, "snapshot", f"{name}: {describe_snapshot(when)} ({age} days old)")
    free = shutil.disk_usage(chroot).free
    doctor.report(OK if free >= MIN_FREE_BYTES else WARN, "chroot disk",
                  f"{free / 1024**3:.1f} GiB free in {chroot}"
                  + ("" if free >= MIN_FREE_BYTES else ": builds unpack and compile in its /var/tmp"))


def run_doctor(env, target, atoms):
    doctor = Doctor()
    if env.host_chroot:  # first: before anything of ours is mounted there
        doctor.run("host chroot", doctor_host_chroot, env)
    session = contextlib.nullcontext()
    if not doctor.failed:
        try:
            session = chroot_session(env)
        except BinhostError as error:  # Portage cannot run there (another architecture, no emulation)
            doctor.report(FAIL, "build method", str(error))
    with session:
        doctor.run("binhost root", doctor_binhost_root_shape, env)
        doctor.run("build method", doctor_build_method, env)
        doctor.run("configuration", doctor_configuration, env, target)
        doctor.run("binrepos", doctor_binrepos, env, target)
        doctor.run("tree", doctor_tree, env, target)
        doctor.run("index", doctor_pkgdir, env)
        doctor.run("preflight", doctor_preflight, env, target, atoms)
    return doctor


# ---- init: the binhost root, or a host chroot, from a verified stage3 --------------------------

DEFAULT_MIRROR = "https://distfiles.gentoo.org"
GENTOO_RELEASE_KEYS = "/usr/share/openpgp-keys/gentoo-release.asc"
GENTOO_KEYS_URL = "https://qa-reports.gentoo.org/output/service-keys.gpg"
DEFAULT_VARIANT = "openrc"
# uname -m -> Gentoo's release arch directory
GENTOO_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "i686": "x86", "i586": "x86",
                 "riscv64": "riscv", "ppc64le": "ppc64", "ppc64": "ppc64", "armv7l": "arm"}
# Release directories whose stage3 files carry another name (releases/x86/.../stage3-i686-...).
STAGE3_FILE_ARCH = {"x86": "i686"}
DECOMPRESS_OPTIONS = {".xz": "--xz", ".zst": "--zstd", ".bz2": "--bzip2", ".gz": "--gzip"}
DOWNLOAD_CHUNK = 1024 * 1024

# What the target runs: its arch, libc, init system, profile and multilib choice.
TARGET_SYSTEM_SCRIPT = r"""
echo "machine $(uname -m)"
echo "arch $(portageq envvar ARCH 2>/dev/null)"
echo "chost $(portageq envvar CHOST 2>/dev/null)"
if [ -d /run/systemd/system ] || readlink /sbin/init 2>/dev/null | grep -q systemd; then
    echo "init systemd"
else
    echo "init openrc"
fi
echo "profile $(readlink "${1%/}/etc/portage/make.profile" 2>/dev/null)"
"""


# A CHOST's first word, for a target whose Portage names no ARCH.
CHOST_ARCHES = (("x86_64", "amd64"), ("aarch64", "arm64"), ("arm", "arm"), ("i686", "x86"), ("i586", "x86"),
                ("riscv64", "riscv"), ("powerpc64", "ppc64"))


def stage3_variant(machine, chost, init, profile, portage_arch=""):
    """(arch, variant, reasons) matching what the target runs, as Gentoo names its stage3s. The
    userland decides the arch: Portage's ARCH, else its CHOST, and the kernel's machine (uname -m)
    only without them (a 64-bit kernel may run a 32-bit userland: aarch64 under arm)."""
    kernel = GENTOO_ARCHES.get(machine, machine)
    portage_arch = portage_arch if re.fullmatch(r"[a-z0-9][a-z0-9_-]*", portage_arch) else ""  # a URL's path word
    from_chost = next((arch for prefix, arch in CHOST_ARCHES if chost.startswith(prefix)), "")
    arch = portage_arch or from_chost or kernel
    if arch == kernel:
        reasons = [f"{machine} is {arch}"]
    else:
        said = f"Portage's ARCH is {arch}" if portage_arch else f"its CHOST {chost} is {arch}"
        reasons = [f"{said} (uname -m says {machine}: the kernel's)"]
    systemd = init == "systemd" or "systemd" in profile
    found = [(part, reason) for part, present, reason in (
        ("musl", "musl" in chost or "/musl" in profile, f"{chost or profile} is musl"),
        ("nomultilib", arch == "amd64" and "no-multilib" in profile, "the profile is no-multilib"),
        ("hardened", "hardened" in profile, "the profile is hardened"),
        ("systemd", systemd, "it boots with systemd"), ("openrc", not systemd, "it boots with OpenRC"))
        if present]
    parts = [part for part, _ in found]
    reasons += [reason for _, reason in found]
    # Gentoo's names: hardened-nomultilib-openrc, musl (+OpenRC), musl-hardened, ...
    order = {"hardened": 0, "nomultilib": 1, "musl": -1}
    parts.sort(key=lambda part: order.get(part, 2))
    variant = "-".join(parts)
    variant = {"musl-openrc": "musl", "musl-hardened-openrc": "musl-hardened"}.get(variant, variant)
    return arch, variant, reasons


def parse_latest(text, file_arch=None, variant=None):
    """The relative path of the newest stage3 in a latest-stage3-*.txt (comments skipped). With
    file_arch and variant, only a path of that very stage3 is accepted: a mirror must not hand us
    another variant's (genuinely signed) list, or a path leaving the autobuilds directory."""
    name = rf"stage3-{re.escape(file_arch)}-{re.escape(variant)}" if file_arch else r"stage3-[\w.-]+"
    pattern = re.compile(rf"^\d{{8}}T\d{{6}}Z/{name}-\d{{8}}T\d{{6}}Z\.tar\.(xz|zst|bz2)$")
    for line in text.splitlines():
        words = line.split()
        if words and not line.startswith("#") and pattern.match(words[0]):
            return words[0], int(words[1]) if len(words) > 1 and words[1].isdigit() else None
    raise BinhostError(f"the latest-stage3 list names no stage3-{file_arch or '*'}-{variant or '*'}"
                       " tarball: wrong --arch/--variant, or a wrong mirror")


def parse_digests(text, name):
    """{algorithm: hex} for the file `name` from a .DIGESTS file (`# SHA512 HASH` blocks)."""
    digests, algorithm = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            words = line[1:].split()
            algorithm = words[0].lower() if len(words) == 2 and words[1] == "HASH" else None
        elif algorithm and line.strip():
            value, _, file_name = line.partition(" ")
            if file_name.strip().lstrip("*") == name:
                digests[algorithm] = value.lower()
    return {algorithm: value for algorithm, value in digests.items() if algorithm in ("sha512", "blake2b")}


MAX_SMALL_FILE = 1024 * 1024


def fetch_small(url, what):
    """A small file (latest list, DIGESTS, signature) into memory, at most 1 MiB."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(MAX_SMALL_FILE + 1)
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise BinhostError(f"cannot download {what} from {url}: {error}") from None
    if len(data) > MAX_SMALL_FILE:
        raise BinhostError(f"{what} at {url} is larger than 1 MiB: that is not what it should be")
    return data


class Progress:
    """A one-line progress bar on a terminal, nothing otherwise."""

    def __init__(self, output, name, total):
        self.output, self.name, self.total = output, name, total
        self.enabled = output.out.isatty() and output.verbosity > 0
        self.shown = -1

    def update(self, done):
        if not self.enabled or not self.total:
            return
        percent = done * 100 // self.total
        if percent != self.shown:
            self.shown = percent
            bar = "=" * (percent // 4)
            self.output.progress(f">>> {self.name} [{bar:<25}] {percent:3d}% {done // 1048576} MiB")

    def finish(self):
        if self.enabled and self.shown >= 0:
            self.output.progress("", done=True)


def download(url, destination, runner, output, digests):
    """Download url to destination, resuming a previous partial download, hashing as the data
    arrives; returns {algorithm: hexdigest}. The partial file is renamed only when complete."""
    partial = destination + ".partial"
    hashes = {algorithm: hashlib.new(algorithm) for algorithm in digests}
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    if offset:
        output.info(f"Resuming {os.path.basename(destination)} at {offset} bytes")
        with open(partial, "rb") as handle:
            for chunk in iter(lambda: handle.read(DOWNLOAD_CHUNK), b""):
                for value in hashes.values():
                    value.update(chunk)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(partial, "ab") as handle:
            if offset and response.status != 206:  # the server ignored Range: start again
                handle.truncate(0)
                hashes = {algorithm: hashlib.new(algorithm) for algorithm in digests}
                offset = 0
            total = offset + int(response.headers.get("Content-Length") or 0)
            progress = Progress(output, os.path.basename(destination), total)
            done = offset
            for chunk in iter(lambda: response.read(DOWNLOAD_CHUNK), b""):
                handle.write(chunk)
                for value in hashes.values():
                    value.update(chunk)
                done += len(chunk)
                progress.update(done)
            progress.finish()
            if total > offset and done < total:
                raise ConnectionResetError(f"connection closed after {done} of {total} bytes")
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:  # 416 to our Range: the file is complete already
            raise BinhostError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise BinhostError(f"download of {url} interrupted ({error!r}): run init again to resume") from None
    runner.rename(partial, destination)
    return {algorithm: value.hexdigest() for algorithm, value in hashes.items()}


def check_init_root(root, force):
    if os.path.lexists(root) and not os.path.isdir(root):
        raise BinhostError(f"{root} exists and is not a directory")
    if os.path.isdir(root) and os.listdir(root) and not force:
        raise BinhostError(f"{root} is not empty: it may hold a binhost already; use init --force to"
                           " replace it (the old one is kept beside it)")


# uname -m -> the catalyst subarch Gentoo names that machine's stage3s by, when an arch has several.
MACHINE_SUBARCHES = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i686", "i586": "i486",
                     "armv7l": "armv7a_hardfp", "armv6l": "armv6j_hardfp", "riscv64": "rv64_lp64d",
                     "ppc64le": "ppc64le", "ppc64": "ppc64", "ppc": "ppc"}


def chost_subarch(chost):
    """The catalyst subarch of the stage3s for a CHOST whose first word names it: arm's
    (armv7a-unknown-linux-gnueabihf: armv7a_hardfp). It decides over the kernel's machine, which
    says aarch64 for a 32-bit userland on a 64-bit kernel."""
    cpu = chost.split("-", 1)[0]
    if re.fullmatch(r"armv\d+[a-z]*", cpu):
        return cpu + ("_hardfp" if chost.endswith("hf") else "")
    return None


def stage3_subarch(base, arch, variant, machine, chost=""):
    """The subarch of the stage3s of this variant that the arch's latest-stage3.txt lists, picked
    for the target's CHOST, else its machine, when there are several. Only a name is taken from
    this list; the stage3 itself is then found and verified through its own signed list."""
    text = fetch_small(f"{base}/latest-stage3.txt", f"the list of {arch} stage3s").decode("utf-8", "replace")
    subarches = sorted(set(re.findall(rf"stage3-([A-Za-z0-9_]+)-{re.escape(variant)}-\d{{8}}T\d{{6}}Z\.tar\.",
                                      text)))
    if len(subarches) == 1:
        return subarches[0]
    for wanted in (chost_subarch(chost), MACHINE_SUBARCHES.get(machine)):
        if wanted in subarches:
            return wanted
    if not subarches:
        raise BinhostError(f"{base}/latest-stage3.txt lists no {variant} stage3: choose --variant"
                           " from what it lists, or give --stage3 URL")
    raise BinhostError(f"{arch} has {variant} stage3s for {', '.join(subarches)}: give --stage3 URL"
                       f" of the one for this machine ({chost or machine})")


def stage3_url(args, arch, variant, stage3, keys, output):
    if stage3:
        return stage3
    base = f"{args.mirror.rstrip('/')}/releases/{arch}/autobuilds"
    file_arch = STAGE3_FILE_ARCH.get(arch, arch)
    latest_url = f"{base}/latest-stage3-{file_arch}-{variant}.txt"
    try:
        latest = fetch_small(latest_url, f"the list of {arch} {variant} stage3s")
    except BinhostError:
        # Gentoo names stage3s by catalyst subarch (armv7a_hardfp, rv64_lp64d, ppc64le, i686):
        # the arch directory's latest-stage3.txt lists what there is.
        file_arch = stage3_subarch(base, arch, variant, getattr(args, "target_machine", None)
                                   or os.uname().machine, getattr(args, "target_chost", ""))
        latest_url = f"{base}/latest-stage3-{file_arch}-{variant}.txt"
        latest = fetch_small(latest_url, f"the list of {file_arch} {variant} stage3s")
    text = keys.verified_text(latest, latest_url) if keys else latest.decode("utf-8", "replace")
    path, _size = parse_latest(text, file_arch, variant)
    output.info(f"Newest stage3-{arch}-{variant}: {path}")
    return f"{base}/{path}"


def file_digests(path, algorithms):
    hashes = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(DOWNLOAD_CHUNK), b""):
            for value in hashes.values():
                value.update(chunk)
    return {algorithm: value.hexdigest() for algorithm, value in hashes.items()}


def extract_stage3(tarball, root, runner, output, keep=()):
    """Extract as the Handbook says, into a directory beside root that becomes root only when
    complete: a failed init leaves nothing behind. What keep names (paths relative to root: the
    signing key, PKGDIR) moves from a previous root into the new one."""
    parent = os.path.dirname(root.rstrip("/")) or "/"
    suffix = os.path.splitext(tarball)[1]
    decompress = [DECOMPRESS_OPTIONS[suffix]] if suffix in DECOMPRESS_OPTIONS else []

    def tar(directory):
        return ["tar", "--extract", "--preserve-permissions", "--xattrs-include=*.*", "--numeric-owner",
                *decompress, "--file", tarball, "--directory", directory]

    if runner.pretend:
        staging = os.path.join(parent, f".{os.path.basename(root.rstrip('/'))}.new.XXXXXX")
        runner.run(tar(staging))
        output.info(f"... then {staging} is renamed to {root}"
                    + (f", keeping {', '.join(keep)} of the previous one" if keep and os.path.isdir(root) else ""))
        return
    staging = runner.make_staging_directory(parent, f".{os.path.basename(root.rstrip('/'))}.new.", 0o700)
    output.action(f"Extracting {os.path.basename(tarball)} into {root}")
    old, moved = None, []
    try:
        runner.run(tar(staging), capture=True, describe=f"extracting {os.path.basename(tarball)}")
        os.chmod(staging, 0o755)
        if os.path.isdir(root) and os.listdir(root):
            old = f"{root.rstrip('/')}.{timestamp()}.bak"
            # Kept things move into the new tree first, so an error leaves the old root whole.
            for relative in keep:
                source, destination = os.path.join(root, relative), os.path.join(staging, relative)
                if os.path.lexists(source):
                    runner.make_directory(os.path.dirname(destination))
                    if os.path.isdir(destination) and not os.path.islink(destination):
                        runner.remove_tree(destination, ignore_errors=False)
                    runner.rename(source, destination)
                    moved.append((source, destination))
                    output.info(f"Keeping {relative} (signing key or packages) in the new root")
            runner.rename(root, old)
            output.info(f"The previous {root} is kept as {old}")
        elif os.path.isdir(root):
            runner.remove_directory(root)
        runner.rename(staging, root)
    except BaseException:
        if not os.path.exists(root) and old:
            runner.rename(old, root)
        for source, destination in reversed(moved):  # back where they were, before staging goes
            if os.path.lexists(destination) and not os.path.lexists(source):
                runner.rename(destination, source)
        runner.remove_tree(staging)
        raise


def install_stage3(args, arch, variant, stage3, root, runner, output, keep=()):
    """Download (or take) a stage3, check its digests and PGP signature, extract it as root.
    Returns (file name, SHA-512), or None under --pretend."""
    keyring = args.keyring or GENTOO_RELEASE_KEYS
    keys = None
    if args.no_verify_pgp:
        output.warn("--no-verify-pgp: the stage3 is checked against its DIGESTS only, which came"
                    " from the same server")
    elif not os.path.isfile(keyring):
        raise BinhostError(f"Gentoo's release keys are not at {keyring}: pass --keyring FILE (on Gentoo:"
                           " emerge sec-keys/openpgp-keys-gentoo-release; elsewhere download them from"
                           f" {GENTOO_KEYS_URL} and check the fingerprints on"
                           " https://www.gentoo.org/downloads/signatures/), or --no-verify-pgp to trust"
                           " the digests alone")
    else:
        with open(keyring, "rb") as handle:
            keys = TrustedKeys(handle.read(), "Gentoo's release keys", runner)
    downloads = None
    try:
        url = stage3_url(args, arch, variant, stage3, keys, output)
        remote = "://" in url
        name = os.path.basename(urllib.parse.urlsplit(url).path if remote else url)

        def companion(suffix):  # the .DIGESTS and .asc published beside the tarball
            if remote:
                return fetch_small(url + suffix, name + suffix)
            try:
                with open(url + suffix, "rb") as handle:
                    return handle.read()
            except OSError as error:
                raise BinhostError(f"cannot read {url + suffix}: {error.strerror}") from None

        digests_data = companion(".DIGESTS")
        # Signed, or the DIGESTS could pair another genuinely signed tarball with our file name.
        digests_text = (keys.verified_text(digests_data, f"{name}.DIGESTS") if keys
                        else digests_data.decode("utf-8", "replace"))
        expected = parse_digests(digests_text, name)
        if "sha512" not in expected:
            raise BinhostError(f"{name}.DIGESTS has no SHA512 for {name}: refusing an unverifiable stage3")
        parent = os.path.dirname(root.rstrip("/")) or "/"
        downloads = os.path.join(parent, f".{os.path.basename(root.rstrip('/'))}.download")
        tarball = os.path.join(downloads, name) if remote else os.path.abspath(url)
        if runner.pretend:
            output.info(f"Would download {url} to {tarball}, check its digests and signature, and:")
            extract_stage3(tarball, root, runner, output, keep)
            return None
        if os.geteuid() != 0:
            raise BinhostError("init must run as root: a stage3 holds files of other owners and devices")
        if remote:
            runner.make_directory(downloads)
            output.action(f"Downloading {url}")
            actual = download(url, tarball, runner, output, expected)
        else:
            actual = file_digests(tarball, expected)
        for algorithm, value in expected.items():
            if actual[algorithm] != value:
                if remote:
                    runner.remove(tarball)
                raise BinhostError(f"{algorithm.upper()} of {name} does not match its DIGESTS: the file"
                                   " is corrupt or was tampered with" + (" (deleted; run init again)"
                                                                         if remote else ""))
        output.info(f"{name}: {' and '.join(a.upper() for a in expected)} match the DIGESTS")
        if keys:
            signature = tarball + ".asc"
            if remote:
                runner.write_file(signature, companion(".asc"), backup=False)
            keys.verify_detached(signature, tarball, name)
            output.info(f"{name}: PGP signature good ("
                        + (f"a key from {args.keyring}" if args.keyring else "Gentoo release key") + ")")
    finally:
        if keys:
            keys.close()
        if downloads and os.path.isdir(downloads) and not os.listdir(downloads):
            runner.remove_directory(downloads)  # a refused download leaves nothing behind
    replacing = os.path.isdir(root) and os.listdir(root)  # --force: no build may run in the root it replaces
    with root_replacement_lock(root, output, "init --force again") if replacing else contextlib.nullcontext():
        extract_stage3(tarball, root, runner, output, keep)
    if remote:
        runner.remove_tree(downloads)
    return name, expected["sha512"]


def init_binhost(config, args, runner, output):
    env = config.environment_for_command(args.target)
    root = env.root
    check_init_root(root, args.force)
    arch, variant = args.arch, args.variant
    if args.like_target:
        target = config.target(args.target)
        probe = env.remote(target).script(TARGET_SYSTEM_SCRIPT, target.root, changes=False,
                                          what="asking the target what it runs")
        facts = dict(line.split(" ", 1) for line in probe.stdout.splitlines() if " " in line)
        like_arch, like_variant, reasons = stage3_variant(facts.get("machine", ""), facts.get("chost", ""),
                                                          facts.get("init", ""), facts.get("profile", ""),
                                                          facts.get("arch", "").strip())
        arch, variant = arch or like_arch, variant or like_variant  # explicit options win
        args.target_machine, args.target_chost = facts.get("machine"), facts.get("chost", "").strip()
        output.info(f"{target.name}: stage3-{like_arch}-{like_variant}, because {', '.join(reasons)}")
    arch = arch or GENTOO_ARCHES.get(os.uname().machine, os.uname().machine)
    variant = variant or DEFAULT_VARIANT
    # init --force replaces the root, but not the packages kept in it (the key lives outside).
    keep = [os.path.relpath(path, root) for path in (env.pkgdir,)
            if os.path.relpath(path, root).split(os.sep)[0] not in ("..", ".")]
    installed = install_stage3(args, arch, variant, args.stage3, root, runner, output, keep)
    if installed is None:  # --pretend
        if not env.host_chroot and env.build_method != "root":
            output.info("Would then sync inside the root, with its own Portage (emerge --sync NAME), each repository"
                        " its configuration names that this machine lacks, when it builds with the chroot method"
                        " (README: 'Build methods')")
        return
    name, sha512 = installed
    runner.make_directory(os.path.join(root, "var/cache/binpkgs"))
    note = {"stage3": name, "stage3-sha512": sha512,
            "stage3-installed": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if env.root == config.binhost.root:  # the notes describe [binhost] root
        runner.write_file(config.path, set_config_values(read_text(config.path), "binhost", note))
    link_repositories_into(env)
    try:  # the root is in place: what its repositories still lack, the first build syncs again
        sync_repositories(env, missing_only=True)
    except BinhostError as error:
        output.warn(f"{error} (the stage3 is in place; the first build, update or add-target syncs again)")
    output.info(f"Next: '{PROG} config pull' copies the target's Portage configuration into {root}")


def sync_host_repository(host, how, runner, output):
    """emerge-webrsync (a signed snapshot, the Handbook's first sync) or emerge --sync."""
    argv = [host.program("emerge-webrsync", "it comes with Portage")] if how == "webrsync" \
        else [host.program("emerge", "it comes with Portage"), "--sync"]
    command = " ".join([os.path.basename(argv[0])] + argv[1:])
    output.action(f"Syncing the ebuild repository in {host.where}: {command}")
    result = host.run(argv, check=False, own_group=True)
    if result is not None and result.returncode != 0:
        raise BinhostError(f"{command} failed in {host.where}"
                           f" (exit {result.returncode}): see its output above; run init --host-chroot"
                           " again to retry")


def report_snapshot(host, output):
    snapshots = repository_snapshots(host)
    if not snapshots:
        output.warn(f"No repository in {host.where} has a snapshot date (metadata/timestamp.chk):"
                    " is it synced?")
    for name, when in sorted(snapshots.items()):
        output.info(f"Repository {name} in {host.where}: snapshot of {describe_snapshot(when)}")


def init_host_chroot(config, args, runner, output):
    """init --host-chroot DIR: a Gentoo host environment for a build machine without Gentoo, its
    repository synced, and the binhost environment inside it."""
    env = config.environment_for_command(args.target)
    chroot = env.host_chroot
    if os.path.lexists(chroot) and not os.path.isdir(chroot):
        raise BinhostError(f"{chroot} exists and is not a directory: choose another --host-chroot")
    if not runner.pretend:
        check_chroot_privileges(chroot)
    if os.path.isdir(chroot) and set(os.listdir(chroot)) - {"lost+found"}:
        output.info(f"Using the existing host environment in {chroot} (to start over: check that"
                    f" nothing is mounted in it with 'findmnt -R {chroot}', then"
                    f" 'rm -rf --one-file-system {chroot}')")
    elif os.path.ismount(chroot):
        # The stage3 is extracted beside the directory and renamed into place when complete.
        raise BinhostError(f"{chroot} is a mount point: use a directory on that filesystem, such as"
                           f" {os.path.join(chroot, 'gentoo')}")
    else:
        # This environment runs here, so it is this machine's arch with generic CFLAGS, whatever
        # the target is.
        machine = os.uname().machine
        arch = GENTOO_ARCHES.get(machine, machine)
        output.action(f"Creating the Gentoo host environment in {chroot} (stage3-{arch}-{DEFAULT_VARIANT},"
                      f" this machine is {machine})")
        if install_stage3(args, arch, DEFAULT_VARIANT, args.host_stage3, chroot, runner, output) is None:
            output.info("... then the repository is synced inside it, and the binhost root created")
            return
    host = env.host_for()
    host.sync_resolv_conf()
    if args.sync_with != "none":
        sync_host_repository(host, args.sync_with, runner, output)
    if not runner.pretend:
        report_snapshot(host, output)
    if args.host_chroot:
        runner.write_file(config.path, set_config_values(read_text(config.path), "host", {"chroot": chroot}))
    if os.path.isdir(env.root) and os.listdir(env.root) and not args.force:
        output.info(f"Keeping the binhost root {env.root} (init --force replaces it)")
        link_repositories_into(env)
        return
    host_keys = under(chroot, GENTOO_RELEASE_KEYS)
    if not args.keyring and not os.path.isfile(GENTOO_RELEASE_KEYS) and os.path.isfile(host_keys):
        # Not Gentoo here: the verified host stage3 brought Gentoo's release keys along.
        output.info(f"Verifying the binhost's stage3 with the release keys of the host environment,"
                    f" {host_keys}")
        args.keyring = host_keys
    init_binhost(config, args, runner, output)


# ---- onboarding: add-target and remove-target --------------------------------------------------

SSH_LOGIN_WAIT = 10  # seconds add-target waits for an answer before calling the host unreachable


def ssh_option_value(target, name, flag):
    """The value of an ssh option given in ssh-options as '-o Name=value', '-oName value' or FLAG."""
    options, value = target.ssh_options, None
    for index, word in enumerate(options):
        following = options[index + 1] if index + 1 < len(options) else ""
        if word == flag:
            value = following
        elif word.startswith(flag) and len(word) > len(flag) and flag != "-o":
            value = word[len(flag):]
        option = following if word == "-o" else word[2:] if word.startswith("-o") else ""
        key, _, setting = option.replace(" ", "=", 1).partition("=")
        if key.lower() == name.lower() and setting:
            value = setting
    return value


def ssh_login_command(target):
    """ssh with the target's port and options, interactive: the user's own first login."""
    options, words = [], list(target.ssh_options)
    while words:
        word = words.pop(0)
        option = (words.pop(0) if words else "") if word == "-o" else word[2:] if word.startswith("-o") else None
        if option is None:
            options.append(word)
        elif not option.lower().startswith("batchmode"):
            options += ["-o", option]
    port = ["-p", str(target.ssh_port)] if target.ssh_port != DEFAULT_SSH_PORT else []
    return ["ssh", *port, *options, target.host]


def ssh_key_hint(target):
    """The one step that lets this machine log in to the target without a password, with the key
    and port the target's ssh options name."""
    identity = ssh_option_value(target, "identityfile", "-i")
    port = ssh_option_value(target, "port", "-p") or (
        str(target.ssh_port) if target.ssh_port != DEFAULT_SSH_PORT else None)
    keys = [path for path in (os.path.expanduser(f"~/.ssh/id_{kind}.pub") for kind in ("ed25519", "ecdsa", "rsa"))
            if os.path.isfile(path)]
    make_key = "" if keys or identity else "ssh-keygen -t ed25519 && "
    argv = ["ssh-copy-id", *(["-i", identity] if identity else []), *(["-p", port] if port else []), target.host]
    public = f"{identity}.pub" if identity else (keys[0] if keys else "~/.ssh/id_ed25519.pub")
    return f"{make_key}{format_command(argv)} (or append {public} to ~/.ssh/authorized_keys of the login user there)"


def ssh_login_problem(target, runner):
    """None when ssh logs in to the target without asking anything, else what went wrong and
    the step that fixes it, told apart by ssh's own messages."""
    remote = Remote(target, runner, runner.output)
    argv = remote.ssh_base() + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_LOGIN_WAIT}",
                                "--", target.host, "true"]
    result = runner.read(argv, check=False)
    if result.returncode == 0:
        return None
    said = as_text(result.stderr or "")
    host = target.host.rpartition("@")[2]
    port = ssh_option_value(target, "port", "-p") or str(target.ssh_port)
    last = last_line(said) or f"ssh exit {result.returncode}"
    if re.search(r"Could not resolve hostname|Name or service not known|No address associated", said):
        return f"{host} is not a host name this machine knows ({last}): check the spelling, or give its address"
    if "Connection refused" in said:
        return (f"nothing answers on port {port} of {host} ({last}): start sshd there, or give its"
                " port with --ssh-port")
    if re.search(r"timed out|No route to host|Network is unreachable", said):
        return (f"{host} did not answer within {SSH_LOGIN_WAIT} s ({last}): check that it is on and"
                f" the address is right, and that no firewall drops port {port}")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in said:
        known = host if port == str(DEFAULT_SSH_PORT) else f"[{host}]:{port}"
        return (f"{host}'s host key is not the one this machine knows: if it was reinstalled, run"
                f" ssh-keygen -R {shlex.quote(known)} and log in once with ssh to accept the new key"
                " (compare its fingerprint on the console)")
    if "Host key verification failed" in said or "host key is known" in said:
        return (f"{host}'s host key is not known yet ({last}): log in once with"
                f" {format_command(ssh_login_command(target))} and accept it, comparing its fingerprint")
    return f"cannot log in to {target.host} without a password ({last}): run {ssh_key_hint(target)}"


def choose_environment(config, target, runner, output, known=False):
    """(root, why) of the binhost environment a new target gets: one whose configuration is the
    target's (by fingerprint, as doctor --all compares them), else one no other target uses, else
    a new one beside [binhost] root."""
    env = config.environment_for()
    remote = Remote(target, runner, output)
    target_tar = sanitized_config_tar(read_config_tar(remote, target.root), target.name, output)
    target_tar = resolve_march_native_in(target_tar, env, target)
    wanted = configuration_fingerprint(config_members(target_tar))
    free = None
    for environment in config.environments().values():
        users = sorted(other.name for other in config.targets.values()
                       if other.name != target.name and config.environment_for(other).root == environment.root)
        if not os.path.isdir(os.path.join(environment.root, "etc/portage")):
            free = free or (environment.root, "a new binhost environment")
            continue
        with chroot_session(environment):
            theirs = configuration_fingerprint(config_members(read_config_tar(LocalShell(environment),
                                                                              environment.root)))
        if theirs == wanted and known and environment.root == (target.binhost_root or env.root):
            return environment.root, f"{environment.root}, as before (fingerprint {wanted})"
        if theirs == wanted:
            return environment.root, (f"the configuration of {', '.join(users) or 'the binhost'} is the same"
                                      f" (fingerprint {wanted}): sharing {environment.root}")
        if not users:
            free = free or (environment.root, f"{environment.root} is used by no other target")
    if free:
        return free
    root = f"{env.root.rstrip('/')}-{target.name}"
    return root, f"its configuration (fingerprint {wanted}) differs from every environment's: a new one, {root}"


def target_reaches_us(env, target):
    """Whether the target can download from our URL: asked with a server on the configured
    address and port for the moment, or the serve of ours already there. An HTTP error counts
    as reaching us only when it is ours (a 404 before the first build); another program on the
    port, or an answer our server never saw, does not."""
    remote = env.remote(target)
    answer = who_answers(env.bind, env.port, tls=bool(env.tls_cert))
    if answer is not None and not is_our_server(answer):
        program = answer or "a server that does not name itself"
        raise BinhostError(f"port {env.port} here is answered by {program}, not by {PROG}: stop that"
                           f" program, or set port (and url) in [binhost] of {env.config_path}, then"
                           f" add-target {target.name} again")
    with (background_server({env.env_name: env}, env.output, env.bind, env.port, tunnel=False)
          if answer is None else contextlib.nullcontext()) as server:
        tool, code = remote.fetch_index()
    if tool == "none":
        raise BinhostError(f"{fetch_problem(env, target, (tool, code))}, then add-target again")
    answered = code in FETCH_ANSWERED.get(tool, ()) or (tool, code) == ("wget", "6")  # 404, 401
    if answered and server is not None and not server.answered:
        return False, f"{tool} exit {code}: an HTTP error from a server that is not this one (check the url)"
    return code == "0" or answered, f"{tool} exit {code}"


def record_signing_key(config, env, fingerprint):
    values = {"signing-key": fingerprint or "<new fingerprint>", "gpg-home": env.gpg_home}
    text = read_text(config.path) or f"# {PROG} configuration; see README.md for every key.\n"
    env.runner.write_file(config.path, set_config_values(text, "binhost", values))


def show_first_pull(env, target):
    """add-target --pretend on a root step 2 has not made: the target's configuration is read
    (read-only) and every file the pull would write is shown, with the command that writes them."""
    stream = read_config_tar(env.remote(target), target.root)
    env.output.text(describe_config_changes({}, config_members(stream), f"binhost:{env.root}",
                                            f"{target.name}:{target.root}"), always=True)
    env.output.info(f"Would unpack it into {env.root}/etc/portage (then link the repositories it names), with:")
    env.runner.run(["sh", "-c", INSTALL_CONFIG_SCRIPT, "gentoo-binhost", env.root,
                    hashlib.sha256(stream).hexdigest(), timestamp(), BINREPOS_NAME + ".conf", OWN_REPOS_ENTRY])
    env.output.info(f"Would check {target.name}'s CPU against the new root's compiler, as"
                    f" '{PROG} --target {target.name} cpu' does")


def add_target(config, args, runner, output):
    """add-target NAME [USER@]HOST: every step from nothing to a target that installs from us,
    each said in one line, each skipped when done already."""
    if args.ssh_port is not None and not 0 < args.ssh_port <= 65535:
        raise UsageError(f"--ssh-port {args.ssh_port}: use a port number (1-65535)")
    name = args.name
    values = {"host": args.host}
    values.update((key, value) for key, value in (
        ("ssh-port", None if args.ssh_port is None else str(args.ssh_port)),
        ("ssh-options", " ".join(shlex.quote(option) for option in args.ssh_option or ())),
        ("root", args.root), ("path", args.path)) if value)
    existing = config.targets.get(name)
    if not existing:  # a new target follows the binhost's snapshot; one set up before keeps its choice
        values["tree"] = "binhost"
    wanted = TargetSettings(name, values, config.path)
    if existing and existing.host.rpartition("@")[2] != wanted.host.rpartition("@")[2]:
        raise UsageError(f"{config.path}: [target {name}] is {existing.host}, not {wanted.host}: run"
                         f" '{PROG} remove-target {name}' first, or choose another name")

    def write_config(section, section_values):
        runner.write_file(config.path, set_config_values(read_text(config.path), section, section_values))

    target, changed = wanted, {}
    if existing:  # a re-run corrects what the last one was given; what it is not given stays
        target = copy.copy(existing)
        for key in values:  # host, ssh-port, ssh-options, root, path (tree only for a new target)
            attribute = key.replace("-", "_")
            if getattr(existing, attribute) != getattr(wanted, attribute):
                setattr(target, attribute, getattr(wanted, attribute))
                changed[key] = values[key]
    output.action(f"1/5 ssh: logging in to {target.host} without a password (waiting up to {SSH_LOGIN_WAIT} s)")
    if runner.pretend:
        output.text(format_command(Remote(target, runner, output).ssh_base()
                                   + ["-o", "BatchMode=yes", "--", target.host, "true"]) + "  # read-only: runs",
                    always=True)
    problem = ssh_login_problem(target, runner)
    if problem:
        raise BinhostError(f"{problem}; then add-target again: nothing was written")
    if existing and not changed:
        output.info(f"[target {name}] is in {config.path} already")
    else:
        if changed:
            output.info(f"[target {name}] is in {config.path} already: changing "
                        + ", ".join(f"{key} = {value}" for key, value in changed.items()))
        write_config(f"target {name}", changed or values)
    config.targets[name] = target

    # Chosen again on every run: a section written by hand must not pull another configuration
    # over the one other targets share; a target already set up finds its own environment.
    root, why = choose_environment(config, target, runner, output, known=bool(existing))
    output.action(f"2/5 environment: {why}")
    if root != (target.binhost_root or config.binhost.root):
        write_config(f"target {name}", {"binhost-root": root})
        target.binhost_root = root if root != config.binhost.root else None
    env = config.environment_for(target)
    if not os.path.isdir(os.path.join(env.root, "etc/portage")):
        init_args = argparse.Namespace(
            target=name, like_target=True, arch=args.arch, variant=args.variant, stage3=args.stage3,
            keyring=args.keyring, no_verify_pgp=args.no_verify_pgp, mirror=args.mirror, force=False)
        init_binhost(config, init_args, runner, output)
    output.action(f"3/5 configuration: {name}'s /etc/portage and world into {env.root}")
    if runner.pretend and not os.path.isdir(env.root):  # step 2 only said how it would make it
        show_first_pull(env, target)
    else:
        with chroot_session(env):
            sync_config("pull", env, target)
            try:
                cpu_report(env, target)
            except BinhostError as error:
                output.warn(f"CPU check skipped: {error}")
        # A build machine without Gentoo: the repositories the target's configuration names, each
        # verified by the binhost root's own Portage as it syncs it into the root.
        sync_repositories(env, missing_only=True)
    if env.signing_key:
        output.info(f"Signing key {env.signing_key} exists already")
    else:
        fingerprint = generate_signing_key(config.environment_for())
        write_config("binhost", {"signing-key": fingerprint or "<new fingerprint>",
                                 "gpg-home": config.binhost.gpg_home})
        env = config.environment_for(target)

    output.action(f"4/5 target: can {name} download from {target_url(env, False, with_credentials=False)}?")
    if env.transport == "tunnel":
        output.info("transport = tunnel: the target reaches us through ssh, no port to open")
    elif runner.pretend:
        output.info(f"Would ask {name} to download our index, and write transport = tunnel when it cannot")
    else:
        runner.make_directory(env.pkgdir)  # served for the question, empty or not
        reachable, detail = target_reaches_us(env, target)
        if reachable:
            output.info(f"{name} reaches us over HTTP")
        elif [other for other in config.targets if other != name]:
            raise BinhostError(f"{name} cannot reach {target_url(env, False, with_credentials=False)}"
                               f" ({detail}), and transport is one setting for every target: open the port"
                               f" for it, or set transport = tunnel in [binhost] of {config.path} and run"
                               f" '{PROG} setup-target' for each target, then add-target {name} again")
        else:
            output.warn(f"{name} cannot reach {target_url(env, False, with_credentials=False)} ({detail}):"
                        " writing transport = tunnel, so it reaches us through ssh and no port needs opening")
            write_config("binhost", {"transport": "tunnel"})
            config.binhost.transport = "tunnel"
            env = config.environment_for(target)
    if env.signing_key:
        setup_target(env, target)
    else:  # --pretend: the key is not made
        output.info(f"Would write {name}'s binrepos entry and make it trust the new key, with"
                    f" '{PROG} --target {name} setup-target'")
        output.action(f"5/5 doctor {name}")
        output.info(f"Would check the binhost against {name} with '{PROG} --target {name} doctor' (read-only)")
        return

    output.action(f"5/5 doctor {name}")
    doctor = run_doctor(env, target, [])
    for result in doctor.results:
        output.check(result["status"], result["check"], result["detail"])
    serve_hint = "" if env.transport == "tunnel" else f" (with '{PROG} serve' running)"
    output.info(f"Next: '{PROG} --target {name} emerge -uDN @world'{serve_hint} builds here and installs"
                f" there: {name} compiles nothing")


def remove_config_section(text, section):
    """The INI text without [section] and its lines."""
    lines, kept, inside = text.splitlines(), [], False
    for line in lines:
        match = configparser.ConfigParser.SECTCRE.match(line.strip())
        if match:
            inside = match.group("header").strip() == section
        if not inside:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + "\n"


def give_back_own_tree(env, target):
    """A target that followed the binhost's snapshot syncs its repositories as it did before: our
    repos.conf entry and the snapshot copies go; when it cannot be reached, what to remove there."""
    base = posixpath.join(target.root, TARGET_TREES)
    confdir = posixpath.join(target.portage_config_dir, "repos.conf")
    try:
        env.remote(target).script(UNFOLLOW_SCRIPT, base, confdir, OWN_REPOS_ENTRY,
                                  what="removing the binhost's repos.conf entry")
        if not env.runner.pretend:
            env.output.info(f"{target.name} syncs its repositories with its own settings again (removed"
                            f" {confdir}/{OWN_REPOS_ENTRY} and {base})")
    except BinhostError as error:
        env.output.warn(f"{error}: {target.name} still syncs from the binhost's snapshot: on it, run"
                        f" 'rm -f {shlex.quote(posixpath.join(confdir, OWN_REPOS_ENTRY))} && rm -rf {shlex.quote(base)}'")


def remove_target(config, args, runner, output):
    target = config.target(args.name)
    env = config.environment_for(target)
    users = sorted(other.name for other in config.targets.values()
                   if other.name != target.name and config.environment_for(other).root == env.root)
    output.info(f"Removing [target {target.name}] from {config.path} (its binrepos.conf/{BINREPOS_NAME}.conf"
                " stays until you remove it there)")
    if target.tree == "binhost":
        give_back_own_tree(env, target)
    purge = args.purge and not users and env.root != config.binhost.root
    if args.purge and not purge:
        why = (f"{', '.join(users)} {'uses' if len(users) == 1 else 'use'} it" if users
               else "it is the [binhost] root")
        output.warn(f"Keeping the environment {env.root}: {why}")
    if purge and os.path.isdir(env.root):
        with root_replacement_lock(env.root, output, "remove-target --purge again"):
            output.info(f"Removing the environment {env.root} (no other target uses it)")
            runner.run(["rm", "-rf", "--one-file-system", os.path.realpath(env.root)],
                       describe=f"removing {env.root}")
    else:
        record = os.path.join(env.packages.publications_dir(), INSTALLED_DIR, target.name)
        if os.path.isfile(record):  # clean no longer keeps what it had installed
            runner.remove(record)
    runner.write_file(config.path, remove_config_section(read_text(config.path), f"target {target.name}"))


# ------------------------------------------------------------------------------------------------
# Serving: the serve command, services and timers, nginx
# ------------------------------------------------------------------------------------------------

def serve(environments, target, runner, output, bind, port, tunnel=False, listings=False):
    env = next(iter(environments.values()))  # what the environments share: server settings
    if tunnel:
        bind = "127.0.0.1"
    elif bind not in LOOPBACK_ADDRESSES and not (env.tls_cert and env.auth_file):
        missing = " and ".join(word for word, present in (("TLS", env.tls_cert),
                                                          ("auth", env.auth_file)) if not present)
        output.warn(f"Serving on {bind} without {missing}: anyone who can reach port {port} can"
                    " download every package (signatures stop tampering, not reading). Bind to a"
                    " private address, use --tunnel, or set tls-cert/tls-key and auth-file.")
    scheme = "https" if env.tls_cert and not tunnel else "http"
    pkgdirs = ", ".join(each.pkgdir for each in environments.values())
    if runner.pretend:
        output.info(f"Would serve {pkgdirs} on {scheme}://{bind}:{port}/")
        if tunnel:
            runner.start(Remote(target, runner, output).tunnel_argv((env.tunnel_port, port)))
        return
    server = start_server(environments, output, bind, port, listings=listings, tunnel=tunnel)
    actual_port = server.server_address[1]
    output.action(f"Serving {pkgdirs} on {scheme}://{bind}:{actual_port}/")
    for each in environments.values():
        output.info("Targets need this entry in /etc/portage/binrepos.conf/"
                    f"{BINREPOS_NAME}.conf ('{PROG} setup-target' writes it)"
                    + (f", for the environment {each.root}:" if each.env_name else ":"))
        # The password stays out of the output (service logs are often world-readable).
        entry = binrepos_entry(target_url(each, tunnel, with_credentials=False, port=actual_port),
                               bool(each.signing_key))
        if each.auth_file:
            entry = entry.replace("://", "://USER:PASSWORD@", 1)
        output.text(entry)
    tunnel_process = stopped_by = None
    try:
        with stop_on_sigterm(server):
            if tunnel:
                remote = Remote(target, runner, output)
                tunnel_process = runner.start(remote.tunnel_argv((env.tunnel_port, actual_port)))
                output.action(f"Tunnel: {target.name} reaches us on http://127.0.0.1:{env.tunnel_port}/")
                threading.Thread(target=watch_tunnel, args=(tunnel_process, server, output),
                                 daemon=True).start()
            server.serve_forever()
    except Terminated as stop:  # SIGHUP (SIGTERM stops serve_forever itself): clean up, then say so
        stopped_by = stop
    except KeyboardInterrupt:
        pass
    finally:
        if tunnel_process is not None and tunnel_process.poll() is None:
            tunnel_process.terminate()
            tunnel_process.wait()
        server.server_close()
    output.info("Stopped serving")
    if stopped_by is not None:
        raise stopped_by
    if tunnel_process is not None and tunnel_process.returncode not in (0, -signal.SIGTERM):
        raise BinhostError(f"the ssh tunnel to {target.name} ended (exit {tunnel_process.returncode}):"
                           f" is port {env.tunnel_port} free on the target?")


def service_definition(kind, config_path, serve_options):
    """serve_options: the options of this serve command line, which the service runs again."""
    script = os.path.abspath(__file__)
    arguments = " ".join(["-c", shlex.quote(os.path.abspath(config_path)), "serve"]
                         + [shlex.quote(word) for word in serve_options])
    if kind == "openrc":
        return (f"#!/sbin/openrc-run\n"
                f"# /etc/init.d/gentoo-binhost: serve the binhost's PKGDIR (from {PROG} serve --print-service)\n"
                f'description="Gentoo binary package host"\n'
                f'command="{sys.executable}"\n'
                f'command_args="{script} --color=n {arguments}"\n'
                f"command_background=true\n"
                f'pidfile="/run/${{RC_SVCNAME}}.pid"\n'
                f'output_log="/var/log/gentoo-binhost.log"\n'
                f'error_log="/var/log/gentoo-binhost.log"\n'
                f"\n"
                f"depend() {{\n\tneed net\n}}\n")
    return (f"# /etc/systemd/system/gentoo-binhost.service (from {PROG} serve --print-service)\n"
            f"[Unit]\n"
            f"Description=Gentoo binary package host\n"
            f"Wants=network-online.target\n"
            f"After=network-online.target\n"
            f"\n"
            f"[Service]\n"
            f"ExecStart={sys.executable} {script} --color=n {arguments}\n"
            f"Restart=on-failure\n"
            f"NoNewPrivileges=yes\n"
            f"ProtectSystem=strict\n"
            f"ProtectHome=read-only\n"
            f"PrivateTmp=yes\n"
            f"\n"
            f"[Install]\n"
            f"WantedBy=multi-user.target\n")


def warn_private_tmp(config, env):
    """The unit's PrivateTmp=yes gives the service empty /tmp and /var/tmp of its own: whatever
    serve reads from there is not found. (ProtectHome=read-only leaves /home readable: serve
    only reads.)"""
    needed = {"this script": os.path.abspath(__file__), "Python": sys.executable, "the configuration": config.path,
              "tls-cert": env.tls_cert, "tls-key": env.tls_key, "auth-file": env.auth_file,
              **{f"the PKGDIR of {name or 'the binhost'}": environment.pkgdir
                 for name, environment in config.environments().items()}}
    for what, path in needed.items():
        resolved = os.path.realpath(os.path.abspath(path)) if path else ""
        if any(resolved == private or resolved.startswith(private + "/") for private in ("/tmp", "/var/tmp")):
            env.output.warn(f"{what} is {path}, under {'/var/tmp' if resolved.startswith('/var/tmp') else '/tmp'}:"
                            " the unit's PrivateTmp=yes hides it from the service; move it, or remove"
                            " PrivateTmp=yes from the unit")


def update_timer(kind, config_path):
    """A nightly `update`: a systemd timer with its service, or a cron line."""
    command = (f"{sys.executable} {os.path.abspath(__file__)} --color=n -c"
               f" {shlex.quote(os.path.abspath(config_path))} update")
    if kind == "cron":
        return (f"# /etc/cron.d/gentoo-binhost-update (from {PROG} serve --print-timer cron)\n"
                # Through syslog (logger): a log file of its own would grow without rotation.
                f"30 3 * * * root {command} 2>&1 | logger -t gentoo-binhost-update\n")
    return (f"# /etc/systemd/system/gentoo-binhost-update.service (from {PROG} serve --print-timer systemd)\n"
            f"[Unit]\nDescription=Build and publish what the Gentoo targets need\n"
            f"Wants=network-online.target\nAfter=network-online.target\n\n"
            f"[Service]\nType=oneshot\nExecStart={command}\n\n"
            f"# /etc/systemd/system/gentoo-binhost-update.timer: systemctl enable --now gentoo-binhost-update.timer\n"
            f"[Unit]\nDescription=Nightly gentoo-binhost update\n\n"
            f"[Timer]\nOnCalendar=*-*-* 03:30\nRandomizedDelaySec=30m\nPersistent=true\n\n"
            f"[Install]\nWantedBy=timers.target\n")


def nginx_server_block(env, bind, port):
    listen = f"{bind}:{port}" if bind not in ("0.0.0.0", "") else str(port)
    lines = [f"# nginx server block for the binhost's PKGDIR (from {PROG} serve --print-nginx)",
             "server {",
             f"    listen {listen}{' ssl' if env.tls_cert else ''};",
             "    server_name _;",
             f"    root {env.pkgdir};",
             "    autoindex off;",
             "    sendfile on;",
             "    tcp_nopush on;",
             "    # Never gzip-encode: Portage expects Packages.gz as it is on disk.",
             "    gzip off;",
             "    # Dotfiles are not served; a missing file must be a 404 (never 403) for Portage.",
             "    location ~ /\\. { return 404; }",
             "    # Portage asks with its copy's TIMESTAMP + 5 s: only the exact date may get a 304.",
             "    if_modified_since exact;",
             "    # The last published index (a build in progress rewrites the one in PKGDIR).",
             f"    location = /Packages {{ try_files /{PUBLISHED_DIR}/{CURRENT_PUBLICATION}/Packages /Packages =404; }}",
             f"    location = /Packages.gz {{ try_files /{PUBLISHED_DIR}/{CURRENT_PUBLICATION}/Packages.gz"
             " /Packages.gz =404; }",
             "    location / { try_files $uri =404; }",
             "    # A staged publication, while the gate asks the targets about it (see the README).",
             f"    location ~ ^/{STAGED_URL_DIR}/([A-Za-z0-9]+)/(Packages(\\.gz)?)$ {{"
             f" try_files /{PUBLISHED_DIR}/{STAGED_PREFIX}$1/$2 =404; }}",
             f"    location ~ ^/{STAGED_URL_DIR}/[A-Za-z0-9]+/(.+)$ {{ try_files /$1 =404; }}"]
    if env.tls_cert:
        lines += [f"    ssl_certificate {env.tls_cert};",
                  f"    ssl_certificate_key {env.tls_key or env.tls_cert};"]
    if env.auth_file:
        lines += ['    auth_basic "gentoo-binhost";',
                  "    # nginx needs hashed passwords: htpasswd -c /etc/nginx/gentoo-binhost.htpasswd USER",
                  "    auth_basic_user_file /etc/nginx/gentoo-binhost.htpasswd;"]
    return "\n".join(lines + ["}"]) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


COMMANDS_IN_ORDER = ("add-target", "emerge", "update", "doctor", "serve", "install", "build", "list", "history",
                     "rollback", "release", "clean", "config", "cpu", "setup-target", "keygen", "sign", "init",
                     "remove-target")


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # Abbreviated options would hide where the command word is (see split_passthrough).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """A usage error points to this command's own --help; a misspelt command gets the
        nearest ones."""
        unknown = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
        if unknown:
            near = difflib.get_close_matches(unknown.group(1), COMMANDS_IN_ORDER, n=3, cutoff=0.6)
            near = ", ".join(near[:-1]) + " or " + near[-1] if len(near) > 1 else "".join(near)
            message = f"unknown command '{unknown.group(1)}'" + (f": did you mean {near}?" if near else "")
        raise UsageError(f"{message} (see '{self.prog} --help')")


#: The commands in the order a user meets them, as the top-level help lists them.
# Commands that use the key (sign, make, export it): they first move a gpg-home out of the builds'
# reach (gpg would read a gpg.conf a build could have written there).
COMMANDS_SIGNING = ("emerge", "update", "build", "sign", "keygen", "init", "setup-target", "add-target")
#: What build, install and emerge take themselves, right after the command, before emerge's words.
OWN_OPTIONS_HELP = {
    "build": (("--target NAME", "build in NAME's binhost environment"),
              ("--for-target", "build what the target's own emerge would merge for EMERGE ARGS (with"
                               " --target NAME), not EMERGE ARGS as given here"),
              ("--distcc HOSTS", "compile on these distcc helpers, e.g. 'host1/8 host2/4', after"
                                 " checking their gcc version")),
    "install": (("--target NAME", "install on this target"),
                ("--all", "install on every target")),
    "emerge": (("--target NAME", "build for this target and install there"),
               ("--all", "every target: all builds and one publication first, then the installs")),
}


def add_global_options(parser, after_command=False, with_all=True):
    """The options that come before the command; after_command: the same options accepted after
    it as well (`doctor --target t1`), where they must not reset what was given before it."""
    default = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("-c", "--config", metavar="FILE", **default,
                        help=f"configuration file (default ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    parser.add_argument("--target", metavar="NAME", help="the [target NAME] to act on", **default)
    if with_all:
        parser.add_argument("--all", action="store_true", **default,
                            help="install, emerge, doctor, config diff: every target, past failures")
    parser.add_argument("-p", "--pretend", action="store_true", **default,
                        help="show every command that would change something, run none")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every command run", **default)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors", **default)
    parser.add_argument("--color", choices=("y", "n"), help="colored output (default: on a terminal)",
                        **default)


def build_parser(config=None):
    """The command line; config (when it could be read) supplies the defaults help shows."""
    parser = ArgumentParser(
        prog=PROG, description="Build binary packages here for another Gentoo machine and install"
                               " them there.",
        epilog="Everything after build, install and emerge is handed to emerge untouched (but for"
               " --target NAME or --all right after the command).")
    add_global_options(parser)
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    add_parser = commands.add_parser

    def command_parser(name, with_all=True, **kwargs):
        command = add_parser(name, **kwargs)
        add_global_options(command, after_command=True, with_all=with_all)
        return command

    commands.add_parser = command_parser
    parser.command_parsers = commands.choices  # {name: its parser}, for `build --help`
    for name, summary in (("build", "emerge with FEATURES=buildpkg into the binhost"),
                          ("install", "emerge --getbinpkgonly on the target, over ssh"),
                          ("emerge", "build, then install the same arguments")):
        own = "".join(f"  {option:<16}{text}\n" for option, text in OWN_OPTIONS_HELP[name])
        command = add_parser(name, help=summary, description=summary + ".", add_help=False,
                             usage=f"{PROG} [OPTIONS] {name} [{name.upper()} OPTIONS] EMERGE ARGS",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"{name} options (right after '{name}', before emerge's):\n{own}"
                                    "  -h, --help      this help\n\nEverything else is handed to emerge"
                                    f" untouched, e.g. '{PROG} {name} -uDN @world'.")
        command.add_argument("emerge_args", nargs=argparse.REMAINDER, metavar="EMERGE ARGS")

    setup = commands.add_parser("setup-target", help="make the target use this binhost",
                                description="Write binrepos.conf/gentoo-binhost.conf on the target"
                                            " and trust the signing key there.")
    setup.add_argument("--no-verify-signature", dest="verify_signature", action="store_false",
                       help="let the target install unsigned packages (not recommended)")

    serve_parser = commands.add_parser("serve", help="serve PKGDIR over HTTP",
                                       description="Serve PKGDIR over HTTP for targets.")
    served = config.binhost if config else None
    serve_parser.add_argument("--bind", metavar="ADDRESS", help="address to listen on (default"
                              f" {served.bind if served else DEFAULT_BIND}, from [binhost] bind)")
    serve_parser.add_argument("--port", type=int, metavar="PORT", help="port (default"
                              f" {served.port if served else DEFAULT_PORT}, from [binhost] port)")
    serve_parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    serve_parser.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    serve_parser.add_argument("--auth-file", metavar="FILE",
                              help="require HTTP Basic auth; FILE has user:password lines")
    serve_parser.add_argument("--timeout", type=float, metavar="SECONDS",
                              help=f"drop a silent client after SECONDS (default {DEFAULT_CLIENT_TIMEOUT})")
    serve_parser.add_argument("--index", action="store_true", help="list directories (off by default)")
    serve_parser.add_argument("--tunnel", action="store_true",
                              help="listen on 127.0.0.1 only and reach the target through ssh -R")
    serve_parser.add_argument("--print-service", choices=("openrc", "systemd"),
                              help="print an init script or unit for a permanent server, and exit")
    serve_parser.add_argument("--print-nginx", action="store_true",
                              help="print an nginx server block serving PKGDIR, and exit")
    serve_parser.add_argument("--print-timer", choices=("systemd", "cron"),
                              help="print a systemd timer (and its service) or a cron line running"
                                   " 'update' every night, and exit")

    keygen = commands.add_parser("keygen", help="create the binhost's signing key",
                                 description="Create a signing key for binary packages and record it"
                                             " in the configuration.")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.add_argument("--passphrase-file", metavar="FILE",
                        help="protect the key with the passphrase in FILE (builds then need it)")
    keygen.add_argument("--export", action="store_true", help="print the public key and exit")

    config = commands.add_parser("config", help="copy the Portage configuration between target and binhost",
                                 description="pull: the target's /etc/portage and world into the binhost;"
                                             " push: the binhost's to the target; diff: show the"
                                             " differences.")
    config.add_argument("action", choices=("pull", "push", "diff"))
    config.add_argument("--exit-code", action="store_true",
                        help="diff: exit with 1 when the configurations differ (like git diff)")

    init = commands.add_parser("init", help="create the binhost root from a verified stage3",
                               description="Download the newest stage3 (or --stage3), verify its"
                                           " digests and PGP signature, and extract it as the binhost root.")
    init.add_argument("--arch", help="Gentoo arch (default: this machine's, e.g. amd64)")
    init.add_argument("--variant", help=f"stage3 variant (default {DEFAULT_VARIANT}; e.g. systemd, musl,"
                                        " nomultilib-openrc)")
    init.add_argument("--mirror", default=DEFAULT_MIRROR, metavar="URL", help=f"default {DEFAULT_MIRROR}")
    init.add_argument("--stage3", metavar="URL|FILE", help="this stage3 instead of the newest")
    init.add_argument("--keyring", metavar="FILE", help=f"Gentoo's release keys (default {GENTOO_RELEASE_KEYS})")
    init.add_argument("--no-verify-pgp", action="store_true", help="check the digests only")
    init.add_argument("--like-target", action="store_true",
                      help="choose arch and variant from what the target runs")
    init.add_argument("--force", action="store_true", help="replace a non-empty root (kept as ROOT.<date>.bak)")
    init.add_argument("--host-chroot", metavar="DIR",
                      help="no Gentoo here: first a Gentoo host environment in DIR (this machine's arch),"
                           " the binhost root inside it (default DIR/binhost); recorded as [host] chroot")
    init.add_argument("--host-stage3", metavar="URL|FILE", help="this stage3 for the host environment")
    sync_choice = init.add_mutually_exclusive_group()
    sync_choice.add_argument("--sync", dest="sync_with", action="store_const", const="sync",
                             default="webrsync", help="sync the host chroot's repositories with emerge"
                                                      " --sync (default: emerge-webrsync)")
    sync_choice.add_argument("--no-sync", dest="sync_with", action="store_const", const="none",
                             help="leave the host chroot's repositories as they are")

    cpu = commands.add_parser("cpu", help="the target's CPU as make.conf flags",
                              description="Resolve -march=native on the target into explicit flags"
                                          " (COMMON_FLAGS) and CPU_FLAGS_X86 (CPU_FLAGS_ARM on arm) for the binhost.")
    cpu.add_argument("--apply", action="store_true",
                     help="write them into the binhost's make.conf and package.use (with a backup)")

    doctor = commands.add_parser("doctor", help="check that the binhost and the target agree",
                                 description="Check and explain, one line each, whether the binhost"
                                             " builds what the target would: configuration, profile,"
                                             " USE, world, repositories, binrepos, signing, index; then"
                                             " emerge --pretend --getbinpkgonly on the target.")
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.add_argument("atoms", nargs="*", metavar="ATOM", help="what to preflight (default @world)")

    listing = commands.add_parser("list", help="what the binhost holds",
                                  description="The binary packages in PKGDIR: CPV, build id, size,"
                                              " build time, USE.")
    listing.add_argument("--json", action="store_true", help="print them as JSON")

    clean = commands.add_parser("clean", help="remove packages nothing needs any more",
                                description="Remove binary packages whose CPV is no longer installed in"
                                            " the binhost root, and older builds beyond --keep, then"
                                            " refresh the index.")
    clean.add_argument("--keep", type=int, default=DEFAULT_KEEP, metavar="N",
                       help=f"builds to keep of each installed CPV (default {DEFAULT_KEEP})")

    history = commands.add_parser("history", help="the published sets, newest first",
                                  description="The kept publications (publish-keep): when, why, and which"
                                              " CPVs each added, updated and removed.")
    history.add_argument("--json", action="store_true", help="print them as JSON")
    rollback_parser = commands.add_parser("rollback", help="publish an earlier set again, holding back the rest",
                                          description="Publish an earlier publication's packages again, as"
                                                      " a new publication, so targets see it; what it"
                                                      " withdraws (those builds, and newer versions of those"
                                                      " packages) is held back from every later publication"
                                                      " until 'release'.")
    rollback_parser.add_argument("id", nargs="?", type=int, metavar="ID",
                                 help="the publication (default: the one before the current one)")
    release_parser = commands.add_parser("release", help="end what rollbacks hold back",
                                         description="End the holds of rollbacks on these packages (all"
                                                     " without ATOMs): the next publication offers their"
                                                     " builds again, and builds may make newer versions.")
    release_parser.add_argument("atoms", nargs="*", metavar="ATOM", help="category/package names")
    update = commands.add_parser("update", help="sync, build every target's world, publish, clean",
                                 description="For each environment: sync its repositories, build what"
                                             " every target's emerge -uDN @world needs, sign, publish,"
                                             " clean; one summary line per environment.")
    update.add_argument("--no-sync", action="store_true", help="leave the repositories as they are")

    add = commands.add_parser("add-target", help="everything from nothing to a target that installs from us",
                              description="Add [target NAME], check ssh, choose or create its binhost"
                                          " environment (init --like-target), pull its configuration, check"
                                          " its CPU, create a signing key, set it up (choosing the transport)"
                                          " and run doctor; each step is skipped when done already.")
    add.add_argument("name", metavar="NAME")
    add.add_argument("host", metavar="[USER@]HOST")
    add.add_argument("--ssh-port", type=int, metavar="N", help=f"ssh port (default {DEFAULT_SSH_PORT})")
    add.add_argument("--ssh-option", action="append", metavar="OPT",
                     help="an ssh option for this target (repeat for more), e.g. --ssh-option=-i"
                          " --ssh-option=/root/.ssh/binhost")
    add.add_argument("--root", metavar="DIR", help="the target's ROOT (its root = key; default /)")
    add.add_argument("--path", metavar="DIRS", help="prepended to PATH on the target (its path = key)")
    add.add_argument("--arch", help="stage3 arch for a new environment (default: the target's)")
    add.add_argument("--variant", help="stage3 variant for a new environment (default: the target's)")
    add.add_argument("--mirror", default=DEFAULT_MIRROR, metavar="URL", help=f"default {DEFAULT_MIRROR}")
    add.add_argument("--stage3", metavar="URL|FILE", help="this stage3 for a new environment")
    add.add_argument("--keyring", metavar="FILE", help=f"Gentoo's release keys (default {GENTOO_RELEASE_KEYS})")
    add.add_argument("--no-verify-pgp", action="store_true", help="check the stage3's digests only")
    remove = commands.add_parser("remove-target", help="remove a [target NAME]",
                                 description="Remove [target NAME] from the configuration, saying what goes;"
                                             " --purge also removes its binhost environment when no other"
                                             " target uses it.")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--purge", action="store_true", help="also remove its own binhost environment")

    sign = commands.add_parser("sign", with_all=False, help="sign unsigned packages in PKGDIR",
                               description="Sign the packages in PKGDIR that are not signed yet, then"
                                           " refresh the index.")
    sign.add_argument("--all", dest="resign", action="store_true",
                      help="re-sign every package with the configured key (after keygen --force)")
    # Listed in the order a user meets them, not the order they are defined in.
    commands._choices_actions.sort(key=lambda action: COMMANDS_IN_ORDER.index(action.dest))
    return parser


def split_passthrough(argv):
    """Split argv at a build/install/emerge command: what follows belongs to emerge untouched."""
    index = 0
    while index < len(argv) and argv[index].startswith("-") and argv[index] != "--":
        index += 2 if argv[index] in GLOBAL_OPTIONS_WITH_VALUE else 1
    if index < len(argv) and argv[index] in EMERGE_PASSTHROUGH:
        return argv[:index + 1], argv[index + 1:]
    return argv, None


def take_command_options(args, emerge_args, parser):
    """build/install/emerge: `--target NAME` and `--all` right after the command are ours, and
    `--help` there shows our help; anywhere later they would reach emerge, so they are refused."""
    words = list(emerge_args)
    while words:
        word = words[0]
        if word in ("-h", "--help"):
            parser.command_parsers[args.command].print_help()
            raise SystemExit(EXIT_OK)
        if word == "--all":
            args.all = True
            words.pop(0)
            continue
        if word == "--target" and len(words) > 1:
            chosen, words = words[1], words[2:]
        elif word.startswith("--target="):
            chosen, words = word.split("=", 1)[1], words[1:]
        else:
            break
        if args.target not in (None, chosen):
            raise UsageError(f"--target {args.target} and --target {chosen}: choose one")
        args.target = chosen
    for word in words:
        if word == "--all" or word == "--target" or word.startswith("--target="):
            option = word.split("=")[0]
            raise UsageError(f"{option} among emerge's arguments would go to emerge: put {option} before"
                             f" the command ('{PROG} {option}{' NAME' if option == '--target' else ''}"
                             f" {args.command} ...') or right after it")
    if not words:
        raise UsageError(f"{args.command} needs emerge arguments: the packages or sets, e.g."
                         f" '{PROG} {args.command} app-editors/vim' or '-uDN @world'")
    return words


def cmd_build(config, args, runner, output):
    emerge_args = list(args.emerge_args)
    for_target = emerge_args[:1] == ["--for-target"]
    if for_target:  # ours, like --distcc: what the target would merge, not these arguments
        emerge_args = emerge_args[1:]
    hosts = None
    if emerge_args[:1] == ["--distcc"]:  # emerge has no --distcc: ours, taken before the rest
        hosts, emerge_args = (emerge_args[1] if len(emerge_args) > 1 else ""), emerge_args[2:]
    elif emerge_args[:1] and emerge_args[0].startswith("--distcc="):
        hosts, emerge_args = emerge_args[0].split("=", 1)[1], emerge_args[1:]
    if hosts is not None and not distcc_hosts(hosts):
        raise UsageError("build --distcc needs the helper hosts, e.g. --distcc 'host1/8 host2/4'")
    if not emerge_args:
        raise UsageError("build needs emerge arguments after its own options")
    target = config.target(args.target) if for_target else None
    env = config.environment_for(target) if for_target else config.environment_for_command(args.target)
    if hosts is not None:
        env.settings.distcc_hosts = hosts
    if for_target:
        build_for_target(env, target, emerge_args)
    else:
        build_packages(env, emerge_args)


def for_each_target(config, output, *phases, between=None):
    """Each phase(target) for every target, going on past failures (a target that failed skips its
    later phases; between() runs after the first phase), then a summary table."""
    if not config.targets:
        raise UsageError(f"{config.path}: no target configured: add one with '{PROG} add-target NAME [USER@]HOST'")
    names = sorted(config.targets)
    results, seconds = dict.fromkeys(names, "ok"), dict.fromkeys(names, 0.0)
    for number, phase in enumerate(phases):
        if number == 1 and between is not None:
            between()
        for name in names:
            if results[name] != "ok":
                continue
            output.action(f"Target {name}")
            started = time.monotonic()
            try:
                phase(config.targets[name])
            except BinhostError as error:
                output.error(f"{name}: {error}")
                results[name] = f"FAILED: {error}"
            seconds[name] += time.monotonic() - started
    width = max(len(name) for name in names + ["target"])
    output.text(f"{'target':<{width}}  {'time':>7}  result", always=True)
    for name in names:
        output.text(f"{name:<{width}}  {seconds[name]:6.1f}s  {results[name]}", always=True)
    failed = [name for name in names if results[name] != "ok"]
    if failed:
        raise BinhostError(f"{len(failed)} of {len(names)} target(s) failed: {', '.join(failed)}")


def targets_of(config, args):
    """The targets a command acts on: every one with --all, else the chosen or only one."""
    if args.all and not config.targets:
        raise UsageError(f"{config.path}: no target configured: add one with '{PROG} add-target NAME [USER@]HOST'")
    return list(config.targets.values()) if args.all else [config.target(args.target)]


def cmd_install(config, args, runner, output):
    if args.all:
        for_each_target(config, output, lambda target: install_packages(
            config.environment_for(target), target, args.emerge_args))
    else:
        target = config.target(args.target)
        install_packages(config.environment_for(target), target, args.emerge_args)


def cmd_emerge(config, args, runner, output):
    if not args.all:
        target = config.target(args.target)
        env = config.environment_for(target)
        with env.remote(target).serving():
            plan = build_for_target(env, target, args.emerge_args)
            install_packages(env, target, args.emerge_args, plan, asked=True)
        return
    # --all: the builds for every target, one publication per environment, then the installs.
    plans, pending = {}, {}

    def build(target):
        env = config.environment_for(target)
        publishing = pending.setdefault(env.root, PendingPublication(
            env, f"emerge --all {' '.join(args.emerge_args)}"))
        plans[target.name] = build_for_target(env, target, args.emerge_args, pending=publishing)

    def publish_all():
        for publishing in pending.values():
            with build_lock(publishing.env):
                publishing.publish()

    def install(target):
        plan = plans.get(target.name)
        if plan is not None and plan.trees is not None:  # published: the live tree follows, then installs
            with build_lock(config.environment_for(target)):
                plan.trees.move()
        install_packages(config.environment_for(target), target, args.emerge_args, plan, asked=True)

    for_each_target(config, output, build, install, between=publish_all)


def cmd_setup_target(config, args, runner, output):
    target = config.target(args.target)
    setup_target(config.environment_for(target), target, args.verify_signature)


def cmd_serve(config, args, runner, output):
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError("--timeout needs a positive number of seconds")
    for each in config.environments().values():  # the server's settings: every environment's
        for option in ("tls_cert", "tls_key", "auth_file"):
            if getattr(args, option):
                setattr(each.settings, option, os.path.abspath(getattr(args, option)))
        if args.timeout is not None:
            each.settings.client_timeout = args.timeout
    env = config.environment_for()
    if args.tls_key and not env.tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    bind = args.bind or env.bind
    port = env.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: use a port number (0-65535)")
    if args.print_service:
        options = [word for flag, value in (("--bind", args.bind), ("--port", args.port),
                                            ("--tls-cert", env.tls_cert if args.tls_cert else None),
                                            ("--tls-key", env.tls_key if args.tls_key else None),
                                            ("--auth-file", env.auth_file if args.auth_file else None),
                                            ("--timeout", args.timeout))
                   if value is not None for word in (flag, str(value))]
        options += [flag for flag, given in (("--index", args.index), ("--tunnel", args.tunnel)) if given]
        output.text(service_definition(args.print_service, config.path, options), always=True)
        if args.print_service == "systemd":
            warn_private_tmp(config, env)
        return
    if args.print_timer:
        output.text(update_timer(args.print_timer, config.path), always=True)
        return
    if args.print_nginx:
        if len(config.environments()) > 1:
            raise UsageError("serve --print-nginx writes one server block for one PKGDIR; with several"
                             " binhost environments, add a location /NAME/ { alias PKGDIR/; } per environment")
        output.text(nginx_server_block(env, bind, port), always=True)
        return
    tunnel = args.tunnel or env.transport == "tunnel"
    if args.port is not None and not tunnel:
        url = target_url(env, tunnel, with_credentials=False)
        parts = urllib.parse.urlsplit(url)
        expected = parts.port or (443 if parts.scheme == "https" else 80)
        if port not in (0, expected):
            output.warn(f"Serving on port {port}, but targets are set up for port {expected} ({url}):"
                        f" serve without --port, or set port (and url) in [binhost] of {config.path}"
                        f" and run '{PROG} setup-target' again")
    target = config.target(args.target) if tunnel else None
    serve(config.environments(), target, runner, output, bind, port, tunnel, args.index)


def cmd_keygen(config, args, runner, output):
    env = config.environment_for()
    if args.export:
        output.text(export_public_key(env), always=True)
        return
    if args.passphrase_file and not os.path.isfile(args.passphrase_file):
        raise UsageError(f"passphrase file {args.passphrase_file} does not exist")
    fingerprint = generate_signing_key(env, args.passphrase_file, args.force)
    record_signing_key(config, env, fingerprint)
    if fingerprint:
        output.info(f"Signing key {fingerprint} in {env.gpg_home}, recorded in {config.path}")
        output.text(fingerprint, always=True)
        output.info(f"Next: '{PROG} setup-target' makes the target trust it;"
                    f" '{PROG} sign' signs packages built before")


def cmd_sign(config, args, runner, output):
    env = config.environment_for_command(args.target)
    count = sign_packages(env, resign=args.resign)
    if count:
        output.info(f"Signed {count} package(s) in {env.pkgdir}")


def cmd_config(config, args, runner, output):
    if args.all and args.action != "diff":
        raise UsageError("--all works with config diff only: pull and push act on one --target")
    if args.exit_code and args.action != "diff":
        raise UsageError("--exit-code goes with config diff")
    if args.all:
        def diff(target):
            env = config.environment_for(target)
            with chroot_session(env):
                if sync_config("diff", env, target, show_only=True):
                    raise BinhostError("its configuration differs from the binhost's (diff above)")
        for_each_target(config, output, diff)
        return
    target = config.target(args.target)
    env = config.environment_for(target)
    with chroot_session(env):
        differs = sync_config(args.action, env, target, show_only=args.action == "diff")
    if differs and args.exit_code:
        raise BinhostError(f"the configurations of {target.name} and the binhost differ (diff above)")


def cmd_init(config, args, runner, output):
    if (args.host_stage3 or args.sync_with != "webrsync") and not config.binhost.host_chroot:
        raise UsageError("--host-stage3, --sync and --no-sync are for the host chroot: add"
                         " --host-chroot DIR")
    (init_host_chroot if config.binhost.host_chroot else init_binhost)(config, args, runner, output)


def cmd_list(config, args, runner, output):
    packages = config.environment_for_command(args.target).packages
    pkgdir = packages.pkgdir
    records = packages.package_records() if os.path.isfile(os.path.join(pkgdir, "Packages")) else []
    if not records and not args.json:
        output.info(f"No binary packages in {pkgdir} yet: '{PROG} build ATOM' or '{PROG} emerge ATOM'"
                    " builds some")
        return
    if args.json:
        output.text(json.dumps(records, indent=2), always=True)
        return
    for record in records:
        size = human_size(record["size"]) if record["size"] is not None else "?"
        state = f"  ({record['state']})" if record["state"] else ""
        output.text(f"{record['cpv']:<40} build {record['build_id']:<3} {size:>10}"
                    f"  {record['build_time'] or '?'}  USE=\"{' '.join(record['use'])}\"{state}", always=True)


def cmd_clean(config, args, runner, output):
    clean_packages(config.environment_for_command(args.target), args.keep)


def cmd_history(config, args, runner, output):
    packages = config.environment_for_command(args.target).packages
    pkgdir, history = packages.pkgdir, packages.publication_history()
    if args.json:
        output.text(json.dumps(history, indent=2), always=True)
        return
    if not history:
        output.info(f"Nothing published from {pkgdir} yet: a successful build publishes")
        return
    for entry in history:
        changes = "; ".join(f"{kind} {' '.join(entry[kind])}" for kind in ("added", "updated", "removed")
                            if entry[kind]) or "no change"
        released = sorted(set(entry["held"]) - set(entry["holds"]))
        holds = (f"; holds back {' '.join(entry['holds'])} until release" if entry["holds"] else "") + (
            f"; held back {' '.join(released)} (released)" if released else "")
        trees = f"; built from {describe_tree(entry['trees'])}" if entry["trees"] else ""
        output.text(f"{entry['id']:>4}{' *' if entry['current'] else '  '} {entry['published']}"
                    f"  {entry['packages']:>5} packages  {entry['why']}: {changes}{holds}{trees}", always=True)


def cmd_rollback(config, args, runner, output):
    env = config.environment_for_command(args.target)
    publication = env.packages.rollback(args.id)
    if publication:
        output.info(f"Targets now get publication {publication}; later builds and updates keep what it"
                    f" holds back out until '{PROG} release'")


def cmd_release(config, args, runner, output):
    config.environment_for_command(args.target).packages.release(args.atoms)


def cmd_cpu(config, args, runner, output):
    target = config.target(args.target)
    cpu_report(config.environment_for(target), target, apply=args.apply)


def cmd_doctor(config, args, runner, output):
    doctors, seconds = {}, {}
    for target in targets_of(config, args):
        started = time.monotonic()
        doctors[target.name] = run_doctor(config.environment_for(target), target, args.atoms)
        seconds[target.name] = time.monotonic() - started
    groups = {}
    for name, doctor in doctors.items():
        groups.setdefault(doctor.fingerprint, []).append(name)
    if args.json:
        report = {"targets": {name: doctor.results for name, doctor in doctors.items()},
                  "shared-configurations": [names for fingerprint, names in groups.items()
                                            if fingerprint and len(names) > 1]} if args.all \
            else next(iter(doctors.values())).results
        output.text(json.dumps(report, indent=2), always=True)
    else:
        for name, doctor in doctors.items():
            if args.all:
                output.action(f"Target {name}")
            for result in doctor.results:
                output.check(result["status"], result["check"], result["detail"])
    if args.all and not args.json:
        width = max(len(name) for name in list(doctors) + ["target"])
        output.text(f"{'target':<{width}}  {'time':>7}  result", always=True)
        for name, doctor in doctors.items():
            counts = {status: sum(r["status"] == status for r in doctor.results) for status in (OK, WARN, FAIL)}
            output.text(f"{name:<{width}}  {seconds[name]:6.1f}s  {counts[FAIL]} FAIL, {counts[WARN]} WARN,"
                        f" {counts[OK]} OK", always=True)
        for fingerprint, names in sorted(groups.items(), key=lambda item: item[1]):
            if fingerprint and len(names) > 1:
                output.info(f"{', '.join(names)} have the same configuration (fingerprint {fingerprint}):"
                            " they can share one binhost environment")
            elif fingerprint:
                output.info(f"{names[0]}: configuration of its own (fingerprint {fingerprint})")
    failed = [name for name, doctor in doctors.items() if doctor.failed]
    if failed:
        problems = sum(r["status"] == FAIL for doctor in doctors.values() for r in doctor.results)
        raise BinhostError(f"doctor found {problems} problem(s)"
                           + (f" on {', '.join(failed)}" if args.all else ""))


# Commands that create a configuration file named with -c (or $GENTOO_BINHOST_CONFIG) when it
# does not exist yet; add-target creates only the default one (a mistyped -c stays an error).
COMMANDS_WRITING_CONFIG = ("init", "keygen")

COMMANDS = {
    "doctor": cmd_doctor,
    "cpu": cmd_cpu,
    "init": cmd_init,
    "list": cmd_list,
    "clean": cmd_clean,
    "config": cmd_config,
    "build": cmd_build, "install": cmd_install, "emerge": cmd_emerge,
    "setup-target": cmd_setup_target, "serve": cmd_serve, "keygen": cmd_keygen, "sign": cmd_sign,
    "add-target": add_target, "remove-target": remove_target,
    "history": cmd_history, "rollback": cmd_rollback, "release": cmd_release, "update": update_environments,
}


def help_config(head):
    """The configuration `--help` shows defaults from, when it can be read, else None."""
    path = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    for option, value in zip(head, head[1:]):
        if option in ("-c", "--config"):
            path = value
    try:
        return load_config(path, Runner(Output(color=False)))
    except BinhostError:
        return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    output = Output(color=None)
    try:
        head, emerge_args = split_passthrough(argv)
        parser = build_parser(help_config(head) if {"-h", "--help"} & set(head) else None)
        args, unknown = parser.parse_known_args(head)
        if unknown:  # said by the command's own parser, which points to its own --help
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        if emerge_args is not None:
            args.emerge_args = take_command_options(args, emerge_args, parser)
        output = Output(color=None if args.color is None else args.color == "y",
                        verbosity=0 if args.quiet else 2 if args.verbose else 1)
        config_path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
        explicit = args.config or os.environ.get(CONFIG_ENV)
        if explicit and not os.path.exists(config_path) and args.command not in COMMANDS_WRITING_CONFIG:
            given = "-c" if args.config else f"${CONFIG_ENV}"
            raise UsageError(f"configuration file {config_path} ({given}) does not exist: check the"
                             f" path, or leave {given} out to use {DEFAULT_CONFIG}")
        host_chroot = getattr(args, "host_chroot", None)  # init --host-chroot DIR: [host] chroot
        runner = Runner(output, pretend=args.pretend)
        config = load_config(config_path, runner, host_chroot=os.path.abspath(host_chroot) if host_chroot else None)
        if args.all and args.target:
            raise UsageError("--all and --target exclude each other")
        if args.all and args.command not in ("install", "emerge", "doctor", "config"):
            raise UsageError(f"--all works with install, emerge, doctor and config diff, not {args.command}")
        if args.command in COMMANDS_SIGNING:
            move_signing_home_out(config, runner, output)
        with terminate_as_interrupt(runner):  # SIGTERM and SIGHUP clean up like Ctrl-C
            COMMANDS[args.command](config, args, runner, output)
        return EXIT_OK
    except BinhostError as error:
        output.error(str(error))
        return error.exit_code
    except Terminated as stop:
        output.error(f"Stopped by {signal.Signals(stop.signum).name}")
        return EXIT_SIGNAL_BASE + stop.signum
    except KeyboardInterrupt:
        output.error("Interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as error:
        # Files we were asked to read or write: permissions, full disks, paths that are files.
        where = f"{error.filename}: " if error.filename else ""
        output.error(f"{where}{error.strerror or error}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
