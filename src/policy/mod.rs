//! Cedar policies: load `policies/`, validate strictly, and decide per field.
//!
//! Owns every `cedar_policy` type; nothing outside this module sees one. A
//! [`PolicySnapshot`] is an immutable, fully validated set (schema, policies, directory,
//! field catalog) with the hash that decision log entries cite; [`PolicyStore`] swaps
//! snapshots atomically. Decisions fail closed: any evaluation error denies the field.
//!
//! Speed: a Cedar evaluation costs about a microsecond per policy, so [`PolicySnapshot::decide`]
//! evaluates once per class of fields that the policies cannot tell apart (see
//! [`analysis`]) and remembers decisions per snapshot in a bounded cache.

pub mod analysis;
pub mod catalog;
mod checks;
mod decide;
mod diagnostics;
mod load;
mod names;
pub mod prove;
mod store;
pub mod suite;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{Authorizer, Entities, EntityUid, PolicySet, Schema};

pub use analysis::Observed;
pub use catalog::FieldCatalog;
pub use decide::{FieldDecision, RequestFacts, Verdict};
pub use diagnostics::LoadError;
pub use names::{
    Action, DATA_SUBJECTS_TYPE, KEY_RING_TYPE, Principal, ResourceKind, field_entity_id,
};
pub use store::{
    LoadAttempt, PolicyStore, ProofGuard, ProofMode, ProofStatus, StoreStatus, Trigger,
    affects_policy_set, weakened,
};

use crate::record::{FieldName, Jurisdiction, RecordType};
use decide::DecisionKey;
use names::Names;

/// Schema file in the policy directory (Cedar human-readable schema format).
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Directory of principals, teams, organizations and jurisdictions (Cedar entities JSON).
pub const DIRECTORY_FILE: &str = "directory.json";
/// Field catalog file.
pub const CATALOG_FILE: &str = "fields.toml";
/// Annotation that names a policy; required and unique across files.
pub const ID_ANNOTATION: &str = "id";
/// Annotation that, set to `"false"`, hides a policy's id from denied callers.
pub const CALLER_VISIBLE_ANNOTATION: &str = "caller_visible";

/// An immutable, validated policy set with everything needed to decide.
pub struct PolicySnapshot {
    names: Names,
    hash: String,
    /// The files hashed, by name, exactly as read: what [`PolicySnapshot::archive`] keeps.
    sources: Vec<(String, String)>,
    schema: Schema,
    all_policies: PolicySet,
    by_action: BTreeMap<Action, PolicySet>,
    entities: Entities,
    catalog: FieldCatalog,
    jurisdictions: BTreeSet<Jurisdiction>,
    observed: Observed,
    hidden_ids: HashSet<String>,
    policy_files: BTreeMap<String, PathBuf>,
    /// The actions the schema declares (see `checks::declared_actions`).
    declared: BTreeSet<Action>,
    /// The invariants of `invariants/` and the acknowledgements of `CHANGES.yaml`.
    invariants: Arc<prove::Invariants>,
    /// What the prover must know of the schema.
    shape: checks::SchemaShape,
    authorizer: Authorizer,
    cache: RwLock<HashMap<DecisionKey, Arc<FieldDecision>>>,
}

impl fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("hash", &self.hash)
            .field("policies", &self.policy_files.len())
            .finish_non_exhaustive()
    }
}

/// Errors of loading policies or deciding a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy directory does not load; each diagnostic names its file.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The principal is not in the directory.
    #[error("unknown principal `{0}`: not in the directory")]
    UnknownPrincipal(String),
    /// The calling service is not in the directory.
    #[error("unknown service `{0}`: not in the directory")]
    UnknownService(String),
    /// The record type is not in the field catalog.
    #[error("unknown record type `{0}`: not in the field catalog")]
    UnknownRecordType(RecordType),
    /// The field is not in the catalog for its record type.
    #[error("unknown field `{field}` for record type `{record_type}`")]
    UnknownField {
        /// The record type.
        record_type: RecordType,
        /// The field.
        field: FieldName,
    },
    /// No `Jurisdiction` entity of that code is in the directory.
    #[error("unknown jurisdiction `{0}`: not in the policy directory")]
    UnknownJurisdiction(Jurisdiction),
    /// Key administration needs an employee principal; a service alone may not.
    #[error(
        "key administration is decided for employees only, not `{0}`: present an employee token"
    )]
    NotAnEmployee(String),
    /// The policy set's schema does not declare the action (or its resource type).
    #[error(
        "the policy set's schema does not declare `{}` (on `{}`): add it as in the shipped policies/schema.cedarschema to use it", .0.as_str(), .0.resource_kind().type_name()
    )]
    Undeclared(Action),
    /// A request could not be built; a defect, not a caller mistake.
    #[error("internal policy error: {0}")]
    Internal(String),
}

impl PolicySnapshot {
    /// SHA-256 (hex) over the schema, policy files, directory and catalog.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The field catalog.
    pub fn catalog(&self) -> &FieldCatalog {
        &self.catalog
    }

    /// Jurisdictions that the directory defines.
    pub fn jurisdictions(&self) -> &BTreeSet<Jurisdiction> {
        &self.jurisdictions
    }

    /// Policy ids and the file each came from.
    pub fn policy_files(&self) -> &BTreeMap<String, PathBuf> {
        &self.policy_files
    }

    /// What the policy set can observe of resources and contexts.
    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    /// Ids of the directory's employees that are members of `group` (as Cedar's
    /// `principal in group`, transitively), sorted. `group` is a Cedar entity
    /// reference such as `Organization::"parentco"`; it must exist.
    pub fn employees_in(&self, group: &str) -> Result<Vec<String>, String> {
        let group_uid = EntityUid::from_str(group).map_err(|_| {
            format!("`{group}` is not an entity reference like `Team::\"usds-legal\"`")
        })?;
        if self.entities.get(&group_uid).is_none() {
            return Err(format!("`{group}` is not in the directory"));
        }
        let mut members: Vec<String> = self
            .entities
            .iter()
            .map(cedar_policy::Entity::uid)
            .filter(|uid| {
                uid.type_name() == &self.names.employee
                    && uid != &group_uid
                    && self.entities.is_ancestor_of(&group_uid, uid)
            })
            .map(|uid| uid.id().unescaped().to_owned())
            .collect();
        members.sort_unstable();
        Ok(members)
    }

    /// Ids of the directory's `Service` entities, sorted.
    pub fn service_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .entities
            .iter()
            .map(cedar_policy::Entity::uid)
            .filter(|uid| uid.type_name() == &self.names.service)
            .map(|uid| uid.id().unescaped().to_owned())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The invariants proved of this set, and the acknowledged changes to them.
    pub fn invariants(&self) -> &prove::Invariants {
        &self.invariants
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.all_policies.policies().count()
    }

    /// Whether the set has no policies (never true for a loaded snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
