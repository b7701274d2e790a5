//! Config text to the raw structs, with every syntax error, unknown key and wrong type found in one pass.
//! serde stops at the first problem, so each one found is reported, its entry taken out of the parsed
//! document, and the rest read again: as many rounds as the file has entries, at most.

use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::raw::RawConfig;

/// A problem found while reading the file's shape: where, which key (`service[orders].probe.mode`), what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ShapeProblem {
    pub span: Range<usize>,
    pub key: Option<String>,
    pub message: String,
}

/// The raw config with every entry that could be read, and the problems of the others. `None` when the
/// text is not TOML at all (the problems then are the syntax errors).
pub(super) fn parse(text: &str) -> (Option<RawConfig>, Vec<ShapeProblem>) {
    let (mut doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        let problems = errors
            .iter()
            .map(|e| ShapeProblem { span: e.span().unwrap_or(0..0), key: None, message: e.message().trim().into() })
            .collect();
        return (None, problems);
    }
    let mut problems = Vec::new();
    let rounds = entries(doc.get_ref()) + 1;
    for _ in 0..rounds {
        match RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let key = take_out(doc.get_mut(), &span, "");
                let found = key.is_some();
                problems.push(ShapeProblem { span, key, message: hint(e.message().trim()) });
                if !found {
                    // why: nothing was taken out, so another round would fail the same way.
                    return (None, problems);
                }
            }
        }
    }
    (None, problems)
}

/// serde's words for a wrong type, in the words of the file: how to write the value.
fn hint(message: &str) -> String {
    message
        .replace("expected i64", "expected a whole number, written without quotes")
        .replace("expected f64", "expected a number, written without quotes")
        .replace("expected a boolean", "expected true or false, written without quotes")
}

/// How many key/value entries the document has, nested ones included.
fn entries(table: &DeTable<'_>) -> usize {
    table.iter().map(|(_, v)| 1 + value_entries(v.get_ref())).sum()
}

fn value_entries(v: &DeValue<'_>) -> usize {
    match v {
        DeValue::Table(t) => entries(t),
        DeValue::Array(a) => a.iter().map(|v| value_entries(v.get_ref())).sum(),
        _ => 0,
    }
}

/// Takes out of `table` the innermost entry whose key or value holds `span`; returns its key path, named
/// as validation names keys (`service[orders].hold.deadline`, `service[2].name` before a name is known).
fn take_out(table: &mut DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<String> {
    if span.is_empty() && span.start == 0 {
        return None;
    }
    let holds = |r: Range<usize>| r.start <= span.start && span.end <= r.end;
    let mut hit = None;
    for (k, v) in table.iter_mut() {
        let path = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        let (key_span, value_span) = (k.span(), v.span());
        // why: a table's span holds its entries' spans, and a `[header]` table may have none that does:
        // look inside first, so the innermost entry is the one taken out.
        match v.get_mut() {
            DeValue::Table(inner) => {
                if let Some(found) = take_out(inner, span, &path) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    if let DeValue::Table(inner) = item.get_mut() {
                        let label = match inner.get("name").map(|n| n.get_ref()) {
                            Some(DeValue::String(name)) => format!("{path}[{name}]"),
                            _ => format!("{path}[{index}]"),
                        };
                        if let Some(found) = take_out(inner, span, &label) {
                            return Some(found);
                        }
                    }
                }
            }
            _ => {}
        }
        if hit.is_none() && (holds(key_span) || holds(value_span)) {
            hit = Some((k.clone(), path));
        }
    }
    let (key, path) = hit?;
    table.remove(&key);
    Some(path)
}
