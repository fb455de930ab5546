#!/usr/bin/env python3
"""Drive a real imagegate with the official `openai` Python SDK (base_url pointed at the gateway).

Starts a mock upstream (a real HTTP server on 127.0.0.1:0) and two gateway processes on
127.0.0.1:0, one per model profile, then checks, through the SDK:

dall-e-2 profile (`[validation] models = ["dall-e-2"]`, `[models] default = "dall-e-2"`, `accepted = {}`):
  1. a success with a file upload (the SDK sends image/png with the file name),
  2. a success with raw bytes (the SDK sends filename "upload", application/octet-stream),
  3. a validation error arriving as openai.BadRequestError with the right param and code,
     and never reaching the upstream,
  4. an authentication error arriving as openai.AuthenticationError.

gpt-image profile (the shipped `[models]` defaults; ../shared/spec/gpt-image-models.md):
  5. a list of two files (PNG + JPEG) sent as `image[]`, the JSON answer (§4) parsed, `usage` present,
  6. raw bytes (application/octet-stream) re-typed by the gateway: the upstream sees image/png,
  7. `stream=True, partial_images=1` iterated to `image_edit.completed` (with `usage`) (§5),
  8. openai.BadRequestError with `.code`/`.param` for a retired model (dall-e-2), for
     `response_format` and for 17 images, none of them reaching the upstream.

TLS termination (`[server.tls]`, a CA and a server certificate made with the `openssl` command):
  9. the SDK over https with an httpx client that trusts that CA (`verify=`, the SDK's
     `DefaultHttpxClient`) gets its edit,
 10. a client that trusts only the system CAs is refused (openai.APIConnectionError).

Usage: openai_sdk.py PATH_TO_IMAGEGATE_BINARY
"""
import base64
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


