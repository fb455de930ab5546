#!/usr/bin/env node
// Drive a real imagegate with the official OpenAI Node SDK (`openai` from npm, v7; baseURL pointed
// at the gateway), gpt-image profile (the shipped [models] defaults;
// ../shared/spec/gpt-image-models.md).
//
// Starts a mock upstream (node:http on 127.0.0.1:0) that answers like OpenAI (§4 JSON with
// data[].b64_json and usage; §5 SSE when the form's stream is true), starts the gateway binary on
// 127.0.0.1:0 and reads its "imagegate listening" log line, then checks, through the SDK:
//   1. an upload via toFile(buffer, 'a.png', { type: 'image/png' }): JSON answer parsed, usage present,
//   2. raw bytes via toFile(buffer, 'upload') without a type: the SDK sends application/octet-stream,
//      the gateway re-types the part by its bytes and the upstream sees image/png,
//   3. stream: true iterated with for await to image_edit.completed (with usage),
//   4. a retired model (dall-e-2) as OpenAI.BadRequestError with code/param, not reaching the upstream.
//
// Usage: node openai_node.mjs PATH_TO_IMAGEGATE_BINARY
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { deflateSync, crc32 as zlibCrc32 } from 'node:zlib';

import OpenAI, { toFile } from 'openai';

const GATEWAY_KEY = 'ig-sdk-test-key-0123456789';
const UPSTREAM_KEY = 'sk-upstream-test-key';
const START_TIMEOUT_MS = 60_000;

// ---- test images ---------------------------------------------------------------------------------

// CRC-32 as PNG uses it (zlib.crc32 exists from Node 20.15 / 22.2; fall back to a table otherwise).
const crcTable = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  if (typeof zlibCrc32 === 'function') return zlibCrc32(buf);
  let c = 0xffffffff;
  for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** An opaque RGBA8 PNG made by hand, side x side. */
function pngRgba(side) {
  const rows = [];
  for (let y = 0; y < side; y++) {
    rows.push(Buffer.from([0]));
    for (let x = 0; x < side; x++) rows.push(Buffer.from([30, 120, 200, 255]));
  }
  const chunk = (kind, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(kind, 'ascii'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(side, 0);
  ihdr.writeUInt32BE(side, 4);
  ihdr.set([8, 6, 0, 0, 0], 8);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.concat(rows))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

// ---- mock upstream -------------------------------------------------------------------------------

/** [{name, filename, type, data}] of a multipart/form-data body. */
function multipartParts(contentType, body) {
  const boundary = /boundary="?([^";]+)"?/.exec(contentType ?? '')?.[1];
  if (!boundary) throw new Error(`no boundary in ${contentType}`);
  const delimiter = Buffer.from(`--${boundary}`);
  const parts = [];
  let at = body.indexOf(delimiter);
  while (at >= 0) {
    const start = at + delimiter.length;
    if (body.subarray(start, start + 2).toString() === '--') break;
    const next = body.indexOf(delimiter, start);
    if (next < 0) break;
    const chunk = body.subarray(start + 2, next - 2); // after CRLF, before CRLF--boundary
    const split = chunk.indexOf('\r\n\r\n');
    const head = chunk.subarray(0, split).toString('utf8');
    parts.push({
      name: /name="([^"]*)"/.exec(head)?.[1],
      filename: /filename="([^"]*)"/.exec(head)?.[1] ?? null,
      type: /^content-type:\s*(\S+)/im.exec(head)?.[1] ?? null,
      data: chunk.subarray(split + 4),
    });
    at = next;
  }
  return parts;
}
const field = (parts, name) => parts.find((p) => p.name === name && p.filename === null)?.data.toString('utf8');
const fileParts = (parts) => parts.filter((p) => p.filename !== null);

const USAGE = {
  input_tokens: 1060,
  input_tokens_details: { text_tokens: 60, image_tokens: 1000 },
  output_tokens: 2000,
  output_tokens_details: { image_tokens: 2000, text_tokens: 0 },
  total_tokens: 3060,
};

const received = [];

