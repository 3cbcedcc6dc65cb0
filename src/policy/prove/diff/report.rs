//! How a policy diff is shown: for a terminal (`human`) and as JSON (`json`, the
//! shape `ringfence policy diff --json` prints). May not compute anything.

use serde_json::{Value, json};

use super::{CellChange, Example, PolicyDiff};

impl PolicyDiff {
    /// For a terminal.
    pub fn human(&self) -> String {
        let mut out = format!(
            "policy diff {} -> {}\n",
            short(&self.old_set),
            short(&self.new_set)
        );
        if self.files.is_empty() {
            out.push_str("files: none changed\n");
        } else {
            out.push_str(&format!("files: {}\n", self.files.join(", ")));
        }
        for summary in self.summary() {
            out.push_str(&format!(
                "{:<14} {:<9} {}{}\n",
                summary.action,
                summary.principal,
                summary.movement.as_str(),
                summary
                    .unproven
                    .as_ref()
                    .map(|why| format!(" (symbolic view unanswered: {why})"))
                    .unwrap_or_default()
            ));
        }
        for env in &self.symbolic {
            for (what, example) in [("widening", &env.widening), ("narrowing", &env.narrowing)] {
                if let Ok(Some(example)) = example {
                    out.push_str(&format!(
                        "\n{what} in {}: {}\n",
                        env.environment, example.summary
                    ));
                    match &example.replay {
                        Ok(()) => out.push_str("  confirmed by the authorizer: the case passes on the new set, fails on the old\n"),
                        Err(why) => out.push_str(&format!("  not confirmed by the authorizer: {why}\n")),
                    }
                    for line in example.suite.lines() {
                        out.push_str(&format!("    {line}\n"));
                    }
                }
            }
        }
        out.push_str(&format!(
            "\nconcrete: {} of {} cells changed (directory people and services x jurisdictions x catalog fields x context classes)\n",
            self.cells
                .iter()
                .map(|c| c.fields.len().max(1) * c.contexts.len())
                .sum::<usize>(),
            self.cells_checked
        ));
        const SHOWN: usize = 60;
        for cell in self.cells.iter().take(SHOWN) {
            out.push_str(&format!("  {}\n", describe(cell)));
        }
        if self.cells.len() > SHOWN {
            out.push_str(&format!(
                "  ... and {} more groups (--format json lists all)\n",
                self.cells.len() - SHOWN
            ));
        }
        for why in &self.incomplete {
            out.push_str(&format!("concrete view incomplete: {why}\n"));
        }
        out.push_str(&format!("took {} ms\n", self.took.as_millis()));
        out
    }

    /// One JSON document.
    pub fn json(&self) -> Value {
        let example = |e: &Result<Option<Example>, String>| match e {
            Ok(None) => json!(null),
            Ok(Some(example)) => json!({
                "summary": example.summary,
                "suite": example.suite,
                "confirmed": example.replay.is_ok(),
                "replay_problem": example.replay.as_ref().err(),
            }),
            Err(why) => json!({"unanswered": why}),
        };
        json!({
            "old_set": self.old_set,
            "new_set": self.new_set,
            "files": self.files,
            "summary": self.summary().iter().map(|s| json!({
                "action": s.action,
                "principal": s.principal,
                "movement": s.movement.as_str(),
                "symbolic_unanswered": s.unproven,
            })).collect::<Vec<_>>(),
            "symbolic": self.symbolic.iter().map(|e| json!({
                "environment": e.environment,
                "widening": example(&e.widening),
                "narrowing": example(&e.narrowing),
            })).collect::<Vec<_>>(),
            "cells_checked": self.cells_checked,
            "concrete_incomplete": self.incomplete,
            "cells": self.cells.iter().map(|c| json!({
                "action": c.action,
                "principal": c.principal,
                "service": c.service,
                "jurisdiction": c.jurisdiction,
                "resource": c.resource,
                "fields": c.fields,
                "contexts": c.contexts.iter().map(|(purpose, ticket, authentication)| json!({
                    "purpose": purpose,
                    "ticket": ticket,
                    "authentication": authentication,
                })).collect::<Vec<_>>(),
                "old": c.old,
                "new": c.new,
            })).collect::<Vec<_>>(),
            "took_ms": self.took.as_millis() as u64,
        })
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn describe(cell: &CellChange) -> String {
    let fields = if cell.fields.is_empty() {
        String::new()
    } else {
        format!(" [{}]", cell.fields.join(", "))
    };
    let contexts = match cell.contexts.as_slice() {
        [(purpose, ticket, authentication)] => {
            format!("purpose {purpose:?}, ticket {ticket:?}, {authentication}")
        }
        [(purpose, ticket, authentication), ..] => format!(
            "{} contexts, e.g. purpose {purpose:?}, ticket {ticket:?}, {authentication}",
            cell.contexts.len()
        ),
        [] => String::new(),
    };
    format!(
        "{} {} via {} on {}/{}{} ({contexts}): {} -> {}",
        cell.action,
        cell.principal,
        cell.service,
        cell.jurisdiction,
        cell.resource,
        fields,
        cell.old,
        cell.new
    )
}
