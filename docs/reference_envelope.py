#!/usr/bin/env python3
"""Independent reference implementation of the ringfence v1 envelope (docs/crypto.md).

Written from the document alone, with Python's `cryptography` package, to show that the
specification is complete: it derives a record key from a root key, seals and opens a
field envelope. `python3 docs/reference_envelope.py` prints the known-answer vector that
`tests/data/envelope_kat.json` pins for the Rust implementation.
"""
import hashlib
import hmac
import json
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT_KEY_SALT = b"ringfence/v1 root-key"
RECORD_KEY_LABEL = b"ringfence/v1 record-key"


def lp16(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def record_key(root: bytes, jurisdiction: str, key_version: int, record_type: str, record_id: str) -> bytes:
    prk = hkdf_extract(ROOT_KEY_SALT, root)
    info = (
        lp16(RECORD_KEY_LABEL)
        + lp16(jurisdiction.encode())
        + struct.pack(">I", key_version)
        + lp16(record_type.encode())
        + lp16(record_id.encode())
    )
    return hkdf_expand(prk, info, 32)


def header(jurisdiction: str, key_version: int, nonce: bytes) -> bytes:
    code = jurisdiction.encode()
    return b"RF" + bytes([1, len(code)]) + code + struct.pack(">I", key_version) + nonce


def aad(hdr: bytes, record_type: str, record_id: str, field: str) -> bytes:
    return hdr + lp16(record_type.encode()) + lp16(record_id.encode()) + lp16(field.encode())


def seal(root, jurisdiction, key_version, record_type, record_id, field, nonce, plaintext):
    key = record_key(root, jurisdiction, key_version, record_type, record_id)
    hdr = header(jurisdiction, key_version, nonce)
    return hdr + AESGCM(key).encrypt(nonce, plaintext, aad(hdr, record_type, record_id, field))


def open_envelope(root, record_type, record_id, field, envelope: bytes) -> bytes:
    assert envelope[:3] == b"RF\x01", "not a v1 envelope"
    code_len = envelope[3]
    jurisdiction = envelope[4 : 4 + code_len].decode()
    (key_version,) = struct.unpack(">I", envelope[4 + code_len : 8 + code_len])
    nonce = envelope[8 + code_len : 20 + code_len]
    hdr = envelope[: 20 + code_len]
    key = record_key(root, jurisdiction, key_version, record_type, record_id)
    return AESGCM(key).decrypt(nonce, envelope[20 + code_len :], aad(hdr, record_type, record_id, field))


if __name__ == "__main__":
    vector = {
        "root_key": bytes(range(32)).hex(),
        "jurisdiction": "US",
        "key_version": 1,
        "record_type": "user_profile",
        "record_id": "u-42",
        "field": "email",
        "nonce": bytes(range(12)).hex(),
        "plaintext": b"alice@example.com".hex(),
    }
    root = bytes.fromhex(vector["root_key"])
    vector["record_key"] = record_key(root, "US", 1, "user_profile", "u-42").hex()
    envelope = seal(root, "US", 1, "user_profile", "u-42", "email", bytes(range(12)), b"alice@example.com")
    assert open_envelope(root, "user_profile", "u-42", "email", envelope) == b"alice@example.com"
    vector["envelope"] = envelope.hex()
    print(json.dumps(vector, indent=2))