function upstreamHandler(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (req.method === 'GET' && req.url === '/v1/models') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ object: 'list', data: [{ id: 'gpt-image-2', object: 'model' }] }));
      return;
    }
    let parts = [];
    try {
      parts = multipartParts(req.headers['content-type'], body);
    } catch (e) {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `mock: ${e.message}`, type: 'server_error', param: null, code: null } }));
      return;
    }
    received.push({ method: req.method, url: req.url, headers: req.headers, parts });
    const b64 = pngRgba(8).toString('base64');
    const common = { size: '1024x1024', quality: 'medium', background: 'opaque', output_format: 'png' };
    if (field(parts, 'stream') === 'true') {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'x-request-id': 'req_upstream_node_stream' });
      const created_at = Math.floor(Date.now() / 1000);
      const { output_tokens_details: _omit, ...usage } = USAGE;
      const events = [
        { type: 'image_edit.partial_image', b64_json: b64, created_at, ...common, partial_image_index: 0 },
        { type: 'image_edit.completed', b64_json: b64, created_at, ...common, usage, safety_identifier: null },
      ];
      for (const event of events) res.write(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`);
      res.end();
      return;
    }
    const n = Number(field(parts, 'n') ?? '1');
    const answer = {
      created: Math.floor(Date.now() / 1000),
      data: Array.from({ length: n }, () => ({ b64_json: b64 })),
      ...common,
      usage: USAGE,
    };
    res.writeHead(200, { 'content-type': 'application/json', 'x-request-id': 'req_upstream_node', 'openai-version': '2020-10-01' });
    res.end(JSON.stringify(answer));
  });
}

// ---- gateway -------------------------------------------------------------------------------------

function startGateway(binary, upstreamUrl, workdir) {
  const keyHash = 'sha256:' + createHash('sha256').update(GATEWAY_KEY).digest('hex');
  const config = path.join(workdir, 'imagegate.toml');
  // The shipped [models] defaults; no startup GET /v1/models; per-user limits loose enough for
  // the checks (the shipped burst is 5 requests).
  writeFileSync(
    config,
    `
[server]
listen = "127.0.0.1:0"
[upstream]
base_url = "${upstreamUrl}"
allow_http = true
[log]
format = "json"
[models]
check_at_start = false
[limits.per_user]
requests_per_minute = 600
requests_burst = 100
images_per_minute = 600
images_burst = 100
[[clients]]
name = "sdk-test"
key_hash = "${keyHash}"
`,
  );
  const proc = spawn(binary, ['serve', '--config', config], {
    cwd: workdir,
    env: { ...process.env, OPENAI_API_KEY: UPSTREAM_KEY, IMAGEGATE_DATA_DIR: workdir },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const lines = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`gateway did not log "imagegate listening" within ${START_TIMEOUT_MS} ms:\n${lines.join('\n')}`));
    }, START_TIMEOUT_MS);
    const rl = readline.createInterface({ input: proc.stderr });
    rl.on('line', (line) => {
      // Keep draining stderr after start so the gateway never blocks on a full pipe.
      if (lines.length < 200) lines.push(line);
      let event;
      try {
        event = JSON.parse(line);
      } catch {
        return;
      }
      if (event.message === 'imagegate listening') {
        clearTimeout(timer);
        resolve({ proc, addr: event.addr });
      }
    });
    proc.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited (${code ?? signal}) before listening:\n${lines.join('\n')}`));
    });
  });
}

function stopGateway(proc) {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
    proc.on('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill('SIGTERM');
  });
}

// ---- checks --------------------------------------------------------------------------------------

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

