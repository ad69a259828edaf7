//! libpq's multi-host connection strings, which sqlx does not parse:
//! `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write`.
//!
//! [`HostList::parse`] splits such a URL into one set of connect options per host.
//! [`HostList::select`] picks the host to use, the way libpq does for `target_session_attrs`:
//! hosts are tried in order, and the first one whose session fits wins (`prefer-standby` tries
//! for a standby first, then takes any). [`Failover`] keeps pools on the host that fits: it
//! checks the current host every second and, when it no longer fits (it died, or was demoted),
//! selects again and points the pools' future connections at the new host. Connections opened
//! before the switch are closed instead of being handed out.

use std::{
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{
    ConnectOptions, Connection, PgPool,
    pool::PoolConnectionMetadata,
    postgres::{PgConnectOptions, PgConnection},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::StoreError;
use crate::metrics;

/// How often the current host is checked, and how long one check may take.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// libpq's `target_session_attrs`: which kind of server a session must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    /// Accepts writes: not in recovery and `default_transaction_read_only` off.
    ReadWrite,
    ReadOnly,
    /// Not in recovery.
    Primary,
    /// In recovery.
    Standby,
    /// A standby if one answers, else any server.
    PreferStandby,
}

impl FromStr for SessionAttrs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            other => return Err(format!("unknown target_session_attrs {other:?}")),
        })
    }
}

impl SessionAttrs {
    fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
            Self::Primary => "primary",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in `session` fits.
    fn accepts(self, session: Session) -> bool {
        match self {
            Self::Any | Self::PreferStandby => true,
            Self::ReadWrite => !session.in_recovery && !session.read_only,
            Self::ReadOnly => session.in_recovery || session.read_only,
            Self::Primary => !session.in_recovery,
            Self::Standby => session.in_recovery,
        }
    }
}

/// What a server said of itself.
#[derive(Debug, Clone, Copy)]
struct Session {
    in_recovery: bool,
    read_only: bool,
}

const SESSION_QUERY: &str =
    "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'";

async fn session_of(connection: &mut PgConnection) -> Result<Session, sqlx::Error> {
    let (in_recovery, read_only): (bool, bool) =
        sqlx::query_as(SESSION_QUERY).fetch_one(connection).await?;
    Ok(Session {
        in_recovery,
        read_only,
    })
}

/// One host of a connection string.
#[derive(Debug, Clone)]
pub struct Host {
    /// `host:port`, for logs (never the password).
    pub name: String,
    pub options: PgConnectOptions,
}

/// The hosts of a connection string, and the kind of session it asks for.
#[derive(Debug, Clone)]
pub struct HostList {
    pub hosts: Vec<Host>,
    pub attrs: SessionAttrs,
}

