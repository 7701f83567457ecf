"""`make bench`: gentoo-binhost.py's `serve` against `python3 -m http.server` and nginx.

Every server serves the same temporary directory on 127.0.0.1, and the same client programs
drive each of them, one server at a time:

  (1) one big package (512 MiB) downloaded with curl, best of 3, in MB/s;
  (2) `Packages` (about 200 KB) with 32 concurrent keep-alive clients (wrk -t2 -c32 -d5s), in
      requests/s;
  (3) 50 clients (curl processes, each keeping its connection alive) each downloading 20 packages
      of 1-5 MB, total wall time, best of 3;
  (4) one honest client's time for 10 packages while 64 connections from 8 addresses download the
      big package reading 1 KB a second (slow readers holding connections), best of 3.

One more row has no goal: (2b) `Packages` for a single client on one keep-alive connection (wrk
-t1 -c1), the way one Portage fetch sees the server; a server that leaves Nagle's algorithm on
waits for the client's delayed ACK at the end of each response there.

Every result is printed with its ratio to nginx and to http.server, and each goal is reported as
met or not. Performance claims live in this output, never as test thresholds: nothing here fails
because a server is slow. It exits non-zero only when it cannot run (no curl) or a server fails
(an error, wrong bytes).

Run as root, it installs what is missing (Debian: nginx-light, wrk, curl). Without nginx or wrk
the other measurements still run and the report says what is missing. `--quick` is a smoke run
with small files and short durations.
"""

import argparse
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "gentoo-binhost.py"
DEBIAN_PACKAGES = {"curl": "curl", "wrk": "wrk", "nginx": "nginx-light"}
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
MB = 1000 * 1000
MIB = 1024 * 1024

OURS, HTTP_SERVER, NGINX = "gentoo-binhost", "http.server", "nginx"


class BenchError(Exception):
    """A prerequisite is missing or a server answered wrongly: the benchmark cannot go on."""


# ------------------------------------------------------------------------------------------------
# Prerequisites
# ------------------------------------------------------------------------------------------------


