"""What a new user meets in the first hour: the README's own paths work at once, options go where
people put them, mistakes get one clear line, and nothing says OK too soon.

Real components throughout (Portage from PyPI, the session's sshd, gpg, our `serve`), on the
session's `world` (tests/conftest.py) or on fresh binhost roots of their own where a test changes
PKGDIR. Fresh roots live under world.base (0755: Portage verifies signatures as `nobody`)."""

import contextlib
import email.utils
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import (PROJECT_DIR, REPO, SCRIPT, binhost_serving, eroot, free_port, portage_env, run,
                      stop_process, slow_ebuild, wait_for_port, write_portage_config)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

class Binhost:
    """A binhost root of its own (own PKGDIR, own port), configured like the world's."""

    def __init__(self, world, name, repo=REPO, use="loud"):
        self.world = world
        self.base = Path(tempfile.mkdtemp(prefix=name + "-", dir=world.base))
        self.base.chmod(0o755)  # Portage verifies as nobody
        self.root = self.base / "binhost"
        self.pkgdir = self.root / "var/cache/binpkgs"
        self.port = free_port()
        self.config = self.base / "binhost.conf"
        write_portage_config(self.root, repo=repo, extra_make_conf=f'USE="{use}"\n')
        # gpg-home short: gpg-agent's socket path in it is limited to 107 bytes.
        self.config.write_text(f"[binhost]\nroot = {self.root}\nurl = http://127.0.0.1:{self.port}/\n"
                               f"bind = 127.0.0.1\nport = {self.port}\ngpg-home = {self.base}/g\n")

    def cli(self, *args, config=None, **options):
        return self.world.cli(*args, config=config or self.config, **options)

    def new_target(self, name):
        """A target ROOT (own PKGDIR) and a config: this binhost's [binhost] section, one target."""
        return self.world.new_target(name, signing_config=self.config)

    def serving(self):
        return binhost_serving(self.config, self.port)

    def packages(self):
        return sorted(self.pkgdir.rglob("*.gpkg.tar"))


def index_entries(pkgdir):
    """The package entries of PKGDIR/Packages as dicts."""
    blocks = (Path(pkgdir) / "Packages").read_text().split("\n\n")[1:]
    return [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            for block in blocks if block.strip()]


def newest_build_id(pkgdir, cpv):
    ids = [int(entry["BUILD_ID"]) for entry in index_entries(pkgdir) if entry.get("CPV") == cpv]
    assert ids, f"{cpv} not in {pkgdir}/Packages"
    return max(ids)


def installed_build_id(world, root, cpv):
    return world.installed(root, f"var/db/pkg/{cpv}/BUILD_ID").read_text().strip()


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("!!!")]


def doctor_report(result):
    return {record["check"]: record for record in json.loads(result.stdout)}


def set_world_file(world, root, *atoms):
    path = world.installed(root, "var/lib/portage/world")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(atom + "\n" for atom in atoms))


def two_target_config(world, first, name, second="fh-other"):
    """first's config plus a second target, so that choosing one with --target matters."""
    config = world.base / f"{name}.conf"
    config.write_text(Path(first).read_text() + f"\n[target {second}]\nhost = root@127.0.0.1\n"
                      "ssh-port = 1\nssh-options = -o BatchMode=yes -o ConnectTimeout=5\n")
    return config


# ------------------------------------------------------------------------------------------------
# Shared set-up: one fresh, signed binhost with just app-misc/hello built, served
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hello_binhost(world):
    binhost = Binhost(world, "hello-only")
    binhost.cli("keygen")
    binhost.cli("build", "app-misc/hello")
    assert [p.name.split("-")[0] for p in binhost.packages()] == ["hello"]
    with binhost.serving():
        yield binhost


# ------------------------------------------------------------------------------------------------
# 1. A second build right after the first reaches the target (If-Modified-Since = TIMESTAMP + 5 s)
# ------------------------------------------------------------------------------------------------

HOLD_LOOP = """\tlocal waited=0
\twhile [ -e {hold} ] && [ ${{waited}} -lt 1200 ]; do sleep 0.1; waited=$((waited + 1)); done
"""


