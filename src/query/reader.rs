//! What the read RPCs share: the stores they read, the node's state that Stats reports, and
//! the feed that Tail follows.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::slots::Slots;
use crate::{
    archive::Archive, auth::Caller, broker::Broker, buffer::Buffer, config::Config, feed::TailFeed,
    filter::Filter, metrics::Counters, privacy::SharedPrivacy, proto::status::InvalidArgument,
    spool::Spool, store::Store, writer::breaker::Breaker,
};

pub struct Reader {
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub archive: Arc<Archive>,
    pub privacy: SharedPrivacy,
    /// Stats: the node's ingest counters, buffer, circuit, spool and broker backlog.
    pub counters: Arc<Counters>,
    pub buffer: Arc<Buffer>,
    pub breaker: Arc<Breaker>,
    pub spool: Option<Spool>,
    pub broker: Option<Broker>,
    /// Tail: the batches this node's writers made durable.
    pub feed: Arc<TailFeed>,
    /// Cancelled when the server stops: Tail streams end.
    pub shutdown: CancellationToken,
    /// What one principal may have running at once (`reads.*`).
    pub queries: Arc<Slots>,
    pub exports: Arc<Slots>,
    pub tails: Arc<Slots>,
}

impl Reader {
    /// `filter` restricted to what `caller` may read, in stored form.
    pub fn restrict(&self, filter: &mut Filter, caller: &Caller) -> Result<(), InvalidArgument> {
        filter.restrict(caller, &self.privacy.load())
    }
}