impl HostList {
    /// Parses a PostgreSQL URL with one host or several (`h1:5432,h2:5432`) and an optional
    /// `target_session_attrs` (default `any`). Every other parameter is sqlx's.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::Url(sqlx::Error::Configuration(reason.into()));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("a database url starts with postgres://".to_owned()))?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        let mut attrs = SessionAttrs::Any;
        let mut kept = Vec::new();
        for pair in query.into_iter().flat_map(|query| query.split('&')) {
            match pair.split_once('=') {
                Some(("target_session_attrs", value)) => attrs = value.parse().map_err(invalid)?,
                _ if !pair.is_empty() => kept.push(pair),
                _ => {}
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let userinfo = userinfo
            .map(|userinfo| format!("{userinfo}@"))
            .unwrap_or_default();
        let mut hosts = Vec::new();
        for host in host_list.split(',') {
            let single = format!("{scheme}://{userinfo}{host}{path}{query}");
            let options = PgConnectOptions::from_str(&single).map_err(StoreError::Url)?;
            let name = if host.is_empty() {
                format!("{}:{}", options.get_host(), options.get_port())
            } else {
                host.to_owned()
            };
            hosts.push(Host { name, options });
        }
        Ok(Self { hosts, attrs })
    }

    /// A list of one host, taken as it is (the private cluster's socket).
    pub fn single(name: &str, options: PgConnectOptions) -> Self {
        Self {
            hosts: vec![Host {
                name: name.to_owned(),
                options,
            }],
            attrs: SessionAttrs::Any,
        }
    }

    /// The same hosts, asking for another kind of session.
    pub fn with_attrs(mut self, attrs: SessionAttrs) -> Self {
        self.attrs = attrs;
        self
    }

    /// The first host, in order, whose session fits (for `prefer-standby`, a standby first).
    /// One host with `any` is taken without a check, as libpq does.
    pub async fn select(&self, timeout: Duration) -> Result<usize, StoreError> {
        if self.hosts.len() == 1 && self.attrs == SessionAttrs::Any {
            return Ok(0);
        }
        let passes: &[SessionAttrs] = match self.attrs {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            attrs => &[attrs],
        };
        let mut last_error = None;
        for attrs in passes {
            for (index, host) in self.hosts.iter().enumerate() {
                match probe(host, timeout).await {
                    Ok(session) if attrs.accepts(session) => return Ok(index),
                    Ok(_) => {}
                    Err(error) => last_error = Some(error),
                }
            }
        }
        Err(StoreError::NoHostFits {
            attrs: self.attrs.as_str(),
            hosts: self.names(),
            last_error: last_error
                .map(|error| error.to_string())
                .unwrap_or_default(),
        })
    }

    fn names(&self) -> String {
        self.hosts
            .iter()
            .map(|host| host.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Connects to one host and asks what it is.
async fn probe(host: &Host, timeout: Duration) -> Result<Session, sqlx::Error> {
    let attempt = async {
        let mut connection = host.options.connect().await?;
        let session = session_of(&mut connection).await;
        let _ = connection.close().await;
        session
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// When a [`Failover`] last moved its pools to another host.
pub type SwitchClock = Arc<Mutex<Option<Instant>>>;

/// A pool's `before_acquire` check: false (close it) for a connection opened before the last
/// switch of host, so that no connection to the old host is handed out after a failover. A
/// connect that began before the switch may end after it, so connections opened within
/// `grace` (the connect timeout) after the switch are closed too.
pub fn opened_after_switch(
    clock: SwitchClock,
    grace: Duration,
) -> impl for<'c> Fn(
    &'c mut PgConnection,
    PoolConnectionMetadata,
) -> futures::future::BoxFuture<'c, Result<bool, sqlx::Error>>
+ Send
+ Sync
+ 'static {
    move |_, metadata| {
        let fresh = clock
            .lock()
            .ok()
            .and_then(|switched_at| *switched_at)
            .is_none_or(|switched_at| {
                switched_at
                    .elapsed()
                    .checked_sub(grace)
                    .is_some_and(|since_grace| metadata.age < since_grace)
            });
        Box::pin(async move { Ok(fresh) })
    }
}

/// Keeps pools on the host of a [`HostList`] that fits its `target_session_attrs`.
#[derive(Debug)]
pub struct Failover {
    label: &'static str,
    hosts: HostList,
    current: AtomicUsize,
    clock: SwitchClock,
    /// Each pool, with its own connect options for every host (its timeouts, its name).
    pools: Vec<(PgPool, Vec<PgConnectOptions>)>,
    /// Warn when the primary (after a switch) has no synchronous standby.
    require_sync_standby: bool,
}

impl Failover {
    /// `label` names the pools in logs and metrics (`write`, `read`); `current` is the host
    /// the pools were opened on, and `clock` the one their [`opened_after_switch`] reads.
    pub fn new(label: &'static str, hosts: HostList, current: usize, clock: SwitchClock) -> Self {
        Self {
            label,
            hosts,
            current: AtomicUsize::new(current),
            clock,
            pools: Vec::new(),
            require_sync_standby: false,
        }
    }

    /// Adds a pool, with its options for each host (in the order of the host list).
    pub fn pool(mut self, pool: PgPool, options: Vec<PgConnectOptions>) -> Self {
        self.pools.push((pool, options));
        self
    }

    pub fn require_sync_standby(mut self, require: bool) -> Self {
        self.require_sync_standby = require;
        self
    }

    /// The host the pools use now.
    pub fn current_host(&self) -> &str {
        let index = self.current.load(Ordering::Relaxed);
        self.hosts
            .hosts
            .get(index)
            .map_or("", |host| host.name.as_str())
    }

    /// Checks the current host every second until `stopping`; when it no longer fits, selects
    /// again and moves the pools. Returns at once when there is a single host.
    pub async fn watch(&self, stopping: CancellationToken) {
        if self.hosts.hosts.len() < 2 {
            return;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(CHECK_INTERVAL) => {}
                () = stopping.cancelled() => return,
            }
            if self.current_fits().await {
                continue;
            }
            match self.hosts.select(CHECK_TIMEOUT).await {
                Ok(index) if index != self.current.load(Ordering::Relaxed) => {
                    self.switch(index);
                    if self.require_sync_standby
                        && let Some((pool, _)) = self.pools.first()
                    {
                        super::warn_without_sync_standby(pool).await;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(pools = self.label, %error, "no database host fits yet; checking again");
                }
            }
        }
    }

    /// Whether the current host still answers, with a session that fits. Asked on a
    /// connection of its own: a pool busy with writes is no sign of a dead host.
    async fn current_fits(&self) -> bool {
        let index = self.current.load(Ordering::Relaxed);
        let Some(host) = self.hosts.hosts.get(index) else {
            return true;
        };
        match probe(host, CHECK_TIMEOUT).await {
            Ok(session) => match self.hosts.attrs {
                // Any answering host fits; a standby is looked for again only when the
                // current host fails.
                SessionAttrs::PreferStandby => true,
                attrs => attrs.accepts(session),
            },
            Err(_) => false,
        }
    }

    fn switch(&self, index: usize) {
        let Some(host) = self.hosts.hosts.get(index) else {
            return;
        };
        let previous = self.current_host().to_owned();
        for (pool, options) in &self.pools {
            if let Some(options) = options.get(index) {
                pool.set_connect_options(options.clone());
            }
        }
        if let Ok(mut switched_at) = self.clock.lock() {
            *switched_at = Some(Instant::now());
        }
        self.current.store(index, Ordering::Relaxed);
        metrics::database_failover(self.label);
        tracing::warn!(
            pools = self.label,
            from = %previous,
            to = %host.name,
            "database host changed: new connections go to the new host"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_host_url_gives_one_set_of_options_per_host_and_keeps_the_rest() {
        let list = HostList::parse(
            "postgres://app:s3cret@db1:5433,db2,10.0.0.3:6000/events?target_session_attrs=read-write&sslmode=disable",
        )
        .expect("parse");
        assert_eq!(list.attrs, SessionAttrs::ReadWrite);
        let names: Vec<&str> = list.hosts.iter().map(|host| host.name.as_str()).collect();
        assert_eq!(names, ["db1:5433", "db2", "10.0.0.3:6000"]);
        let ports: Vec<u16> = list
            .hosts
            .iter()
            .map(|host| host.options.get_port())
            .collect();
        assert_eq!(ports, [5433, 5432, 6000]);
        for host in &list.hosts {
            assert_eq!(host.options.get_username(), "app");
            assert_eq!(host.options.get_database(), Some("events"));
        }
    }

    #[test]
    fn a_single_host_url_defaults_to_any_session() {
        let list = HostList::parse("postgresql://localhost/db").expect("parse");
        assert_eq!(list.attrs, SessionAttrs::Any);
        assert_eq!(list.hosts.len(), 1);
        assert!(HostList::parse("postgres://h/db?target_session_attrs=sideways").is_err());
        assert!(HostList::parse("h1,h2/db").is_err());
    }

    #[test]
    fn session_attrs_accept_the_servers_libpq_would() {
        let primary = Session {
            in_recovery: false,
            read_only: false,
        };
        let standby = Session {
            in_recovery: true,
            read_only: true,
        };
        let read_only_primary = Session {
            in_recovery: false,
            read_only: true,
        };
        assert!(SessionAttrs::ReadWrite.accepts(primary));
        assert!(!SessionAttrs::ReadWrite.accepts(standby));
        assert!(!SessionAttrs::ReadWrite.accepts(read_only_primary));
        assert!(SessionAttrs::Primary.accepts(read_only_primary));
        assert!(SessionAttrs::Standby.accepts(standby));
        assert!(SessionAttrs::ReadOnly.accepts(read_only_primary));
        assert!(SessionAttrs::Any.accepts(standby));
    }
}
