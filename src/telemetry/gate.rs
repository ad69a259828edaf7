//! The log exporter's own filter, applied inside it.
//!
//! With the exporter behind a per-layer filter more verbose than the log lines' somewhere
//! (`telemetry.log_level = "info,sluice=debug"` beside `log.filter = "info"`), the lines
//! stopped at start-up: an event only the exporter wanted left tracing-subscriber's per-layer
//! filter state disabled for the lines. So the exporter is an unfiltered layer that looks at
//! each span and event itself, and never changes what another layer sees.

use tracing::{Event, Metadata, Subscriber, span};
use tracing_subscriber::{Layer, filter::Targets, layer::Context, registry::LookupSpan};

pub struct Gated<L> {
    inner: L,
    targets: Targets,
}

impl<L> Gated<L> {
    pub fn new(inner: L, targets: Targets) -> Self {
        Self { inner, targets }
    }

    fn wants(&self, metadata: &Metadata<'_>) -> bool {
        self.targets
            .would_enable(metadata.target(), metadata.level())
    }
}

impl<S, L> Layer<S> for Gated<L>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    L: Layer<S>,
{
    fn on_new_span(&self, attributes: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if self.wants(attributes.metadata()) {
            self.inner.on_new_span(attributes, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if ctx
            .metadata(id)
            .is_some_and(|metadata| self.wants(metadata))
        {
            self.inner.on_record(id, values, ctx);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if self.wants(event.metadata()) {
            self.inner.on_event(event, ctx);
        }
    }
}
