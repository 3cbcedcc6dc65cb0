//! Diagnostics of a policy directory that does not load: every problem, rendered with
//! its file, line and column. May not load or decide.

use std::fmt;
use std::path::Path;

/// Why a policy directory failed to load: one rendered diagnostic per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// Rendered diagnostics, each naming file and, where known, line and column.
    pub diagnostics: Vec<String>,
}

/// How the first diagnostic of a set refused by the proof guard begins.
pub const PROOF_REFUSAL: &str = "refused by the proof guard";

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A set the proof guard refused is valid; its first line says what is wrong.
        if let Some((first, rest)) = self.diagnostics.split_first()
            && first.starts_with(PROOF_REFUSAL)
        {
            write!(f, "policy set {first}")?;
            for diagnostic in rest {
                write!(f, "\n{}", diagnostic.trim_end())?;
            }
            return Ok(());
        }
        write!(
            f,
            "policy set is invalid ({} problem",
            self.diagnostics.len()
        )?;
        if self.diagnostics.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for diagnostic in &self.diagnostics {
            write!(f, "\n{}", diagnostic.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

pub(super) fn render(diagnostic: &dyn miette::Diagnostic) -> String {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100);
    let mut out = String::new();
    if handler.render_report(&mut out, diagnostic).is_err() {
        out = diagnostic.to_string();
    }
    out
}

pub(super) fn render_in_file<E>(error: E, file: &Path, text: &str) -> String
where
    E: miette::Diagnostic + Send + Sync + 'static,
{
    let name = file.display().to_string();
    let report = miette::Report::new(error)
        .with_source_code(miette::NamedSource::new(name.clone(), text.to_owned()));
    name_snippets(&render(report.as_ref()), &name)
}

/// Cedar attaches its own unnamed source to many diagnostics, so snippet headers read
/// `[3:35]`; this makes them `[policies/x.cedar:3:35]`.
pub(super) fn name_snippets(rendered: &str, name: &str) -> String {
    const HEADER: &str = "╭─[";
    let named = format!("{HEADER}{name}:");
    if rendered.contains(&named) {
        rendered.to_owned()
    } else {
        rendered.replace(HEADER, &named)
    }
}

/// Where each policy of a Cedar file starts (1-based line and column, counted in
/// characters), by its place in the file, from Cedar's own source spans; `None` for a
/// policy Cedar gives no span (then its file and ordinal name it). Empty when the file
/// does not parse.
pub(super) fn policy_locations(text: &str) -> Vec<Option<(usize, usize)>> {
    let Ok((texts, _)) =
        cedar_policy_core::parser::parse_policyset_and_also_return_policy_text(text)
    else {
        return Vec::new();
    };
    let base = text.as_ptr() as usize;
    let mut locations = vec![None; texts.len()];
    for (id, source) in &texts {
        // Cedar numbers the policies of a file `policy0`, `policy1`... in order.
        let Some(ordinal) = id
            .as_ref()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        // The source is a slice of `text`: its address gives its offset.
        let Some(offset) = source
            .as_ref()
            .and_then(|source| (source.as_ptr() as usize).checked_sub(base))
        else {
            continue;
        };
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        if let Some(slot) = locations.get_mut(ordinal) {
            *slot = Some((line, column));
        }
    }
    locations
}

pub(super) struct Collected {
    pub(super) diagnostics: Vec<String>,
}

impl Collected {
    pub(super) fn read(&mut self, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(error) => {
                self.diagnostics
                    .push(format!("{}: cannot read: {error}", path.display()));
                None
            }
        }
    }
}
