//! What a run produces: figures with their targets, written as
//! `target/bench/results.json` (for scripts) and `BENCHMARKS.md` (for people).

use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One measured figure. `name` is stable across runs so scripts can compare.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Stable identifier, e.g. `pipeline_overhead_p50_ratio`.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit (`ratio`, `ms`, `us`, `rps`, `MB`, `share`).
    pub unit: String,
    /// The bar we set, e.g. `<= 1.10`; `None` for figures shown for context.
    pub target: Option<String>,
    /// Whether the figure meets the target; `None` when there is none.
    pub met: Option<bool>,
}

/// A comparison the target is stated as.
#[derive(Debug, Clone, Copy)]
pub enum Bar {
    /// The value must be at most this.
    AtMost(f64),
    /// The value must be at least this.
    AtLeast(f64),
}

impl Record {
    /// A figure shown for context, without a target.
    pub fn info(name: &str, value: f64, unit: &str) -> Record {
        Record {
            name: name.into(),
            value,
            unit: unit.into(),
            target: None,
            met: None,
        }
    }

    /// A figure measured against `bar`.
    pub fn against(name: &str, value: f64, unit: &str, bar: Bar) -> Record {
        let (target, met) = match bar {
            Bar::AtMost(limit) => (format!("<= {}", trim(limit)), value <= limit),
            Bar::AtLeast(limit) => (format!(">= {}", trim(limit)), value >= limit),
        };
        Record {
            name: name.into(),
            value,
            unit: unit.into(),
            target: Some(target),
            met: Some(met && value.is_finite()),
        }
    }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One numbered part of the report.
pub struct Section {
    /// Heading, e.g. `1. Pipeline overhead`.
    pub title: String,
    /// What was compared and how, in a sentence or two.
    pub method: String,
    /// The exact commands and settings used.
    pub commands: Vec<String>,
    /// Side-by-side rows: a header and rows of cells.
    pub table: Vec<Vec<String>>,
    /// The figures with their targets.
    pub records: Vec<Record>,
    /// Observations worth reading (shortfalls, causes).
    pub notes: Vec<String>,
}

impl Section {
    /// An empty section titled `title`.
    pub fn new(title: &str, method: &str) -> Section {
        Section {
            title: title.into(),
            method: method.into(),
            commands: Vec::new(),
            table: Vec::new(),
            records: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Formats a number for a table: at most three decimals, no trailing zeros.
pub fn num(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        trim(value)
    }
}

/// Writes every record of `sections` as a JSON list to `path`.
pub fn write_json(path: &Path, sections: &[Section]) -> Result<()> {
    let records: Vec<&Record> = sections.iter().flat_map(|s| &s.records).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(&records)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Renders the Markdown report.
pub fn markdown(header: &str, sections: &[Section], appendix: &str) -> String {
    let mut out = String::from(header);
    let all: Vec<&Record> = sections.iter().flat_map(|s| &s.records).collect();
    let targets = all.iter().filter(|r| r.met.is_some()).count();
    let met = all.iter().filter(|r| r.met == Some(true)).count();
    let _ = writeln!(out, "\n## Summary: {met} of {targets} targets met\n");
    out.push_str("| figure | value | unit | target | met |\n|---|---:|---|---|---|\n");
    for r in all.iter().filter(|r| r.met.is_some()) {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            r.name,
            num(r.value),
            r.unit,
            r.target.as_deref().unwrap_or(""),
            if r.met == Some(true) { "yes" } else { "**no**" }
        );
    }
    for section in sections {
        let _ = write!(out, "\n## {}\n\n{}\n", section.title, section.method);
        if !section.commands.is_empty() {
            out.push_str("\n```\n");
            for c in &section.commands {
                let _ = writeln!(out, "{c}");
            }
            out.push_str("```\n");
        }
        if let Some((header, rows)) = section.table.split_first() {
            let _ = write!(
                out,
                "\n| {} |\n|{}\n",
                header.join(" | "),
                "---|".repeat(header.len())
            );
            for row in rows {
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
        }
        out.push_str("\n| figure | value | unit | target | met |\n|---|---:|---|---|---|\n");
        for r in &section.records {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {met} |",
                r.name,
                num(r.value),
                r.unit,
                r.target.as_deref().unwrap_or("")
            );
        }
        for note in &section.notes {
            let _ = write!(out, "\n{note}\n");
        }
    }
    out.push_str(appendix);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_in_the_stated_direction() {
        let under = Record::against("a", 1.05, "ratio", Bar::AtMost(1.1));
        assert_eq!(
            (under.target.as_deref(), under.met),
            (Some("<= 1.1"), Some(true))
        );
        let short = Record::against("b", 0.9, "ratio", Bar::AtLeast(1.2));
        assert_eq!(
            (short.target.as_deref(), short.met),
            (Some(">= 1.2"), Some(false))
        );
        let nan = Record::against("c", f64::NAN, "ratio", Bar::AtMost(1.0));
        assert_eq!(nan.met, Some(false));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(num(1.23456), "1.235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(2.0), "2");
    }
}
