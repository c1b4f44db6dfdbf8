//! Output: aligned tables for people (colour only when asked or on a terminal), JSON and YAML
//! for scripts.

use std::fmt::Write as _;

use serde::Serialize;
use vramslice_core::format_bytes;

use crate::explain::{Explanation, PodState};
use crate::model::{NodeRow, PodRow};

/// Output format (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON (stable field names, bytes as numbers).
    Json,
    /// YAML (same fields as JSON).
    Yaml,
}

/// A failure to serialize output.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// JSON.
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// YAML.
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
}

/// Serialize `value` as JSON or YAML (tables are rendered by the functions below).
pub fn structured<T: Serialize>(value: &T, format: Format) -> Result<String, RenderError> {
    Ok(match format {
        Format::Yaml => serde_saphyr::to_string(value)?,
        _ => serde_json::to_string_pretty(value)? + "\n",
    })
}

#[derive(Clone, Copy)]
enum Tone {
    Plain,
    Good,
    Warn,
    Bad,
    Bold,
}

/// Colours, or none.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Emit ANSI colour codes.
    pub color: bool,
}

impl Style {
    fn paint(self, text: &str, tone: Tone) -> String {
        let code = match tone {
            Tone::Plain => return text.to_string(),
            Tone::Good => "32",
            Tone::Warn => "33",
            Tone::Bad => "31",
            Tone::Bold => "1",
        };
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Columns padded to their widest cell; colour applied after padding so alignment holds.
fn table(header: &[&str], rows: &[Vec<(String, Tone)>], style: Style) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, (cell, _)) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<(String, Tone)>, out: &mut String| {
        // Trailing empty cells add no padding, so lines never end in spaces.
        let last = cells.iter().rposition(|(c, _)| !c.is_empty()).unwrap_or(0);
        for (i, (cell, tone)) in cells.into_iter().enumerate().take(last + 1) {
            let pad = if i == last {
                0
            } else {
                widths[i] - cell.chars().count() + 3
            };
            out.push_str(&style.paint(&cell, tone));
            out.push_str(&" ".repeat(pad));
        }
        out.push('\n');
    };
    line(
        header
            .iter()
            .map(|h| (h.to_string(), Tone::Plain))
            .collect(),
        &mut out,
    );
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

fn plain(s: impl Into<String>) -> (String, Tone) {
    (s.into(), Tone::Plain)
}

fn opt_bytes(b: Option<u64>) -> String {
    b.map_or_else(|| "-".to_string(), format_bytes)
}

/// What an empty `nodes` table means (for stderr: stdout stays empty, as kubectl keeps it for
/// "No resources found", so that scripts counting rows count none).
pub const NO_NODES: &str = "No GpuNode objects found: is the vramslice device plugin running?";
/// What an empty `pods` table means.
pub const NO_PODS: &str = "No pods request vramslice memory.";
/// What an empty `claims` table means.
pub const NO_CLAIMS: &str = "No claims of vramslice devices.";

/// `kubectl vramslice nodes` as a table: one line per GPU; nothing for no rows ([`NO_NODES`]).
pub fn nodes_table(rows: &[NodeRow], style: Style) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut lines = Vec::new();
    for n in rows {
        let reading = match (n.reading_age_seconds, n.stale) {
            (Some(s), false) => plain(format!("{s}s ago")),
            (Some(s), true) => (format!("{s}s ago (stale)"), Tone::Warn),
            (None, _) => ("unreadable".to_string(), Tone::Bad),
        };
        if n.gpus.is_empty() {
            lines.push(vec![
                plain(&n.node),
                plain("-"),
                plain("(no GPUs)"),
                plain("-"),
                plain("-"),
                plain("-"),
                plain("-"),
                plain("-"),
                plain("-"),
                reading.clone(),
            ]);
        }
        for g in &n.gpus {
            let health = if g.healthy {
                ("healthy".to_string(), Tone::Good)
            } else {
                (
                    format!(
                        "unhealthy: {}",
                        g.health_reason.as_deref().unwrap_or("unknown")
                    ),
                    Tone::Bad,
                )
            };
            let effective = match g.effective_free_bytes {
                Some(0) => ("0 B".to_string(), Tone::Warn),
                other => plain(opt_bytes(other)),
            };
            lines.push(vec![
                plain(&n.node),
                plain(g.index.to_string()),
                plain(&g.model),
                plain(format_bytes(g.total_bytes)),
                plain(format_bytes(g.used_bytes)),
                plain(format_bytes(g.allocated_bytes)),
                plain(format_bytes(g.free_bytes)),
                effective,
                health,
                reading.clone(),
            ]);
        }
    }
    table(
        &[
            "NODE",
            "GPU",
            "MODEL",
            "TOTAL",
            "LIVE USED",
            "ALLOCATED",
            "LIVE FREE",
            "EFFECTIVE FREE",
            "HEALTH",
            "READING",
        ],
        &lines,
        style,
    )
}

