// OpenPGP.js as the other party, for the PGP interoperability tests. One command per run:
//
//   node openpgp_tool.mjs seal [--sign KEY[,PASSFILE]]... [--to KEY]... [--armor]
//                              [--compress uncompressed|zip|zlib] [--padded]
//       stdin: plaintext; stdout: base64url of the OpenPGP message
//   node openpgp_tool.mjs open --key KEY[,PASSFILE]... [--verify KEY]...
//       stdin: base64url (armored or binary inside); stdout: JSON
//       {"plaintext": base64, "signatures": [{"keyID", "valid", "hash"}]}
//
// KEY is an armored key file; PASSFILE holds the passphrase of a protected secret key.
import { readFileSync } from 'node:fs';
import * as openpgp from 'openpgp';

function parse(argv) {
  const opts = { sign: [], to: [], key: [], verify: [], armor: false, padded: false,
                 compress: 'uncompressed' };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].replace(/^--/, '');
    if (name === 'armor' || name === 'padded') opts[name] = true;
    else if (name === 'compress') opts.compress = argv[++i];
    else if (Array.isArray(opts[name])) opts[name].push(argv[++i]);
    else throw new Error(`unknown option ${argv[i]}`);
  }
  return opts;
}

async function privateKey(spec) {
  const [file, passFile] = spec.split(',');
  const key = await openpgp.readPrivateKey({ armoredKey: readFileSync(file, 'utf8') });
  if (!passFile) return key;
  const passphrase = readFileSync(passFile, 'utf8').replace(/\r?\n$/, '');
  return openpgp.decryptKey({ privateKey: key, passphrase });
}

const publicKey = async (file) => openpgp.readKey({ armoredKey: readFileSync(file, 'utf8') });

function readStdin() {
  return readFileSync(0);
}

function toBase64url(bytes, padded) {
  const text = Buffer.from(bytes).toString('base64url');
  return padded ? text + '='.repeat((4 - (text.length % 4)) % 4) : text;
}

async function seal(opts) {
  const message = await openpgp.createMessage({ binary: new Uint8Array(readStdin()) });
  const sealed = await openpgp.encrypt({
    message,
    encryptionKeys: await Promise.all(opts.to.map(publicKey)),
    signingKeys: await Promise.all(opts.sign.map(privateKey)),
    format: opts.armor ? 'armored' : 'binary',
    config: { preferredCompressionAlgorithm: openpgp.enums.compression[opts.compress] },
  });
  const bytes = typeof sealed === 'string' ? Buffer.from(sealed, 'utf8') : sealed;
  process.stdout.write(toBase64url(bytes, opts.padded));
}

async function open(opts) {
  const raw = Buffer.from(readStdin().toString('utf8').trim().replace(/=+$/, ''), 'base64url');
  const armored = raw.subarray(0, 10).toString('latin1') === '-----BEGIN';
  const message = armored
    ? await openpgp.readMessage({ armoredMessage: raw.toString('utf8') })
    : await openpgp.readMessage({ binaryMessage: new Uint8Array(raw) });
  const { data, signatures } = await openpgp.decrypt({
    message,
    decryptionKeys: await Promise.all(opts.key.map(privateKey)),
    verificationKeys: await Promise.all(opts.verify.map(publicKey)),
    format: 'binary',
  });
  const report = [];
  for (const sig of signatures) {
    let valid = true;
    try {
      await sig.verified;
    } catch {
      valid = false;
    }
    const packet = (await sig.signature).packets[0];
    report.push({
      keyID: sig.keyID.toHex().toUpperCase(),
      valid,
      hash: openpgp.enums.read(openpgp.enums.hash, packet.hashAlgorithm),
    });
  }
  process.stdout.write(JSON.stringify({
    plaintext: Buffer.from(data).toString('base64'),
    signatures: report,
  }));
}

const [command, ...rest] = process.argv.slice(2);
const commands = { seal, open };
if (!commands[command]) {
  process.stderr.write('usage: openpgp_tool.mjs seal|open [options]\n');
  process.exit(2);
}
commands[command](parse(rest)).catch((err) => {
  process.stderr.write(`openpgp_tool: ${err.message}\n`);
  process.exit(1);
});
