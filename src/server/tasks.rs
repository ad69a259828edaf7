//! A group of background tasks with one cancellation token: the server starts each group's
//! tasks and stops the groups one after the other, in the teardown order of
//! [`super::background::Background::shutdown`].

use std::future::Future;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Debug, Default)]
pub struct TaskGroup {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl TaskGroup {
    /// A group cancelled on its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// A group also cancelled when `parent` is.
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            tracker: TaskTracker::new(),
        }
    }

    /// The group's token, for tasks that watch it and end in their own time (a consumer
    /// finishing its batch).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Runs `task`, which watches [`Self::token`] itself.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Runs `task` until it ends or the group is cancelled; then it is dropped where it
    /// waits (the loops that only sleep and retry).
    pub fn spawn_until_cancelled(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker
            .spawn(self.token.clone().run_until_cancelled_owned(task));
    }

    /// Resolves once every task of the group has ended, without cancelling them.
    pub async fn finished(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Cancels the group and waits for its tasks.
    pub async fn stop(&self) {
        self.token.cancel();
        self.finished().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn stop_drops_waiting_loops_and_waits_for_tasks_that_watch_the_token() {
        let group = TaskGroup::new();
        let (done, mut finished) = tokio::sync::mpsc::channel::<&str>(2);
        group.spawn_until_cancelled(async {
            std::future::pending::<()>().await;
        });
        let token = group.token();
        let watcher = done.clone();
        group.spawn(async move {
            token.cancelled().await;
            // Ends in its own time, after the cancellation.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = watcher.send("watcher").await;
        });
        group.stop().await;
        drop(done);
        assert_eq!(finished.recv().await, Some("watcher"));
    }

    #[tokio::test]
    async fn a_child_group_is_cancelled_with_its_parent() {
        let parent = CancellationToken::new();
        let group = TaskGroup::child_of(&parent);
        parent.cancel();
        assert!(group.token().is_cancelled());
    }
}
