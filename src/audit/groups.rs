//! The compact layout of an entry's field decisions (`field_groups`, entry format 3):
//! fields grouped by outcome, determining policies, errors and key version, each named
//! under its classification. Reads the per-field list of formats 1 and 2 as well.
//! Pure data; may not touch files.

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::FieldEntry;

/// The decision a field outcome implies: `deny` exactly when the outcome is `denied`.
/// A group states its `decision` only when it is not the implied one.
fn implied_decision(outcome: &str) -> &'static str {
    if outcome == "denied" { "deny" } else { "allow" }
}

fn same_group(a: &FieldEntry, b: &FieldEntry) -> bool {
    a.outcome == b.outcome
        && a.decision == b.decision
        && a.policies == b.policies
        && a.errors == b.errors
        && a.key_version == b.key_version
}

/// `fields` in groups, in order of each group's first field.
fn grouped(fields: &[FieldEntry]) -> Vec<Vec<&FieldEntry>> {
    let mut groups: Vec<Vec<&FieldEntry>> = Vec::new();
    for field in fields {
        match groups
            .iter_mut()
            .find(|group| group.first().is_some_and(|first| same_group(first, field)))
        {
            Some(group) => group.push(field),
            None => groups.push(vec![field]),
        }
    }
    groups
}

struct Group<'a>(Vec<&'a FieldEntry>);

impl Serialize for Group<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(first) = self.0.first() else {
            return Err(serde::ser::Error::custom("empty field group"));
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("outcome", &first.outcome)?;
        if first.decision != implied_decision(&first.outcome) {
            map.serialize_entry("decision", &first.decision)?;
        }
        if !first.policies.is_empty() {
            map.serialize_entry("policies", &first.policies)?;
        }
        if !first.errors.is_empty() {
            map.serialize_entry("errors", &first.errors)?;
        }
        if let Some(version) = first.key_version {
            map.serialize_entry("key_version", &version)?;
        }
        let mut classes: Vec<(&str, Vec<&str>)> = Vec::new();
        for field in &self.0 {
            match classes
                .iter_mut()
                .find(|(class, _)| *class == field.classification)
            {
                Some((_, names)) => names.push(&field.field),
                None => classes.push((&field.classification, vec![&field.field])),
            }
        }
        map.serialize_entry("fields", &Classes(classes))?;
        map.end()
    }
}

struct Classes<'a>(Vec<(&'a str, Vec<&'a str>)>);

impl Serialize for Classes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (class, names) in &self.0 {
            map.serialize_entry(class, names)?;
        }
        map.end()
    }
}

/// Writes `fields` as `field_groups` (see `docs/decision-log.md`, "Field groups").
pub(super) fn serialize<S: Serializer>(
    fields: &[FieldEntry],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let groups = grouped(fields);
    let mut seq = serializer.serialize_seq(Some(groups.len()))?;
    for group in groups {
        seq.serialize_element(&Group(group))?;
    }
    seq.end()
}

/// One group as stored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredGroup {
    outcome: String,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    errors: Vec<String>,
    #[serde(default)]
    key_version: Option<u32>,
    fields: StoredClasses,
}

/// Classification -> field names, in stored order.
struct StoredClasses(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for StoredClasses {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = StoredClasses;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of classifications to field names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StoredClasses, A::Error> {
                let mut classes: Vec<(String, Vec<String>)> = Vec::new();
                while let Some((class, names)) = map.next_entry::<String, Vec<String>>()? {
                    if names.is_empty() {
                        return Err(A::Error::custom(format!(
                            "classification `{class}` names no field"
                        )));
                    }
                    if classes.iter().any(|(seen, _)| *seen == class) {
                        return Err(A::Error::custom(format!(
                            "classification `{class}` appears twice in one group"
                        )));
                    }
                    classes.push((class, names));
                }
                Ok(StoredClasses(classes))
            }
        }
        deserializer.deserialize_map(Ordered)
    }
}

