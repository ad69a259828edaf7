//! Erasures every writer applies: a Delete or Anonymize is recorded (the `erasures` table)
//! before its work starts and marked finished when it ends, and every write to PostgreSQL, on
//! any node, erases (or anonymizes) the events it covers that were admitted before it ended.
//! So an event acknowledged before a Delete returns is never found after it, whether it sat in
//! this node's buffer, another node's spool, or the broker while the Delete ran.
//!
//! Ordering is by one lock: a write transaction holds it shared while it reads the erasures
//! and commits its rows; recording an erasure takes it exclusively. A write under way when an
//! erasure is recorded commits first (its rows are then there for the Delete to find); a write
//! that starts later sees the erasure. Admission times come from the nodes' clocks, so an
//! erasure reaches events admitted up to [`CLOCK_MARGIN`] after it ended: it errs toward
//! erasing.

use std::{borrow::Cow, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::{event::ValidEvent, glob::ServiceGlobs, privacy::Privacy};

/// How far the nodes' clocks may disagree: an erasure reaches events admitted up to this long
/// after it ended.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// What an erasure does to the events it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Delete,
    /// The user's events stay, under this pseudonym, their link to the person gone.
    Anonymize {
        pseudonym: String,
    },
}

/// One erasure: whose events, of which services and time range.
#[derive(Debug, Clone)]
pub struct Erasure {
    pub kind: Kind,
    /// In stored form.
    pub user_id: Option<String>,
    /// Only these services; empty: any.
    pub services: Vec<String>,
    /// The globs of the services the erasing caller may change; None: every service.
    pub service_globs: Option<Vec<String>>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

impl Erasure {
    /// Records the erasure before its work starts, after every write under way committed;
    /// gives its id, for [`finish`].
    pub async fn record(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        let (kind, pseudonym) = self.kind_columns();
        let mut transaction = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.erasures'))")
            .execute(&mut *transaction)
            .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO erasures (kind, user_id, services, service_globs, start_ts, end_ts, pseudonym) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(kind)
        .bind(&self.user_id)
        .bind(&self.services)
        .bind(&self.service_globs)
        .bind(self.start)
        .bind(self.end)
        .bind(pseudonym)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(id)
    }
}

impl Erasure {
    /// Records an erasure applied again after a restore (`erasure::reapply`), with the times
    /// of the original call: it reaches what was admitted before it ended, no later.
    pub async fn record_again(
        &self,
        pool: &PgPool,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let (kind, pseudonym) = self.kind_columns();
        let mut transaction = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.erasures'))")
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO erasures (kind, user_id, services, service_globs, start_ts, end_ts, pseudonym, started_at, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(kind)
        .bind(&self.user_id)
        .bind(&self.services)
        .bind(&self.service_globs)
        .bind(self.start)
        .bind(self.end)
        .bind(pseudonym)
        .bind(started_at)
        .bind(finished_at)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await
    }

    /// The `kind` and `pseudonym` columns.
    fn kind_columns(&self) -> (&'static str, Option<&str>) {
        match &self.kind {
            Kind::Delete => ("delete", None),
            Kind::Anonymize { pseudonym } => ("anonymize", Some(pseudonym.as_str())),
        }
    }
}

/// Marks an erasure ended: from now on it reaches only events admitted before (and within
/// [`CLOCK_MARGIN`] after).
pub async fn finish(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE erasures SET finished_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Forgets erasures that ended longer ago than `older_than`: no event admitted before them
/// is still kept anywhere (the lifecycle job passes the longest retention).
pub async fn expire(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    // A call that could not mark its erasure finished (the database went away at its end)
    // would erase the user's new events for ever: a day after it started, it counts as ended.
    sqlx::query(
        "UPDATE erasures SET finished_at = started_at + interval '1 day' \
         WHERE finished_at IS NULL AND started_at < now() - interval '1 day'",
    )
    .execute(pool)
    .await?;
    let deleted =
        sqlx::query("DELETE FROM erasures WHERE finished_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(pool)
            .await?
            .rows_affected();
    Ok(deleted)
}

struct Row {
    kind: String,
    user_id: Option<String>,
    services: Vec<String>,
    service_globs: Option<Vec<String>>,
    start_ts: Option<DateTime<Utc>>,
    end_ts: Option<DateTime<Utc>>,
    pseudonym: Option<String>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Row {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            kind: row.try_get("kind")?,
            user_id: row.try_get("user_id")?,
            services: row.try_get("services")?,
            service_globs: row.try_get("service_globs")?,
            start_ts: row.try_get("start_ts")?,
            end_ts: row.try_get("end_ts")?,
            pseudonym: row.try_get("pseudonym")?,
        })
    }
}

/// The erasures that reach one write.
#[derive(Debug, Default)]
pub struct Reaching {
    erasures: Vec<(Erasure, ServiceGlobs)>,
}

impl Reaching {
    /// Takes the erasure lock (shared) for the caller's transaction, then reads the erasures
    /// that reach events admitted at `admitted` (None: not known, every recorded erasure).
    pub async fn read(
        connection: &mut PgConnection,
        admitted: Option<DateTime<Utc>>,
    ) -> Result<Self, sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT kind, user_id, services, service_globs, start_ts, end_ts, pseudonym \
             FROM sluice_erasures_reaching($1, make_interval(secs => $2))",
        )
        .bind(admitted)
        .bind(CLOCK_MARGIN.as_secs_f64())
        .fetch_all(connection)
        .await?;
        let erasures = rows
            .into_iter()
            .map(|row| {
                let kind = match (row.kind.as_str(), row.pseudonym) {
                    ("anonymize", Some(pseudonym)) => Kind::Anonymize { pseudonym },
                    _ => Kind::Delete,
                };
                // Globs were checked when the policy was built; one that no longer builds
                // would mean every service, which errs toward erasing.
                let globs = match &row.service_globs {
                    Some(globs) => ServiceGlobs::new(globs).unwrap_or_else(|_| ServiceGlobs::all()),
                    None => ServiceGlobs::all(),
                };
                let erasure = Erasure {
                    kind,
                    user_id: row.user_id,
                    services: row.services,
                    service_globs: row.service_globs,
                    start: row.start_ts,
                    end: row.end_ts,
                };
                (erasure, globs)
            })
            .collect();
        Ok(Self { erasures })
    }

