//! What a policy set can observe of a request, found by walking each policy's JSON form
//! (Cedar's EST). Two fields whose observable facts agree get the same decision, so the
//! authorizer runs once per class of equivalent fields, not once per field.
//!
//! The walk is conservative: any use of `resource` or `context` it does not recognise
//! marks the whole value as observed, which only costs speed, never correctness.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Entity type of jurisdictions; a field's only ancestor.
pub const JURISDICTION_TYPE: &str = "Jurisdiction";

/// The facts of the resource and context that some policy can observe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Some policy compares or passes the resource itself (`==`, `in` a non-jurisdiction).
    pub resource_identity: bool,
    /// Attributes read or tested on `resource`.
    pub resource_attributes: BTreeSet<String>,
    /// Some policy uses `context` other than by reading named attributes.
    pub whole_context: bool,
    /// Attributes read or tested on `context`.
    pub context_attributes: BTreeSet<String>,
    /// Context attributes whose every use is a comparison with string literals
    /// (`==`, `!=`, `[..].contains(..)`), with the literals. Values that equal the same
    /// literal, or none of them, are indistinguishable to the policies.
    pub context_literals: BTreeMap<String, BTreeSet<String>>,
    /// Context attributes used in some other way: their exact value matters.
    pub context_raw: BTreeSet<String>,
}

/// How a context attribute's value reaches a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextUse<'a> {
    /// Never used: any value decides the same.
    Unused,
    /// Only compared with these literals.
    Literals(&'a BTreeSet<String>),
    /// Used as is.
    Raw,
}

impl Observed {
    /// Whether the attribute `name` of the resource can influence a decision.
    pub fn resource_attribute(&self, name: &str) -> bool {
        self.resource_identity || self.resource_attributes.contains(name)
    }