/// A JSON object read as `T`: serde would also read a struct from an array of its
/// members in order, which `audit query`, matching members by name, would not see.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Members<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Members(std::marker::PhantomData))
            .map(Object)
    }
}

/// An element of `field_groups` (format 3) or of `fields` (formats 1 and 2).
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Group(Object<StoredGroup>),
    Field(Object<FieldEntry>),
}

/// Most bytes of memory one entry's field decisions may take once expanded, in
/// `query` and `replay`: a group repeats its policies and errors for every field it
/// names, so a crafted line could otherwise take without bound. `audit verify` and
/// the server's startup do not apply it (they never expand): an entry the server
/// wrote always verifies, and one over it is refused by `query`'s filters and
/// reported by `replay`.
const MAX_EXPANDED_BYTES: usize = 256 * 1024 * 1024;

/// What one field takes once expanded: the entry, its strings and its lists.
fn expanded_size(group: &StoredGroup, class: &str, name: &str) -> usize {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|item| std::mem::size_of::<String>() + item.len())
            .sum::<usize>()
    };
    std::mem::size_of::<FieldEntry>()
        + name.len()
        + class.len()
        + group.outcome.len()
        + group.decision.as_ref().map_or(5, String::len)
        + list(&group.policies)
        + list(&group.errors)
}

/// Checks `groups` without expanding them: every group names a field, every field
/// appears once, and, with a `limit`, the expansion stays under it. Returns how many
/// fields they name.
fn check(groups: &[StoredGroup], limit: Option<usize>) -> Result<usize, String> {
    let mut names = std::collections::HashSet::new();
    let mut expanded = 0usize;
    for group in groups {
        if group.fields.0.is_empty() {
            return Err("a field group names no field".to_owned());
        }
        for (class, members) in &group.fields.0 {
            for name in members {
                if let Some(limit) = limit {
                    expanded = expanded.saturating_add(expanded_size(group, class, name));
                    if expanded > limit {
                        return Err(format!(
                            "field groups that take more than {} MiB expanded",
                            limit >> 20
                        ));
                    }
                }
                if !names.insert(name.as_str()) {
                    return Err(format!("field `{name}` appears twice"));
                }
            }
        }
    }
    Ok(names.len())
}

/// The fields of `groups`, each field once, in stored order.
fn expand(groups: Vec<StoredGroup>) -> Result<Vec<FieldEntry>, String> {
    let mut fields: Vec<FieldEntry> = Vec::with_capacity(check(&groups, Some(MAX_EXPANDED_BYTES))?);
    for group in groups {
        let decision = group
            .decision
            .unwrap_or_else(|| implied_decision(&group.outcome).to_owned());
        for (class, members) in group.fields.0 {
            for name in members {
                fields.push(FieldEntry {
                    field: name,
                    classification: class.clone(),
                    decision: decision.clone(),
                    policies: group.policies.clone(),
                    errors: group.errors.clone(),
                    key_version: group.key_version,
                    outcome: group.outcome.clone(),
                });
            }
        }
    }
    Ok(fields)
}

/// Reads `field_groups` (format 3) or `fields` (formats 1 and 2) into one list of
/// field decisions: a group's fields in stored order, groups one after the other. A
/// list is all groups or all fields; which of the two fits the entry's format is
/// checked by `audit verify` (with [`strict_groups`] and [`strict_fields`]) and by
/// `audit query`.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<FieldEntry>, D::Error> {
    let stored = Vec::<Stored>::deserialize(deserializer)?;
    if stored.iter().all(|item| matches!(item, Stored::Field(_))) {
        return Ok(stored
            .into_iter()
            .filter_map(|item| match item {
                Stored::Field(Object(field)) => Some(field),
                Stored::Group(_) => None,
            })
            .collect());
    }
    let mut groups = Vec::with_capacity(stored.len());
    for item in stored {
        match item {
            Stored::Group(Object(group)) => groups.push(group),
            Stored::Field(_) => {
                return Err(D::Error::custom(
                    "fields listed one by one among field groups",
                ));
            }
        }
    }
    expand(groups).map_err(D::Error::custom)
}

