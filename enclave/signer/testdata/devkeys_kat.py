#!/usr/bin/env python3
"""Known answers of the --dev-key-seed derivation (enclave/signer/devkeys.go),
computed independently of the Go code: HKDF-SHA256 written out with hmac,
primality by sympy, key encoding by pyca/cryptography. Prints the key ids of
seed 00 01 .. 1f that TestDevKeySeedKnownAnswers pins.

    pip install cryptography sympy; python3 devkeys_kat.py
"""
import hashlib
import hmac
from math import gcd

import sympy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_

VERSION = b"nitrosign dev-key-seed v1"
SEED = bytes(range(32))
PRK = hmac.new(VERSION, SEED, hashlib.sha256).digest()  # HKDF-Extract(salt, ikm)


def expand(info, length):
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(PRK, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def stream(key, n):
    out, block = b"", 0
    while len(out) < n:
        out += expand(f"nitrosign dev-key-seed v1 {key} block {block}".encode(), 255 * 32)
        block += 1
    return out[:n]


def key_id(pub):
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def rsa_key_id(bits):
    half = bits // 2
    s = stream(f"RSA-{bits}", 400000)
    pos = 0

    def prime():
        nonlocal pos
        while True:
            c = int.from_bytes(s[pos:pos + half // 8], "big")
            pos += half // 8
            c |= (1 << (half - 1)) | (1 << (half - 2)) | 1
            if gcd(65537, c - 1) == 1 and sympy.isprime(c):
                return c

    p, q = prime(), prime()
    assert abs(p - q) > 1 << (half - 100)
    return key_id(rsa_.RSAPublicNumbers(65537, p * q).public_key())


ORDER = {
    "P-256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "P-384": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
}


def ecc_key(name, curve, size):
    # The first draw is below the order for this seed (no rejection).
    d = int.from_bytes(stream(f"ECC-{name}", size), "big")
    assert 0 < d < ORDER[name]
    return ec.derive_private_key(d, curve)


print("RSA-2048 ", rsa_key_id(2048))
print("ECC P-256", key_id(ecc_key("P-256", ec.SECP256R1(), 32).public_key()))
p384 = ecc_key("P-384", ec.SECP384R1(), 48)
print("ECC P-384 X starts", p384.public_key().public_numbers().x.to_bytes(48, "big")[:8].hex())
print("Ed25519  ", key_id(ed25519.Ed25519PrivateKey.from_private_bytes(stream("Ed25519", 32)).public_key()))
