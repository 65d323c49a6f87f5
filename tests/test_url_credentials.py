"""Issue 25 (hidden class: credentials inside URLs): a user name, password or token in a URL, or a
signed query, is never printed or logged; http(s) credentials are sent as HTTP basic auth (they
used to make urllib read `user:token@host` as the host name); s3:// credentials in the URL are
refused in one line naming the environment variables to use."""

from __future__ import annotations

import base64
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Tok3n-zQ9"


def test_redact_hides_userinfo_and_signed_query_values_only():
    from hiervl.redact import redact

    assert redact(f"https://bob:{SECRET}@host:8/a/b.tar failed") == "https://***@host:8/a/b.tar failed"
    assert redact(f"s3://AKIA:{SECRET}@bucket/x") == "s3://***@bucket/x"
    assert redact(f"http://{SECRET}@h/x") == "http://***@h/x"  # a token as the user name
    url = f"https://h/x.mp4?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}&part=3&access_token={SECRET}"
    assert redact(url) == "https://h/x.mp4?X-Amz-Signature=***&X-Amz-Credential=***&part=3&access_token=***"
    for plain in ("/data/runs/a@b/x", "data.path=runs/demo/shards", "email me: a@b.c", "https://h/x?part=3"):
        assert redact(plain) == plain


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    body = b"key,video,caption\nk1,a.mp4,a red dot\n"

    def do_GET(self):  # noqa: N802 - http.server's name
        want = "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_http_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown():
    from hiervl.storage import open_store

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        store = open_store(f"http://bob:{SECRET}@127.0.0.1:{port}/data", {"retries": 0})
        assert store.read("manifest.csv") == _AuthHandler.body
        assert SECRET not in store.url and store.url == f"http://127.0.0.1:{port}/data"
        wrong = open_store(f"http://bob:nope@127.0.0.1:{port}/data", {"retries": 0})
        with pytest.raises(Exception) as e:
            wrong.read("manifest.csv")
        assert "nope" not in str(e.value), e.value
    finally:
        server.shutdown()


def _cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "hiervl.launch.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_url_with_credentials_never_reaches_the_terminal(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the read fails
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _cli("prep", "--input", f"https://bob:{SECRET}@127.0.0.1:{port}/m.csv", "--out", str(tmp_path / "out"),
               "storage.retries=0")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and SECRET not in res.stdout + res.stderr, res.stderr[-3000:]
    assert lines[-1].startswith("hiervl prep: error: could not read the input manifest: https://127.0.0.1:"), lines
    res = _cli("train", "--config", "configs/tiny.yaml", f"data.path=s3://AKIAEXAMPLE:{SECRET}@bucket/shards",
               f"train.out_dir={tmp_path / 'run'}", "storage.retries=0")
    assert res.returncode == 1 and SECRET not in res.stdout + res.stderr, res.stderr[-3000:]
    assert "credentials do not go in the URL; set AWS_ACCESS_KEY_ID" in res.stderr.strip().splitlines()[-1]
    # anything a command prints passes the redaction: here a config printed back
    res = _cli("train", "--config", "configs/tiny.yaml", "--print-config",
               f"data.path=https://h/shards?sig={SECRET}")
    assert res.returncode == 0 and SECRET not in res.stdout and "sig=***" in res.stdout, res.stdout[-2000:]


def test_log_records_are_redacted_in_every_handler(tmp_path, capsys):
    from hiervl.log import get_logger, setup_logging

    try:
        setup_logging(0, log_dir=tmp_path)
        get_logger("hiervl.test").warning("%s: read failed", f"https://bob:{SECRET}@h/x")
        for handler in get_logger("hiervl").handlers:
            handler.flush()
        text = (tmp_path / "rank0.log").read_text() + capsys.readouterr().err
        assert SECRET not in text and text.count("https://***@h/x: read failed") == 2, text
    finally:
        setup_logging(0)
