"""Sharing is never open by default; remote users cannot escape the models folder."""
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from appserver import ROOT, free_port, running_app


def login(url, user, password):
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "login", data=data), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_for(pattern, log_path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, log_path.read_text())
        if m:
            return m
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in log:\n{log_path.read_text()[-2000:]}")


def test_share_without_auth_requires_the_generated_password(monkeypatch):
    # Gradio reads its share server from this variable: a closed loopback port, so no public link can be made
    # and the outcome does not depend on the network. The app process inherits it.
    monkeypatch.setenv("GRADIO_SHARE_SERVER_ADDRESS", f"127.0.0.1:{free_port()}")
    with running_app("--share", "--no-save", "--runtime", "pytorch") as (url, proc):
        log_path = ROOT / "tests" / "artifacts" / f"app-{urllib.parse.urlparse(url).port}.log"
        m = wait_for(r"Login for the public link: user (\S+), password (\S+)", log_path)
        user, password = m.group(1), m.group(2)
        log = log_path.read_text()
        assert "No public link could be made" in log and "serving locally only" in log
        assert "Public link:" not in log
        assert login(url, user, "wrong") >= 400
        assert login(url, user, password) == 200
        for path in ("config", "gradio_api/info"):
            try:
                urllib.request.urlopen(url + path, timeout=10)
                opened = True
            except urllib.error.HTTPError as e:
                opened = e.code < 400
            assert not opened, f"{path} answered without a login"


def test_explicit_auth_is_used_as_given(tmp_path):
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# team\nann:s3cret\n")
    with running_app("--auth", "bob:hunter22", "--auth-file", str(auth_file), "--no-save", "--runtime",
                     "pytorch") as (url, _):
        assert login(url, "bob", "hunter22") == 200
        assert login(url, "ann", "s3cret") == 200
        assert login(url, "bob", "nope") >= 400