def test_a_rebuild_within_seconds_is_installed_not_the_stale_index(world):
    """Portage asks for the index with If-Modified-Since = its copy's TIMESTAMP + 5 s: an index
    rewritten within those 5 s must still reach it. To get there without a clock, the second
    build waits in hello-app's compile (a hold file) until the target has fetched the first index,
    so the two indexes are about a second apart."""
    repo = Path(tempfile.mkdtemp(prefix="stale-repo-", dir=world.base)) / "repo"
    shutil.copytree(REPO, repo)
    hold = repo.parent / "hold"
    ebuild = repo / "app-misc/hello-app/hello-app-1.0.ebuild"
    ebuild.write_text(ebuild.read_text().replace("src_compile() {\n",
                                                 "src_compile() {\n" + HOLD_LOOP.format(hold=hold)))
    assert str(hold) in ebuild.read_text()
    binhost = Binhost(world, "stale", repo=repo)
    binhost.cli("keygen")
    root, config = binhost.new_target("fh-stale")
    cached_index = eroot(root, world.eprefix) / "var/cache/edb/binhost"
    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")
    with binhost.serving():
        binhost.cli("setup-target", config=config)
        binhost.cli("build", "--oneshot", "app-misc/hello-app")
        first = newest_build_id(binhost.pkgdir, "app-misc/hello-app-1.0")

        hold.touch()
        second_build = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(binhost.config), "build",
                                         "--oneshot", "app-misc/hello-app"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            install = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(config), "install",
                                        "app-misc/hello-app"], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + 120
                while not list(cached_index.glob("*/Packages")):
                    assert install.poll() is None, "the install ended without fetching the index"
                    assert time.monotonic() < deadline, "the target did not fetch the index in 120 s"
                    time.sleep(0.05)
            finally:
                hold.unlink()
                installed, _ = install.communicate(timeout=300)
            assert install.returncode == 0, installed
            built, _ = second_build.communicate(timeout=300)
            assert second_build.returncode == 0, built
        finally:
            for process in (second_build, install):
                if process.poll() is None:
                    stop_process(process)
        assert installed_build_id(world, root, "app-misc/hello-app-1.0") == str(first)
        second = newest_build_id(binhost.pkgdir, "app-misc/hello-app-1.0")
        assert second > first

        binhost.cli("install", "app-misc/hello-app", config=config)
    assert installed_build_id(world, root, "app-misc/hello-app-1.0") == str(second)


@pytest.fixture
def index_server(gb, tmp_path):
    """Our server class (as `serve` runs it) on a free port, serving a dir with a Packages file."""
    pkgdir = tmp_path / "pkgdir"
    pkgdir.mkdir()
    (pkgdir / "Packages").write_text("VERSION: 0\nTIMESTAMP: 1700000000\n\n")
    mtime = 1700000000
    os.utime(pkgdir / "Packages", (mtime, mtime))
    server = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], mtime
    finally:
        server.shutdown()
        server.server_close()


def get_status(port, headers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/Packages", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_if_modified_since_with_portages_tolerance_is_not_a_304(index_server):
    port, mtime = index_server
    assert get_status(port, {"If-Modified-Since": email.utils.formatdate(mtime + 5, usegmt=True)}) == 200


def test_if_modified_since_exactly_the_files_time_is_a_304(index_server):
    port, mtime = index_server
    assert get_status(port, {"If-Modified-Since": email.utils.formatdate(mtime, usegmt=True)}) == 304


# ------------------------------------------------------------------------------------------------
# 2. The README's sign-after-refusal path works at once
# ------------------------------------------------------------------------------------------------

def test_sign_after_an_unsigned_refusal_installs_at_once(world):
    binhost = Binhost(world, "sign-later")
    built = binhost.cli("build", "app-misc/hello")
    assert "No signing key configured" in built.stderr
    binhost.cli("keygen")
    root, config = binhost.new_target("fh-sign-later")
    with binhost.serving():
        binhost.cli("setup-target", config=config)
        refused = binhost.cli("install", "app-misc/hello", config=config, check=False)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "binpkg appears unsigned" in refused.stdout + refused.stderr  # Portage's own words
        assert not world.installed(root, "usr/bin/hello").exists()

        binhost.cli("sign")
        again = binhost.cli("install", "app-misc/hello", config=config, check=False)
        assert again.returncode == 0, again.stdout + again.stderr
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"


# ------------------------------------------------------------------------------------------------
# 3. The README's configuration example parses
# ------------------------------------------------------------------------------------------------

def readme_configuration_example():
    lines = (PROJECT_DIR / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("INI, like Portage's binrepos.conf"))
    block = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith("    "):
            if block:
                break
            continue  # text between the sentence and the block
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line)
    assert block, "no indented block after the configuration sentence"
    return textwrap.dedent("\n".join(block)).strip("\n") + "\n"


