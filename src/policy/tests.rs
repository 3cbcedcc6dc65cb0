use std::path::Path;

use super::diagnostics::policy_locations;
use super::*;
use crate::record::StatedPurpose;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A writable copy of the shipped policy directory.
fn copy_of_shipped() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn j(code: &str) -> Jurisdiction {
    Jurisdiction::new(code).unwrap()
}

fn fields(names: &[&str]) -> Vec<FieldName> {
    names.iter().map(|n| FieldName::new(n).unwrap()).collect()
}

fn user_profile() -> RecordType {
    RecordType::new("user_profile").unwrap()
}

struct Ask {
    principal: Principal,
    service: &'static str,
    stated: StatedPurpose,
}

impl Ask {
    fn employee(id: &str, purpose: &str, ticket: &str) -> Self {
        Self {
            principal: Principal::Employee(id.to_owned()),
            service: "us-support-tool",
            stated: StatedPurpose::new(purpose, ticket).unwrap(),
        }
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            principal: &self.principal,
            service: self.service,
            authentication: "test",
            stated: &self.stated,
            request_time: 1_790_000_000,
        }
    }
}

fn decide<'s>(
    snapshot: &'s PolicySnapshot,
    ask: &Ask,
    action: Action,
    jurisdiction: &str,
    names: &[&str],
) -> Vec<Verdict<'s>> {
    snapshot
        .decide(
            action,
            &ask.facts(),
            &j(jurisdiction),
            &user_profile(),
            &fields(names),
        )
        .unwrap()
}

#[test]
fn shipped_policies_load_with_ids_from_annotations() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    assert!(
        snapshot
            .policy_files()
            .contains_key("parent-company-never-reads-us")
    );
    assert_eq!(snapshot.len(), snapshot.policy_files().len());
    assert_eq!(snapshot.hash().len(), 64);
    let codes: Vec<_> = snapshot
        .jurisdictions()
        .iter()
        .map(Jurisdiction::as_str)
        .collect();
    assert_eq!(codes, ["EU", "SG", "US"]);
    // The example set does not single out fields, so fields collapse into classes.
    assert!(!snapshot.observed().resource_identity);
    // The hash is stable across loads and changes with any file.
    assert_eq!(
        PolicySnapshot::load(&shipped()).unwrap().hash(),
        snapshot.hash()
    );
    let copy = copy_of_shipped();
    std::fs::write(copy.path().join("extra.cedar"), "// just a comment\n").unwrap();
    assert_ne!(
        PolicySnapshot::load(copy.path()).unwrap().hash(),
        snapshot.hash()
    );
}

#[test]
fn gatekeeper_engineer_reads_us_with_purpose_and_ticket_only() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    let ok = Ask::employee("alice", "support", "INC-1");
    let decisions = decide(
        &snapshot,
        &ok,
        Action::Decrypt,
        "US",
        &["email", "display_name", "government_id"],
    );
    assert!(decisions[0].allowed);
    assert_eq!(decisions[0].policies, ["us-gatekeeper-engineers-read-us"]);
    assert!(decisions[1].allowed, "public field");
    assert!(!decisions[2].allowed, "restricted field");
    assert!(
        decisions[2].policies.is_empty(),
        "default deny names no policy"
    );

    for (purpose, ticket) in [("", "INC-1"), ("support", ""), ("curiosity", "INC-1")] {
        let ask = Ask::employee("alice", purpose, ticket);
        let decisions = decide(&snapshot, &ask, Action::Decrypt, "US", &["email"]);
        assert!(
            !decisions[0].allowed,
            "purpose {purpose:?} ticket {ticket:?}"
        );
    }
}

#[test]
fn parent_company_staff_are_denied_every_us_field() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    let all: Vec<String> = snapshot
        .catalog()
        .fields(&user_profile())
        .unwrap()
        .map(|f| f.as_str().to_owned())
        .collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    for who in ["bob", "carol", "mei", "emil"] {
        for purpose in ["support", "legal-request", ""] {
            let ask = Ask::employee(who, purpose, "INC-9");
            for decision in decide(&snapshot, &ask, Action::Decrypt, "US", &all) {
                assert!(!decision.allowed, "{who} {purpose}");
            }
        }
    }
    // carol is also on the US gatekeeper team: the forbid still wins, and says so.
    let carol = Ask::employee("carol", "support", "INC-9");
    let decisions = decide(&snapshot, &carol, Action::Decrypt, "US", &["email"]);
    assert_eq!(decisions[0].policies, ["parent-company-never-reads-us"]);
    assert_eq!(decisions[0].visible_policies, decisions[0].policies);
    // Outside the US the same staff read public fields.
    let decisions = decide(&snapshot, &carol, Action::Decrypt, "SG", &["display_name"]);
    assert!(decisions[0].allowed);
}

