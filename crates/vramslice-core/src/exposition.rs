//! How a `/metrics` page is served: which text format a scraper gets, and the OpenMetrics text
//! the components render turned into the Prometheus text format (0.0.4).
//!
//! Every component renders OpenMetrics 1.0 text (what `prometheus-client` writes). A scraper
//! that asks for it in `Accept` (Prometheus does) gets it as is; any other client (curl, a
//! plain `GET`, a parser of the classic format) gets the Prometheus text format, which is what
//! the contract promises on `/metrics`. The conversion is by family type: a counter's family is
//! named with its `_total` sample, an info metric becomes a gauge named `…_info`, `unknown`
//! becomes `untyped`; `# UNIT`, `# EOF`, `_created` samples and exemplars have no place in the
//! older format and are dropped.

use std::collections::HashMap;

/// The content type of OpenMetrics 1.0 text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text format a `/metrics` answer is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// The Prometheus text format 0.0.4: the default.
    PrometheusText,
    /// OpenMetrics 1.0 text, for a scraper whose `Accept` prefers it.
    OpenMetrics,
}

impl Exposition {
    /// The format to answer a request whose `Accept` headers are `accept` (none, one, or several,
    /// each a comma-separated list): the acceptable media range with the highest `q` decides,
    /// the first listed on a tie.
    /// `application/openmetrics-text` picks OpenMetrics; `text/plain`, `text/*` and `*/*` pick
    /// the Prometheus text format, as does a header that accepts neither (the answer is then
    /// still the default rather than a 406).
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Self {
        let mut best: Option<(f32, Self)> = None;
        for range in accept.into_iter().flat_map(|header| header.split(',')) {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let format = match media.as_str() {
                "application/openmetrics-text" => Self::OpenMetrics,
                "text/plain" | "text/*" | "*/*" => Self::PrometheusText,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .filter(|q| q.is_finite());
            let Some(q) = q else { continue };
            if q > 0.0 && best.is_none_or(|(top, _)| q > top) {
                best = Some((q, format));
            }
        }
        best.map_or(Self::PrometheusText, |(_, format)| format)
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// `openmetrics` (OpenMetrics text as rendered) in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Self::PrometheusText => to_prometheus_text(&openmetrics),
            Self::OpenMetrics => openmetrics,
        }
    }
}

/// OpenMetrics 1.0 text turned into the Prometheus text format 0.0.4 (see the module docs).
/// Lines it does not recognise pass through unchanged.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| descriptor(line, "TYPE"))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = descriptor(line, "HELP") {
            let (family, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, _) = classic_family(family, types.get(family).copied());
            push_line(&mut out, &format!("# HELP {name} {}", classic_help(help)));
        } else if let Some(rest) = descriptor(line, "TYPE") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, kind) = classic_family(family, Some(kind));
            push_line(&mut out, &format!("# TYPE {name} {kind}"));
        } else if descriptor(line, "UNIT").is_some() || line.trim_end() == "# EOF" {
            continue;
        } else if line.starts_with('#') || line.trim().is_empty() {
            push_line(&mut out, line);
        } else if let Some(sample) = classic_sample(line, &types) {
            push_line(&mut out, sample);
        }
    }
    out
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line);
    out.push('\n');
}

/// What follows `# KEYWORD ` on a descriptor line.
fn descriptor<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    line.strip_prefix("# ")?
        .strip_prefix(keyword)?
        .strip_prefix(' ')
}

/// A family's name and type in the classic format, from its OpenMetrics name and type.
fn classic_family(family: &str, kind: Option<&str>) -> (String, &'static str) {
    match kind.unwrap_or("unknown") {
        // OpenMetrics names a counter family without its `_total` (one registered as `x_total`
        // has samples `x_total_total`): the classic family is always the sample's name.
        "counter" => (format!("{family}_total"), "counter"),
        "gauge" => (family.to_string(), "gauge"),
        "histogram" => (family.to_string(), "histogram"),
        "summary" => (family.to_string(), "summary"),
        "info" => (format!("{family}_info"), "gauge"),
        "stateset" => (family.to_string(), "gauge"),
        _ => (family.to_string(), "untyped"),
    }
}

/// OpenMetrics escapes `"` in HELP text; the classic format leaves it bare (and escapes only
/// backslash and newline, as both do).
fn classic_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// A sample line without its exemplar; `None` for a `_created` sample of a counter, histogram
/// or summary, which the classic format has no place for.
fn classic_sample<'a>(line: &'a str, types: &HashMap<&str, &str>) -> Option<&'a str> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if let Some(family) = name.strip_suffix("_created")
        && matches!(
            types.get(family).copied(),
            Some("counter" | "histogram" | "summary")
        )
    {
        return None;
    }
    let labels_end = if line[name_end..].starts_with('{') {
        name_end + labels_len(&line[name_end..])
    } else {
        name_end
    };
    let rest = &line[labels_end..];
    Some(match rest.find(" # ") {
        Some(exemplar) => &line[..labels_end + exemplar],
        None => line,
    })
}