def test_readme_configuration_example_parses(gb, tmp_path):
    example = readme_configuration_example()
    assert "[binhost]" in example and "[target laptop]" in example
    path = tmp_path / "example.conf"
    path.write_text(example)
    config = gb.load_config(str(path), gb.Runner(gb.Output(color=False)))
    assert config.binhost.port == 8080
    assert config.binhost.root == "/binhost"
    assert config.binhost.url == "http://binhost.lan:8080/"
    laptop = config.targets["laptop"]
    assert laptop.host == "root@laptop.lan"
    assert laptop.ssh_options == ["-i", "/root/.ssh/binhost"]


# ------------------------------------------------------------------------------------------------
# 4. doctor never says OK too soon
# ------------------------------------------------------------------------------------------------

def test_doctor_fails_preflight_for_a_world_package_the_binhost_lacks(world, hello_binhost):
    root, config = hello_binhost.new_target("fh-doctor-greet")
    hello_binhost.cli("setup-target", config=config)
    set_world_file(world, root, "app-misc/greet")
    result = hello_binhost.cli("--color=n", "doctor", config=config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    preflight = [line for line in result.stdout.splitlines() if line.startswith("FAIL preflight")]
    assert preflight, result.stdout
    assert "app-misc/greet" in preflight[0]


def test_doctor_fails_for_a_target_never_set_up(world, hello_binhost):
    _, config = hello_binhost.new_target("fh-doctor-new")
    result = hello_binhost.cli("doctor", "--json", config=config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    report = doctor_report(result)
    assert report["binrepos"]["status"] == "FAIL", report["binrepos"]
    assert report["preflight"]["status"] != "OK", report["preflight"]


# ------------------------------------------------------------------------------------------------
# 5. SIGTERM, SIGHUP, SIGINT to the tool's PID alone stop the whole build
# ------------------------------------------------------------------------------------------------


# Runs the tool as its child, as a shell script would: the tool is then not a process group
# leader. The wrapper itself leads a session of its own, so nothing the tool signals can reach
# pytest. It prints the tool's pid, then its exit status (negative: killed by that signal);
# the tool's own output goes to the log file named first.
WRAPPER = """
import signal, subprocess, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, lambda *_: None)   # handlers, unlike SIG_IGN, are not inherited
with open(sys.argv[1], "w") as log:
    tool = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
print(tool.pid, flush=True)
print(tool.wait(), flush=True)
"""


def processes_named(name):
    """pids of live processes whose command line contains name (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if name.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def lock_is_free(path):
    """Try to take the build lock; release it at once. True if it could be taken."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.fixture(scope="module")
def slow_binhost(world):
    """A binhost root whose repository (a copy of tests/repo) has app-misc/slow."""
    base = Path(tempfile.mkdtemp(prefix="slow-repo-", dir=world.base))
    repo = base / "repo"
    shutil.copytree(REPO, repo)
    (repo / "app-misc/slow").mkdir()
    return Binhost(world, "slow", repo=repo), repo


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_to_the_tool_alone_stops_the_build_and_frees_the_lock(world, slow_binhost, signum, code):
    binhost, repo = slow_binhost
    token = uuid.uuid4().hex[:12]
    # Only the sleeper's command line may contain its name: not the wrapper's (the log), not touch's.
    sleeper_name = f"gb-sleeper-{token}"
    sleeper = binhost.base / sleeper_name
    shutil.copy(shutil.which("sleep"), sleeper)
    marker = binhost.base / f"slow-{token}.started"
    (repo / "app-misc/slow/slow-1.0.ebuild").write_text(slow_ebuild(marker, sleeper, 600))
    lock = binhost.root.parent / f".{binhost.root.name}.build.lock"

    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")
    log = binhost.base / f"slow-{token}.log"
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(log), sys.executable, str(SCRIPT), "-c",
                                str(binhost.config), "build", "--oneshot", "app-misc/slow"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        tool_pid = int(wrapper.stdout.readline())
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert wrapper.poll() is None, f"the build ended before app-misc/slow's compile:\n{log.read_text()}"
            assert time.monotonic() < deadline, "app-misc/slow's compile did not start in 120 s"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while not processes_named(sleeper_name):
            assert time.monotonic() < deadline, "the sleeper did not start"
            time.sleep(0.1)
        assert os.getpgid(tool_pid) != tool_pid, "the tool must not lead its process group here"

        os.kill(tool_pid, signum)
        # While the build's processes live, no second build may get the lock.
        for _ in range(5):
            if not processes_named(sleeper_name):
                break
            if lock_is_free(lock):
                assert not processes_named(sleeper_name), \
                    "the build lock was free while the interrupted build's compile still ran"
            time.sleep(0.05)

        try:
            wrapper.wait(timeout=60)  # the wrapper ends right after the tool
        except subprocess.TimeoutExpired:
            pytest.fail(f"the tool did not exit within 60 s of the signal; its output:\n{log.read_text()}")
        status = wrapper.stdout.read().strip()
        assert status == str(code), f"tool exit status {status!r}, expected {code}; its output:\n{log.read_text()}"
        assert not processes_named(sleeper_name), "the build's compile outlived the tool"
        assert lock_is_free(lock), "the build lock is still held after the tool exited"
    finally:
        # Whatever is left of the wrapper's session (the tool, emerge, the ebuild), then the sleeper.
        try:
            os.killpg(wrapper.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in processes_named(sleeper_name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wrapper.wait(timeout=30)
        wrapper.stdout.close()


# The tool, imported as a module, with a grace period of 2 s instead of 10 (the one constant a
# test may change: the behaviour is the same, the wait shorter).
SHORT_GRACE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gentoo_binhost", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
tool.STOP_GRACE_SECONDS = 2
sys.exit(tool.main(sys.argv[2:]))
"""


def test_a_build_process_that_ignores_sigterm_is_killed_after_the_grace_period(world, slow_binhost):
    """README: the build is sent the signal, then SIGKILL after the grace period; the lock is held
    until every process of the build is gone."""
    binhost, repo = slow_binhost
    token = uuid.uuid4().hex[:12]
    sleeper_name = f"gb-stubborn-{token}"
    sleeper = binhost.base / sleeper_name
    shutil.copy(shutil.which("sleep"), sleeper)
    marker = binhost.base / f"stubborn-{token}.started"
    (repo / "app-misc/slow/slow-1.0.ebuild").write_text(slow_ebuild(marker, f"trap '' TERM; {sleeper}", 600))
    lock = binhost.root.parent / f".{binhost.root.name}.build.lock"
    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")
    log = binhost.base / f"stubborn-{token}.log"
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(log), sys.executable, "-c", SHORT_GRACE,
                                str(SCRIPT), "-c", str(binhost.config), "build", "--oneshot", "app-misc/slow"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        tool_pid = int(wrapper.stdout.readline())
        deadline = time.monotonic() + 120
        while not processes_named(sleeper_name):
            assert wrapper.poll() is None, f"the build ended before its compile:\n{log.read_text()}"
            assert time.monotonic() < deadline, "the stubborn compile did not start in 120 s"
            time.sleep(0.2)
        os.kill(tool_pid, signal.SIGTERM)
        time.sleep(1)
        assert processes_named(sleeper_name), "the compile was meant to outlive SIGTERM for a while"
        assert not lock_is_free(lock), "the lock was free while the build still ran"
        wrapper.wait(timeout=60)
        assert wrapper.stdout.read().strip() == "143", log.read_text()
        assert not processes_named(sleeper_name), "SIGKILL did not follow the grace period"
        assert lock_is_free(lock)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(wrapper.pid, signal.SIGKILL)
        for pid in processes_named(sleeper_name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wrapper.wait(timeout=30)
        wrapper.stdout.close()


# ------------------------------------------------------------------------------------------------
# 6, 7. Options after the command
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_target(world):
    """A target set up for the world's binhost, in a config with a second (unreachable) target."""
    root, config = world.new_target("fh-options")
    world.cli("setup-target", config=config)
    return root, two_target_config(world, config, "fh-options-two")


def test_install_with_target_after_the_command_selects_it(world, world_target):
    root, config = world_target
    result = world.cli("install", "--target", "fh-options", "app-misc/hello", config=config, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--target" not in next(line for line in result.stdout.splitlines() if "Installing on" in line)
    assert run([world.installed(root, "usr/bin/hello")]).stdout == "hello from binhost\n"


@pytest.mark.parametrize("option", [["--target", "fh-options"], ["--all"]], ids=["--target", "--all"])
def test_a_global_option_after_emerge_arguments_is_refused(world, world_target, option):
    _, config = world_target
    result = world.cli("install", "app-misc/hello", *option, config=config, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    if option[0] == "--target":
        assert "put --target before the command" in result.stderr
    else:  # the contract says "same for --all": the message names --all and where it goes
        assert "--all" in result.stderr and "before the command" in result.stderr
    assert "Installing on" not in result.stdout


def test_build_with_target_after_the_command(world):
    binhost = Binhost(world, "build-target")
    _, config = binhost.new_target("fh-build-target")
    result = binhost.cli("build", "--target", "fh-build-target", "app-misc/hello", config=config, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name.split("-")[0] for p in binhost.packages()] == ["hello"]


def test_doctor_with_target_after_the_command(world, world_target):
    _, config = world_target
    before = world.cli("--target", "fh-options", "doctor", "--json", config=config, check=False)
    after = world.cli("doctor", "--target", "fh-options", "--json", config=config, check=False)
    assert after.returncode == before.returncode, after.stderr
    assert ([(r["check"], r["status"]) for r in json.loads(after.stdout)]
            == [(r["check"], r["status"]) for r in json.loads(before.stdout)])


def test_pretend_and_verbose_after_the_command(world, hello_binhost):
    before = sorted(p.name for p in hello_binhost.packages())
    clean = hello_binhost.cli("clean", "--pretend", check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert sorted(p.name for p in hello_binhost.packages()) == before
    listing = hello_binhost.cli("list", "-v", check=False)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "app-misc/hello-1.1" in listing.stdout


# ------------------------------------------------------------------------------------------------
# 8, 9. Mistakes get one clear line and the right exit code
# ------------------------------------------------------------------------------------------------

def test_a_missing_config_file_is_one_line(world, tmp_path):
    missing = tmp_path / "nowhere.conf"
    result = world.cli("list", config=missing, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and str(missing) in errors[0], result.stderr


def test_list_of_an_empty_pkgdir(world):
    binhost = Binhost(world, "empty")
    assert not (binhost.pkgdir / "Packages").exists()
    result = binhost.cli("list", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No binary packages" in result.stdout


def test_build_without_an_atom_is_a_usage_error(world):
    binhost = Binhost(world, "no-atom")
    result = binhost.cli("build", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not binhost.packages()


def test_config_diff_exit_code(world):
    binhost = Binhost(world, "diff")
    _, config = binhost.new_target("fh-diff")
    differ = binhost.cli("config", "diff", "--exit-code", config=config, check=False)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert binhost.cli("config", "diff", config=config, check=False).returncode == 0
    binhost.cli("config", "pull", config=config)
    same = binhost.cli("config", "diff", "--exit-code", config=config, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    assert binhost.cli("config", "diff", config=config, check=False).returncode == 0


# ------------------------------------------------------------------------------------------------
# 10. The auth password never shows
# ------------------------------------------------------------------------------------------------

def test_pretend_setup_target_never_prints_the_password(world):
    auth = world.base / "fh-auth"
    auth.write_text("portage:s3cretpw\n")
    auth.chmod(0o600)
    root, config = world.new_target("fh-pretend-auth", extra_binhost=f"auth-file = {auth}\n")
    result = world.cli("--pretend", "setup-target", config=config, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sync-uri" in result.stdout, "the pretend output shows the entry it would write"
    assert "s3cretpw" not in result.stdout + result.stderr
    assert not (root / "etc/portage/binrepos.conf").exists()


# ------------------------------------------------------------------------------------------------
# 11. serve --port other than the configured one warns
# ------------------------------------------------------------------------------------------------

def test_serve_on_another_port_than_configured_warns(world):
    port = free_port()
    env = dict(os.environ, PATH=f"{world.portage_bin}:{os.environ['PATH']}", NO_COLOR="1")
    server = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(world.config), "--color=n", "serve",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port(port, proc=server), "serve --port did not start"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stop_process(server)
            raise
    warning = [line for line in stderr.splitlines() if "set up for port" in line]
    assert warning and re.search(rf"\b{world.port}\b", warning[0]), stderr


# ------------------------------------------------------------------------------------------------
# 12. Our own binrepos.conf/ on the target is no configuration difference
# ------------------------------------------------------------------------------------------------

def test_doctor_configuration_is_ok_right_after_setup_target(world):
    binhost = Binhost(world, "same-config")
    # The world's key and server; this binhost root gets the target's configuration by pull.
    text = world.config.read_text().replace(f"root = {world.binhost}\n", f"root = {binhost.root}\n")
    assert f"root = {binhost.root}\n" in text
    binhost.config.write_text(text)
    root, config = binhost.new_target("fh-same-config")
    binhost.cli("config", "pull", config=config)
    assert "identical" in binhost.cli("config", "diff", config=config).stdout
    binhost.cli("setup-target", config=config)
    assert (root / "etc/portage/binrepos.conf/gentoo-binhost.conf").is_file()
    report = doctor_report(binhost.cli("doctor", "--json", config=config, check=False))
    assert report["configuration"]["status"] == "OK", report["configuration"]


# ------------------------------------------------------------------------------------------------
# 13, 14. Unreachable targets and URLs: stop early, say what
# ------------------------------------------------------------------------------------------------

def test_emerge_to_an_unreachable_target_stops_before_building(world):
    binhost = Binhost(world, "unreachable")
    config = binhost.base / "gone.conf"
    config.write_text(binhost.config.read_text() + "\n[target gone]\nhost = root@127.0.0.1\nssh-port = 1\n"
                      "ssh-options = -o BatchMode=yes -o ConnectTimeout=5\n"
                      f"path = {world.portage_bin}\n")
    result = binhost.cli("emerge", "--oneshot", "app-misc/hello", config=config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Building in" not in result.stdout
    assert not binhost.packages()


def test_install_when_the_target_cannot_reach_our_url(world):
    root, config = world.new_target("fh-dead-url")
    world.cli("setup-target", config=config)
    dead = free_port()
    dead_url = f"http://127.0.0.1:{dead}/"
    config.write_text(config.read_text().replace(f"http://127.0.0.1:{world.port}/", dead_url))
    entry = root / "etc/portage/binrepos.conf/gentoo-binhost.conf"
    entry.write_text(entry.read_text().replace(f"http://127.0.0.1:{world.port}/", dead_url))
    assert dead_url in config.read_text() and dead_url in entry.read_text()
    result = world.cli("install", "app-misc/hello", config=config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in error_lines(result.stderr) if "cannot download" in line]
    assert errors and dead_url in errors[0], result.stderr
    assert not world.installed(root, "usr/bin/hello").exists()


# ------------------------------------------------------------------------------------------------
# The root method leaves this machine's own PKGDIR alone: emerge's --buildpkg applies to every
# root, FEATURES in our environment only to the binhost root's configuration
# ------------------------------------------------------------------------------------------------

TOOL = "app-misc/build-tool"



def host_pkgdir(portage_bin):
    """The / configuration's PKGDIR as Portage sees it (the lab's: <eprefix>/var/cache/binpkgs)."""
    return Path(run(["portageq", "envvar", "PKGDIR"], env=portage_env(portage_bin)).stdout.strip())


def snapshot(directory):
    """{relative path: (size, mtime_ns)} of every file under directory."""
    if not directory.is_dir():
        return {}
    return {path.relative_to(directory).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in directory.rglob("*") if path.is_file()}


def test_root_method_build_dependencies_leave_no_binary_in_the_hosts_pkgdir(
        tmp_path, portage_bin, eprefix, host_portage):
    unmerge = ["emerge", "--unmerge", "--quiet", TOOL]
    run(unmerge, env=portage_env(portage_bin), check=False)  # so this build merges it into /
    root = tmp_path / "binhost"
    write_portage_config(root)
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = root\n")
    host_binpkgs = host_pkgdir(portage_bin)
    before = snapshot(host_binpkgs)
    try:
        result = run([sys.executable, SCRIPT, "-c", config, "--color=n", "build", "--oneshot",
                      "app-misc/uses-build-tool"], check=False,
                     env={"PATH": f"{portage_bin}:{os.environ['PATH']}"})
        assert result.returncode == 0, result.stdout + result.stderr
        # The test means something only when / really got the build dependency.
        assert list((Path(eprefix) / "var/db/pkg/app-misc").glob("build-tool-*")), result.stdout
        pkgdir = root / "var/cache/binpkgs"
        ours = sorted(path.relative_to(pkgdir).as_posix() for path in pkgdir.rglob("*.gpkg.tar")
                      if ".published" not in path.relative_to(pkgdir).parts)
        # --root-deps: the binhost root has the build dependency too, and its binary is ours.
        assert ours == ["app-misc/build-tool/build-tool-1-1.gpkg.tar",
                        "app-misc/uses-build-tool/uses-build-tool-1.0-1.gpkg.tar"], ours
        assert snapshot(host_binpkgs) == before, f"the build wrote into / 's PKGDIR {host_binpkgs}"
    finally:
        run(unmerge, env=portage_env(portage_bin), check=False)