#[test]
fn services_encrypt_only_for_their_own_jurisdiction() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    let signup = Ask {
        principal: Principal::Service("us-signup".to_owned()),
        service: "us-signup",
        stated: StatedPurpose::default(),
    };
    assert!(decide(&snapshot, &signup, Action::Encrypt, "US", &["email"])[0].allowed);
    assert!(!decide(&snapshot, &signup, Action::Encrypt, "SG", &["email"])[0].allowed);
    // A service cannot read what it writes unless a policy says so.
    assert!(!decide(&snapshot, &signup, Action::Decrypt, "US", &["email"])[0].allowed);
}

#[test]
fn unknown_principal_service_jurisdiction_and_fields_are_errors() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    let ghost = Ask::employee("mallory", "support", "INC-1");
    let error = snapshot
        .decide(
            Action::Decrypt,
            &ghost.facts(),
            &j("US"),
            &user_profile(),
            &fields(&["email"]),
        )
        .unwrap_err();
    assert!(matches!(error, Error::UnknownPrincipal(_)), "{error}");
    assert_eq!(
        error.to_string(),
        "unknown principal `Employee::\"mallory\"`: not in the directory"
    );
    let mut bad_service = Ask::employee("alice", "support", "INC-1");
    bad_service.service = "nope";
    assert!(matches!(
        snapshot.decide(
            Action::Decrypt,
            &bad_service.facts(),
            &j("US"),
            &user_profile(),
            &[]
        ),
        Err(Error::UnknownService(_))
    ));
    let alice = Ask::employee("alice", "support", "INC-1");
    assert!(matches!(
        snapshot.decide(
            Action::Decrypt,
            &alice.facts(),
            &j("BR"),
            &user_profile(),
            &[]
        ),
        Err(Error::UnknownJurisdiction(_))
    ));
    assert!(matches!(
        snapshot.decide(
            Action::Decrypt,
            &alice.facts(),
            &j("US"),
            &RecordType::new("order").unwrap(),
            &[]
        ),
        Err(Error::UnknownRecordType(_))
    ));
    assert!(matches!(
        snapshot.decide(
            Action::Decrypt,
            &alice.facts(),
            &j("US"),
            &user_profile(),
            &fields(&["shoe_size"])
        ),
        Err(Error::UnknownField { .. })
    ));
}