/// The length of the label set `{…}` that `text` opens with, quoted values (and their escapes)
/// included; all of `text` when the set never closes.
fn labels_len(text: &str) -> usize {
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (false, _, '"') => quoted = true,
            (false, _, '}') => return at + 1,
            _ => {}
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What prometheus-client 0.25 writes for a counter family, a gauge, a histogram and an
    /// info metric, with a unit, a `_created` sample, an exemplar and escapes.
    const OPENMETRICS: &str = concat!(
        "# HELP vramslice_decisions Filter verdicts, \\\"by\\\" verb.\n",
        "# TYPE vramslice_decisions counter\n",
        "vramslice_decisions_total{verb=\"filter\",result=\"a # {b}\"} 3 # {trace_id=\"x\"} 1.0\n",
        "vramslice_decisions_created{verb=\"filter\"} 1700000000.0\n",
        "# HELP vramslice_gpu_total_bytes GPU memory.\n",
        "# TYPE vramslice_gpu_total_bytes gauge\n",
        "# UNIT vramslice_gpu_total_bytes bytes\n",
        "vramslice_gpu_total_bytes{gpu=\"GPU-1\",index=\"0\"} 85899345920\n",
        "# HELP vramslice_latency_seconds Verb latency.\n",
        "# TYPE vramslice_latency_seconds histogram\n",
        "vramslice_latency_seconds_sum 0.5\n",
        "vramslice_latency_seconds_count 2\n",
        "vramslice_latency_seconds_bucket{le=\"0.1\"} 1\n",
        "vramslice_latency_seconds_bucket{le=\"+Inf\"} 2\n",
        "# HELP vramslice_build Build.\n",
        "# TYPE vramslice_build info\n",
        "vramslice_build_info{version=\"0.1.0\"} 1\n",
        "# EOF\n",
    );

    #[test]
    fn openmetrics_becomes_prometheus_text_by_family_type() {
        let text = to_prometheus_text(OPENMETRICS);
        let want = concat!(
            "# HELP vramslice_decisions_total Filter verdicts, \"by\" verb.\n",
            "# TYPE vramslice_decisions_total counter\n",
            "vramslice_decisions_total{verb=\"filter\",result=\"a # {b}\"} 3\n",
            "# HELP vramslice_gpu_total_bytes GPU memory.\n",
            "# TYPE vramslice_gpu_total_bytes gauge\n",
            "vramslice_gpu_total_bytes{gpu=\"GPU-1\",index=\"0\"} 85899345920\n",
            "# HELP vramslice_latency_seconds Verb latency.\n",
            "# TYPE vramslice_latency_seconds histogram\n",
            "vramslice_latency_seconds_sum 0.5\n",
            "vramslice_latency_seconds_count 2\n",
            "vramslice_latency_seconds_bucket{le=\"0.1\"} 1\n",
            "vramslice_latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "# HELP vramslice_build_info Build.\n",
            "# TYPE vramslice_build_info gauge\n",
            "vramslice_build_info{version=\"0.1.0\"} 1\n",
        );
        assert_eq!(text, want);
    }

    #[test]
    fn help_keeps_escaped_backslashes_and_newlines() {
        assert_eq!(classic_help(r#"a \\" b \n c \" d"#), r#"a \\" b \n c " d"#);
        assert_eq!(classic_help("trailing \\"), "trailing \\");
    }

    #[test]
    fn a_counter_registered_as_total_keeps_its_samples_name() {
        // What prometheus-client writes for a counter registered as `x_total`.
        let text = to_prometheus_text("# TYPE x_total counter\nx_total_total 1\n# EOF\n");
        assert_eq!(text, "# TYPE x_total_total counter\nx_total_total 1\n");
        assert_eq!(
            to_prometheus_text("# TYPE y unknown\ny 2\n"),
            "# TYPE y untyped\ny 2\n"
        );
    }

    #[test]
    fn negotiation_follows_the_accept_header() {
        use Exposition::{OpenMetrics, PrometheusText};
        // What Prometheus sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (None, PrometheusText),
            (Some(""), PrometheusText),
            (Some("*/*"), PrometheusText),
            (Some("text/plain"), PrometheusText),
            (Some(prometheus), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            (
                Some("text/plain;q=0.9, application/openmetrics-text"),
                OpenMetrics,
            ),
            (
                Some("text/plain, application/openmetrics-text"),
                PrometheusText,
            ),
            (Some("application/openmetrics-text;q=0"), PrometheusText),
            (Some("application/openmetrics-text;q=bad"), PrometheusText),
            (Some("application/json"), PrometheusText),
            (
                Some("application/vnd.google.protobuf;q=1,application/openmetrics-text;q=0.5"),
                OpenMetrics,
            ),
        ] {
            assert_eq!(Exposition::negotiate(accept), want, "Accept: {accept:?}");
        }
        // Several Accept headers read as one list.
        assert_eq!(
            Exposition::negotiate(["text/plain;q=0.5", "application/openmetrics-text"]),
            OpenMetrics
        );
        assert_eq!(
            OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            PrometheusText.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(OpenMetrics.render("a 1\n# EOF\n".into()), "a 1\n# EOF\n");
        assert_eq!(PrometheusText.render("a 1\n# EOF\n".into()), "a 1\n");
    }

    proptest! {
        /// Whatever the label values hold, a sample keeps its labels and value and loses only
        /// its exemplar; nothing panics.
        #[test]
        fn samples_keep_labels_and_value(
            value in "[ -~]{0,20}",
            number in any::<u32>(),
            exemplar in proptest::bool::ANY,
        ) {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            let sample = format!("m_total{{l=\"{escaped}\"}} {number}");
            let line = if exemplar { format!("{sample} # {{t=\"1\"}} 1.0") } else { sample.clone() };
            let text = to_prometheus_text(&format!("# TYPE m counter\n{line}\n# EOF\n"));
            prop_assert_eq!(text, format!("# TYPE m_total counter\n{sample}\n"));
        }

        #[test]
        fn negotiation_never_panics(accept in "[ -~]{0,60}") {
            let _ = Exposition::negotiate(Some(accept.as_str()));
        }
    }
}