    /// How the value of context attribute `name` can influence a decision.
    pub fn context_use(&self, name: &str) -> ContextUse<'_> {
        if self.whole_context || self.context_raw.contains(name) {
            ContextUse::Raw
        } else if let Some(literals) = self.context_literals.get(name) {
            ContextUse::Literals(literals)
        } else {
            // Never used, or only tested with `has`: every request carries every attribute.
            ContextUse::Unused
        }
    }

    fn context_literal(&mut self, name: &str, literal: &str) {
        self.context_attributes.insert(name.to_owned());
        self.context_literals
            .entry(name.to_owned())
            .or_default()
            .insert(literal.to_owned());
    }

    /// Adds what one policy (in EST JSON form) observes.
    pub fn add_policy(&mut self, policy: &Value) {
        match policy.get("resource") {
            Some(scope) => self.resource_scope(scope),
            None => self.resource_identity = true,
        }
        match policy.get("conditions") {
            Some(Value::Array(conditions)) => {
                for condition in conditions {
                    match condition.get("body") {
                        Some(body) => self.expression(body),
                        None => self.everything(),
                    }
                }
            }
            None => {}
            Some(_) => self.everything(),
        }
    }

    fn everything(&mut self) {
        self.resource_identity = true;
        self.whole_context = true;
    }

    fn resource_scope(&mut self, scope: &Value) {
        let op = scope.get("op").and_then(Value::as_str);
        let jurisdiction_only = match op {
            Some("All" | "all") => true,
            Some("in") => scope.get("entity").is_some_and(is_jurisdiction_entity),
            Some("is") => scope
                .get("in")
                .is_none_or(|inner| inner.get("entity").is_some_and(is_jurisdiction_entity)),
            _ => false,
        };
        if !jurisdiction_only {
            self.resource_identity = true;
        }
    }

    /// Walks one expression node. Every EST expression is an object with exactly one
    /// key (the operator); anything else is not understood and observes everything.
    fn expression(&mut self, expression: &Value) {
        match expression {
            Value::Object(map) if map.len() == 1 => {
                if let Some((operator, argument)) = map.iter().next() {
                    self.operator(operator, argument);
                }
            }
            _ => self.everything(),
        }
    }

    /// Walks the named child expressions of an operator's argument object; an argument
    /// of another shape, or with other keys, observes everything.
    fn children(&mut self, argument: &Value, names: &[&str], optional: &[&str]) {
        let Value::Object(map) = argument else {
            self.everything();
            return;
        };
        if map
            .keys()
            .any(|key| !names.contains(&key.as_str()) && !optional.contains(&key.as_str()))
        {
            self.everything();
            return;
        }
        for name in names {
            match map.get(*name) {
                Some(child) => self.expression(child),
                None => self.everything(),
            }
        }
        for name in optional {
            if let Some(child) = map.get(*name) {
                self.expression(child);
            }
        }
    }

    fn operator(&mut self, operator: &str, argument: &Value) {
        match operator {
            "Var" => match argument.as_str() {
                Some("resource") => self.resource_identity = true,
                Some("context") => self.whole_context = true,
                Some(_) => {}
                None => self.everything(),
            },
            // Literals, including entity literals, observe nothing.
            "Value" => {}
            "Set" => match argument {
                Value::Array(items) => items.iter().for_each(|item| self.expression(item)),
                _ => self.everything(),
            },
            // Keys of a record literal are names, not operators: walk the values only.
            "Record" => match argument {
                Value::Object(fields) => fields.values().for_each(|value| self.expression(value)),
                _ => self.everything(),
            },
            "." | "has" => {
                let attribute = match argument.get("attr") {
                    Some(Value::String(name)) => Some(name.as_str()),
                    Some(Value::Array(path)) => path.first().and_then(Value::as_str),
                    _ => None,
                };
                let left = argument.get("left");
                match (left.and_then(variable), attribute) {
                    (Some("resource"), Some(name)) => {
                        self.resource_attributes.insert(name.to_owned());
                    }
                    (Some("context"), Some(name)) => {
                        self.context_attributes.insert(name.to_owned());
                        // `has` on a context attribute is constant (all are always
                        // present); reading it exposes the value.
                        if operator == "." {
                            self.context_raw.insert(name.to_owned());
                        }
                    }
                    (_, Some(_)) => match left {
                        Some(left) => self.expression(left),
                        None => self.everything(),
                    },
                    (_, None) => self.everything(),
                }
            }
            "==" | "!=" => {
                let left = argument.get("left");
                let right = argument.get("right");
                let compared = match (
                    left.and_then(context_attribute),
                    right.and_then(string_literal),
                ) {
                    (Some(name), Some(literal)) => Some((name, literal)),
                    _ => match (
                        right.and_then(context_attribute),
                        left.and_then(string_literal),
                    ) {
                        (Some(name), Some(literal)) => Some((name, literal)),
                        _ => None,
                    },
                };
                match compared {
                    Some((name, literal)) => self.context_literal(name, literal),
                    None => self.children(argument, &["left", "right"], &[]),
                }
            }
            "contains" => {
                let set = argument.get("left").and_then(|left| left.get("Set"));
                let literals: Option<Vec<&str>> = match set {
                    Some(Value::Array(items)) => items.iter().map(string_literal).collect(),
                    _ => None,
                };
                match (argument.get("right").and_then(context_attribute), literals) {
                    (Some(name), Some(literals)) => {
                        for literal in literals {
                            self.context_literal(name, literal);
                        }
                        // An empty set literal still marks the attribute as observed.
                        self.context_literals.entry(name.to_owned()).or_default();
                        self.context_attributes.insert(name.to_owned());
                    }
                    _ => self.children(argument, &["left", "right"], &[]),
                }
            }
            "in" => {
                let on_resource = argument.get("left").and_then(variable) == Some("resource");
                let of_jurisdiction = argument
                    .get("right")
                    .and_then(|right| right.get("Value"))
                    .is_some_and(is_jurisdiction_entity);
                if !(on_resource && of_jurisdiction) {
                    self.children(argument, &["left", "right"], &[]);
                }
            }
            "is" => {
                let on_resource = argument.get("left").and_then(variable) == Some("resource");
                if on_resource {
                    // `resource is T` is the same for every field; `in` as for "in" above.
                    if let Some(inner) = argument.get("in") {
                        let of_jurisdiction =
                            inner.get("Value").is_some_and(is_jurisdiction_entity);
                        if !of_jurisdiction {
                            self.resource_identity = true;
                            self.expression(inner);
                        }
                    }
                } else {
                    match argument.get("left") {
                        Some(left) => self.expression(left),
                        None => self.everything(),
                    }
                    if let Some(inner) = argument.get("in") {
                        self.expression(inner);
                    }
                }
            }
            "!" | "neg" | "isEmpty" => self.children(argument, &["arg"], &[]),
            "<" | "<=" | ">" | ">=" | "&&" | "||" | "+" | "-" | "*" | "containsAll"
            | "containsAny" | "getTag" | "hasTag" => {
                self.children(argument, &["left", "right"], &[]);
            }
            // The pattern is a literal; only the left side is an expression.
            "like" => match argument.get("left") {
                Some(left) => self.expression(left),
                None => self.everything(),
            },
            "if-then-else" => self.children(argument, &["if", "then", "else"], &[]),
            // An extension function call: `{"ip": [args]}`, `{"decimal": [args]}`, ...
            _ => match argument {
                Value::Array(arguments) => arguments.iter().for_each(|item| self.expression(item)),
                _ => self.everything(),
            },
        }
    }
}

/// `context.NAME` as a bare attribute read.
fn context_attribute(value: &Value) -> Option<&str> {
    let get = value.get(".")?;
    if get.get("left").and_then(variable) != Some("context") {
        return None;
    }
    get.get("attr").and_then(Value::as_str)
}

fn string_literal(value: &Value) -> Option<&str> {
    value.get("Value").and_then(Value::as_str)
}

