// panva's jose as a peer for the tests: one JSON request per stdin line, one JSON answer per
// stdout line, in order.
//
//   {"id": 1, "op": "seal", "plaintext": <base64>, "sign_key": <path>, "sign_alg": "RS256",
//    "enc_key": <path>, "key_alg": "RSA-OAEP-256", "enc": "A256GCM",
//    "jws_header": {...}, "jwe_header": {...}}      extra header members; null removes one
//   -> {"id": 1, "ok": true, "body": "<compact JWE>"}
//
//   {"id": 2, "op": "open", "body": "<compact JWE>", "dec_key": <path>, "verify_keys": [<path>],
//    "key_algs": [...], "encs": [...], "sign_algs": [...]}  optional accept-lists
//   -> {"id": 2, "ok": true, "plaintext": <base64>, "jws_header": {...}, "jwe_header": {...}}
//
// Failures: {"id": n, "ok": false, "code": "<jose error code>", "message": "..."}.
// Key files are JWK, JWK Set (first key) or PEM; a JWK's kid goes into the headers.

import * as jose from "jose";
import { readFile, stat } from "node:fs/promises";
import { createInterface } from "node:readline";

const cache = new Map();

function publicJwk(jwk) {
  const keep = jwk.kty === "RSA" ? ["kty", "n", "e"] : ["kty", "crv", "x", "y"];
  return Object.fromEntries(keep.filter((k) => k in jwk).map((k) => [k, jwk[k]]));
}

async function loadKey(path, alg, wantPrivate) {
  const { mtimeMs } = await stat(path);
  const cacheKey = `${path}\0${alg}\0${wantPrivate}\0${mtimeMs}`;
  if (cache.has(cacheKey)) return cache.get(cacheKey);
  const text = await readFile(path, "utf8");
  let loaded;
  if (text.trimStart().startsWith("-----BEGIN")) {
    let key;
    if (text.includes("CERTIFICATE")) key = await jose.importX509(text, alg);
    else if (text.includes("PRIVATE KEY")) key = await jose.importPKCS8(text, alg);
    else key = await jose.importSPKI(text, alg);
    loaded = { key, kid: undefined };
  } else {
    let jwk = JSON.parse(text);
    if (Array.isArray(jwk.keys)) jwk = jwk.keys[0];
    const material = wantPrivate ? { ...jwk } : publicJwk(jwk);
    delete material.use;
    delete material.key_ops;
    delete material.alg;
    loaded = { key: await jose.importJWK(material, alg), kid: jwk.kid };
  }
  cache.set(cacheKey, loaded);
  return loaded;
}

function header(base, extra) {
  const result = { ...base };
  for (const [name, value] of Object.entries(extra ?? {})) {
    if (value === null) delete result[name];
    else result[name] = value;
  }
  for (const name of Object.keys(result)) if (result[name] === undefined) delete result[name];
  return result;
}

async function seal(req) {
  const plaintext = Buffer.from(req.plaintext, "base64");
  const signer = await loadKey(req.sign_key, req.sign_alg, true);
  const jws = await new jose.CompactSign(plaintext)
    .setProtectedHeader(header({ alg: req.sign_alg, kid: signer.kid }, req.jws_header))
    .sign(signer.key);
  const recipient = await loadKey(req.enc_key, req.key_alg, false);
  const body = await new jose.CompactEncrypt(new TextEncoder().encode(jws))
    .setProtectedHeader(
      header({ alg: req.key_alg, enc: req.enc, kid: recipient.kid }, req.jwe_header),
    )
    .encrypt(recipient.key);
  return { body };
}

async function open(req) {
  const body = req.body.trim();
  const { alg } = jose.decodeProtectedHeader(body);
  const { key } = await loadKey(req.dec_key, alg, true);
  const decrypted = await jose.compactDecrypt(body, key, {
    keyManagementAlgorithms: req.key_algs ?? undefined,
    contentEncryptionAlgorithms: req.encs ?? undefined,
  });
  const jws = new TextDecoder().decode(decrypted.plaintext);
  const jwsHeader = jose.decodeProtectedHeader(jws);
  let lastError = new jose.errors.JWSSignatureVerificationFailed("no verification key");
  for (const path of req.verify_keys) {
    try {
      // A key of another type cannot even be imported for this alg: that is a miss, too.
      const candidate = await loadKey(path, jwsHeader.alg, false);
      if (jwsHeader.kid !== undefined && candidate.kid !== jwsHeader.kid) continue;
      const verified = await jose.compactVerify(jws, candidate.key, {
        algorithms: req.sign_algs ?? undefined,
      });
      return {
        plaintext: Buffer.from(verified.payload).toString("base64"),
        jws_header: verified.protectedHeader,
        jwe_header: decrypted.protectedHeader,
      };
    } catch (error) {
      lastError = error;
    }
  }
  throw lastError;
}

const ops = { seal, open };
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  let id = null;
  try {
    const req = JSON.parse(line);
    id = req.id ?? null;
    const op = ops[req.op];
    if (!op) throw new Error(`unknown op ${JSON.stringify(req.op)}`);
    answer = { id, ok: true, ...(await op(req)) };
  } catch (error) {
    answer = { id, ok: false, code: error?.code ?? "ERR", message: String(error?.message ?? error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
