#!/usr/bin/env python3
"""Independent reference implementation of the ringfence v2 key hierarchy (docs/crypto.md).

Written from the document with Python's hmac/hashlib (and `cryptography` for AES-GCM):
master key -> jurisdiction wrapping key -> sealing and metadata keys; key ids; a sealed
root key. `python3 docs/reference_keys.py` prints the known-answer vector that
`tests/data/key_hierarchy_kat.json` pins for the Rust implementation.
"""
import hashlib
import hmac
import json
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# RFC 5869 and the lp16 encoding, shared with the envelope reference (same directory).
from reference_envelope import hkdf_expand, hkdf_extract, lp16


def wrapping_key(master: bytes, jurisdiction: str) -> bytes:
    prk = hkdf_extract(b"ringfence/v1 master-key", master)
    return hkdf_expand(prk, lp16(b"ringfence/v2 jurisdiction-wrapping-key") + lp16(jurisdiction.encode()), 32)


def key_id(root: bytes, jurisdiction: str, version: int) -> bytes:
    prk = hkdf_extract(b"ringfence/v1 root-key", root)
    return hkdf_expand(prk, lp16(b"ringfence/v2 key-id") + lp16(jurisdiction.encode()) + struct.pack(">I", version), 16)


def main() -> None:
    master = bytes(range(32))
    root = bytes(range(32, 64))
    jurisdiction, version = "US", 1
    nonce = bytes(range(12))
    metadata = "ringfence keyring metadata example"
    wk = wrapping_key(master, jurisdiction)
    seal_key = hkdf_expand(wk, lp16(b"ringfence/v2 root-key-seal"), 32)
    mac_key = hkdf_expand(wk, lp16(b"ringfence/v2 keyring-mac"), 32)
    kid = key_id(root, jurisdiction, version)
    aad = lp16(b"ringfence/v2 root-key-seal") + lp16(jurisdiction.encode()) + struct.pack(">I", version) + kid
    sealed = nonce + AESGCM(seal_key).encrypt(nonce, root, aad)
    assert AESGCM(seal_key).decrypt(nonce, sealed[12:], aad) == root
    print(json.dumps({
        "master_key": master.hex(),
        "jurisdiction": jurisdiction,
        "key_version": version,
        "root_key": root.hex(),
        "wrapping_key": wk.hex(),
        "key_id": kid.hex(),
        "metadata": metadata,
        "metadata_mac": hmac.new(mac_key, metadata.encode(), hashlib.sha256).hexdigest(),
        "nonce": nonce.hex(),
        "sealed_root_key": sealed.hex(),
    }, indent=2))


if __name__ == "__main__":
    main()
