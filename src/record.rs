//! Domain vocabulary shared by every module: validated names of jurisdictions, record
//! types, records and fields, key versions, and the caller-stated access context.
//!
//! Each newtype checks its syntax once, at the edge, so deeper code never re-validates.
//! This module owns no I/O and knows nothing of protobuf or Cedar.

use std::fmt;

/// Why a value from a request or file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{shown}`: {reason}")]
pub struct InvalidName {
    /// Which kind of value: `jurisdiction`, `record_type`, ...
    pub what: &'static str,
    /// The offending value, shortened and with control characters escaped.
    pub shown: String,
    /// What the value must look like.
    pub reason: &'static str,
}

impl InvalidName {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        Self {
            what,
            shown: shown(value),
            reason,
        }
    }
}

/// A time as the log, the keyring and status reports write it: RFC 3339, UTC.
pub fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The current time, as [`rfc3339`] writes it.
pub fn rfc3339_now() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// Longest directory id (employee or service) accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Whether `value` is a valid directory id: 1 to 128 characters of A-Z, a-z, 0-9,
/// `.`, `_`, `@` or `-`.
pub fn is_directory_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// A user value made safe to print: at most 64 characters, control characters escaped.
pub fn shown(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

fn is_identifier(value: &str, max: usize) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` honours width and alignment, for tabular output.
                f.pad(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(value: &str) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }
    };
}

string_newtype!(
    /// A jurisdiction code such as `US`: 1 to 16 of `A-Z`, `0-9`, `-`, starting with a letter.
    Jurisdiction
);
string_newtype!(
    /// A record type from the field catalog, e.g. `user_profile`: 1 to 64 of `a-z`, `0-9`, `_`.
    RecordType
);
string_newtype!(
    /// A field name from the field catalog, e.g. `email`: 1 to 64 of `a-z`, `0-9`, `_`.
    FieldName
);
string_newtype!(
    /// The caller's identifier of one record: 1 to 256 bytes of printable UTF-8.
    RecordId
);
string_newtype!(
    /// The person a record is about (the data subject), whose secret material every
    /// field of the record is sealed with: 1 to 256 bytes of printable UTF-8. Defaults
    /// to the record id.
    SubjectId
);

impl Jurisdiction {
    /// Longest accepted code, in bytes.
    pub const MAX_LEN: usize = 16;

    /// Checks the syntax of a jurisdiction code.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        let bytes = value.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && bytes.first().is_some_and(u8::is_ascii_uppercase)
            && bytes
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidName::new(
                "jurisdiction",
                value,
                "must be 1 to 16 characters of A-Z, 0-9 or `-`, starting with a letter",
            ))
        }
    }
}

impl RecordType {
    /// Checks the syntax of a record type name.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        if is_identifier(value, 64) {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidName::new(
                "record_type",
                value,
                "must be 1 to 64 characters of a-z, 0-9 or `_`, starting with a letter",
            ))
        }
    }
}

impl FieldName {
    /// Checks the syntax of a field name.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        if is_identifier(value, 64) {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidName::new(
                "field name",
                value,
                "must be 1 to 64 characters of a-z, 0-9 or `_`, starting with a letter",
            ))
        }
    }
}

impl RecordId {
    /// Longest accepted record id, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Checks that a record id is non-empty, bounded and free of control characters.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(InvalidName::new(
                "record_id",
                value,
                "must be 1 to 256 bytes",
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(InvalidName::new(
                "record_id",
                value,
                "must not contain control characters",
            ));
        }
        Ok(Self(value.to_owned()))
    }
}

impl SubjectId {
    /// Longest accepted subject id, in bytes.
    pub const MAX_LEN: usize = RecordId::MAX_LEN;

    /// Checks a subject id with the rules of a record id.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        Self::check(value).map(|()| Self(value.to_owned()))
    }

    /// Whether `value` is a valid subject id, without making one.
    pub fn check(value: &str) -> Result<(), InvalidName> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(InvalidName::new(
                "subject_id",
                value,
                "must be 1 to 256 bytes",
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(InvalidName::new(
                "subject_id",
                value,
                "must not contain control characters",
            ));
        }
        Ok(())
    }
}

impl From<&RecordId> for SubjectId {
    /// A record's default subject: its own id.
    fn from(record: &RecordId) -> Self {
        Self(record.as_str().to_owned())
    }
}

/// The version of a jurisdiction's root key; versions start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion(u32);

impl KeyVersion {
    /// The first version of every root key.
    pub const FIRST: KeyVersion = KeyVersion(1);

    /// A key version; zero is not one.
    pub fn new(value: u32) -> Option<Self> {
        (value >= 1).then_some(Self(value))
    }

    /// The number as stored in envelopes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The version after this one, if any.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for KeyVersion {
    type Err = String;

    /// A decimal version number, 1 or more (`--below 3`).
    fn from_str(text: &str) -> Result<Self, String> {
        text.parse::<u32>()
            .ok()
            .and_then(KeyVersion::new)
            .ok_or_else(|| format!("`{}` is not a key version (1 or more)", shown(text)))
    }
}

/// What the caller states about an access: its purpose and the ticket behind it.
/// Both are recorded in the decision log and visible to policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct StatedPurpose {
    /// E.g. `support`; empty when none was stated.
    pub purpose: String,
    /// E.g. `INC-1234`; empty when none was given.
    pub ticket: String,
}

impl StatedPurpose {
    /// Longest purpose or ticket accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Checks length and characters of a stated purpose and ticket.
    pub fn new(purpose: &str, ticket: &str) -> Result<Self, InvalidName> {
        for (what, value) in [("purpose", purpose), ("ticket", ticket)] {
            if value.len() > Self::MAX_LEN {
                return Err(InvalidName::new(what, value, "must be at most 128 bytes"));
            }
            if value.chars().any(char::is_control) {
                return Err(InvalidName::new(
                    what,
                    value,
                    "must not contain control characters",
                ));
            }
        }
        Ok(Self {
            purpose: purpose.to_owned(),
            ticket: ticket.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jurisdiction_syntax() {
        assert!(Jurisdiction::new("US").is_ok());
        assert!(Jurisdiction::new("EU-WEST").is_ok());
        for bad in ["", "us", "1US", "U S", "ABCDEFGHIJKLMNOPQ", "US\n"] {
            assert!(Jurisdiction::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn identifiers_and_record_ids() {
        assert!(FieldName::new("email_2").is_ok());
        assert!(FieldName::new("Email").is_err());
        assert!(RecordType::new("_x").is_err());
        assert!(RecordId::new("user-42/ä").is_ok());
        assert!(RecordId::new("").is_err());
        assert!(RecordId::new("a\u{0}b").is_err());
        assert!(RecordId::new(&"x".repeat(257)).is_err());
    }

    #[test]
    fn error_messages_escape_and_shorten_user_values() {
        let error = RecordId::new(&format!("{}\n", "y".repeat(300))).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("invalid record_id `yyyy"));
        assert!(message.contains("...`"));
        assert!(!message.contains('\n'));
    }

    #[test]
    fn key_versions_start_at_one() {
        assert_eq!(KeyVersion::new(0), None);
        assert_eq!(KeyVersion::FIRST.next().map(KeyVersion::get), Some(2));
        assert_eq!(KeyVersion::new(u32::MAX).and_then(KeyVersion::next), None);
    }
}
