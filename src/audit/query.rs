//! Querying a decision log: "who read user X's email last month" as one command.
//! Reads entries as they are; `verify` is what proves they were not altered.

use std::io::BufRead as _;
use std::path::Path;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{segment_numbers, segment_path};

/// Which entries to return; every given criterion must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Principal: a directory id (`alice`) or a Cedar uid (`Employee::"alice"`).
    pub principal: Option<String>,
    /// Calling service id.
    pub service: Option<String>,
    /// Entry kind: `decrypt`, `encrypt`, `authorize`, ...
    pub kind: Option<String>,
    /// Record jurisdiction.
    pub jurisdiction: Option<String>,
    /// Record type.
    pub record_type: Option<String>,
    /// Record id.
    pub record_id: Option<String>,
    /// Data subject: entries about the subject's records (a record without a named
    /// subject is its own subject, by record id) and shreds of the subject.
    pub subject: Option<String>,
    /// A field the entry decided.
    pub field: Option<String>,
    /// `allow` or `deny`; with `field`, the decision for that field.
    pub decision: Option<String>,
    /// Entries at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Entries before this time.
    pub until: Option<OffsetDateTime>,
}

/// Parses `--since` / `--until`: RFC 3339, or a date `YYYY-MM-DD` meaning its midnight UTC.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(time);
    }
    OffsetDateTime::parse(&format!("{text}T00:00:00Z"), &Rfc3339)
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a YYYY-MM-DD date"))
}

fn text<'a>(entry: &'a Value, pointer: &str) -> Option<&'a str> {
    entry.pointer(pointer).and_then(Value::as_str)
}

fn principal_matches(entry: &Value, wanted: &str) -> bool {
    text(entry, "/principal").is_some_and(|principal| {
        principal == wanted
            || principal
                .split_once("::")
                .is_some_and(|(_, id)| id.trim_matches('"') == wanted)
    })
}

fn subject_matches(entry: &Value, wanted: &str) -> bool {
    if let Some(record) = entry.get("record") {
        return match text(record, "/subject") {
            Some(subject) => subject == wanted,
            // Entries before subjects, and format-1 records not named one: a record's
            // default subject is its id.
            None => text(record, "/record_id") == Some(wanted),
        };
    }
    text(entry, "/key_admin/subject") == Some(wanted)
}

