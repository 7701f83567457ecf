"""`make bench`, part 2: `build` of the test repository with 0, 1 and 2 local distccd helpers.

On a 2-core machine the helpers run on the same cores, so the point is not speed but that the
work really is spread: the report gives the compile jobs each helper ran (from its own log) and
the wall time of each run as a ratio to the local build measured in the same run. The test
packages are tiny, so Portage's own overhead dominates the wall time; read the ratios as "distcc
costs little", not as a speed-up.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import (SCRIPT, free_port, portage_eprefix, find_portage_bin, stop_process,  # noqa: E402
                      wait_for_port, write_portage_config)

PACKAGES = ["app-misc/hello", "app-misc/greet", "app-misc/hello-app"]
ROUNDS = 3  # builds per setting: the median wall time, the jobs of all of them


def start_helpers(base, count):
    helpers = []
    for number in range(count):
        logs = base / f"helper{number}"
        logs.mkdir(mode=0o1777)
        logs.chmod(0o1777)  # distccd drops root to an unprivileged user
        port = free_port()
        process = subprocess.Popen(["distccd", "--daemon", "--no-detach", "--listen", "127.0.0.1",
                                    "--port", str(port), "--allow", "127.0.0.1", "--jobs", "2",
                                    "--log-file", str(logs / "log"), "--log-level", "info"])
        if not wait_for_port(port, proc=process):
            raise SystemExit(f"!!! distccd on port {port} did not start")
        helpers.append({"process": process, "spec": f"127.0.0.1:{port}/2", "log": logs / "log"})
    return helpers


def compile_jobs(helper):
    text = helper["log"].read_text() if helper["log"].exists() else ""
    return len(re.findall(r"COMPILE_OK.*\.c\b", text))


def timed_build(binhost, config, portage_bin, distcc_hosts):
    argv = [sys.executable, str(SCRIPT), "-q", "-c", str(config), "build"]
    if distcc_hosts:
        argv += ["--distcc", distcc_hosts]
    argv += ["--oneshot", "--quiet-build=y", "--jobs=3", *PACKAGES]
    env = dict(os.environ, PATH=f"{portage_bin}:{os.environ['PATH']}")
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"!!! build failed:\n{result.stderr[-2000:]}")
    return elapsed


def main():
    if not (shutil.which("distccd") and shutil.which("distcc")):
        print(" * distcc not installed: skipping the distcc benchmark (apt-get install distcc)")
        return 0
    portage_bin = find_portage_bin()
    if portage_bin is None:
        raise SystemExit("!!! Portage not found: run `make deps`")
    eprefix = portage_eprefix(portage_bin / "python")
    write_portage_config(Path(eprefix))
    masquerade = Path(eprefix) / "usr/lib/distcc"
    if not masquerade.exists():
        masquerade.parent.mkdir(parents=True, exist_ok=True)
        masquerade.symlink_to("/usr/lib/distcc")
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-distcc-bench-"))
    base.chmod(0o755)  # distccd's unprivileged user writes its log below
    helpers = []
    try:
        binhost = base / "binhost"
        write_portage_config(binhost)
        config = base / "c.conf"
        config.write_text(f"[binhost]\nroot = {binhost}\n")
        timed_build(binhost, config, portage_bin, "")  # warm-up: caches, metadata
        local_times = [timed_build(binhost, config, portage_bin, "") for _ in range(ROUNDS)]
        rows = [("local only", sorted(local_times)[ROUNDS // 2], [])]
        helpers = start_helpers(base, 2)
        for count in (1, 2):
            before = [compile_jobs(helper) for helper in helpers]
            # --randomize: distcc otherwise fills the first host's slots before using the next.
            spec = " ".join(["--randomize"] + [helper["spec"] for helper in helpers[:count]])
            times = [timed_build(binhost, config, portage_bin, spec) for _ in range(ROUNDS)]
            # The version probe before each build is one job per helper: not counted.
            jobs = [compile_jobs(helper) - done - ROUNDS for helper, done in zip(helpers[:count], before)]
            rows.append((f"{count} helper(s)", sorted(times)[ROUNDS // 2], jobs))
        local = rows[0][1]
        print(f"\nbuild of {' '.join(PACKAGES)} (127.0.0.1, {os.cpu_count()} cores)")
        print(f"{'run':<14} {'wall':>8} {'vs local':>9}  compile jobs per helper ({ROUNDS} builds)")
        for name, elapsed, jobs in rows:
            spread = ", ".join(f"helper {i + 1}: {n}" for i, n in enumerate(jobs)) or "-"
            print(f"{name:<14} {elapsed:7.1f}s {local / elapsed:8.2f}x  {spread}")
        spread_ok = all(n > 0 for n in rows[-1][2])
        print(f"work spread over both helpers: {'yes' if spread_ok else 'NO'}")
        return 0
    finally:
        for helper in helpers:
            stop_process(helper["process"])
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