def find_program(name):
    path = shutil.which(name)
    if path:
        return path
    for directory in SBIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def install_missing(programs):
    """Install the Debian packages of the missing programs when running as root; say what happened."""
    missing = [name for name in programs if not find_program(name)]
    if not missing:
        return
    packages = [DEBIAN_PACKAGES[name] for name in missing]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f" * Not installing {' '.join(packages)} (not root or no apt-get)", flush=True)
        return
    print(f">>> Installing {' '.join(packages)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.run(install, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], **quiet)
        if subprocess.run(install, **quiet).returncode != 0:
            # One by one, so that one package that cannot be had does not keep out the others.
            for package in packages:
                subprocess.run(["apt-get", "install", "-y", "-q", package], **quiet)
    still = [name for name in missing if not find_program(name)]
    if still:
        print(f" * Could not install {' '.join(DEBIAN_PACKAGES[name] for name in still)}", flush=True)


# ------------------------------------------------------------------------------------------------
# Test data
# ------------------------------------------------------------------------------------------------


PACKAGE_NAMES = [
    "app-arch/zstd", "app-arch/xz-utils", "app-editors/vim", "app-misc/tmux", "app-shells/bash",
    "dev-lang/perl", "dev-lang/python", "dev-libs/openssl", "dev-libs/glib", "dev-libs/libxml2",
    "dev-util/cmake", "dev-vcs/git", "media-libs/libpng", "net-misc/curl", "net-misc/openssh",
    "sys-apps/coreutils", "sys-apps/util-linux", "sys-devel/gcc", "sys-devel/binutils",
    "sys-libs/glibc", "sys-libs/ncurses", "sys-process/procps", "www-servers/nginx", "x11-libs/gtk+",
]


def write_random_file(path, size, rng):
    """`size` bytes that do not compress: a random block, varied per chunk (fast, unlike urandom)."""
    block = os.urandom(min(size, 4 * MIB)) if size else b""
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            chunk = block[:size - written]
            # A different 8-byte head per chunk keeps chunks distinct without regenerating them.
            head = rng.getrandbits(64).to_bytes(8, "little")[:len(chunk)]
            chunk = head + chunk[len(head):]
            handle.write(chunk)
            written += len(chunk)


def packages_index(packages, target_size):
    """A `Packages` index in Portage's format, padded with more entries to about target_size."""
    header = ("ACCEPT_KEYWORDS: amd64\nARCH: amd64\nCBUILD: x86_64-pc-linux-gnu\nCHOST: x86_64-pc-linux-gnu\n"
              "ELIBC: glibc\nKERNEL: linux\nPACKAGES: {count}\nPROFILE: default/linux/amd64/23.0\n"
              "TIMESTAMP: 1732560000\nVERSION: 0\n\n")
    entries = []
    rng = random.Random(7)
    count = 0
    while True:
        for name, relative, size in packages:
            count += 1
            suffix = "" if count <= len(packages) else f"-extra{count}"
            version = relative.rsplit("/", 1)[-1].split("-", 1)[-1].rsplit(".gpkg", 1)[0]
            entries.append(
                f"BUILD_ID: 1\nBUILD_TIME: {1732500000 + count}\nCPV: {name}{suffix}-{version}\n"
                f"DEFINED_PHASES: compile configure install prepare\n"
                f"DEPEND: dev-libs/libfoo:= >=sys-libs/zlib-1.2.13:=\nEAPI: 8\nIUSE: debug doc nls +ssl test\n"
                f"KEYWORDS: amd64\nLICENSE: GPL-2+\nMD5: {rng.getrandbits(128):032x}\n"
                f"PATH: {relative}\nRDEPEND: dev-libs/libfoo:= >=sys-libs/zlib-1.2.13:=\n"
                f"SHA1: {rng.getrandbits(160):040x}\nSIZE: {size}\nSLOT: 0/0\nUSE: amd64 elibc_glibc nls ssl\n"
                f"MTIME: {1732500000 + count}\n\n")
            text = header.format(count=count) + "".join(entries)
            if len(text) >= target_size:
                return text


def make_data(base, quick):
    """PKGDIR with one big package, 1-5 MB packages under category/package/, and `Packages`."""
    pkgdir = base / "pkgdir"
    rng = random.Random(2024)
    big_size = (32 if quick else 512) * MIB
    big_relative = "dev-lang/rust-bin/rust-bin-1.82.0-1.gpkg.tar"
    packages = []
    sizes = [rng.randint(1 * MB, 5 * MB) for _ in PACKAGE_NAMES]
    if quick:
        sizes = [size // 10 for size in sizes]
    for name, size in zip(PACKAGE_NAMES, sizes):
        package = name.split("/")[1]
        relative = f"{name}/{package}-{rng.randint(1, 9)}.{rng.randint(0, 30)}-1.gpkg.tar"
        (pkgdir / name).mkdir(parents=True, exist_ok=True)
        write_random_file(pkgdir / relative, size, rng)
        packages.append((name, relative, size))
    (pkgdir / big_relative).parent.mkdir(parents=True, exist_ok=True)
    write_random_file(pkgdir / big_relative, big_size, rng)
    index = packages_index(packages + [("dev-lang/rust-bin", big_relative, big_size)], 200 * 1000)
    (pkgdir / "Packages").write_text(index)
    return pkgdir, big_relative, big_size, packages


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def process_tree(pid):
    """pid and all its descendants (nginx's workers), from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
    return pids


def cpu_seconds(pid):
    """User + system CPU seconds used so far by pid and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for current in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


class Server:
    def __init__(self, name, argv, port, log_path, cwd=None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.cwd = cwd
        self.process = None
        self.log = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/"

    def start(self):
        self.log = open(self.log_path, "wb")
        # Access logs go to a file: a terminal would slow a server down unevenly. Its own session, so
        # that a Ctrl-C reaches only this script, which then stops each server in order.
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                        cwd=self.cwd, start_new_session=True)
        try:
            wait_for_port(self.port, self.process, self.name)
        except BenchError as error:
            self.stop()
            raise BenchError(f"{error}; its output:\n{Path(self.log_path).read_text(errors='replace')}") from None

    def cpu(self):
        return cpu_seconds(self.process.pid)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log:
            self.log.close()
            self.log = None


def our_server(base, pkgdir):
    config = base / "gentoo-binhost.conf"
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\n")
    port = free_port()
    argv = [sys.executable, str(SCRIPT), "-q", "-c", str(config), "serve", "--bind", "127.0.0.1",
            "--port", str(port)]
    return Server(OURS, argv, port, base / "ours.log")


def http_server(base, pkgdir):
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(pkgdir)]
    return Server(HTTP_SERVER, argv, port, base / "http-server.log")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
{user}pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
{temp_paths}    server {{
        listen 127.0.0.1:{port};
        root {pkgdir};
    }}
}}
"""
NGINX_TEMP_PATHS = ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                    "scgi_temp_path")


def nginx_server(base, pkgdir, nginx):
    """nginx with a minimal configuration whose pid, logs and temp files are all under base."""
    port = free_port()
    prefix = base / "nginx"
    prefix.mkdir()
    config = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {directive} {prefix}/{directive.split('_temp')[0]};\n"
                         for directive in NGINX_TEMP_PATHS)
    # A build without one of the modules rejects its temp path directive: then leave them all out.
    for paths in (temp_paths, ""):
        config.write_text(NGINX_CONF.format(user=user, base=prefix, port=port, pkgdir=pkgdir,
                                            temp_paths=paths))
        check = subprocess.run([nginx, "-t", "-q", "-p", f"{prefix}/", "-e", f"{prefix}/nginx-error.log",
                                "-c", str(config)], capture_output=True, text=True)
        if check.returncode == 0:
            break
    else:
        raise BenchError(f"nginx rejects its configuration: {check.stderr.strip()}")
    argv = [nginx, "-p", f"{prefix}/", "-e", f"{prefix}/nginx-error.log", "-c", str(config)]
    return Server(NGINX, argv, port, prefix / "nginx.out")


# ------------------------------------------------------------------------------------------------
# Client loads (the same programs and options for every server)
# ------------------------------------------------------------------------------------------------


def check_content(server, pkgdir, packages_file="Packages"):
    """Each server must return the very bytes on disk, or its numbers mean nothing."""
    result = subprocess.run(["curl", "-s", "--fail", server.url + packages_file], capture_output=True)
    if result.returncode != 0 or result.stdout != (pkgdir / packages_file).read_bytes():
        raise BenchError(f"{server.name} did not serve {packages_file} correctly (curl status {result.returncode})")


# Each function below makes one measurement and returns (value, note).


def bench_download(server, relative, size):
    """(1) MB/s of one curl download of the big package."""
    result = subprocess.run(["curl", "-s", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}",
                             server.url + relative], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"curl of {relative} from {server.name} failed with status {result.returncode}")
    downloaded, speed = result.stdout.split()
    if int(float(downloaded)) != size:
        raise BenchError(f"{server.name} sent {downloaded} bytes of {relative}, not {size}")
    return float(speed) / MB, ""


WRK_LINE = re.compile(r"Requests/sec:\s*([\d.]+)")


def bench_packages(server, wrk, duration, connections):
    """(2) requests/s for `Packages` with wrk: 2 threads (1 for 1 connection), `connections`
    keep-alive connections."""
    url = server.url + "Packages"
    threads = f"-t{min(2, connections)}"
    # A short warm-up first: a server's first second (thread start, caches) is not its steady state.
    subprocess.run([wrk, threads, f"-c{connections}", "-d1s", url], capture_output=True)
    result = subprocess.run([wrk, threads, f"-c{connections}", f"-d{duration}s", "--latency", url],
                            capture_output=True, text=True)
    match = WRK_LINE.search(result.stdout)
    if result.returncode != 0 or not match:
        raise BenchError(f"wrk against {server.name} failed: {result.stdout}{result.stderr}")
    notes = []
    latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", result.stdout)
    p99 = re.search(r"^\s*99%\s+(\S+)", result.stdout, re.MULTILINE)
    if latency:
        notes.append(f"latency avg {latency.group(1)}" + (f" p99 {p99.group(1)}" if p99 else "")
                     + f" max {latency.group(3)}")
    errors = re.search(r"Socket errors:\s*(.*)", result.stdout)
    if errors:
        notes.append("socket errors: " + errors.group(1).strip())
    non_ok = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", result.stdout)
    if non_ok:
        notes.append(f"{non_ok.group(1)} non-2xx responses")
    return float(match.group(1)), "; ".join(notes)


def bench_many_clients(server, plans):
    """(3) wall time for all clients at once, each one curl process fetching its packages in turn
    over one kept-alive connection (when the server keeps it alive)."""
    start = time.monotonic()
    processes = []
    for plan in plans:
        argv = ["curl", "-s", "--fail", "-w", "%{http_code} %{size_download} %{num_connects}\\n"]
        for relative, _size in plan:
            argv += ["-o", "/dev/null", server.url + relative]
        processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    try:
        outputs = [process.communicate()[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.monotonic() - start
    connects = 0
    for process, plan, output in zip(processes, plans, outputs):
        words = output.split()
        results = [words[index:index + 3] for index in range(0, len(words), 3)]
        if process.returncode != 0 or len(results) != len(plan):
            raise BenchError(f"a client of {server.name} failed (curl status {process.returncode})")
        for (relative, size), (code, downloaded, connected) in zip(plan, results):
            if code != "200" or int(downloaded) != size:
                raise BenchError(f"{server.name} answered {code} with {downloaded} bytes for {relative}")
            connects += int(connected)
    requests = sum(len(plan) for plan in plans)
    return elapsed, f"{connects} connections for {requests} requests"


SLOW_ADDRESSES = 8
SLOW_PER_ADDRESS = 8


def bench_beside_slow_readers(server, relative, plan):
    """(4) one honest client's time for its packages while 64 connections from 8 addresses each
    download the big package and read 1 KB a second: the slots those readers hold must not
    starve anyone (serve drops downloads below its floor; nginx is event-driven)."""
    stop, readers = threading.Event(), []

    def trickle(sock):
        with contextlib.suppress(OSError):
            while not stop.wait(1.0):
                if not sock.recv(1024):
                    return

    for address in range(SLOW_ADDRESSES):
        for _ in range(SLOW_PER_ADDRESS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            try:
                sock.bind((f"127.0.5.{address + 1}", 0))
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(f"GET /{relative} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            except OSError:
                sock.close()
                continue
            readers.append(sock)
            threading.Thread(target=trickle, args=(sock,), daemon=True).start()
    try:
        time.sleep(1)  # every reader is in its body now
        start = time.monotonic()
        argv = ["curl", "-s", "--fail", "--retry", "5", "--retry-delay", "1", "-w", "%{http_code} %{size_download}\\n"]
        for package, _size in plan:
            argv += ["-o", "/dev/null", server.url + package]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        for sock in readers:
            sock.close()
    words = result.stdout.split()
    answers = [words[index:index + 2] for index in range(0, len(words), 2)]
    if result.returncode != 0 or [(code, int(size)) for code, size in answers] != [("200", size) for _, size in plan]:
        raise BenchError(f"the honest client of {server.name} failed beside slow readers (curl status"
                         f" {result.returncode}: {result.stdout.strip()[-200:]})")
    return elapsed, f"{len(readers)} slow readers held connections"


def client_plans(packages, clients, per_client):
    """For each client, `per_client` packages in its own order: the same plans for every server."""
    rng = random.Random(50)
    plans = []
    for _ in range(clients):
        chosen = [packages[index] for index in rng.sample(range(len(packages)), min(per_client, len(packages)))]
        plans.append([(relative, size) for _name, relative, size in chosen])
    return plans


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def ratio(ours, other, higher_is_better):
    """How many times better ours is (>1: better), whatever the metric's direction."""
    if ours is None or other is None or not ours or not other:
        return None
    return ours / other if higher_is_better else other / ours


