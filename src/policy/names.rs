//! Entity naming: the actions, the principals, and the Cedar entity uids and ids
//! ringfence builds for them. Parses names once per snapshot; may not decide or load.

use std::fmt;
use std::str::FromStr;

use cedar_policy::{EntityId, EntityTypeName, EntityUid};

use super::Error;
use crate::record::{FieldName, Jurisdiction, RecordType};

/// An action that policies decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Encrypting a field of a record.
    Encrypt,
    /// Decrypting (or asking whether one may decrypt) a field.
    Decrypt,
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 2] = [Action::Encrypt, Action::Decrypt];

    /// The Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
        }
    }
}

/// Who a decision is about: an employee, or a service acting without a human.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// An `Employee` of the directory, by id.
    Employee(String),
    /// A `Service` of the directory, by id.
    Service(String),
}

impl Principal {
    fn type_name(&self) -> &'static str {
        match self {
            Principal::Employee(_) => "Employee",
            Principal::Service(_) => "Service",
        }
    }

    /// The directory id.
    pub fn id(&self) -> &str {
        match self {
            Principal::Employee(id) | Principal::Service(id) => id,
        }
    }
}

impl FromStr for Principal {
    type Err = String;

    /// Parses what `Display` writes, Cedar's entity uid syntax: `Employee::"alice"` or
    /// `Service::"us-signup"`. (Logs written before, with Rust's string quoting, read
    /// the same: directory ids need no escaping in either.)
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{}` is not `Employee::\"id\"` or `Service::\"id\"`",
                crate::record::shown(text)
            )
        };
        let uid = EntityUid::from_str(text).map_err(|_| bad())?;
        let id = uid.id().unescaped().to_owned();
        match uid.type_name().to_string().as_str() {
            "Employee" => Ok(Principal::Employee(id)),
            "Service" => Ok(Principal::Service(id)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Principal {
    /// Cedar's entity uid syntax, as policies write it: `Employee::"alice"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::\"{}\"", self.type_name(), self.id().escape_debug())
    }
}

/// Entity type names and action ids, parsed once per snapshot instead of per request.
pub(super) struct Names {
    pub(super) employee: EntityTypeName,
    pub(super) service: EntityTypeName,
    pub(super) field: EntityTypeName,
    pub(super) encrypt: EntityUid,
    pub(super) decrypt: EntityUid,
}

impl Names {
    pub(super) fn new() -> Result<Self, Error> {
        Ok(Self {
            employee: type_name("Employee")?,
            service: type_name("Service")?,
            field: type_name("Field")?,
            encrypt: uid("Action", Action::Encrypt.as_str())?,
            decrypt: uid("Action", Action::Decrypt.as_str())?,
        })
    }

    pub(super) fn principal(&self, principal: &Principal) -> EntityUid {
        let type_name = match principal {
            Principal::Employee(_) => &self.employee,
            Principal::Service(_) => &self.service,
        };
        EntityUid::from_type_name_and_id(type_name.clone(), EntityId::new(principal.id()))
    }

    pub(super) fn service(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.service.clone(), EntityId::new(id))
    }

    pub(super) fn field(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.field.clone(), EntityId::new(id))
    }

    pub(super) fn action(&self, action: Action) -> &EntityUid {
        match action {
            Action::Encrypt => &self.encrypt,
            Action::Decrypt => &self.decrypt,
        }
    }
}

pub(super) fn type_name(name: &str) -> Result<EntityTypeName, Error> {
    EntityTypeName::from_str(name).map_err(|error| Error::Internal(error.to_string()))
}

pub(super) fn uid(type_name_text: &str, id: &str) -> Result<EntityUid, Error> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(type_name_text)?,
        EntityId::new(id),
    ))
}

/// Id of the `Field` entity of a (jurisdiction, record type, field).
pub fn field_entity_id(
    jurisdiction: &Jurisdiction,
    record_type: &RecordType,
    field: &FieldName,
) -> String {
    format!("{jurisdiction}/{record_type}/{field}")
}