fn variable(value: &Value) -> Option<&str> {
    value.get("Var").and_then(Value::as_str)
}

fn is_jurisdiction_entity(value: &Value) -> bool {
    let entity = value.get("__entity").unwrap_or(value);
    entity
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|name| name == JURISDICTION_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::Policy;

    fn observe(text: &str) -> Observed {
        let policy: Policy = text.parse().unwrap();
        let mut observed = Observed::default();
        observed.add_policy(&policy.to_json().unwrap());
        observed
    }

    #[test]
    fn attributes_and_jurisdiction_scopes_are_not_identity() {
        let observed = observe(
            r#"permit(principal, action, resource in Jurisdiction::"US")
               when { resource.classification == "pii" && context.purpose == "support"
                      && resource has field && resource in Jurisdiction::"SG"
                      && resource is Field };"#,
        );
        assert!(!observed.resource_identity);
        assert!(!observed.whole_context);
        assert_eq!(
            observed.resource_attributes,
            ["classification", "field"].map(String::from).into()
        );
        assert_eq!(
            observed.context_attributes,
            ["purpose"].map(String::from).into()
        );
        assert!(observed.resource_attribute("field"));
        assert!(!observed.resource_attribute("record_type"));
    }

    #[test]
    fn identity_uses_are_detected() {
        for text in [
            r#"permit(principal, action, resource == Field::"US/user/email");"#,
            r#"permit(principal, action, resource) when { resource == principal.favourite };"#,
            r#"permit(principal, action, resource) when { resource in principal.jurisdiction };"#,
            r#"permit(principal, action, resource) when { [resource].contains(principal) };"#,
            r#"permit(principal, action, resource) when { resource.jurisdiction == context.service.jurisdiction && (if true then resource else resource) == resource };"#,
            r#"permit(principal, action, resource is Field in Field::"x");"#,
        ] {
            assert!(observe(text).resource_identity, "{text}");
        }
    }

    #[test]
    fn literal_comparisons_abstract_context_values() {
        let observed = observe(
            r#"permit(principal, action, resource)
               when { ["support", "fraud"].contains(context.purpose) && context.ticket != ""
                      && context has authentication
                      && (context.service == Service::"x" || "y" == context.purpose) };"#,
        );
        let purpose: BTreeSet<String> = ["fraud", "support", "y"].map(String::from).into();
        assert_eq!(
            observed.context_use("purpose"),
            ContextUse::Literals(&purpose)
        );
        let empty: BTreeSet<String> = [String::new()].into();
        assert_eq!(observed.context_use("ticket"), ContextUse::Literals(&empty));
        assert_eq!(observed.context_use("authentication"), ContextUse::Unused);
        assert_eq!(
            observed.context_use("service"),
            ContextUse::Raw,
            "compared with an entity"
        );
        assert_eq!(observed.context_use("request_time"), ContextUse::Unused);

        let raw = observe(
            r#"permit(principal, action, resource) when { context.ticket like "INC-*" || context.purpose == "a" };"#,
        );
        assert_eq!(raw.context_use("ticket"), ContextUse::Raw);
        let literal: BTreeSet<String> = ["a".to_owned()].into();
        assert_eq!(raw.context_use("purpose"), ContextUse::Literals(&literal));
    }

    #[test]
    fn record_literals_do_not_hide_uses() {
        // Keys of a record literal may be any name, `Value` and `Var` included.
        for text in [
            r#"forbid(principal, action, resource) when { {Value: resource.field} == {Value: "tax_id"} };"#,
            r#"forbid(principal, action, resource) when { {Var: resource.field, Record: 1}.Var == "tax_id" };"#,
        ] {
            let observed = observe(text);
            assert!(observed.resource_attribute("field"), "{text}");
        }
        let hidden_identity = observe(
            r#"forbid(principal, action, resource) when { {Value: resource} == {Value: Field::"US/user_profile/tax_id"} };"#,
        );
        assert!(hidden_identity.resource_identity);
        let hidden_purpose = observe(
            r#"permit(principal, action, resource) when { {Value: context.purpose} == {Value: "x"} };"#,
        );
        assert_eq!(hidden_purpose.context_use("purpose"), ContextUse::Raw);
        let extension = observe(
            r#"permit(principal, action, resource) when { decimal("1.0").lessThan(decimal("2.0")) && ip("10.0.0.1").isLoopback() && context.purpose like "a*" };"#,
        );
        assert_eq!(extension.context_use("purpose"), ContextUse::Raw);
    }

    #[test]
    fn whole_context_uses_are_detected() {
        let observed = observe(r#"permit(principal, action, resource) when { context == {} };"#);
        assert!(observed.whole_context);
        let nested = observe(
            r#"permit(principal, action, resource) when { context.service.jurisdiction == resource.jurisdiction };"#,
        );
        assert!(!nested.whole_context);
        assert!(nested.context_attributes.contains("service"));
        assert!(nested.resource_attribute("jurisdiction"));
    }
}
