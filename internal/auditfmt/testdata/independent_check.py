#!/usr/bin/env python3
# An audit verifier written from internal/auditfmt's package documentation
# alone, run on the test vector (testdata/vector.jsonl, which
# TestCanonicalVector keeps in step with the Go encoder): it recomputes
# every hash from the canonical encoding, follows prev, checks that each
# line is canonical JSON and checks the head's Ed25519 signature.
#   python3 internal/auditfmt/testdata/independent_check.py internal/auditfmt/testdata/vector.jsonl
# Needs Python 3 and the `cryptography` package (Debian: python3-cryptography).
import base64
import hashlib
import json
import struct
import sys

from cryptography.hazmat.primitives.serialization import load_der_public_key

ORDER = {
    "genesis": ["audit_key", "attestation", "previous_head"],
    "decision": ["caller", "caller_id", "method", "key_id", "algorithm", "message_sha256", "outcome", "code", "reason"],
    "head": ["signed_seq", "signed_hash", "signature"],
}


def field(name, value):
    n, v = name.encode(), value.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v


def text(v):
    return str(v) if isinstance(v, int) else v


def canonical(e):
    out = b"nitrosign-audit-entry-v1\n"
    for n in ["chain", "seq", "time", "kind", "prev"]:
        out += field(n, text(e[n]))
    for n in ORDER[e["kind"]]:
        if n == "previous_head":
            ph = e[n]
            for k in ["chain", "seq", "hash"]:
                out += field("previous_head." + k, "" if ph is None else text(ph[k]))
        else:
            out += field(n, text(e[n]))
    return out


def main(path):
    ok = True
    prev, key = {}, {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            e = json.loads(line)
            h = hashlib.sha256(canonical(e)).hexdigest()
            good = h == e["hash"] and json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n" == line
            if e["seq"] == 0:
                good = good and e["prev"] == "0" * 64
                key[e["chain"]] = load_der_public_key(base64.b64decode(e["audit_key"]))
            else:
                good = good and e["prev"] == prev.get(e["chain"])
            if e["kind"] == "head":
                msg = "nitrosign-audit-head-v1\n%s\n%d\n%s" % (e["chain"], e["signed_seq"], e["signed_hash"])
                try:
                    key[e["chain"]].verify(base64.b64decode(e["signature"]), msg.encode())
                except Exception:
                    good = False
            prev[e["chain"]] = e["hash"]
            print("line %d: %s seq %d %s" % (i, e["kind"], e["seq"], "OK" if good else "FAULT"))
            ok = ok and good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