impl Filter {
    /// Whether one parsed entry matches.
    pub fn matches(&self, entry: &Value) -> bool {
        let equal = |pointer: &str, wanted: &Option<String>| {
            wanted
                .as_deref()
                .is_none_or(|wanted| text(entry, pointer) == Some(wanted))
        };
        // A key event concerns a jurisdiction without a record; a key administration
        // request, the jurisdictions of its key rings.
        let jurisdiction_matches = match (&self.jurisdiction, entry.get("key_admin")) {
            (Some(wanted), Some(admin)) => admin
                .get("key_rings")
                .and_then(Value::as_array)
                .is_some_and(|rings| {
                    rings.iter().any(|ring| {
                        ring.get("jurisdiction").and_then(Value::as_str) == Some(wanted)
                    })
                }),
            _ if entry.get("key_event").is_some() => {
                equal("/key_event/jurisdiction", &self.jurisdiction)
            }
            _ => equal("/record/jurisdiction", &self.jurisdiction),
        };
        if !(equal("/service", &self.service)
            && equal("/kind", &self.kind)
            && jurisdiction_matches
            && equal("/record/record_type", &self.record_type)
            && equal("/record/record_id", &self.record_id))
        {
            return false;
        }
        if let Some(principal) = &self.principal
            && !principal_matches(entry, principal)
        {
            return false;
        }
        if let Some(subject) = &self.subject
            && !subject_matches(entry, subject)
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(time) =
                text(entry, "/time").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|since| time < since)
                || self.until.is_some_and(|until| time >= until)
            {
                return false;
            }
        }
        if self.field.is_some() || self.decision.is_some() {
            let fields = entry.get("fields").and_then(Value::as_array);
            let hit = fields.is_some_and(|fields| {
                fields.iter().any(|field| {
                    self.field
                        .as_deref()
                        .is_none_or(|wanted| text(field, "/field") == Some(wanted))
                        && self
                            .decision
                            .as_deref()
                            .is_none_or(|wanted| text(field, "/decision") == Some(wanted))
                })
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// What a query saw besides its matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryStats {
    /// Entries read.
    pub entries: u64,
    /// Entries that matched.
    pub matched: u64,
    /// Lines that are not JSON (a torn tail, or damage `verify` would report).
    pub unreadable: u64,
    /// Lines of a sealed segment after its last acknowledged entry: written by a batch
    /// whose fsync failed, never answered, so never shown.
    pub unacknowledged: u64,
}

/// Calls `emit` with every matching entry's line, in log order.
pub fn query(
    dir: &Path,
    filter: &Filter,
    mut emit: impl FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<QueryStats> {
    for_each_entry(dir, filter, |line, _| emit(line))
}

/// Calls `visit` with the line and the parsed entry of every entry that matches
/// `filter`, in log order.
pub fn for_each_entry(
    dir: &Path,
    filter: &Filter,
    mut visit: impl FnMut(&str, &Value) -> std::io::Result<()>,
) -> std::io::Result<QueryStats> {
    let mut stats = QueryStats::default();
    for number in segment_numbers(dir)? {
        let sealed_after = super::read_failed_marker(dir, number)
            .map_err(std::io::Error::other)?
            .map(|marker| marker.last_durable_seq);
        let file = match std::fs::File::open(segment_path(dir, number)) {
            Ok(file) => file,
            // A sealed segment whose every line failed need not exist.
            Err(error)
                if sealed_after.is_some() && error.kind() == std::io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(error) => return Err(error),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut buffer = String::new();
        loop {
            buffer.clear();
            if reader.read_line(&mut buffer)? == 0 {
                break;
            }
            // A last line without its newline is a torn write: `verify` does not count
            // it, so neither does `query` (nor `replay`), however complete it looks.
            let Some(line) = buffer.strip_suffix('\n') else {
                stats.unreadable += 1;
                break;
            };
            let line = line.to_owned();
            match serde_json::from_str::<Value>(&line) {
                Ok(entry)
                    if sealed_after.is_some_and(|last| {
                        entry
                            .get("seq")
                            .and_then(Value::as_u64)
                            .is_none_or(|seq| seq > last)
                    }) =>
                {
                    stats.unacknowledged += 1;
                }
                Ok(mut entry) => {
                    // Entries before format 2 carry no `format`; a newer one is not
                    // guessed at (as `verify` refuses it).
                    let problem =
                        match <super::entry::Layout as serde::Deserialize>::deserialize(&entry) {
                            Ok(layout) => layout.problem(),
                            Err(error) => Some(format!("unreadable `format`: {error}")),
                        };
                    if let Some(problem) = problem {
                        return Err(std::io::Error::other(format!(
                            "entry seq {}: {problem}",
                            entry.get("seq").unwrap_or(&Value::Null)
                        )));
                    }
                    super::expand_fields(&mut entry);
                    stats.entries += 1;
                    if filter.matches(&entry) {
                        stats.matched += 1;
                        visit(&line, &entry)?;
                    }
                }
                Err(_) => stats.unreadable += 1,
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_never_acknowledged_and_look_alike_segment_names_are_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let line = |seq: u64| format!("{{\"seq\":{seq},\"kind\":\"decrypt\"}}\n");
        std::fs::write(segment_path(dir.path(), 1), line(1) + &line(2) + &line(3)).unwrap();
        // Sealed after seq 1: seq 2 and 3 were written by a batch whose fsync failed.
        let marker = super::super::FailedMarker {
            segment: 1,
            last_durable_seq: 1,
            head: String::new(),
            reason: "test".to_owned(),
        };
        super::super::write_failed_marker(dir.path(), &marker).unwrap();
        // A complete-looking line without its newline is a torn write, not an entry.
        let mut bytes = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        bytes.extend_from_slice(line(4).trim_end().as_bytes());
        std::fs::write(segment_path(dir.path(), 1), bytes).unwrap();
        // Not segment 1 a second time.
        std::fs::write(dir.path().join("decisions-1.jsonl"), line(1)).unwrap();
        std::fs::write(dir.path().join("decisions-+000001.jsonl"), line(1)).unwrap();
        let mut seen = Vec::new();
        let stats = for_each_entry(dir.path(), &Filter::default(), |_, entry| {
            seen.push(entry["seq"].as_u64().unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![1]);
        assert_eq!(stats.unacknowledged, 2);
        assert_eq!(stats.unreadable, 1);
    }

    #[test]
    fn key_events_match_by_jurisdiction_and_unknown_formats_are_refused() {
        let event = json!({"seq": 1, "format": 2, "kind": "key_event",
            "key_event": {"operation": "rotate", "jurisdiction": "US", "version": 2}});
        let us = Filter {
            jurisdiction: Some("US".to_owned()),
            ..Filter::default()
        };
        assert!(us.matches(&event));
        let sg = Filter {
            jurisdiction: Some("SG".to_owned()),
            ..Filter::default()
        };
        assert!(!sg.matches(&event));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            segment_path(dir.path(), 1),
            "{\"seq\":1,\"format\":4,\"kind\":\"decrypt\"}\n",
        )
        .unwrap();
        let error = for_each_entry(dir.path(), &Filter::default(), |_, _| Ok(())).unwrap_err();
        assert!(
            error.to_string().contains("entry format 4 is unknown"),
            "{error}"
        );
    }

    #[test]
    fn entries_about_a_subject_are_found_by_subject_or_by_default_record_id() {
        let named = json!({"kind": "decrypt",
            "record": {"record_type": "user_profile", "record_id": "r-1", "jurisdiction": "US", "subject": "s-9"}});
        let unnamed = json!({"kind": "decrypt",
            "record": {"record_type": "user_profile", "record_id": "s-9", "jurisdiction": "US"}});
        let other = json!({"kind": "decrypt",
            "record": {"record_type": "user_profile", "record_id": "s-9", "jurisdiction": "US", "subject": "s-1"}});
        let shred = json!({"kind": "key_admin", "key_admin": {"operation": "shred", "key_rings": [], "subject": "s-9"}});
        let filter = Filter {
            subject: Some("s-9".to_owned()),
            ..Filter::default()
        };
        assert!(filter.matches(&named));
        assert!(filter.matches(&unnamed));
        assert!(!filter.matches(&other));
        assert!(filter.matches(&shred));
        assert!(!filter.matches(&json!({"kind": "checkpoint"})));
    }

    fn entry() -> Value {
        json!({
            "seq": 3, "time": "2026-11-20T10:00:00.5Z", "kind": "decrypt",
            "service": "us-support-tool", "principal": "Employee::\"alice\"",
            "record": {"record_type": "user_profile", "record_id": "u-42", "jurisdiction": "US"},
            "fields": [
                {"field": "email", "decision": "allow"},
                {"field": "tax_id", "decision": "deny"}
            ]
        })
    }

    #[test]
    fn filters_combine() {
        let entry = entry();
        let all = Filter::default();
        assert!(all.matches(&entry));
        let who_read_email = Filter {
            record_id: Some("u-42".to_owned()),
            field: Some("email".to_owned()),
            decision: Some("allow".to_owned()),
            since: Some(parse_time("2026-11-01").unwrap()),
            until: Some(parse_time("2026-12-01").unwrap()),
            ..Filter::default()
        };
        assert!(who_read_email.matches(&entry));
        for filter in [
            Filter {
                field: Some("tax_id".to_owned()),
                decision: Some("allow".to_owned()),
                ..Filter::default()
            },
            Filter {
                principal: Some("bob".to_owned()),
                ..Filter::default()
            },
            Filter {
                jurisdiction: Some("SG".to_owned()),
                ..Filter::default()
            },
            Filter {
                until: Some(parse_time("2026-11-20T10:00:00Z").unwrap()),
                ..Filter::default()
            },
            Filter {
                since: Some(parse_time("2026-11-21").unwrap()),
                ..Filter::default()
            },
        ] {
            assert!(!filter.matches(&entry), "{filter:?}");
        }
        assert!(
            Filter {
                principal: Some("alice".to_owned()),
                ..Filter::default()
            }
            .matches(&entry)
        );
        assert!(
            Filter {
                principal: Some("Employee::\"alice\"".to_owned()),
                ..Filter::default()
            }
            .matches(&entry)
        );
        assert!(parse_time("last month").is_err());
    }
}
