"""serve: the built-in HTTP server, exercised with real HTTP clients over 127.0.0.1."""

import email.utils
import http.client
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gentoo-binhost.py")


@pytest.fixture
def pkgdir(tmp_path):
    root = tmp_path / "pkgdir"
    (root / "app-misc" / "hello").mkdir(parents=True)
    (root / "Packages").write_text("VERSION: 0\nTIMESTAMP: 1\n\n")
    (root / "app-misc" / "hello" / "hello-1.0-1.gpkg.tar").write_bytes(bytes(range(256)) * 40)
    (root / ".secret").write_text("hidden")
    (tmp_path / "outside").write_text("outside the pkgdir")
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink("/etc/passwd", root / "passwd")
    return root


@pytest.fixture
def server(gb, pkgdir):
    output = gb.Output(color=False, verbosity=0)
    httpd = gb.make_server("127.0.0.1", 0, str(pkgdir), output)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def request(port, path, method="GET", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


def test_serves_files_with_exact_length_and_no_content_encoding(server, pkgdir):
    response, body = request(server, "/app-misc/hello/hello-1.0-1.gpkg.tar")
    assert response.status == 200
    assert body == (pkgdir / "app-misc/hello/hello-1.0-1.gpkg.tar").read_bytes()
    assert int(response.headers["Content-Length"]) == len(body)
    assert response.headers["Content-Encoding"] is None
    assert response.headers["Last-Modified"]


def test_missing_packages_gz_is_404_not_403(server):
    response, _ = request(server, "/Packages.gz")
    assert response.status == 404


@pytest.mark.parametrize("path", [
    "/../outside", "/%2e%2e/outside", "/app-misc/%2E%2E/%2e%2e/outside", "//etc/passwd",
    "/.secret", "/escape", "/passwd", "/app-misc", "/", "/app-misc/hello/",
])
def test_refuses_anything_but_regular_files_inside_pkgdir(server, path):
    response, body = request(server, path)
    assert response.status == 404, path
    assert b"outside" not in body and b"root:" not in body and b"hidden" not in body


def test_head_sends_headers_only(server, pkgdir):
    response, body = request(server, "/Packages", method="HEAD")
    assert response.status == 200
    assert body == b""
    assert int(response.headers["Content-Length"]) == (pkgdir / "Packages").stat().st_size


def test_if_modified_since_gives_304(server, pkgdir):
    mtime = int((pkgdir / "Packages").stat().st_mtime)
    response, body = request(server, "/Packages",
                             headers={"If-Modified-Since": email.utils.formatdate(mtime, usegmt=True)})
    assert (response.status, body) == (304, b"")
    response, _ = request(server, "/Packages",
                          headers={"If-Modified-Since": email.utils.formatdate(mtime - 10, usegmt=True)})
    assert response.status == 200


def test_byte_ranges(server, pkgdir):
    data = (pkgdir / "app-misc/hello/hello-1.0-1.gpkg.tar").read_bytes()
    path = "/app-misc/hello/hello-1.0-1.gpkg.tar"
    response, body = request(server, path, headers={"Range": "bytes=100-199"})
    assert response.status == 206 and body == data[100:200]
    assert response.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    response, body = request(server, path, headers={"Range": "bytes=10000-"})
    assert response.status == 206 and body == data[10000:]
    response, body = request(server, path, headers={"Range": "bytes=-5"})
    assert response.status == 206 and body == data[-5:]
    response, _ = request(server, path, headers={"Range": f"bytes={len(data)}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"


def test_keep_alive_serves_several_requests_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    sockets = set()
    for _ in range(3):
        connection.request("GET", "/Packages")
        sockets.add(id(connection.sock))  # http.client would silently reconnect after a close
        response = connection.getresponse()
        assert response.status == 200 and response.read().startswith(b"VERSION")
        assert not response.will_close
    assert len(sockets) == 1
    connection.close()


def test_serve_command_prints_the_binrepos_entry_and_stops_on_sigterm(tmp_path, pkgdir):
    from conftest import free_port
    port = free_port()
    config = tmp_path / "binhost.conf"
    config.write_text(f"[binhost]\nroot = {tmp_path}\npkgdir = {pkgdir}\n"
                      f"url = http://binhost.example:{port}/\nbind = 127.0.0.1\nport = {port}\n")
    process = subprocess.Popen([sys.executable, SCRIPT, "-c", str(config), "--color=n", "serve"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                response, body = request(port, "/Packages")
                break
            except OSError:
                time.sleep(0.1)
        assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert f"sync-uri = http://binhost.example:{port}/" in stdout
    assert "[gentoo-binhost]" in stdout
    assert '"GET /Packages HTTP/1.1" 200' in stdout


def test_serve_refuses_a_busy_port(tmp_path, pkgdir):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "binhost.conf"
        config.write_text(f"[binhost]\npkgdir = {pkgdir}\nbind = 127.0.0.1\nport = {port}\n")
        result = subprocess.run([sys.executable, SCRIPT, "-c", str(config), "serve"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("!!! port") and "Traceback" not in result.stderr


# ---- hardening: concurrency, timeouts, TLS, auth, service files ---------------------------------


def test_fifty_concurrent_downloads_arrive_byte_identical(gb, tmp_path):
    import concurrent.futures
    import hashlib
    pkgdir = tmp_path / "big"
    pkgdir.mkdir()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (pkgdir / "big.gpkg.tar").write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    httpd = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            digests = list(pool.map(
                lambda _: hashlib.sha256(request(httpd.server_address[1], "/big.gpkg.tar")[1]).hexdigest(),
                range(50)))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert digests == [expected] * 50


def test_a_silent_client_is_dropped_while_others_are_served(gb, pkgdir):
    import socket
    httpd = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0),
                           client_timeout=1)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as silent:
            response, _ = request(port, "/Packages")
            assert response.status == 200
            silent.settimeout(10)
            started = time.monotonic()
            assert silent.recv(1) == b""  # the server closed it
            assert time.monotonic() - started < 9
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    from conftest import need, run
    import shutil
    need(shutil.which("openssl"), "openssl missing")
    directory = tmp_path_factory.mktemp("tls")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", directory / "key.pem",
         "-out", directory / "cert.pem"])
    return directory / "cert.pem", directory / "key.pem"


def serve_cli(tmp_path, pkgdir, *extra, config_extra=""):
    """Start `serve` as a user would; returns (process, port)."""
    from conftest import free_port, wait_for_port
    port = free_port()
    config = tmp_path / "serve.conf"
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\nbind = 127.0.0.1\nport = {port}\n{config_extra}")
    process = subprocess.Popen([sys.executable, SCRIPT, "-c", str(config), "--color=n", "serve"] + list(extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_port(port, proc=process), process.communicate(timeout=10)
    return process, port


def stop(process):
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=20)


def test_tls_with_curl(tmp_path, pkgdir, certificate):
    from conftest import need, run
    import shutil
    need(shutil.which("curl"), "curl missing")
    cert, key = certificate
    process, port = serve_cli(tmp_path, pkgdir, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        fetched = run(["curl", "-sS", "--fail", "--cacert", cert, f"https://127.0.0.1:{port}/Packages"])
        assert fetched.stdout.startswith("VERSION")
        refused = run(["curl", "-sS", "--fail", f"https://127.0.0.1:{port}/Packages"], check=False)
        assert refused.returncode != 0  # an untrusted certificate is refused by the client
        missing = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", cert,
                       f"https://127.0.0.1:{port}/Packages.gz"], check=False)
        assert missing.stdout == "404"
    finally:
        stdout, _ = stop(process)
    assert "sync-uri = https://" in stdout  # the default url follows TLS


def test_basic_auth_with_curl(tmp_path, pkgdir):
    from conftest import need, run
    import shutil
    need(shutil.which("curl"), "curl missing")
    auth = tmp_path / "auth"
    auth.write_text("# users\nportage:s3cret%word\n")
    auth.chmod(0o600)
    process, port = serve_cli(tmp_path, pkgdir, "--auth-file", str(auth))
    try:
        url = f"http://127.0.0.1:{port}/Packages"
        code = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url], check=False).stdout
        assert code == "401"
        wrong = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "portage:nope", url],
                    check=False).stdout
        assert wrong == "401"
        right = run(["curl", "-sS", "--fail", "-u", "portage:s3cret%word", url])
        assert right.stdout.startswith("VERSION")
    finally:
        stdout, stderr = stop(process)
    # The printed entry shows where credentials go, never the password (logs are often readable).
    assert "sync-uri = http://USER:PASSWORD@" in stdout and "s3cret" not in stdout