/// Equivalence classes and the cache must never change a decision.
fn assert_classes_match_each(snapshot: &PolicySnapshot) {
    let record_type = user_profile();
    let all: Vec<FieldName> = snapshot
        .catalog()
        .fields(&record_type)
        .unwrap()
        .cloned()
        .collect();
    let mut compared = 0;
    for who in ["alice", "lena", "bob", "carol", "mei", "emil"] {
        for (purpose, ticket) in [
            ("support", "INC-1"),
            // Another ticket and purpose in the same literal classes: served from the
            // cache, and must still agree.
            ("support", "INC-2"),
            ("legal-request", "L-7"),
            ("curiosity", "X-1"),
            ("fraud", "X-1"),
            ("", ""),
            ("support", ""),
        ] {
            for jurisdiction in ["US", "SG", "EU"] {
                for action in Action::ALL
                    .into_iter()
                    .filter(|action| !action.resource_kind().is_jurisdictional())
                {
                    let ask = Ask::employee(who, purpose, ticket);
                    // Twice: the second round is served from the cache.
                    for _ in 0..2 {
                        let fast = snapshot
                            .decide(action, &ask.facts(), &j(jurisdiction), &record_type, &all)
                            .unwrap();
                        let each = snapshot
                            .decide_each(action, &ask.facts(), &j(jurisdiction), &record_type, &all)
                            .unwrap();
                        for ((field, fast), each) in all.iter().zip(&fast).zip(&each) {
                            assert_eq!(
                                **fast, *each,
                                "{who} {purpose} {jurisdiction} {action:?} {field}"
                            );
                            compared += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(compared > 1000);
}

#[test]
fn decision_classes_agree_with_per_field_evaluation() {
    assert_classes_match_each(&PolicySnapshot::load(&shipped()).unwrap());
}

#[test]
fn field_specific_policies_make_fields_distinct() {
    let copy = copy_of_shipped();
    std::fs::write(
        copy.path().join("field.cedar"),
        r#"@id("alice-reads-one-restricted-field")
permit (principal == Employee::"alice", action == Action::"decrypt", resource == Field::"US/user_profile/tax_id");
@id("nobody-reads-watch-history")
forbid (principal, action, resource is Field) when { resource.field == "watch_history" };
@id("no-tax-id-through-a-record-literal")
forbid (principal, action == Action::"decrypt", resource in Jurisdiction::"US")
when { {Value: resource.field} == {Value: "legal_hold_notes"} };
"#,
    )
    .unwrap();
    let snapshot = PolicySnapshot::load(copy.path()).unwrap();
    assert!(snapshot.observed().resource_identity);
    assert_classes_match_each(&snapshot);
    let alice = Ask::employee("alice", "support", "INC-1");
    let decisions = decide(
        &snapshot,
        &alice,
        Action::Decrypt,
        "US",
        &["tax_id", "government_id", "watch_history", "device_ids"],
    );
    let allowed: Vec<bool> = decisions.iter().map(|d| d.allowed).collect();
    assert_eq!(allowed, [true, false, false, true]);
}

#[test]
fn an_erring_forbid_denies_instead_of_being_skipped() {
    let copy = copy_of_shipped();
    // Overflows for any real request time: Cedar skips the forbid with an error.
    std::fs::write(
        copy.path().join("overflow.cedar"),
        r#"@id("erring-forbid")
@caller_visible("false")
forbid (principal, action == Action::"decrypt", resource)
when { context.request_time * 9223372036854775807 > 0 };
"#,
    )
    .unwrap();
    let snapshot = PolicySnapshot::load(copy.path()).unwrap();
    let alice = Ask::employee("alice", "support", "INC-1");
    let decision = &decide(&snapshot, &alice, Action::Decrypt, "US", &["email"])[0];
    assert!(!decision.allowed, "an erring forbid let a permit through");
    assert!(
        decision.errors.iter().any(|e| e.contains("erring-forbid")),
        "{:?}",
        decision.errors
    );
    assert!(decision.policies.is_empty());
    // Encrypt is not in the forbid's scope: unaffected.
    let signup = Ask {
        principal: Principal::Service("us-signup".to_owned()),
        service: "us-signup",
        stated: StatedPurpose::default(),
    };
    assert!(decide(&snapshot, &signup, Action::Encrypt, "US", &["email"])[0].allowed);
}

#[test]
fn hidden_policy_ids_are_not_shown_to_callers() {
    let copy = copy_of_shipped();
    let path = copy.path().join("us-data.cedar");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "@id(\"parent-company-never-reads-us\")",
        "@id(\"parent-company-never-reads-us\")\n@caller_visible(\"false\")",
    );
    std::fs::write(&path, text).unwrap();
    let snapshot = PolicySnapshot::load(copy.path()).unwrap();
    let bob = Ask::employee("bob", "support", "INC-1");
    let decision = &decide(&snapshot, &bob, Action::Decrypt, "US", &["email"])[0];
    assert_eq!(decision.policies, ["parent-company-never-reads-us"]);
    assert!(decision.visible_policies.is_empty());

    // A value other than "true" or "false" is a mistake, not "visible".
    let typo = std::fs::read_to_string(&path)
        .unwrap()
        .replace("@caller_visible(\"false\")", "@caller_visible(\"no\")");
    std::fs::write(&path, typo).unwrap();
    let error = PolicySnapshot::load(copy.path()).unwrap_err().to_string();
    assert!(
        error.contains("us-data.cedar") && error.contains("must be \"true\" or \"false\""),
        "{error}"
    );
}

fn load_error(edit: impl FnOnce(&Path)) -> String {
    let copy = copy_of_shipped();
    edit(copy.path());
    PolicySnapshot::load(copy.path()).unwrap_err().to_string()
}

#[test]
fn missing_and_duplicate_ids_name_file_and_line() {
    let message = load_error(|dir| {
        std::fs::write(
            dir.join("zz.cedar"),
            "// header\n\n@id(\"public-fields-readable-by-employees\")\npermit (principal, action, resource);\n\npermit (principal, action, resource);\n",
        )
        .unwrap();
    });
    assert!(
        message.contains(
            "zz.cedar:3:1: duplicate policy id `public-fields-readable-by-employees`, already used in"
        ),
        "{message}"
    );
    assert!(message.contains("company-wide.cedar"), "{message}");
    assert!(
        message.contains("zz.cedar:6:1: policy has no `@id"),
        "{message}"
    );
}

#[test]
fn syntax_and_validation_errors_name_file_and_line() {
    let message = load_error(|dir| {
        std::fs::write(dir.join("broken.cedar"), "@id(\"x\")\npermit (principal, action, resource)\nwhen { resource.classification == };\n").unwrap();
    });
    assert!(message.contains("broken.cedar:3:"), "{message}");

    let message = load_error(|dir| {
        std::fs::write(
            dir.join("typo.cedar"),
            "@id(\"typo\")\npermit (principal, action == Action::\"decrypt\", resource)\nwhen { resource.clasification == \"public\" };\n",
        )
        .unwrap();
    });
    assert!(message.contains("typo.cedar"), "{message}");
    assert!(message.contains("clasification"), "{message}");
    assert!(message.contains(":3:"), "{message}");
}

#[test]
fn directory_catalog_and_schema_errors_are_reported() {
    let message = load_error(|dir| {
        let text = std::fs::read_to_string(dir.join(DIRECTORY_FILE)).unwrap();
        std::fs::write(
            dir.join(DIRECTORY_FILE),
            text.replace("\"location\": \"US\"", "\"location\": 7"),
        )
        .unwrap();
    });
    assert!(message.contains("directory.json"), "{message}");

    let message = load_error(|dir| {
        std::fs::write(dir.join(DIRECTORY_FILE), "[\n  {\"uid\": }\n]").unwrap();
    });
    assert!(message.contains("directory.json:2:"), "{message}");

    let message = load_error(|dir| {
        std::fs::write(
            dir.join(CATALOG_FILE),
            "classifications = [\"public\"]\n[record_types.user]\nemail = \"secret\"\n",
        )
        .unwrap();
    });
    assert!(
        message.contains("fields.toml: field `user.email`"),
        "{message}"
    );

    let message = load_error(|dir| {
        let text = std::fs::read_to_string(dir.join(SCHEMA_FILE)).unwrap();
        std::fs::write(
            dir.join(SCHEMA_FILE),
            text.replace("request_time: Long,", ""),
        )
        .unwrap();
    });
    assert!(message.contains("request_time"), "{message}");
}

#[test]
fn reload_keeps_the_old_set_when_the_new_one_is_invalid() {
    let copy = copy_of_shipped();
    let store = PolicyStore::load(copy.path()).unwrap();
    let before = store.current().hash().to_owned();
    std::fs::write(copy.path().join("bad.cedar"), "permit (").unwrap();
    assert!(store.reload(Trigger::Hangup).is_err());
    assert_eq!(store.current().hash(), before);
    std::fs::remove_file(copy.path().join("bad.cedar")).unwrap();
    std::fs::write(
        copy.path().join("ok.cedar"),
        "@id(\"ok\")\nforbid (principal, action, resource) when { false };\n",
    )
    .unwrap();
    let after = store.reload(Trigger::Hangup).unwrap();
    assert_ne!(after.hash(), before);
    assert_eq!(store.current().hash(), after.hash());
}

#[test]
fn policy_locations_come_from_cedar_spans_past_comments_and_strings() {
    let text = "// permit ( in a comment\n@id(\"permit\")\npermit (principal, action, resource)\nwhen { context.purpose == \"forbid\" };\n\n  @id(\"b\")\nforbid (principal, action, resource);\n";
    assert_eq!(policy_locations(text), vec![Some((2, 1)), Some((6, 3))]);
    assert!(policy_locations("permit (").is_empty());
}

#[test]
fn principals_are_written_and_read_in_cedar_entity_uid_syntax() {
    // As logs have always written them.
    for (text, principal) in [
        (
            r#"Employee::"alice""#,
            Principal::Employee("alice".to_owned()),
        ),
        (
            r#"Service::"us-signup""#,
            Principal::Service("us-signup".to_owned()),
        ),
        (
            r#"Employee::"first.last@example.org""#,
            Principal::Employee("first.last@example.org".to_owned()),
        ),
    ] {
        assert_eq!(principal.to_string(), text);
        assert_eq!(text.parse::<Principal>().unwrap(), principal);
        // Cedar reads it as the same entity.
        let uid = cedar_policy::EntityUid::from_str(text).unwrap();
        assert_eq!(uid.id().unescaped(), principal.id());
    }
    // Ids Cedar must escape still round-trip.
    let odd = Principal::Employee("a\"b\\c\nd".to_owned());
    assert_eq!(odd.to_string().parse::<Principal>().unwrap(), odd);
    assert_eq!(
        cedar_policy::EntityUid::from_str(&odd.to_string())
            .unwrap()
            .to_string(),
        odd.to_string()
    );
    for bad in [
        "alice",
        r#"Team::"x""#,
        r#"Employee::alice"#,
        r#"Employee::"a" extra"#,
    ] {
        assert!(bad.parse::<Principal>().is_err(), "{bad}");
    }
}

#[test]
fn a_permit_of_every_action_that_could_reach_a_key_ring_is_refused_with_the_fix() {
    for (text, refused) in [
        // Written before key actions existed: it would now grant `destroy_key`.
        (
            r#"permit (principal == Employee::"alice", action, resource in Jurisdiction::"US");"#,
            true,
        ),
        (r#"permit (principal, action, resource);"#, true),
        (r#"permit (principal, action, resource is KeyRing);"#, true),
        (
            r#"permit (principal, action, resource is Field) when { resource.classification == "public" };"#,
            false,
        ),
        (
            r#"permit (principal, action, resource == Field::"US/user_profile/email");"#,
            false,
        ),
        (
            r#"permit (principal, action in [Action::"decrypt"], resource in Jurisdiction::"US");"#,
            false,
        ),
        // Forbids may stay broad.
        (
            r#"forbid (principal, action, resource in Jurisdiction::"US") when { context.ticket == "" };"#,
            false,
        ),
    ] {
        let copy = copy_of_shipped();
        std::fs::write(
            copy.path().join("extra.cedar"),
            format!("@id(\"extra\")\n{text}\n"),
        )
        .unwrap();
        let loaded = PolicySnapshot::load(copy.path());
        match (refused, loaded) {
            (true, Err(error)) => {
                let text = error.to_string();
                assert!(text.contains("extra.cedar:1:1"), "{text}");
                assert!(text.contains("would grant key administration"), "{text}");
                assert!(text.contains("resource is Field"), "{text}");
            }
            (false, Ok(_)) => {}
            (refused, outcome) => panic!("{text}: refused {refused}, got {:?}", outcome.err()),
        }
    }
}

#[test]
fn a_policy_set_written_before_key_administration_still_loads_and_decides_records() {
    let copy = copy_of_shipped();
    let schema_path = copy.path().join("schema.cedarschema");
    let schema = std::fs::read_to_string(&schema_path).unwrap();
    // Without the KeyRing and DataSubjects entities and every action after decrypt
    // (key administration, rewrap, shred), as the schema was before them.
    let start = schema.find("// One jurisdiction's root keys").unwrap();
    let subjects = schema
        .find("// The data subjects of one jurisdiction")
        .unwrap();
    let end = subjects + schema[subjects..].find("};").unwrap() + 2;
    let actions = schema.find("// Key administration").unwrap();
    std::fs::write(
        &schema_path,
        format!("{}{}", &schema[..start], &schema[end..actions]),
    )
    .unwrap();
    std::fs::remove_file(copy.path().join("key-admin.cedar")).unwrap();
    std::fs::remove_file(copy.path().join("migration.cedar")).unwrap();
    // Unscoped permits grant nothing they did not grant before: accepted.
    std::fs::write(
        copy.path().join("extra.cedar"),
        "@id(\"extra\")\npermit (principal == Employee::\"alice\", action, resource in Jurisdiction::\"US\") when { context.ticket == \"OLD-1\" };\n",
    )
    .unwrap();
    let snapshot = PolicySnapshot::load(copy.path()).unwrap();
    let alice = Ask::employee("alice", "support", "INC-1");
    assert!(decide(&snapshot, &alice, Action::Decrypt, "US", &["email"])[0].allowed);
    let kim = Principal::Employee("kim".to_owned());
    let stated = StatedPurpose::new("", "KEY-1").unwrap();
    let facts = RequestFacts {
        principal: &kim,
        service: "us-key-console",
        authentication: crate::identity::METHOD_MTLS_TOKEN,
        stated: &stated,
        request_time: 0,
    };
    assert!(matches!(
        snapshot.decide_key(Action::RotateKey, &facts, &Jurisdiction::new("US").unwrap()),
        Err(Error::Undeclared(Action::RotateKey))
    ));
    assert!(matches!(
        snapshot.decide_key(Action::Shred, &facts, &Jurisdiction::new("US").unwrap()),
        Err(Error::Undeclared(Action::Shred))
    ));
    let rewrap = snapshot.decide(
        Action::Rewrap,
        &alice.facts(),
        &Jurisdiction::new("US").unwrap(),
        &RecordType::new("user_profile").unwrap(),
        &[FieldName::new("email").unwrap()],
    );
    assert!(matches!(rewrap, Err(Error::Undeclared(Action::Rewrap))));
}