/// `audit verify`'s reading of `field_groups`: group objects only, every member
/// known, every field once; returns how many fields they name.
pub(super) fn strict_groups<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    let groups: Vec<StoredGroup> = Vec::<Object<StoredGroup>>::deserialize(deserializer)?
        .into_iter()
        .map(|Object(group)| group)
        .collect();
    check(&groups, None).map(Some).map_err(D::Error::custom)
}

/// `audit verify`'s reading of `fields` (formats 1 and 2): one object per field with
/// the members those formats wrote, nothing else.
pub(super) fn strict_fields<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    Vec::<Object<FieldEntry>>::deserialize(deserializer).map(|fields| Some(fields.len()))
}

#[derive(Deserialize)]
struct Fields(#[serde(deserialize_with = "deserialize")] Vec<FieldEntry>);

/// Rewrites a parsed entry's `field_groups` into the per-field `fields` list formats 1
/// and 2 wrote (one object per field: `field`, `classification`, `decision`,
/// `policies`, `errors`, `key_version`, `outcome`), the same facts field by field.
/// Leaves an entry without groups, or with groups it cannot read, as it is.
pub fn expand_fields(entry: &mut Value) {
    let Some(object) = entry.as_object_mut() else {
        return;
    };
    let Some(groups) = object.get("field_groups") else {
        return;
    };
    let Ok(Fields(fields)) = Fields::deserialize(groups) else {
        return;
    };
    let Ok(fields) = serde_json::to_value(fields) else {
        return;
    };
    // In place, so that the members keep their order.
    let mut fields = Some(fields);
    *object = std::mem::take(object)
        .into_iter()
        .map(|(key, value)| match key.as_str() {
            "field_groups" => ("fields".to_owned(), fields.take().unwrap_or(value)),
            _ => (key, value),
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, class: &str, decision: &str, policy: &str, outcome: &str) -> FieldEntry {
        FieldEntry {
            field: name.to_owned(),
            classification: class.to_owned(),
            decision: decision.to_owned(),
            policies: if policy.is_empty() {
                vec![]
            } else {
                vec![policy.to_owned()]
            },
            errors: vec![],
            key_version: Some(1),
            outcome: outcome.to_owned(),
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Holder {
        #[serde(
            rename = "field_groups",
            alias = "fields",
            serialize_with = "serialize",
            deserialize_with = "deserialize"
        )]
        fields: Vec<FieldEntry>,
    }

    fn sorted(mut fields: Vec<FieldEntry>) -> Vec<FieldEntry> {
        fields.sort_by(|a, b| a.field.cmp(&b.field));
        fields
    }

    #[test]
    fn groups_keep_every_fact_of_every_field() {
        let mut fields = vec![
            field("email", "pii", "allow", "reads-pii", "decrypt"),
            field("ssn", "restricted", "deny", "", "denied"),
            field("nickname", "public", "allow", "reads-public", "decrypt"),
            field("phone", "pii", "allow", "reads-pii", "decrypt"),
            field("city", "sensitive", "allow", "reads-pii", "decrypt"),
            // Not the decision its outcome implies: stated in its group.
            field("pin", "restricted", "deny", "", "shredded"),
            field("tax_id", "restricted", "allow", "", "integrity_failure"),
        ];
        fields[6].key_version = None;
        fields[6].errors = vec!["while evaluating policy `p`: error".to_owned()];
        let line = serde_json::to_string(&Holder {
            fields: fields.clone(),
        })
        .unwrap();
        assert_eq!(
            line,
            concat!(
                r#"{"field_groups":["#,
                r#"{"outcome":"decrypt","policies":["reads-pii"],"key_version":1,"fields":{"pii":["email","phone"],"sensitive":["city"]}},"#,
                r#"{"outcome":"denied","key_version":1,"fields":{"restricted":["ssn"]}},"#,
                r#"{"outcome":"decrypt","policies":["reads-public"],"key_version":1,"fields":{"public":["nickname"]}},"#,
                r#"{"outcome":"shredded","decision":"deny","key_version":1,"fields":{"restricted":["pin"]}},"#,
                r#"{"outcome":"integrity_failure","errors":["while evaluating policy `p`: error"],"fields":{"restricted":["tax_id"]}}"#,
                "]}"
            )
        );
        let read: Holder = serde_json::from_str(&line).unwrap();
        assert_eq!(sorted(read.fields), sorted(fields.clone()));
        // The per-field list of formats 1 and 2 reads as the same facts.
        let old = serde_json::json!({ "fields": fields });
        let read: Holder = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(read.fields, fields);
        // And `expand_fields` turns the groups back into that list, in place.
        let mut entry: Value = serde_json::from_str(&format!(
            r#"{{"seq":1,{},"outcome":"decided"}}"#,
            &line[1..line.len() - 1]
        ))
        .unwrap();
        expand_fields(&mut entry);
        let keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["seq", "fields", "outcome"]);
        let expanded: Vec<FieldEntry> = serde_json::from_value(entry["fields"].clone()).unwrap();
        assert_eq!(sorted(expanded), sorted(fields));
    }

    #[test]
    fn malformed_groups_are_refused() {
        for bad in [
            r#"{"field_groups":[{"outcome":"decrypt","fields":{}}]}"#,
            r#"{"field_groups":[{"outcome":"decrypt","fields":{"pii":[]}}]}"#,
            r#"{"field_groups":[{"outcome":"decrypt","fields":{"pii":["a"]},"extra":1}]}"#,
            r#"{"field_groups":[{"fields":{"pii":["a"]}}]}"#,
            r#"{"field_groups":[{"outcome":"decrypt","fields":["a"]}]}"#,
        ] {
            assert!(serde_json::from_str::<Holder>(bad).is_err(), "{bad}");
        }
        // A small line cannot expand without bound: 100,000 names sharing a 3 KB error
        // would be 300 MB one by one; refused before anything is expanded.
        let names: Vec<String> = (0..100_000).map(|n| format!("f{n}")).collect();
        let huge = serde_json::json!({"field_groups": [{
            "outcome": "denied", "errors": ["e".repeat(3000)], "fields": {"pii": names}}]})
        .to_string();
        assert!(huge.len() < 1_000_000);
        let error = serde_json::from_str::<Holder>(&huge).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("field groups that take more than 256 MiB expanded"),
            "{error}"
        );
        // Not by the strings alone: 100,000 empty policy ids cost a String each, for
        // each of 100,000 fields.
        let empty: Vec<&str> = vec![""; 100_000];
        let names: Vec<String> = (0..100_000).map(|n| format!("f{n}")).collect();
        let lists = serde_json::json!({"field_groups": [{
            "outcome": "decrypt", "policies": empty, "fields": {"pii": names}}]})
        .to_string();
        assert!(lists.len() < 2_000_000);
        assert!(serde_json::from_str::<Holder>(&lists).is_err());
        // A struct is read from an object only, never from an array of its members.
        for array in [
            r#"{"fields":[["email","pii","deny",[],[],1,"denied"]]}"#,
            r#"{"field_groups":[["decrypt",null,[],[],1,{"pii":["email"]}]]}"#,
        ] {
            assert!(serde_json::from_str::<Holder>(array).is_err(), "{array}");
        }
        // `expand_fields` leaves what it cannot read as it is.
        let mut entry: Value =
            serde_json::from_str(r#"{"field_groups":[{"outcome":"decrypt","fields":{}}]}"#)
                .unwrap();
        let before = entry.clone();
        expand_fields(&mut entry);
        assert_eq!(entry, before);
    }
}