def test_public_bind_without_tls_or_auth_warns(tmp_path, pkgdir):
    from conftest import free_port
    port = free_port()
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\nport = {port}\n")
    process = subprocess.Popen([sys.executable, SCRIPT, "-c", str(config), "--color=n", "serve",
                                "--bind", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from conftest import wait_for_port
    assert wait_for_port(port, proc=process)
    _, stderr = stop(process)
    assert "without TLS and auth" in stderr


def test_print_nginx_is_valid_nginx_configuration(tmp_path, pkgdir):
    from conftest import run
    import shutil
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        # nginx is optional (make bench installs it); its package starts a server when installed.
        pytest.skip("nginx missing (apt-get install nginx-light)")
    config = tmp_path / "c.conf"
    config.write_text(f"[binhost]\npkgdir = {pkgdir}\nbind = 127.0.0.1\nport = 18080\n")
    block = run([sys.executable, SCRIPT, "-c", config, "serve", "--print-nginx"]).stdout
    assert f"root {pkgdir};" in block
    nginx_conf = tmp_path / "nginx.conf"
    nginx_conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                          f"events {{}}\nhttp {{\naccess_log off;\n{block}}}\n")
    run([shutil.which("nginx") or "/usr/sbin/nginx", "-t", "-q", "-p", tmp_path, "-c", nginx_conf])


@pytest.mark.parametrize("kind, marker", [("openrc", "#!/sbin/openrc-run"), ("systemd", "[Service]")])
def test_print_service(tmp_path, kind, marker):
    config = tmp_path / "c.conf"
    config.write_text("[binhost]\n")
    result = subprocess.run([sys.executable, SCRIPT, "-c", str(config), "serve", "--print-service", kind],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and marker in result.stdout
    assert f"-c {config} serve" in result.stdout and os.path.abspath(SCRIPT) in result.stdout
    # The serve options of that command line are the service's too.
    cert = tmp_path / "cert.pem"
    given = subprocess.run([sys.executable, SCRIPT, "-c", str(config), "serve", "--print-service", kind,
                            "--port", "8443", "--tls-cert", str(cert), "--index"],
                           capture_output=True, text=True, timeout=30)
    assert f"-c {config} serve --port 8443 --tls-cert {cert} --index" in given.stdout, given.stdout + given.stderr
    # The configuration lies under /tmp: the unit's PrivateTmp=yes would hide it from the service.
    hidden = [line for line in result.stderr.splitlines() if "PrivateTmp=yes hides it" in line]
    if kind == "systemd" and os.path.realpath(config).startswith("/tmp/"):
        assert "PrivateTmp=yes" in result.stdout
        assert [line for line in hidden if f"the configuration is {config}, under /tmp" in line], result.stderr
    else:
        assert not hidden, result.stderr


def test_directory_listings_only_with_index(gb, pkgdir):
    httpd = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, verbosity=0), listings=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        response, body = request(port, "/")
        assert response.status == 200
        assert b'href="app-misc/"' in body and b'href="Packages"' in body
        assert b".secret" not in body and b"escape" not in body and b"passwd" not in body
        assert request(port, "/app-misc")[0].status == 301
        assert b"hello/" in request(port, "/app-misc/")[1]
        assert request(port, "/../")[0].status == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_request_bodies_are_refused_not_parsed_as_requests(server):
    import socket
    with socket.create_connection(("127.0.0.1", server), timeout=10) as client:
        client.sendall(b"GET /Packages HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n"
                       b"GET /.secret HTTP/1.1\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1") == 1


def test_no_open_redirect_and_no_escapes_in_the_log(gb, pkgdir):
    import io
    log = io.StringIO()
    httpd = gb.make_server("127.0.0.1", 0, str(pkgdir), gb.Output(color=False, out=log), listings=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        response, _ = request(httpd.server_address[1], "//app-misc")
        assert response.status == 301 and response.headers["Location"] == "/app-misc/"
        import socket
        with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as raw:
            raw.sendall(b"GET /\x1b[31mred HTTP/1.1\r\nConnection: close\r\n\r\n")
            while raw.recv(65536):
                pass
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "\x1b" not in log.getvalue() and "\\x1b[31mred" in log.getvalue()


def test_not_modified_has_no_content_length(server, pkgdir):
    mtime = int((pkgdir / "Packages").stat().st_mtime)
    response, _ = request(server, "/Packages",
                          headers={"If-Modified-Since": email.utils.formatdate(mtime, usegmt=True)})
    assert response.status == 304 and response.headers["Content-Length"] is None


def test_a_fifo_is_not_served(gb, pkgdir, server):
    os.mkfifo(pkgdir / "fifo")
    response, _ = request(server, "/fifo")
    assert response.status == 404
