use super::*;
use serde::Deserialize;

fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap()
}

#[derive(Deserialize)]
struct HkdfVector {
    name: String,
    ikm: String,
    salt: String,
    info: String,
    length: usize,
    prk: String,
    okm: String,
}

#[test]
fn hkdf_matches_rfc5869_vectors() {
    let vectors: Vec<HkdfVector> =
        serde_json::from_str(include_str!("../../tests/data/rfc5869_sha256.json")).unwrap();
    assert_eq!(vectors.len(), 3);
    for vector in vectors {
        let prk = hkdf_extract(&unhex(&vector.salt), &unhex(&vector.ikm));
        assert_eq!(hex::encode(prk.as_slice()), vector.prk, "{}", vector.name);
        let mut okm = vec![0u8; vector.length];
        hkdf_expand(prk.as_slice(), &unhex(&vector.info), &mut okm).unwrap();
        assert_eq!(hex::encode(&okm), vector.okm, "{}", vector.name);
    }
}

#[derive(Deserialize)]
struct EnvelopeVector {
    root_key: String,
    jurisdiction: String,
    key_version: u32,
    record_type: String,
    record_id: String,
    field: String,
    nonce: String,
    plaintext: String,
    record_key: String,
    envelope: String,
}

struct Fixture {
    root: DerivationKey,
    jurisdiction: Jurisdiction,
    key_version: KeyVersion,
    record_type: RecordType,
    record_id: RecordId,
    field: FieldName,
}

impl Fixture {
    fn scope(&self) -> RecordScope<'_> {
        RecordScope {
            jurisdiction: &self.jurisdiction,
            key_version: self.key_version,
            record_type: &self.record_type,
            record_id: &self.record_id,
        }
    }
}

fn kat() -> (EnvelopeVector, Fixture) {
    let vector: EnvelopeVector =
        serde_json::from_str(include_str!("../../tests/data/envelope_kat.json")).unwrap();
    let root_bytes: [u8; KEY_LEN] = unhex(&vector.root_key).try_into().unwrap();
    let fixture = Fixture {
        root: DerivationKey::from_root(&SecretKey::from_bytes(root_bytes)),
        jurisdiction: Jurisdiction::new(&vector.jurisdiction).unwrap(),
        key_version: KeyVersion::new(vector.key_version).unwrap(),
        record_type: RecordType::new(&vector.record_type).unwrap(),
        record_id: RecordId::new(&vector.record_id).unwrap(),
        field: FieldName::new(&vector.field).unwrap(),
    };
    (vector, fixture)
}

#[test]
fn record_key_derivation_matches_the_reference_implementation() {
    let (vector, fixture) = kat();
    let info = record_key_info(&fixture.scope()).unwrap();
    let mut okm = [0u8; KEY_LEN];
    hkdf_expand(&fixture.root.prk, &info, &mut okm).unwrap();
    assert_eq!(hex::encode(okm), vector.record_key);
}

#[test]
fn envelope_matches_known_answer_and_opens() {
    let (vector, fixture) = kat();
    let scope = fixture.scope();
    let key = fixture.root.record_key(&scope).unwrap();
    let nonce: [u8; NONCE_LEN] = unhex(&vector.nonce).try_into().unwrap();
    let envelope = key
        .seal(&scope, &fixture.field, &nonce, &unhex(&vector.plaintext))
        .unwrap();
    assert_eq!(hex::encode(&envelope), vector.envelope);
    let parsed = Envelope::parse(&envelope).unwrap();
    assert_eq!(parsed.jurisdiction.as_str(), "US");
    assert_eq!(parsed.key_version.get(), 1);
    let plaintext = key.open(&scope, &fixture.field, &parsed).unwrap();
    assert_eq!(plaintext.as_slice(), unhex(&vector.plaintext).as_slice());
}

#[derive(serde::Deserialize)]
struct EnvelopeVectorV2 {
    root_key: String,
    subject_secret: String,
    jurisdiction: String,
    key_version: u32,
    key_id: String,
    subject_id: String,
    record_type: String,
    record_id: String,
    field: String,
    nonce: String,
    plaintext: String,
    record_key: String,
    envelope: String,
}

