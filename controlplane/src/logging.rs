//! Log set-up: `tracing` to stderr, every line carrying the prefix and the instance id.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogConfig;

struct Prefixed {
    head: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(&self.head)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Installs the global subscriber. Lines look like `<prefix>[<instance id>] <time> INFO ...`.
pub fn init(cfg: &LogConfig, instance_id: &str) {
    let level = if cfg.stream { Some(cfg.level) } else { None };
    let filter = tracing_subscriber::filter::LevelFilter::from(level);
    let format = Prefixed {
        head: format!("{}[{instance_id}] ", cfg.prefix),
        inner: tracing_subscriber::fmt::format().with_target(false),
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(format)
        .try_init();
}