async function main() {
  const binary = path.resolve(process.argv[2] ?? '');
  if (!process.argv[2]) {
    console.error('usage: node openai_node.mjs PATH_TO_IMAGEGATE_BINARY');
    process.exit(2);
  }
  const server = http.createServer(upstreamHandler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const upstreamUrl = `http://127.0.0.1:${server.address().port}/v1`;
  const workdir = mkdtempSync(path.join(tmpdir(), 'imagegate-node-'));
  let passed = 0;
  let failed = 0;
  let gateway;
  try {
    gateway = await startGateway(binary, upstreamUrl, workdir);
    const client = new OpenAI({ baseURL: `http://${gateway.addr}/v1`, apiKey: GATEWAY_KEY, maxRetries: 0, timeout: 30_000 });
    const png = pngRgba(64);

    const check = async (name, fn) => {
      try {
        await fn();
        passed++;
        console.log(`ok   ${name}`);
      } catch (e) {
        failed++;
        console.log(`FAIL ${name}: ${e?.constructor?.name}: ${e?.message}`);
      }
    };
    const lastEdit = () => {
      const last = received.at(-1);
      assert(last && last.method === 'POST' && last.url === '/v1/images/edits', `upstream request was ${last?.method} ${last?.url}`);
      return last;
    };

    await check('toFile(png, a.png, image/png): JSON answer with b64_json and usage', async () => {
      const before = received.length;
      const result = await client.images.edit({
        model: 'gpt-image-2',
        image: await toFile(png, 'a.png', { type: 'image/png' }),
        prompt: 'an otter with a beret',
      });
      assert(received.length === before + 1, 'the upstream was not called once');
      const last = lastEdit();
      assert(last.headers.authorization === `Bearer ${UPSTREAM_KEY}`, 'upstream key not injected');
      assert(!JSON.stringify(last.headers).includes(GATEWAY_KEY), 'gateway key leaked upstream');
      const files = fileParts(last.parts).map((p) => `${p.name}:${p.type}`);
      assert(JSON.stringify(files) === JSON.stringify(['image:image/png']), `file parts upstream: ${files}`);
      assert(field(last.parts, 'model') === 'gpt-image-2', 'model not forwarded');
      assert(result.data?.length === 1 && result.data[0].b64_json, `data: ${JSON.stringify(result.data)}`);
      assert(Buffer.from(result.data[0].b64_json, 'base64').subarray(1, 4).toString() === 'PNG', 'b64_json is not a PNG');
      assert(result.usage?.total_tokens === 3060, `usage: ${JSON.stringify(result.usage)}`);
      assert(result.usage.input_tokens_details?.image_tokens === 1000, `usage: ${JSON.stringify(result.usage)}`);
    });

    await check("raw bytes via toFile(buf, 'upload') reach the upstream as image/png", async () => {
      const before = received.length;
      const upload = await toFile(pngRgba(32), 'upload');
      const result = await client.images.edit({ model: 'gpt-image-2', image: upload, prompt: 'raw bytes upload' });
      assert(received.length === before + 1, 'the upstream was not called once');
      const files = fileParts(lastEdit().parts);
      assert(files.length === 1 && files[0].name === 'image', `file parts upstream: ${files.map((p) => p.name)}`);
      assert(files[0].type === 'image/png', `upstream saw part type ${files[0].type}, expected image/png`);
      assert(result.usage?.total_tokens === 3060, `usage: ${JSON.stringify(result.usage)}`);
    });

    await check('stream: true iterated with for await to image_edit.completed with usage', async () => {
      const before = received.length;
      const stream = await client.images.edit({
        model: 'gpt-image-2',
        image: await toFile(png, 'a.png', { type: 'image/png' }),
        prompt: 'streamed',
        stream: true,
        partial_images: 1,
      });
      const types = [];
      let completed;
      for await (const event of stream) {
        types.push(event.type);
        if (event.type === 'image_edit.completed') completed = event;
      }
      assert(received.length === before + 1, 'the upstream was not called once');
      const parts = lastEdit().parts;
      assert(field(parts, 'stream') === 'true' && field(parts, 'partial_images') === '1', 'stream/partial_images not forwarded');
      assert(JSON.stringify(types) === JSON.stringify(['image_edit.partial_image', 'image_edit.completed']), `events: ${types}`);
      assert(completed?.usage?.total_tokens === 3060, `completed usage: ${JSON.stringify(completed?.usage)}`);
    });

    await check('model dall-e-2 is BadRequestError code=invalid_value param=model', async () => {
      const before = received.length;
      let error;
      try {
        await client.images.edit({ model: 'dall-e-2', image: await toFile(png, 'a.png', { type: 'image/png' }), prompt: 'retired' });
      } catch (e) {
        error = e;
      }
      assert(error instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${error?.constructor?.name ?? 'success'}: ${error?.message}`);
      assert(error.status === 400, `status ${error.status}`);
      assert(error.code === 'invalid_value', `code ${error.code}`);
      assert(error.param === 'model', `param ${error.param}`);
      assert(error.error?.message === "The model 'dall-e-2' does not exist.", `message ${error.error?.message}`);
      assert(received.length === before, 'a refused request reached the upstream');
    });
  } catch (e) {
    failed++;
    console.log(`FAIL setup: ${e?.message}`);
  } finally {
    if (gateway) await stopGateway(gateway.proc);
    server.close();
    server.closeAllConnections?.();
    rmSync(workdir, { recursive: true, force: true });
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

await main();
