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
    /// Making a new root key version current (`KeyRing` resource).
    RotateKey,
    /// Retiring old key versions.
    RetireKey,
    /// Letting retired key versions decrypt again.
    UnretireKey,
    /// Destroying retired key versions for good.
    DestroyKey,
    /// Listing key versions, ids and states.
    ViewKeys,
    /// Re-encrypting a field under the current key version without returning its
    /// plaintext (`Field` resource).
    Rewrap,
    /// Destroying a data subject's secret material in a jurisdiction, so that none of
    /// that subject's fields there ever decrypts again (`DataSubjects` resource).
    Shred,
}

/// The resource type an action applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// `Field`: one field of a record type in a jurisdiction.
    Field,
    /// `KeyRing`: one jurisdiction's root keys.
    KeyRing,
    /// `DataSubjects`: the data subjects of one jurisdiction (their secret material).
    DataSubjects,
}

impl ResourceKind {
    /// The Cedar entity type of the resource.
    pub fn type_name(self) -> &'static str {
        match self {
            ResourceKind::Field => "Field",
            ResourceKind::KeyRing => KEY_RING_TYPE,
            ResourceKind::DataSubjects => DATA_SUBJECTS_TYPE,
        }
    }

    /// Whether the resource is one entity per jurisdiction (administration), not a
    /// field of a record.
    pub fn is_jurisdictional(self) -> bool {
        !matches!(self, ResourceKind::Field)
    }
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 9] = [
        Action::Encrypt,
        Action::Decrypt,
        Action::RotateKey,
        Action::RetireKey,
        Action::UnretireKey,
        Action::DestroyKey,
        Action::ViewKeys,
        Action::Rewrap,
        Action::Shred,
    ];

    /// The Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
            Action::RotateKey => "rotate_key",
            Action::RetireKey => "retire_key",
            Action::UnretireKey => "unretire_key",
            Action::DestroyKey => "destroy_key",
            Action::ViewKeys => "view_keys",
            Action::Rewrap => "rewrap",
            Action::Shred => "shred",
        }
    }

    /// The action with Cedar id `id`.
    pub fn from_id(id: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|action| action.as_str() == id)
    }

    /// What the action applies to.
    pub fn resource_kind(self) -> ResourceKind {
        match self {
            Action::Encrypt | Action::Decrypt | Action::Rewrap => ResourceKind::Field,
            Action::Shred => ResourceKind::DataSubjects,
            Action::RotateKey
            | Action::RetireKey
            | Action::UnretireKey
            | Action::DestroyKey
            | Action::ViewKeys => ResourceKind::KeyRing,
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
    pub(super) key_ring: EntityTypeName,
    pub(super) data_subjects: EntityTypeName,
    rewrap: EntityUid,
    shred: EntityUid,
    encrypt: EntityUid,
    decrypt: EntityUid,
    rotate_key: EntityUid,
    retire_key: EntityUid,
    unretire_key: EntityUid,
    destroy_key: EntityUid,
    view_keys: EntityUid,
}

impl Names {
    pub(super) fn new() -> Result<Self, Error> {
        Ok(Self {
            employee: type_name("Employee")?,
            service: type_name("Service")?,
            field: type_name("Field")?,
            key_ring: type_name(KEY_RING_TYPE)?,
            data_subjects: type_name(DATA_SUBJECTS_TYPE)?,
            rewrap: uid("Action", Action::Rewrap.as_str())?,
            shred: uid("Action", Action::Shred.as_str())?,
            encrypt: uid("Action", Action::Encrypt.as_str())?,
            decrypt: uid("Action", Action::Decrypt.as_str())?,
            rotate_key: uid("Action", Action::RotateKey.as_str())?,
            retire_key: uid("Action", Action::RetireKey.as_str())?,
            unretire_key: uid("Action", Action::UnretireKey.as_str())?,
            destroy_key: uid("Action", Action::DestroyKey.as_str())?,
            view_keys: uid("Action", Action::ViewKeys.as_str())?,
        })
    }

    /// The `KeyRing` or `DataSubjects` entity of a jurisdiction.
    pub(super) fn jurisdictional(
        &self,
        kind: ResourceKind,
        jurisdiction: &Jurisdiction,
    ) -> Option<EntityUid> {
        let type_name = match kind {
            ResourceKind::KeyRing => &self.key_ring,
            ResourceKind::DataSubjects => &self.data_subjects,
            ResourceKind::Field => return None,
        };
        Some(EntityUid::from_type_name_and_id(
            type_name.clone(),
            EntityId::new(jurisdiction.as_str()),
        ))
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
            Action::RotateKey => &self.rotate_key,
            Action::RetireKey => &self.retire_key,
            Action::UnretireKey => &self.unretire_key,
            Action::DestroyKey => &self.destroy_key,
            Action::ViewKeys => &self.view_keys,
            Action::Rewrap => &self.rewrap,
            Action::Shred => &self.shred,
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

/// Entity type of a jurisdiction's root keys, the resource of key administration.
pub const KEY_RING_TYPE: &str = "KeyRing";
/// Entity type of a jurisdiction's data subjects, the resource of `shred`.
pub const DATA_SUBJECTS_TYPE: &str = "DataSubjects";

/// Id of the `Field` entity of a (jurisdiction, record type, field).
pub fn field_entity_id(
    jurisdiction: &Jurisdiction,
    record_type: &RecordType,
    field: &FieldName,
) -> String {
    format!("{jurisdiction}/{record_type}/{field}")
}
