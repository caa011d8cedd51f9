//! Logging set-up shared by every subcommand.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans), for log
    /// collectors such as Loki, Elasticsearch or Cloud Logging.
    Json,
}

/// Logs to stderr in `format`; `RUST_LOG` sets the levels (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colour codes only for a person at a terminal, never into a log file.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// The names among `queried` whose family an exposition (`text`) lacks: for tests that
/// hold the chart's queries to what a process exports. Counters and histograms are
/// queried by their series names (`_total`, `_bucket`, ...), declared by family.
pub fn unexported(text: &str, queried: &[String]) -> Vec<String> {
    queried
        .iter()
        .filter(|name| {
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            !text.contains(&format!("# TYPE {family} "))
        })
        .cloned()
        .collect()
}

/// The metric names starting with `prefix` in a text (alert rules, a dashboard), each
/// once, in order: for tests that hold queries to the metrics they name.
pub fn metric_names(text: &str, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}