#[test]
fn format_2_envelope_matches_its_known_answer_and_needs_the_subject_secret() {
    let vector: EnvelopeVectorV2 =
        serde_json::from_str(include_str!("../../tests/data/envelope_v2_kat.json")).unwrap();
    let root_bytes: [u8; KEY_LEN] = unhex(&vector.root_key).try_into().unwrap();
    let root = DerivationKey::from_root(&SecretKey::from_bytes(root_bytes));
    let jurisdiction = Jurisdiction::new(&vector.jurisdiction).unwrap();
    let key_version = KeyVersion::new(vector.key_version).unwrap();
    let key_id = root.key_id(&jurisdiction, key_version).unwrap();
    assert_eq!(key_id.to_string(), vector.key_id);
    let (record_type, record_id) = (
        RecordType::new(&vector.record_type).unwrap(),
        RecordId::new(&vector.record_id).unwrap(),
    );
    let scope = RecordScope {
        jurisdiction: &jurisdiction,
        key_version,
        record_type: &record_type,
        record_id: &record_id,
    };
    let subject = SubjectId::new(&vector.subject_id).unwrap();
    let secret_bytes: [u8; KEY_LEN] = unhex(&vector.subject_secret).try_into().unwrap();
    let secret = SubjectSecret::from_bytes(secret_bytes);
    let subject_scope = SubjectScope {
        subject: &subject,
        secret: &secret,
        key_id: &key_id,
    };
    // The record key itself, through the same derivation.
    let mut ikm = root.prk.to_vec();
    ikm.extend_from_slice(&secret_bytes);
    let prk = hkdf_extract(SUBJECT_RECORD_SALT, &ikm);
    let mut okm = [0u8; KEY_LEN];
    hkdf_expand(
        prk.as_slice(),
        &subject_record_key_info(&scope, &subject).unwrap(),
        &mut okm,
    )
    .unwrap();
    assert_eq!(hex::encode(okm), vector.record_key);

    let key = root.subject_record_key(&scope, &subject_scope).unwrap();
    let field = FieldName::new(&vector.field).unwrap();
    let nonce: [u8; NONCE_LEN] = unhex(&vector.nonce).try_into().unwrap();
    let envelope = key
        .seal(&scope, &field, &nonce, &unhex(&vector.plaintext))
        .unwrap();
    assert_eq!(hex::encode(&envelope), vector.envelope);
    let parsed = Envelope::parse(&envelope).unwrap();
    assert_eq!(parsed.format, 2);
    assert_eq!(parsed.key_id, Some(key_id));
    assert_eq!(parsed.subject, Some(subject.as_str()));
    assert_eq!(
        key.open(&scope, &field, &parsed).unwrap().as_slice(),
        unhex(&vector.plaintext).as_slice()
    );

    // Another secret (the subject shredded and made anew), another subject, or the
    // format-1 key of the same root: none opens it.
    let other_secret = SubjectSecret::from_bytes([9; KEY_LEN]);
    let other = root
        .subject_record_key(
            &scope,
            &SubjectScope {
                secret: &other_secret,
                ..subject_scope
            },
        )
        .unwrap();
    assert_eq!(other.open(&scope, &field, &parsed), Err(Error::Integrity));
    let someone = SubjectId::new("person-8").unwrap();
    let moved = root
        .subject_record_key(
            &scope,
            &SubjectScope {
                subject: &someone,
                ..subject_scope
            },
        )
        .unwrap();
    assert_eq!(moved.open(&scope, &field, &parsed), Err(Error::Integrity));
    let format_1 = root.record_key(&scope).unwrap();
    assert_eq!(
        format_1.open(&scope, &field, &parsed),
        Err(Error::Integrity)
    );
    // The key id is bound by the AAD alone (it is not an input of the key): the same
    // key with another key id in the header fails authentication.
    let mut other_id_bytes = *key_id.as_bytes();
    other_id_bytes[0] ^= 1;
    let other_id = KeyId(other_id_bytes);
    let relabelled = root
        .subject_record_key(
            &scope,
            &SubjectScope {
                key_id: &other_id,
                ..subject_scope
            },
        )
        .unwrap();
    let mut edited = envelope.clone();
    edited[2 + 1 + 1 + 2 + 4] ^= 1;
    let reparsed = Envelope::parse(&edited).unwrap();
    assert_eq!(reparsed.key_id, Some(other_id));
    assert_eq!(
        relabelled.open(&scope, &field, &reparsed),
        Err(Error::Integrity)
    );
    // A header edit (the subject's id) fails authentication too.
    let mut edited = envelope.clone();
    let at = edited
        .windows(subject.as_str().len())
        .position(|window| window == subject.as_str().as_bytes())
        .unwrap();
    edited[at + 7] ^= 1;
    let reparsed = Envelope::parse(&edited).unwrap();
    assert!(key.open(&scope, &field, &reparsed).is_err());
}

