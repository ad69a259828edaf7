//! Export's rows, window by window ([`super::time_windows`]: the part of the range in each
//! partition), read ahead. The windows take turns on two connections in one snapshot (the
//! export's transaction, and a second one that imports its snapshot), so PostgreSQL sorts
//! the next partition's matches while this one's rows stream to the client. Each connection
//! hands its rows over in batches through a small bounded channel, and stops reading while
//! the channel is full, so memory stays flat. The second connection is taken only while at
//! least half the read pool stays for Query, Stats and other exports; without it, or on a hot
//! standby (which cannot export a snapshot), one connection reads every window in turn.

use std::time::Duration;

use futures::TryStreamExt;
use sqlx::{AssertSqlSafe, PgPool, Postgres, QueryBuilder, postgres::PgRow};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{filter::Filter, store};

/// Rows handed over at once.
const ROWS_PER_BATCH: usize = 256;
/// Batches a connection reads ahead of the export.
const BATCHES_AHEAD: usize = 4;
/// Longest wait for the second connection; past it, one connection reads every window.
const SECOND_CONNECTION_WAIT: Duration = Duration::from_millis(200);

pub(super) type ExportTransaction = sqlx::Transaction<'static, Postgres>;

/// What a connection hands over: rows of the window it reads, or that window's end.
enum Read {
    Rows(Vec<PgRow>),
    WindowEnd,
}

/// One connection reading its share of the windows (every other one), in order.
struct Reader {
    reads: mpsc::Receiver<Result<Read, sqlx::Error>>,
    /// Ends once the reader's last window is read and its transaction committed (at once,
    /// so that it never sits idle in a transaction while the other connection streams).
    task: JoinHandle<Result<(), sqlx::Error>>,
}

/// The rows of every window, in order.
pub(super) struct Windows {
    readers: Vec<Reader>,
    /// The window whose rows come next, and how many there are.
    window: usize,
    windows: usize,
}

impl Windows {
    /// Starts reading `windows` on `transaction`, and on a second connection in its snapshot
    /// when the read pool has one free and there is more than one window.
    pub(super) async fn start(
        pool: &PgPool,
        mut transaction: ExportTransaction,
        windows: Vec<Filter>,
        idle: Duration,
    ) -> Result<Self, sqlx::Error> {
        let count = windows.len();
        let second = if count > 1 {
            second_transaction(pool, &mut transaction, idle).await?
        } else {
            None
        };
        let transactions: Vec<ExportTransaction> =
            std::iter::once(transaction).chain(second).collect();
        let turns = transactions.len();
        let readers = transactions
            .into_iter()
            .enumerate()
            .map(|(turn, transaction)| {
                let share: Vec<Filter> =
                    windows.iter().skip(turn).step_by(turns).cloned().collect();
                let (sender, reads) = mpsc::channel(BATCHES_AHEAD);
                let task = tokio::spawn(read(transaction, share, sender));
                Reader { reads, task }
            })
            .collect();
        Ok(Self {
            readers,
            window: 0,
            windows: count,
        })
    }

    /// The next rows, in order; `None` once every window is read.
    pub(super) async fn next_rows(&mut self) -> Result<Option<Vec<PgRow>>, sqlx::Error> {
        while self.window < self.windows {
            let turns = self.readers.len();
            let reader = &mut self.readers[self.window % turns];
            match reader.reads.recv().await {
                Some(Ok(Read::Rows(rows))) => return Ok(Some(rows)),
                Some(Ok(Read::WindowEnd)) => self.window += 1,
                Some(Err(error)) => return Err(error),
                // The reader ended without saying why: it panicked.
                None => return Err(sqlx::Error::WorkerCrashed),
            }
        }
        Ok(None)
    }

    /// Waits, once every row is read, for the readers to commit.
    pub(super) async fn finish(mut self) -> Result<(), sqlx::Error> {
        for reader in std::mem::take(&mut self.readers) {
            drop(reader.reads);
            reader
                .task
                .await
                .map_err(|_| sqlx::Error::WorkerCrashed)??;
        }
        Ok(())
    }
}

impl Drop for Windows {
    /// An export that ends early (its client gone, an error) stops its readers at once; their
    /// transactions roll back.
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.task.abort();
        }
    }
}

/// A second transaction in the snapshot of `transaction`, when the read pool can spare a
/// connection (at least half of it stays for the other readers) and the server can export
/// its snapshot (a hot standby cannot).
async fn second_transaction(
    pool: &PgPool,
    transaction: &mut ExportTransaction,
    idle: Duration,
) -> Result<Option<ExportTransaction>, sqlx::Error> {
    let max = pool.options().get_max_connections();
    let in_use = pool.size().saturating_sub(pool.num_idle() as u32);
    if (in_use + 1) * 2 > max {
        return Ok(None);
    }
    let Ok(second) = tokio::time::timeout(SECOND_CONNECTION_WAIT, pool.begin()).await else {
        return Ok(None);
    };
    let mut second = second?;
    let snapshot: Option<String> = sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_export_snapshot() END",
    )
    .fetch_one(&mut **transaction)
    .await?;
    // An id is hex digits and dashes (`00000003-0000001B-1`); it cannot be a bind parameter.
    let Some(snapshot) = snapshot.filter(|id| {
        !id.is_empty()
            && id
                .bytes()
                .all(|byte| byte.is_ascii_hexdigit() || byte == b'-')
    }) else {
        return Ok(None);
    };
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *second)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "SET TRANSACTION SNAPSHOT '{snapshot}'"
    )))
    .execute(&mut *second)
    .await?;
    super::settings(&mut second, idle).await?;
    Ok(Some(second))
}

/// Reads `windows` in order on `transaction`, handing their rows over in batches, then
/// commits. An error while reading is handed over in the rows' place (the export meets it in
/// order); only the commit's is returned.
async fn read(
    mut transaction: ExportTransaction,
    windows: Vec<Filter>,
    sender: mpsc::Sender<Result<Read, sqlx::Error>>,
) -> Result<(), sqlx::Error> {
    for window in windows {
        match read_window(&mut transaction, &window, &sender).await {
            Ok(true) => {}
            // The export is gone: its transaction rolls back.
            Ok(false) => return Ok(()),
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return Ok(());
            }
        }
    }
    transaction.commit().await
}

/// One window's rows, then its end; false when the export is gone.
async fn read_window(
    transaction: &mut ExportTransaction,
    window: &Filter,
    sender: &mpsc::Sender<Result<Read, sqlx::Error>>,
) -> Result<bool, sqlx::Error> {
    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {} FROM events", store::line::EVENT_COLUMNS));
    window.push_where(&mut query);
    query.push(" ORDER BY ts, id");
    let mut rows = query.build().fetch(&mut **transaction);
    let mut batch = Vec::with_capacity(ROWS_PER_BATCH);
    while let Some(row) = rows.try_next().await? {
        batch.push(row);
        if batch.len() == ROWS_PER_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(ROWS_PER_BATCH));
            if sender.send(Ok(Read::Rows(full))).await.is_err() {
                return Ok(false);
            }
        }
    }
    if !batch.is_empty() && sender.send(Ok(Read::Rows(batch))).await.is_err() {
        return Ok(false);
    }
    Ok(sender.send(Ok(Read::WindowEnd)).await.is_ok())
}