def format_ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


METRICS = [
    # key, title, unit, format, higher is better
    ("download", "(1) {big} MiB package, curl", "MB/s", "{:.0f}", True),
    ("packages", "(2) Packages, wrk -c{connections}", "req/s", "{:.0f}", True),
    ("packages1", "(2b) Packages, wrk -c1 (no goal)", "req/s", "{:.0f}", True),
    ("clients", "(3) {clients} clients x {per_client} pkgs", "s", "{:.2f}", False),
    ("slow", "(4) 1 client beside 64 slow readers", "s", "{:.2f}", False),
]
METRIC_FORMATS = {key: fmt for key, _title, _unit, fmt, _higher in METRICS}


GOALS = [
    # key, against, minimum ratio, text
    ("download", NGINX, 0.9, "(1) download speed at least 0.9x nginx"),
    ("packages", HTTP_SERVER, 2.0, "(2) Packages req/s at least 2x http.server"),
    ("clients", NGINX, 0.8, "(3) many-clients total time within 0.8x of nginx (nginx time / ours >= 0.8)"),
    ("slow", NGINX, 0.8, "(4) an honest client beside slow readers within 0.8x of nginx"),
]


def report(results, missing, settings, labels, failed):
    metrics = [(key, title.format(**labels), unit, fmt, higher) for key, title, unit, fmt, higher in METRICS]
    print()
    print(f"Results ({settings}; 127.0.0.1, {os.cpu_count()} cores).")
    print("Ratios are 'times as good as' (for times: the other's time / ours): above 1, gentoo-binhost is better.")
    names = [OURS, HTTP_SERVER, NGINX]
    width = 42
    header = f"{'metric':<{width}}" + "".join(f"{name:>16}" for name in names) + f"{'vs nginx':>12}{'vs http.server':>16}"
    print(header)
    print("-" * len(header))
    for key, title, unit, fmt, higher in metrics:
        row = f"{title + ' (' + unit + ')':<{width}}"
        values = {}
        for name in names:
            result = results.get((key, name))
            values[name] = result["value"] if result else None
            cell = (fmt.format(values[name]) if result else "FAILED" if name in failed.get(key, {})
                    else "missing" if name in missing else "not run")
            row += f"{cell:>16}"
        row += f"{format_ratio(ratio(values[OURS], values[NGINX], higher)):>12}"
        row += f"{format_ratio(ratio(values[OURS], values[HTTP_SERVER], higher)):>16}"
        print(row)
    print()
    print("Details:")
    for key, title, _unit, _fmt, _higher in metrics:
        for name in names:
            result = results.get((key, name))
            if result:
                note = f"; best run: {result['note']}" if result.get("note") else ""
                print(f"  {title:<{width - 2}} {name:<15} runs {result['detail']};"
                      f" server CPU {result['cpu']:.2f} s a run{note}")
    print()
    print("Goals:")
    for key, against, minimum, text in GOALS:
        higher = next(metric[4] for metric in metrics if metric[0] == key)
        ours, other = results.get((key, OURS)), results.get((key, against))
        value = ratio(ours["value"], other["value"], higher) if ours and other else None
        if value is None:
            verdict = ("not measured (wrk missing)" if key.startswith("packages") and not find_program("wrk")
                       else f"not measured ({against} missing)" if against in missing else "not measured")
        else:
            verdict = f"{'MET' if value >= minimum else 'NOT MET'} ({value:.2f}x)"
        print(f"  {text:<76} {verdict}")
    print("Every ratio to nginx:")
    for key, title, _unit, _fmt, higher in metrics:
        ours, other = results.get((key, OURS)), results.get((key, NGINX))
        value = ratio(ours["value"], other["value"], higher) if ours and other else None
        print(f"  {title:<{width}} {format_ratio(value)}")
    for name in missing:
        print(f" * {name} could not be run: its columns are empty")
    for key, servers in failed.items():
        for name, error in servers.items():
            print(f"!!! {name} failed measurement {key}: {error}")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def script_version():
    """Which gentoo-binhost.py was measured: its hash, and the commit it sits on (numbers move with it)."""
    digest = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]
    git = ["git", "-C", str(ROOT)]
    with contextlib.suppress(OSError):
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            changed = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", SCRIPT.name]).returncode != 0
            return f"sha256 {digest}, commit {head.stdout.strip()}{' with local changes' if changed else ''}"
    return f"sha256 {digest}"


