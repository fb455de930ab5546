#!/usr/bin/env python3
"""Drive a real imagegate with the official `openai` Python SDK (base_url pointed at the gateway).

Starts a mock upstream (a real HTTP server on 127.0.0.1:0) and the gateway binary on
127.0.0.1:0, then checks, through the SDK:
  1. a success with a file upload (the SDK sends image/png with the file name),
  2. a success with raw bytes (the SDK sends filename "upload", application/octet-stream),
  3. a validation error arriving as openai.BadRequestError with the right param and code,
     and never reaching the upstream,
  4. an authentication error arriving as openai.AuthenticationError.

Usage: openai_sdk.py PATH_TO_IMAGEGATE_BINARY
"""
import hashlib
import http.server
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import openai

GATEWAY_KEY = "ig-sdk-test-key-0123456789"
UPSTREAM_KEY = "sk-upstream-test-key"


def png_rgba(side, transparent=True):
    """An RGBA8 PNG made by hand: opaque red with a transparent top-left pixel."""
    rows = b""
    for y in range(side):
        row = bytearray(b"\x00")
        for x in range(side):
            alpha = 0 if (transparent and x == 0 and y == 0) else 255
            row += bytes([200, 30, 30, alpha])
        rows += bytes(row)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Upstream(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        Upstream.received.append((self.path, dict(self.headers), body))
        n = int(re.search(rb'name="n"\r\n\r\n(\d+)\r\n', body).group(1))
        answer = json.dumps({"created": int(time.time()), "data": [{"url": f"https://example.invalid/{i}.png"} for i in range(n)]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.send_header("x-request-id", "req_upstream_sdk")
        self.send_header("openai-version", "2020-10-01")
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def start_gateway(binary, upstream_url, workdir):
    key_hash = "sha256:" + hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    config = os.path.join(workdir, "imagegate.toml")
    with open(config, "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:0"
[upstream]
base_url = "{upstream_url}"
allow_http = true
[log]
format = "json"
[validation]
models = ["dall-e-2"]
[models]
default = "dall-e-2"
accepted = {{}}
[[clients]]
name = "sdk-test"
key_hash = "{key_hash}"
""")
    env = dict(os.environ, OPENAI_API_KEY=UPSTREAM_KEY, IMAGEGATE_DATA_DIR=workdir)
    proc = subprocess.Popen([binary, "serve", "--config", config], stderr=subprocess.PIPE, env=env, cwd=workdir, text=True)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") == "imagegate listening":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, event["addr"]
    proc.kill()
    sys.exit("gateway did not start:\n" + "".join(lines))


def main():
    binary = os.path.abspath(sys.argv[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    failures = 0
    passed = 0
    with tempfile.TemporaryDirectory() as workdir:
        proc, addr = start_gateway(binary, upstream_url, workdir)
        try:
            client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=30)
            image_path = os.path.join(workdir, "otter.png")
            with open(image_path, "wb") as f:
                f.write(png_rgba(64))

            def check(name, fn):
                nonlocal failures, passed
                try:
                    fn()
                    passed += 1
                    print(f"ok   {name}")
                except Exception as e:  # noqa: BLE001 - report every failure
                    failures += 1
                    print(f"FAIL {name}: {type(e).__name__}: {e}")

            def file_upload():
                with open(image_path, "rb") as f:
                    result = client.images.edit(image=f, prompt="an otter with a beret", n=2, size="256x256")
                assert len(result.data) == 2, result
                path, headers, body = Upstream.received[-1]
                assert path == "/v1/images/edits", path
                lower = {k.lower(): v for k, v in headers.items()}
                assert lower["authorization"] == f"Bearer {UPSTREAM_KEY}", "upstream key not injected"
                assert GATEWAY_KEY.encode() not in body and GATEWAY_KEY not in str(headers), "gateway key leaked upstream"
                names = re.findall(rb'form-data; name="([^"]+)"', body)
                assert names == [b"prompt", b"model", b"n", b"size", b"response_format", b"image"], names
                assert b"Content-Type: image/png" in body

            def raw_bytes():
                before = len(Upstream.received)
                result = client.images.edit(image=png_rgba(32), prompt="raw bytes upload")
                assert len(result.data) == 1
                assert len(Upstream.received) == before + 1

            def validation_error():
                before = len(Upstream.received)
                try:
                    with open(image_path, "rb") as f:
                        client.images.edit(image=f, prompt="too many", n=11)
                except openai.BadRequestError as e:
                    err = e.body if isinstance(e.body, dict) else {}
                    assert err.get("param") == "n", e.body
                    assert err.get("code") == "integer_above_max_value", e.body
                    assert e.status_code == 400
                else:
                    raise AssertionError("no BadRequestError")
                assert len(Upstream.received) == before, "a refused request reached the upstream"

            def opaque_image_error():
                try:
                    client.images.edit(image=("opaque.png", png_rgba(16, transparent=False), "image/png"), prompt="x")
                except openai.BadRequestError as e:
                    assert e.body.get("param") == "image" and e.body.get("code") == "image_not_transparent", e.body
                else:
                    raise AssertionError("no BadRequestError")

            def wrong_key():
                bad = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="ig-wrong-key-000000", max_retries=0)
                try:
                    with open(image_path, "rb") as f:
                        bad.images.edit(image=f, prompt="x")
                except openai.AuthenticationError as e:
                    assert e.body.get("code") == "invalid_api_key", e.body
                    assert "ig-wrong-key-000000" not in str(e.body), "the key was echoed in full"
                else:
                    raise AssertionError("no AuthenticationError")

            check("file upload succeeds, canonical body, key injected", file_upload)
            check("raw bytes (application/octet-stream) succeed", raw_bytes)
            check("n=11 is BadRequestError param=n code=integer_above_max_value", validation_error)
            check("opaque image is BadRequestError code=image_not_transparent", opaque_image_error)
            check("wrong gateway key is AuthenticationError", wrong_key)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            server.shutdown()
    print(f"{passed} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
