//! Users who opted out of tracking, held in memory so that the ingest check costs a hash and a
//! map lookup, never a database round trip. The node that serves OptOut/OptIn updates its set
//! at once; every node reloads the whole table every `privacy.optout_refresh` (2 s), which is
//! how the other nodes learn of it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use sqlx::{PgConnection, PgPool};

use super::SharedPrivacy;
use crate::config::Config;

/// Services a user opted out of: None for every service.
type Scope = Option<BTreeSet<String>>;

/// The opted-out users by key (the keyed hash of the plain id).
#[derive(Debug, Default)]
pub struct OptOuts {
    users: ArcSwap<HashMap<String, Scope>>,
}

/// The opted-out users at one moment ([`OptOuts::current`]).
#[derive(Debug)]
pub struct OptOutSet(Arc<HashMap<String, Scope>>);

impl OptOutSet {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the user (by key) opted out of `service`. Cheap when nobody did.
    pub fn refuses(&self, user_key: &str, service: &str) -> bool {
        match self.0.get(user_key) {
            None => false,
            Some(None) => true,
            Some(Some(services)) => services.contains(service),
        }
    }
}

/// What OptIn can refuse.
#[derive(Debug, thiserror::Error)]
pub enum OptInError {
    #[error("the user opted out of every service; opt in without services")]
    EveryService,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl OptOuts {
    /// The set as it is now, for checking many events (a request's) against one load.
    pub fn current(&self) -> OptOutSet {
        OptOutSet(self.users.load_full())
    }

    /// Reloads the set from the table.
    pub async fn refresh(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows: Vec<(String, Option<Vec<String>>)> =
            sqlx::query_as("SELECT user_key, services FROM privacy_optouts")
                .fetch_all(pool)
                .await?;
        let users: HashMap<String, Scope> = rows
            .into_iter()
            .map(|(key, services)| (key, services.map(|services| services.into_iter().collect())))
            .collect();
        let count = users.len();
        self.users.store(Arc::new(users));
        Ok(count)
    }

    /// Records an opt-out (of `services`, or of every service when empty), merged with an
    /// earlier one, and applies it to this node at once.
    pub async fn opt_out(
        &self,
        connection: &mut PgConnection,
        user_key: &str,
        services: &[String],
    ) -> Result<(), sqlx::Error> {
        let services = (!services.is_empty()).then(|| services.to_vec());
        let merged: Option<Vec<String>> = sqlx::query_scalar(
            "INSERT INTO privacy_optouts (user_key, services) VALUES ($1, $2) \
             ON CONFLICT (user_key) DO UPDATE SET updated_at = now(), services = \
             CASE WHEN privacy_optouts.services IS NULL OR excluded.services IS NULL THEN NULL \
             ELSE ARRAY(SELECT DISTINCT unnest(privacy_optouts.services || excluded.services) ORDER BY 1) END \
             RETURNING services",
        )
        .bind(user_key)
        .bind(services)
        .fetch_one(connection)
        .await?;
        self.apply(
            user_key,
            Some(merged.map(|services| services.into_iter().collect())),
        );
        Ok(())
    }

    /// Withdraws an opt-out (of `services`, or entirely when empty). Returns whether the user
    /// had one.
    pub async fn opt_in(
        &self,
        pool: &PgPool,
        user_key: &str,
        services: &[String],
    ) -> Result<bool, OptInError> {
        // One transaction: the row stays locked from the read to the write, so a concurrent
        // OptOut is never overwritten by a stale read.
        let mut transaction = pool.begin().await?;
        let connection: &mut PgConnection = &mut transaction;
        let current: Option<Option<Vec<String>>> = sqlx::query_scalar(
            "SELECT services FROM privacy_optouts WHERE user_key = $1 FOR UPDATE",
        )
        .bind(user_key)
        .fetch_optional(&mut *connection)
        .await?;
        let Some(current) = current else {
            return Ok(false);
        };
        let left: Option<BTreeSet<String>> = match (current, services.is_empty()) {
            (_, true) => None,
            (None, false) => return Err(OptInError::EveryService),
            (Some(current), false) => {
                let left: BTreeSet<String> = current
                    .into_iter()
                    .filter(|service| !services.contains(service))
                    .collect();
                (!left.is_empty()).then_some(left)
            }
        };
        match &left {
            None => {
                sqlx::query("DELETE FROM privacy_optouts WHERE user_key = $1")
                    .bind(user_key)
                    .execute(&mut *connection)
                    .await?;
            }
            Some(left) => {
                sqlx::query(
                    "UPDATE privacy_optouts SET services = $2, updated_at = now() WHERE user_key = $1",
                )
                .bind(user_key)
                .bind(left.iter().cloned().collect::<Vec<_>>())
                .execute(&mut *connection)
                .await?;
            }
        }
        transaction.commit().await?;
        self.apply(user_key, left.map(Some));
        Ok(true)
    }

    /// Sets one user's entry in this node's set (None: removed).
    fn apply(&self, user_key: &str, scope: Option<Scope>) {
        self.users.rcu(|users| {
            let mut users = HashMap::clone(users);
            match &scope {
                Some(scope) => {
                    users.insert(user_key.to_owned(), scope.clone());
                }
                None => {
                    users.remove(user_key);
                }
            }
            users
        });
    }
}

/// Reloads `optouts` every `every`, so that each node learns of opt-outs served by others. A
/// node still on throwaway keys when the first opt-out appears loads the key file (the one
/// every node must share), since opt-outs are keyed hashes.
pub async fn keep_fresh(
    optouts: Arc<OptOuts>,
    privacy: SharedPrivacy,
    config: Arc<Config>,
    pool: PgPool,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        match optouts.refresh(&pool).await {
            Ok(count) if count > 0 && privacy.load().is_ephemeral() => {
                match super::fingerprints::open(&config, &pool).await {
                    Ok(persistent) => privacy.store(Arc::new(persistent)),
                    Err(error) => tracing::error!(
                        %error,
                        "opt-outs exist but this node cannot load the privacy key file they were made with; they are not applied here"
                    ),
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot reload the opt-out list; keeping the last one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opt_out_covers_its_services_or_all_of_them() {
        let optouts = OptOuts::default();
        let before = optouts.current();
        assert!(!before.refuses("u", "a") && before.is_empty());
        optouts.apply("u", Some(Some(["a".to_owned()].into())));
        let now = optouts.current();
        assert!(now.refuses("u", "a") && !now.refuses("u", "b") && !now.is_empty());
        // A set taken before a change keeps what it held (a request is checked against one).
        assert!(!before.refuses("u", "a") && before.is_empty());
        optouts.apply("v", Some(None));
        assert!(optouts.current().refuses("v", "anything"));
        optouts.apply("u", None);
        assert!(!optouts.current().refuses("u", "a"));
    }
}