def run(args, base):
    install_missing(["curl", "wrk", "nginx"])
    if not find_program("curl"):
        raise BenchError("curl is needed for every measurement: apt-get install curl")
    wrk, nginx = find_program("wrk"), find_program("nginx")
    missing = [] if nginx else [NGINX]
    if not wrk:
        print(" * wrk is missing: measurements (2) and (2b) are skipped", flush=True)
    if not nginx:
        print(" * nginx is missing: no ratios to nginx (install nginx-light)", flush=True)

    quick = args.quick
    print(f" * Measuring {SCRIPT.name} ({script_version()}) with {sys.executable}", flush=True)
    print(">>> Writing test data", flush=True)
    started = time.monotonic()
    pkgdir, big_relative, big_size, packages = make_data(base, quick)
    packages_size = (pkgdir / "Packages").stat().st_size
    print(f" * {big_size // MIB} MiB package, {len(packages)} packages of"
          f" {min(p[2] for p in packages) / MB:.1f}-{max(p[2] for p in packages) / MB:.1f} MB,"
          f" Packages of {packages_size / 1000:.0f} KB in {time.monotonic() - started:.1f} s", flush=True)

    servers = [our_server(base, pkgdir), http_server(base, pkgdir)]
    if nginx:
        try:
            servers.append(nginx_server(base, pkgdir, nginx))
        except BenchError as error:
            print(f" * nginx is left out: {error}", flush=True)
            missing.append(NGINX)
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (2 if quick else 5)
    plans = client_plans(packages, args.clients, args.per_client)
    labels = {"big": big_size // MIB, "connections": args.connections, "clients": args.clients,
              "per_client": args.per_client}
    settings = (f"{'quick: ' if quick else ''}best of {rounds} interleaved runs each;"
                f" wrk -t2 -c{args.connections} -d{duration}s")
    results = {}
    failed = {}
    started_servers = []
    measurements = [("download", bench_download, (big_relative, big_size), max),
                    ("packages", bench_packages, (wrk, duration, args.connections), max),
                    # Not in the issue: one client on one kept-alive connection, as Portage fetches.
                    ("packages1", bench_packages, (wrk, duration, 1), max),
                    ("clients", bench_many_clients, (plans,), min),
                    ("slow", bench_beside_slow_readers, (big_relative, plans[0][:10]), min)]
    try:
        for server in list(servers):
            started_servers.append(server)  # before start(): an interrupted start still gets stopped
            try:
                server.start()
            except BenchError as error:
                if server.name != NGINX:
                    raise
                # Like a missing nginx: the other measurements still mean something.
                print(f" * nginx did not start, so it is left out: {error}", flush=True)
                servers.remove(server)
                missing.append(NGINX)
                continue
            check_content(server, pkgdir)
            print(f" * {server.name} serves on {server.url}", flush=True)
        for key, function, arguments, best in measurements:
            if key.startswith("packages") and not wrk:
                continue
            title = next(title for metric, title, *_rest in METRICS if metric == key).format(**labels)
            print(f">>> {title}", flush=True)
            runs = {server.name: [] for server in servers}
            for number in range(rounds):
                # Rounds alternate between the servers, each round in another order, so that a slow
                # spell of the machine does not land on one server only.
                order = servers[number % len(servers):] + servers[:number % len(servers)]
                for server in order:
                    if server.name in failed.get(key, {}):
                        continue
                    before = server.cpu()
                    try:
                        value, note = function(server, *arguments)
                    except BenchError as error:
                        # A server that fails under load is a result too: report it, go on with the others.
                        print(f"!!! {server.name}: {error}", flush=True)
                        failed.setdefault(key, {})[server.name] = str(error)
                        continue
                    runs[server.name].append((value, note, server.cpu() - before))
                    print(f"    {server.name:<15} {METRIC_FORMATS[key].format(value):>8} {note}", flush=True)
            for server in servers:
                values = [value for value, _note, _cpu in runs[server.name]]
                if server.name in failed.get(key, {}):
                    continue
                chosen = values.index(best(values))
                results[(key, server.name)] = {
                    "value": values[chosen],
                    "cpu": sum(cpu for _value, _note, cpu in runs[server.name]) / len(values),
                    "detail": ", ".join(METRIC_FORMATS[key].format(value) for value in values),
                    "note": runs[server.name][chosen][1],
                }
    finally:
        for server in reversed(started_servers):
            server.stop()
    report(results, missing, settings, labels, failed)
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files and short runs: a smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")
    parser.add_argument("--clients", type=int, default=50, help="clients in (3) (default 50)")
    parser.add_argument("--per-client", type=int, default=20, help="packages per client in (3) (default 20)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections in (2) (default 32)")
    parser.add_argument("--rounds", type=int, help="runs of each measurement, the best counts (default 3)")
    parser.add_argument("--duration", type=int, help="seconds of each wrk run (default 5)")
    args = parser.parse_args(argv)

    # SIGTERM ends the run like Ctrl-C does: through the finally clauses that stop the servers.
    def interrupted(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-bench-"))
    try:
        return run(args, base)
    except BenchError as error:
        print(f"!!! {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("!!! Interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f" * Kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