/// `kubectl vramslice pods` as a table; nothing for no rows ([`NO_PODS`]).
pub fn pods_table(rows: &[PodRow], style: Style) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let lines: Vec<Vec<(String, Tone)>> = rows
        .iter()
        .map(|p| {
            let gpu = match (p.gpu_index, &p.gpu_uuid) {
                (Some(i), Some(u)) => format!("{i} ({})", short_uuid(u)),
                (None, Some(u)) => short_uuid(u),
                _ => "-".into(),
            };
            let used = match p.used_bytes {
                Some(u) if u > p.limit_bytes => (format_bytes(u), Tone::Bad),
                Some(u) if u.saturating_mul(10) >= p.limit_bytes.saturating_mul(9) => {
                    (format_bytes(u), Tone::Warn)
                }
                other => plain(opt_bytes(other)),
            };
            let phase_tone = match p.phase.as_str() {
                "Running" | "Succeeded" => Tone::Good,
                "Pending" => Tone::Warn,
                "Failed" | "Unknown" => Tone::Bad,
                _ => Tone::Plain,
            };
            vec![
                plain(&p.namespace),
                plain(&p.name),
                plain(p.node.clone().unwrap_or_else(|| "-".into())),
                plain(gpu),
                plain(format_bytes(p.limit_bytes)),
                used,
                (p.phase.clone(), phase_tone),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "POD", "NODE", "GPU", "LIMIT", "USED", "STATUS"],
        &lines,
        style,
    )
}

/// `kubectl vramslice claims` as a table; nothing for no rows ([`NO_CLAIMS`]).
pub fn claims_table(rows: &[crate::dra::ClaimRow], style: Style) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let lines: Vec<Vec<(String, Tone)>> = rows
        .iter()
        .map(|c| {
            let used = match c.used_bytes {
                Some(u) if u > c.granted_bytes => (format_bytes(u), Tone::Bad),
                other => plain(opt_bytes(other)),
            };
            let state_tone = if c.state == "allocated" {
                Tone::Good
            } else {
                Tone::Warn
            };
            vec![
                plain(&c.namespace),
                plain(&c.claim),
                plain(if c.pods.is_empty() {
                    "-".to_string()
                } else {
                    c.pods.join(",")
                }),
                plain(c.node.clone().unwrap_or_else(|| "-".into())),
                plain(if c.gpus.is_empty() {
                    "-".to_string()
                } else {
                    c.gpus.join(",")
                }),
                plain(format_bytes(c.granted_bytes)),
                used,
                (c.state.clone(), state_tone),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "CLAIM",
            "PODS",
            "NODE",
            "GPU",
            "GRANTED",
            "USED",
            "STATE",
        ],
        &lines,
        style,
    )
}

fn short_uuid(uuid: &str) -> String {
    // NVML UUIDs ("GPU-8c3f1a2b-1c2d-...", 40 characters) are cut to their first 8 hex digits,
    // enough to tell GPUs apart on one screen; anything shorter is shown whole.
    if uuid.chars().count() <= 24 {
        return uuid.to_string();
    }
    let head: String = uuid.chars().take(12).collect();
    format!("{head}…")
}

/// `kubectl vramslice explain` as text.
pub fn explanation_text(e: &Explanation, style: Style) -> String {
    let mut out = String::new();
    let need = match (e.request_bytes, e.units, &e.resource) {
        (Some(b), Some(u), Some(r)) => format!("{} ({u} × {r})", format_bytes(b)),
        _ => String::new(),
    };
    let _ = match &e.state {
        PodState::NoVram => writeln!(
            out,
            "Pod {} requests no vramslice.io/vram-* resource; vramslice does not place it.",
            e.pod
        ),
        PodState::InvalidRequest { reason } => {
            writeln!(out, "Pod {}: {}", e.pod, style.paint(reason, Tone::Bad))
        }
        PodState::Bound { node, gpu_uuid } => writeln!(
            out,
            "Pod {} ({need}) is bound to node {node}{}.",
            e.pod,
            gpu_uuid
                .as_ref()
                .map(|g| format!(", GPU {g}"))
                .unwrap_or_default()
        ),
        PodState::Pending { fits_on } => {
            let verdict = if *fits_on == 0 {
                style.paint(
                    &format!("fits on none of {} GPU nodes", e.nodes.len()),
                    Tone::Bad,
                )
            } else {
                style.paint(
                    &format!("fits on {fits_on} of {} GPU nodes", e.nodes.len()),
                    Tone::Good,
                )
            };
            writeln!(out, "Pod {} needs {need} on one GPU and {verdict}.", e.pod)
        }
    };
    if !e.nodes.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<(String, Tone)>> = e
            .nodes
            .iter()
            .map(|n| {
                let verdict = if n.fits {
                    ("fits".to_string(), Tone::Good)
                } else if n.unresolvable {
                    ("never".to_string(), Tone::Bad)
                } else {
                    ("no".to_string(), Tone::Warn)
                };
                vec![
                    plain(&n.node),
                    verdict,
                    plain(n.reason.clone().unwrap_or_default()),
                ]
            })
            .collect();
        out.push_str(&table(&["NODE", "FITS", "REASON"], &rows, style));
    }
    if let Some(ev) = e.events.first() {
        let _ = writeln!(
            out,
            "\n{} {} (×{}{}): {}",
            style.paint("Last scheduler event:", Tone::Bold),
            ev.reason,
            ev.count,
            ev.last_seen
                .as_ref()
                .map(|t| format!(", {t}"))
                .unwrap_or_default(),
            ev.message
        );
    }
    for note in &e.notes {
        let _ = writeln!(out, "\n{} {note}", style.paint("Note:", Tone::Bold));
    }
    out
}