    pub fn is_empty(&self) -> bool {
        self.erasures.is_empty()
    }

    /// `event` as it may be written: None when an erasure deletes it, anonymized when one
    /// anonymizes it, itself otherwise.
    pub fn apply<'a>(
        &self,
        event: &'a ValidEvent,
        privacy: &Privacy,
    ) -> Option<Cow<'a, ValidEvent>> {
        let mut event = Cow::Borrowed(event);
        for (erasure, globs) in &self.erasures {
            if !covers(erasure, globs, &event) {
                continue;
            }
            match &erasure.kind {
                Kind::Delete => return None,
                Kind::Anonymize { pseudonym } => {
                    privacy.anonymize_event(event.to_mut(), pseudonym);
                }
            }
        }
        Some(event)
    }
}

/// Whether `erasure` covers `event`: its user, services and time range, within the services
/// the erasing caller may change.
fn covers(erasure: &Erasure, globs: &ServiceGlobs, event: &ValidEvent) -> bool {
    erasure
        .user_id
        .as_ref()
        .is_none_or(|user| event.user_id.as_ref() == Some(user))
        && (erasure.services.is_empty() || erasure.services.contains(&event.service))
        && erasure.start.is_none_or(|start| event.timestamp >= start)
        && erasure.end.is_none_or(|end| event.timestamp < end)
        && globs.allows(&event.service)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erasure(kind: Kind, user: &str, services: &[&str], globs: Option<&[&str]>) -> Erasure {
        Erasure {
            kind,
            user_id: Some(user.to_owned()),
            services: services
                .iter()
                .map(|service| (*service).to_owned())
                .collect(),
            service_globs: globs.map(|globs| globs.iter().map(|glob| (*glob).to_owned()).collect()),
            start: None,
            end: None,
        }
    }

    fn reaching(erasures: Vec<Erasure>) -> Reaching {
        Reaching {
            erasures: erasures
                .into_iter()
                .map(|erasure| {
                    let globs = erasure
                        .service_globs
                        .as_ref()
                        .map_or_else(ServiceGlobs::all, |globs| {
                            ServiceGlobs::new(globs).expect("globs")
                        });
                    (erasure, globs)
                })
                .collect(),
        }
    }

    fn privacy() -> Privacy {
        let keys = crate::privacy::keys::generate().expect("keys");
        Privacy::ephemeral(&crate::config::PrivacyConfig::default(), &keys)
    }

    fn event(user: &str, service: &str) -> ValidEvent {
        ValidEvent {
            user_id: Some(user.to_owned()),
            service: service.to_owned(),
            ..ValidEvent::sample(0)
        }
    }

    #[test]
    fn a_delete_takes_its_users_events_within_its_services_and_the_callers() {
        let privacy = privacy();
        let deletes = reaching(vec![erasure(Kind::Delete, "u", &[], Some(&["billing*"]))]);
        assert!(deletes.apply(&event("u", "billing"), &privacy).is_none());
        assert!(
            deletes.apply(&event("u", "checkout"), &privacy).is_some(),
            "not the caller's"
        );
        assert!(
            deletes.apply(&event("v", "billing"), &privacy).is_some(),
            "another user"
        );
        let scoped = reaching(vec![erasure(Kind::Delete, "u", &["web"], None)]);
        assert!(scoped.apply(&event("u", "web"), &privacy).is_none());
        assert!(scoped.apply(&event("u", "api"), &privacy).is_some());
    }

    #[test]
    fn an_anonymize_keeps_the_event_under_the_pseudonym() {
        let privacy = privacy();
        let anonymize = reaching(vec![erasure(
            Kind::Anonymize {
                pseudonym: "anon:1".to_owned(),
            },
            "u",
            &[],
            None,
        )]);
        let theirs = event("u", "web");
        let kept = anonymize.apply(&theirs, &privacy).expect("kept");
        assert_eq!(kept.user_id.as_deref(), Some("anon:1"));
        assert!(matches!(
            anonymize.apply(&event("v", "web"), &privacy),
            Some(Cow::Borrowed(_))
        ));
    }
}