def jpeg_gray(side=8):
    """A minimal valid baseline JPEG made by hand: side x side (a multiple of 8), one gray component,
    uniform mid-gray. One-code Huffman tables: DC category 0 and AC end-of-block are both the code '0',
    so every 8x8 block is the two bits '00'."""

    def segment(marker, payload):
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    dqt = segment(0xDB, b"\x00" + bytes([1] * 64))
    sof0 = segment(0xC0, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    dht_dc = segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    dht_ac = segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    sos = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    blocks = (side // 8) ** 2
    bits = "00" * blocks
    bits += "1" * (-len(bits) % 8)  # pad with 1-bits
    scan = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + dqt + sof0 + dht_dc + dht_ac + sos + scan + b"\xff\xd9"


def multipart_parts(headers, body):
    """[(name, filename or None, content type or None, data)] of a multipart/form-data body."""
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    boundary = re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        head = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', head).group(1)
        filename = re.search(r'filename="([^"]*)"', head)
        part_type = re.search(r"(?im)^content-type:\s*(\S+)", head)
        parts.append((name, filename and filename.group(1), part_type and part_type.group(1), data[:-2]))
    return parts


def field(parts, name):
    values = [data.decode() for (n, filename, _, data) in parts if n == name and filename is None]
    return values[0] if values else None


USAGE = {
    "input_tokens": 1060,
    "input_tokens_details": {"text_tokens": 60, "image_tokens": 1000},
    "output_tokens": 2000,
    "output_tokens_details": {"image_tokens": 2000, "text_tokens": 0},
    "total_tokens": 3060,
}


class Upstream(http.server.BaseHTTPRequestHandler):
    received = []

    def do_GET(self):
        # Only used if a config leaves [models] check_at_start on.
        answer = json.dumps({"object": "list", "data": [{"id": "gpt-image-2", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        Upstream.received.append((self.path, dict(self.headers), body))
        parts = multipart_parts(self.headers, body)
        if (field(parts, "model") or "").startswith("gpt-image"):
            return self.gpt_image(parts)
        n = int(re.search(rb'name="n"\r\n\r\n(\d+)\r\n', body).group(1))
        answer = json.dumps({"created": int(time.time()), "data": [{"url": f"https://example.invalid/{i}.png"} for i in range(n)]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.send_header("x-request-id", "req_upstream_sdk")
        self.send_header("openai-version", "2020-10-01")
        self.end_headers()
        self.wfile.write(answer)

    def gpt_image(self, parts):
        """Answer like OpenAI for a GPT image model: §4 JSON, or §5 SSE when the form's stream is true."""
        b64 = base64.b64encode(png_rgba(8, transparent=False)).decode()
        common = {"size": "1024x1024", "quality": "medium", "background": "opaque", "output_format": "png"}
        if field(parts, "stream") == "true":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("x-request-id", "req_upstream_sdk_stream")
            self.send_header("connection", "close")
            self.end_headers()
            created = int(time.time())
            partial = dict(type="image_edit.partial_image", b64_json=b64, created_at=created, partial_image_index=0, **common)
            usage = {k: v for k, v in USAGE.items() if k != "output_tokens_details"}
            completed = dict(type="image_edit.completed", b64_json=b64, created_at=created, usage=usage, safety_identifier=None, **common)
            for event in (partial, completed):
                self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.close_connection = True
            return
        n = int(field(parts, "n") or "1")
        answer = dict(created=int(time.time()), data=[{"b64_json": b64} for _ in range(n)], usage=USAGE, **common)
        answer = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.send_header("x-request-id", "req_upstream_sdk")
        self.send_header("openai-version", "2020-10-01")
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


DALL_E_2_PROFILE = """
[validation]
models = ["dall-e-2"]
[models]
default = "dall-e-2"
accepted = {}
"""

# The shipped [models] defaults (gpt-image-2 and the 2.5/2.6 ids), no startup GET /v1/models, and
# per-user limits loose enough for the checks below (the shipped burst is 5 requests).
GPT_IMAGE_PROFILE = """
[models]
check_at_start = false
[limits.per_user]
requests_per_minute = 600
requests_burst = 100
images_per_minute = 600
images_burst = 100
"""


def start_gateway(binary, upstream_url, workdir, profile):
    """Start `imagegate serve` with its own config and data dir under workdir; return (process, addr)."""
    os.makedirs(workdir, exist_ok=True)
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
{profile}
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

    def check(name, fn):
        nonlocal failures, passed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")

    with tempfile.TemporaryDirectory() as workdir:
        try:
            dall_e_2_checks(check, binary, upstream_url, os.path.join(workdir, "dall-e-2"))
            gpt_image_checks(check, binary, upstream_url, os.path.join(workdir, "gpt-image"))
            https_checks(check, binary, upstream_url, os.path.join(workdir, "https"))
        finally:
            server.shutdown()
    print(f"{passed} passed, {failures} failed")
    sys.exit(1 if failures else 0)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def dall_e_2_checks(check, binary, upstream_url, workdir):
    print("-- dall-e-2 profile")
    proc, addr = start_gateway(binary, upstream_url, workdir, DALL_E_2_PROFILE)
    try:
        client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=30)
        image_path = os.path.join(workdir, "otter.png")
        with open(image_path, "wb") as f:
            f.write(png_rgba(64))

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
        stop(proc)


def gpt_image_checks(check, binary, upstream_url, workdir):
    print("-- gpt-image profile (shipped [models] defaults)")
    proc, addr = start_gateway(binary, upstream_url, workdir, GPT_IMAGE_PROFILE)
    try:
        client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=30)
        png_path = os.path.join(workdir, "otter.png")
        jpeg_path = os.path.join(workdir, "beret.jpg")
        with open(png_path, "wb") as f:
            f.write(png_rgba(64, transparent=False))
        with open(jpeg_path, "wb") as f:
            f.write(jpeg_gray(16))

        def last_parts():
            path, headers, body = Upstream.received[-1]
            assert path == "/v1/images/edits", path
            return multipart_parts(headers, body)

        def two_files():
            before = len(Upstream.received)
            with open(png_path, "rb") as png, open(jpeg_path, "rb") as jpeg:
                result = client.images.edit(model="gpt-image-2", image=[png, jpeg], prompt="an otter with a beret", size="1024x1024")
            assert len(Upstream.received) == before + 1, "the upstream was not called once"
            files = [(name, part_type) for (name, filename, part_type, _) in last_parts() if filename is not None]
            assert files == [("image[]", "image/png"), ("image[]", "image/jpeg")], files
            assert field(last_parts(), "model") == "gpt-image-2"
            assert len(result.data) == 1 and result.data[0].b64_json, result
            assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG"), "b64_json is not the PNG sent"
            assert result.usage is not None, "usage missing"
            assert result.usage.total_tokens == 3060 and result.usage.input_tokens_details.image_tokens == 1000, result.usage
            assert result.size == "1024x1024" and result.output_format == "png", result

        def raw_bytes():
            before = len(Upstream.received)
            result = client.images.edit(model="gpt-image-2", image=png_rgba(32, transparent=False), prompt="raw bytes upload")
            assert len(Upstream.received) == before + 1, "the upstream was not called once"
            files = [(name, filename, part_type) for (name, filename, part_type, _) in last_parts() if filename is not None]
            assert len(files) == 1 and files[0][0] == "image", files
            assert files[0][2] == "image/png", f"upstream saw part type {files[0][2]!r}, expected image/png"
            assert result.usage is not None and len(result.data) == 1, result

        def stream():
            before = len(Upstream.received)
            with open(png_path, "rb") as png:
                events = client.images.edit(model="gpt-image-2", image=png, prompt="streamed", stream=True, partial_images=1)
                types = []
                completed = None
                for event in events:
                    types.append(event.type)
                    if event.type == "image_edit.completed":
                        completed = event
            assert len(Upstream.received) == before + 1, "the upstream was not called once"
            parts = last_parts()
            assert field(parts, "stream") == "true" and field(parts, "partial_images") == "1", parts
            assert types == ["image_edit.partial_image", "image_edit.completed"], types
            assert completed.usage is not None and completed.usage.total_tokens == 3060, completed
            assert base64.b64decode(completed.b64_json).startswith(b"\x89PNG")

        def bad_request(expected_code, expected_param, expected_message=None, **kwargs):
            before = len(Upstream.received)
            try:
                client.images.edit(prompt="refused", **kwargs)
            except openai.BadRequestError as e:
                assert e.status_code == 400
                assert e.code == expected_code, (e.code, e.body)
                assert e.param == expected_param, (e.param, e.body)
                if expected_message is not None:
                    assert e.body.get("message") == expected_message, e.body
            else:
                raise AssertionError("no BadRequestError")
            assert len(Upstream.received) == before, "a refused request reached the upstream"

        def retired_model():
            with open(png_path, "rb") as png:
                bad_request("invalid_value", "model", "The model 'dall-e-2' does not exist.", model="dall-e-2", image=png)

        def response_format():
            with open(png_path, "rb") as png:
                bad_request("unknown_parameter", "response_format", "Unknown parameter: 'response_format'.", model="gpt-image-2", image=png, response_format="url")

        def seventeen_images():
            images = [(f"i{i}.png", png_rgba(16, transparent=False), "image/png") for i in range(17)]
            bad_request("array_above_max_length", "image", model="gpt-image-2", image=images)

        check("two files as image[] (png, jpeg), JSON answer with usage", two_files)
        check("raw bytes (application/octet-stream) reach the upstream as image/png", raw_bytes)
        check("stream=True, partial_images=1 iterates to image_edit.completed with usage", stream)
        check("model dall-e-2 is BadRequestError code=invalid_value param=model", retired_model)
        check("response_format=url is BadRequestError code=unknown_parameter", response_format)
        check("17 images is BadRequestError code=array_above_max_length param=image", seventeen_images)
    finally:
        stop(proc)


def make_pki(workdir):
    """A CA and a server certificate for localhost and 127.0.0.1 signed by it (P-256, 2 days),
    made with the openssl command; returns (ca_path, cert_path, key_path)."""
    os.makedirs(workdir, exist_ok=True)
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    with open(path("ca.cnf"), "w") as f:
        f.write("""[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = imagegate SDK test CA
[v3_ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
""")
    with open(path("leaf.cnf"), "w") as f:
        f.write("""basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
""")
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-config", "ca.cnf")
    run("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "leaf.cnf")
    return path("ca.pem"), path("server.pem"), path("server.key")


def https_checks(check, binary, upstream_url, workdir):
    print("-- TLS termination ([server.tls])")
    import ssl

    ca, cert, key = make_pki(workdir)
    profile = DALL_E_2_PROFILE + f"""
[server.tls]
cert_file = "{cert}"
key_file = "{key}"
"""
    proc, addr = start_gateway(binary, upstream_url, workdir, profile)
    port = addr.rsplit(":", 1)[1]
    try:

        def trusted_ca():
            before = len(Upstream.received)
            # The SDK's own httpx client class, trusting the test CA (an SSLContext, which every
            # httpx version accepts for `verify=`).
            with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca), timeout=30) as http_client:
                client = openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=GATEWAY_KEY,
                                       max_retries=0, http_client=http_client)
                result = client.images.edit(image=("otter.png", png_rgba(32), "image/png"), prompt="over https", n=1)
            assert len(result.data) == 1, result
            assert len(Upstream.received) == before + 1
            assert b"over https" in Upstream.received[-1][2]

        def untrusted():
            client = openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=30)
            try:
                client.images.edit(image=("otter.png", png_rgba(32), "image/png"), prompt="x")
            except openai.APIConnectionError:
                pass
            else:
                raise AssertionError("a client without the test CA got through")

        check("the SDK over https with the test CA (httpx verify=) gets its edit", trusted_ca)
        check("without the test CA the SDK is refused (APIConnectionError)", untrusted)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