fn sealed_fixture() -> (Fixture, Vec<u8>) {
    let (vector, fixture) = kat();
    let scope = fixture.scope();
    let key = fixture.root.record_key(&scope).unwrap();
    let [nonce] = fresh_nonces(1).unwrap().try_into().unwrap();
    let envelope = key
        .seal(&scope, &fixture.field, &nonce, &unhex(&vector.plaintext))
        .unwrap();
    (fixture, envelope)
}

/// Opens `envelope` as the given scope would, parsing first; any failure is `Err`.
fn try_open(
    root: &DerivationKey,
    scope: &RecordScope<'_>,
    field: &FieldName,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let parsed = Envelope::parse(envelope)?;
    let key_scope = RecordScope {
        key_version: parsed.key_version,
        jurisdiction: &parsed.jurisdiction,
        ..*scope
    };
    // A server derives the key from what the header names, then checks it against the
    // record it was asked about: both paths must fail on tampering.
    let key = root.record_key(&key_scope)?;
    key.open(scope, field, &parsed)
}

#[test]
fn flipping_any_bit_of_any_byte_fails() {
    let (fixture, envelope) = sealed_fixture();
    let scope = fixture.scope();
    assert!(try_open(&fixture.root, &scope, &fixture.field, &envelope).is_ok());
    for index in 0..envelope.len() {
        for bit in 0..8 {
            let mut tampered = envelope.clone();
            tampered[index] ^= 1 << bit;
            let result = try_open(&fixture.root, &scope, &fixture.field, &tampered);
            assert!(result.is_err(), "byte {index} bit {bit} still opened");
        }
    }
}

#[test]
fn truncation_and_extension_fail() {
    let (fixture, envelope) = sealed_fixture();
    let scope = fixture.scope();
    for len in 0..envelope.len() {
        assert!(try_open(&fixture.root, &scope, &fixture.field, &envelope[..len]).is_err());
    }
    let mut longer = envelope.clone();
    longer.push(0);
    assert_eq!(
        try_open(&fixture.root, &scope, &fixture.field, &longer).unwrap_err(),
        Error::Integrity
    );
}

#[test]
fn moving_a_ciphertext_fails_as_integrity() {
    let (fixture, envelope) = sealed_fixture();
    let other_field = FieldName::new("phone").unwrap();
    let other_record = RecordId::new("u-43").unwrap();
    let other_type = RecordType::new("order").unwrap();
    let scope = fixture.scope();
    let cases = [
        (scope, &other_field, "another field"),
        (
            RecordScope {
                record_id: &other_record,
                ..scope
            },
            &fixture.field,
            "another record",
        ),
        (
            RecordScope {
                record_type: &other_type,
                ..scope
            },
            &fixture.field,
            "another record type",
        ),
    ];
    for (scope, field, what) in cases {
        assert_eq!(
            try_open(&fixture.root, &scope, field, &envelope).unwrap_err(),
            Error::Integrity,
            "{what}"
        );
    }
}

