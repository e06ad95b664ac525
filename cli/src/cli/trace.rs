//! The CLI's tracing: `RUST_LOG` (an `EnvFilter`, default `warn`) and
//! `--log-format text|json` on stderr, so stdout stays the command's output; and
//! `--trace FILE`, a Chrome/Perfetto trace (`chrome://tracing`, ui.perfetto.dev) of
//! the run with one track per agent (its turns, model calls, admissions, steps and
//! tool calls) and one for the engine (each step, its rows and the agents in it).
//!
//! The library only emits spans; this file is the one place a subscriber is set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the subscriber; the returned guard writes the `--trace` file when it
/// drops (at the end of `main`).
pub fn init(format: LogFormat, trace: Option<PathBuf>) -> TraceGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // Each span's close is a line too (with its busy and idle time), so that
    // `RUST_LOG=troupe=debug` shows every turn, model call, admission and step.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt.with_filter(filter)),
        LogFormat::Json => Box::new(fmt.json().with_filter(filter)),
    };
    let state = trace.map(|path| {
        Arc::new(Mutex::new(Chrome {
            path,
            start: Instant::now(),
            events: Vec::new(),
            tracks: HashMap::new(),
        }))
    });
    let chrome = state
        .clone()
        .map(|s| ChromeLayer { state: s }.with_filter(EnvFilter::new("troupe=debug")));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(chrome)
        .try_init();
    TraceGuard { state }
}

/// Writes the trace file on drop.
pub struct TraceGuard {
    state: Option<Arc<Mutex<Chrome>>>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        let Some(state) = &self.state else { return };
        let c = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut events: Vec<Value> = c
            .tracks
            .iter()
            .map(|(name, tid)| {
                json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
            })
            .collect();
        events.extend(c.events.iter().cloned());
        let doc = json!({"traceEvents": events, "displayTimeUnit": "ms"});
        if let Err(e) = std::fs::write(&c.path, doc.to_string()) {
            eprintln!("error: cannot write the trace {}: {e}", c.path.display());
        }
    }
}

/// The trace being collected.
struct Chrome {
    path: PathBuf,
    start: Instant,
    events: Vec<Value>,
    /// Track name -> id (1 is the engine, then agents in order of appearance).
    tracks: HashMap<String, u64>,
}

impl Chrome {
    fn track(&mut self, name: &str) -> u64 {
        if let Some(&t) = self.tracks.get(name) {
            return t;
        }
        let id = if name == "engine" {
            1
        } else {
            2 + self.tracks.keys().filter(|k| *k != "engine").count() as u64
        };
        self.tracks.insert(name.to_string(), id);
        id
    }
}

/// What a span carries until it closes.
struct Open {
    start_us: f64,
    fields: Map<String, Value>,
    track: String,
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), json!(value));
    }
}

/// Records every span as a complete event on its track: `engine` for the engine's
/// steps, the `agent` field (its own or its nearest ancestor's) otherwise.
struct ChromeLayer {
    state: Arc<Mutex<Chrome>>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for ChromeLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        let inherited = span
            .parent()
            .and_then(|p| p.extensions().get::<Open>().map(|o| o.track.clone()));
        let track = if attrs.metadata().name() == "engine_step" {
            "engine".to_string()
        } else if let Some(Value::String(a)) = fields.get("agent") {
            a.clone()
        } else {
            inherited.unwrap_or_else(|| "main".into())
        };
        let start = self.state.lock().unwrap_or_else(|p| p.into_inner()).start;
        span.extensions_mut().insert(Open {
            start_us: start.elapsed().as_secs_f64() * 1e6,
            fields,
            track,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                values.record(&mut Fields(&mut open.fields));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let mut c = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = c.start.elapsed().as_secs_f64() * 1e6;
        let tid = c.track(&open.track);
        c.events.push(json!({
            "name": span.name(),
            "cat": "troupe",
            "ph": "X",
            "ts": open.start_us,
            "dur": (now - open.start_us).max(0.0),
            "pid": 1,
            "tid": tid,
            "args": Value::Object(open.fields),
        }));
    }
}
