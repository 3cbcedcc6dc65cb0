//! The field catalog (`policies/fields.toml`): which record types exist, which fields
//! each has, and the classification of every field.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::record::{FieldName, RecordType};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    classifications: Vec<String>,
    record_types: BTreeMap<String, BTreeMap<String, String>>,
}

/// Record types, their fields, and each field's classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCatalog {
    classifications: Vec<String>,
    record_types: BTreeMap<RecordType, BTreeMap<FieldName, String>>,
}

impl FieldCatalog {
    /// Parses and checks the catalog; the error names the line of the first problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: CatalogFile = toml::from_str(text).map_err(|error| error.to_string())?;
        if file.classifications.is_empty() {
            return Err("`classifications` must list at least one classification".to_owned());
        }
        let mut record_types = BTreeMap::new();
        for (type_name, fields) in file.record_types {
            let record_type = RecordType::new(&type_name).map_err(|e| e.to_string())?;
            if fields.is_empty() {
                return Err(format!("record type `{type_name}` has no fields"));
            }
            let mut checked = BTreeMap::new();
            for (field_name, classification) in fields {
                let field = FieldName::new(&field_name).map_err(|e| e.to_string())?;
                if !file.classifications.contains(&classification) {
                    return Err(format!(
                        "field `{type_name}.{field_name}` has classification `{classification}`, which is not one of `classifications`"
                    ));
                }
                checked.insert(field, classification);
            }
            record_types.insert(record_type, checked);
        }
        Ok(Self {
            classifications: file.classifications,
            record_types,
        })
    }

    /// The classification of a field, if the catalog lists it.
    pub fn classification(&self, record_type: &RecordType, field: &FieldName) -> Option<&str> {
        self.record_types
            .get(record_type)
            .and_then(|fields| fields.get(field))
            .map(String::as_str)
    }

    /// The fields of a record type, in name order.
    pub fn fields(&self, record_type: &RecordType) -> Option<impl Iterator<Item = &FieldName>> {
        self.record_types.get(record_type).map(BTreeMap::keys)
    }

    /// Every (record type, field, classification).
    pub fn entries(&self) -> impl Iterator<Item = (&RecordType, &FieldName, &str)> {
        self.record_types.iter().flat_map(|(record_type, fields)| {
            fields
                .iter()
                .map(move |(field, class)| (record_type, field, class.as_str()))
        })
    }

    /// The declared classifications.
    pub fn classifications(&self) -> &[String] {
        &self.classifications
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let catalog = FieldCatalog::parse(
            "classifications = [\"public\", \"pii\"]\n[record_types.user]\nemail = \"pii\"\n",
        )
        .unwrap();
        let user = RecordType::new("user").unwrap();
        let email = FieldName::new("email").unwrap();
        assert_eq!(catalog.classification(&user, &email), Some("pii"));
        assert_eq!(catalog.fields(&user).unwrap().count(), 1);

        let unknown_class = FieldCatalog::parse(
            "classifications = [\"public\"]\n[record_types.user]\nemail = \"pii\"\n",
        )
        .unwrap_err();
        assert!(unknown_class.contains("user.email"), "{unknown_class}");
        let typo = FieldCatalog::parse("classification = []\n").unwrap_err();
        assert!(typo.contains("line 1"), "{typo}");
        assert!(
            FieldCatalog::parse("classifications=[\"a\"]\n[record_types.User]\nx=\"a\"").is_err()
        );
    }
}