#[test]
fn another_jurisdictions_key_or_version_cannot_open() {
    let (fixture, envelope) = sealed_fixture();
    let parsed = Envelope::parse(&envelope).unwrap();
    let sg = Jurisdiction::new("SG").unwrap();
    // The SG key (even with the same root bytes) under the header's claim of US.
    let sg_key = fixture
        .root
        .record_key(&RecordScope {
            jurisdiction: &sg,
            ..fixture.scope()
        })
        .unwrap();
    assert_eq!(
        sg_key
            .open(&fixture.scope(), &fixture.field, &parsed)
            .unwrap_err(),
        Error::Integrity
    );
    // Another root key of the same jurisdiction (a different version's key).
    let other_root = DerivationKey::from_root(&SecretKey::generate().unwrap());
    let other_key = other_root.record_key(&fixture.scope()).unwrap();
    assert_eq!(
        other_key
            .open(&fixture.scope(), &fixture.field, &parsed)
            .unwrap_err(),
        Error::Integrity
    );
    // Asking for another key version than the envelope names.
    let v2 = RecordScope {
        key_version: KeyVersion::new(2).unwrap(),
        ..fixture.scope()
    };
    let key = fixture.root.record_key(&fixture.scope()).unwrap();
    assert_eq!(
        key.open(&v2, &fixture.field, &parsed).unwrap_err(),
        Error::Integrity
    );
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for garbage in [&b""[..], b"RF", b"XX\x01\x02US", &[0u8; 64], &[0xffu8; 64]] {
        assert!(matches!(Envelope::parse(garbage), Err(Error::Malformed(_))));
    }
    let mut bad_version = sealed_fixture().1;
    bad_version[2] = 3;
    assert_eq!(
        Envelope::parse(&bad_version).unwrap_err(),
        Error::Malformed("unsupported format version")
    );
}

#[test]
fn nonces_are_fresh() {
    let nonces = fresh_nonces(64).unwrap();
    let unique: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(unique.len(), 64);
}

#[test]
fn legacy_key_wrapping_binds_master_jurisdiction_and_version() {
    let master = SecretKey::generate().unwrap();
    let wrapper = LegacyKeyWrapper::new(&master).unwrap();
    let root = SecretKey::generate().unwrap();
    let us = Jurisdiction::new("US").unwrap();
    let sg = Jurisdiction::new("SG").unwrap();
    let v1 = KeyVersion::FIRST;
    let sealed = wrapper.seal(&us, v1, &root).unwrap();
    assert_eq!(sealed.len(), SEALED_KEY_LEN);
    assert_eq!(
        wrapper.open(&us, v1, &sealed).unwrap().expose(),
        root.expose()
    );
    assert!(wrapper.open(&sg, v1, &sealed).is_err());
    assert!(
        wrapper
            .open(&us, KeyVersion::new(2).unwrap(), &sealed)
            .is_err()
    );
    let other = LegacyKeyWrapper::new(&SecretKey::generate().unwrap()).unwrap();
    assert!(other.open(&us, v1, &sealed).is_err());
    let mut flipped = sealed.clone();
    flipped[20] ^= 1;
    assert!(wrapper.open(&us, v1, &flipped).is_err());
}

#[test]
fn jurisdiction_wrapping_keys_bind_master_jurisdiction_version_and_key_id() {
    let master = SecretKey::generate().unwrap();
    let us = Jurisdiction::new("US").unwrap();
    let sg = Jurisdiction::new("SG").unwrap();
    let us_key = WrappingKey::derive(&master, &us).unwrap();
    let sg_key = WrappingKey::derive(&master, &sg).unwrap();
    let root = SecretKey::generate().unwrap();
    let v1 = KeyVersion::FIRST;
    let v2 = KeyVersion::new(2).unwrap();
    let id = DerivationKey::from_root(&root).key_id(&us, v1).unwrap();
    let sealed = us_key.seal(v1, &id, &root).unwrap();
    assert_eq!(sealed.len(), SEALED_KEY_LEN);
    assert_eq!(
        us_key.open(v1, &id, &sealed).unwrap().expose(),
        root.expose()
    );
    // Another jurisdiction's wrapping key, another version, another key id, another
    // master key, one flipped bit: none opens it.
    assert!(sg_key.open(v1, &id, &sealed).is_err());
    assert!(us_key.open(v2, &id, &sealed).is_err());
    let other_id = DerivationKey::from_root(&root).key_id(&us, v2).unwrap();
    assert_ne!(id, other_id, "a key id names the version too");
    assert!(us_key.open(v1, &other_id, &sealed).is_err());
    let other_master = WrappingKey::derive(&SecretKey::generate().unwrap(), &us).unwrap();
    assert!(other_master.open(v1, &id, &sealed).is_err());
    let mut flipped = sealed.clone();
    flipped[20] ^= 1;
    assert!(us_key.open(v1, &id, &flipped).is_err());
    // Metadata tags: bound to the jurisdiction's key and to every byte.
    let tag = us_key.authenticate(b"generation 3").unwrap();
    assert!(us_key.verify(b"generation 3", &tag).is_ok());
    assert!(us_key.verify(b"generation 2", &tag).is_err());
    assert!(sg_key.verify(b"generation 3", &tag).is_err());
    assert!(us_key.verify(b"generation 3", &tag[..31]).is_err());
    assert!(format!("{us_key:?}").contains("redacted"));
}

#[test]
fn key_hierarchy_matches_its_known_answer_vector() {
    // tests/data/key_hierarchy_kat.json, computed independently with Python's hmac and
    // hashlib from docs/crypto.md ("Key hierarchy").
    let kat: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/key_hierarchy_kat.json")).unwrap();
    let hex32 = |name: &str| -> [u8; 32] {
        hex::decode(kat[name].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let master = SecretKey::from_bytes(hex32("master_key"));
    let jurisdiction = Jurisdiction::new(kat["jurisdiction"].as_str().unwrap()).unwrap();
    let version = KeyVersion::new(kat["key_version"].as_u64().unwrap() as u32).unwrap();
    let root = SecretKey::from_bytes(hex32("root_key"));
    let key_id = DerivationKey::from_root(&root)
        .key_id(&jurisdiction, version)
        .unwrap();
    assert_eq!(key_id.to_string(), kat["key_id"].as_str().unwrap());
    let wrapping = WrappingKey::derive(&master, &jurisdiction).unwrap();
    let same = WrappingKey::from_wrapping_key(
        &SecretKey::from_bytes(hex32("wrapping_key")),
        &jurisdiction,
    )
    .unwrap();
    let message = kat["metadata"].as_str().unwrap().as_bytes();
    let tag = wrapping.authenticate(message).unwrap();
    assert_eq!(hex::encode(tag), kat["metadata_mac"].as_str().unwrap());
    assert_eq!(same.authenticate(message).unwrap(), tag);
    let sealed = hex::decode(kat["sealed_root_key"].as_str().unwrap()).unwrap();
    assert_eq!(
        wrapping.open(version, &key_id, &sealed).unwrap().expose(),
        root.expose()
    );
}

#[test]
fn hmac_and_hkdf_state_is_zeroized_on_drop() {
    // Compile-time: HMAC-SHA256 (inside HKDF's `Hkdf<Sha256>` and our metadata tags)
    // keeps its key-derived inner and outer midstates in two `<Sha256 as EagerHash>::Core`
    // values (`hmac::block_api::HmacCore`); with `sha2`'s `zeroize` feature that type
    // wipes itself on drop, and so does a whole SHA-256 hasher.
    fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    zeroized_on_drop::<<sha2::Sha256 as hmac::EagerHash>::Core>();
    zeroized_on_drop::<sha2::Sha256>();
    zeroized_on_drop::<SecretKey>();
    zeroized_on_drop::<DerivationKey>();
}

#[test]
fn debug_output_never_shows_key_bytes() {
    let key = SecretKey::from_bytes([0xab; KEY_LEN]);
    let printed = format!("{key:?} {:?}", DerivationKey::from_root(&key));
    assert!(!printed.contains("ab"), "{printed}");
    assert!(!printed.contains("171"), "{printed}");
    assert!(printed.contains("redacted"));
}

#[test]
fn random_and_mutated_inputs_never_panic_or_open() {
    use rand::RngExt as _;
    let (fixture, envelope) = sealed_fixture();
    let scope = fixture.scope();
    let mut rng = rand::rng();
    for _ in 0..20_000 {
        let len = rng.random_range(0..160);
        let garbage: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Random bytes: parse may fail or succeed, opening must fail.
        assert!(try_open(&fixture.root, &scope, &fixture.field, &garbage).is_err());

        let mut mutated = envelope.clone();
        for _ in 0..rng.random_range(1..4) {
            let index = rng.random_range(0..mutated.len());
            let replacement: u8 = rng.random();
            mutated[index] = replacement;
        }
        if mutated != envelope {
            assert!(try_open(&fixture.root, &scope, &fixture.field, &mutated).is_err());
        }
    }
}
