use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::{Error, NetNs};

type Job = Box<dyn FnOnce() + Send>;

/// A dedicated thread that runs short jobs inside network namespaces for
/// async code.
///
/// Runtime worker threads never change namespace: a worker that entered a
/// pod's namespace and then ran another task would create that task's sockets
/// in the wrong place. Jobs here must be short and non-blocking (create a
/// socket, set options, bind); the slow part, such as `connect`, happens
/// afterwards on the runtime, because a socket keeps its namespace forever.
#[derive(Clone, Debug)]
pub struct NetNsExecutor {
    jobs: mpsc::Sender<Job>,
}

impl NetNsExecutor {
    /// Starts the thread.
    pub fn start() -> Result<Self, Error> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("netns-executor".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        Ok(NetNsExecutor { jobs })
    }

    /// Runs `f` inside `ns` and returns its result.
    pub async fn run<T, F>(&self, ns: &Arc<NetNs>, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let ns = ns.clone();
        let job: Job = Box::new(move || {
            // Entering is done for every job: it costs one system call and
            // means no job depends on what the previous one left behind.
            let result = ns.enter_current_thread().map(|()| f());
            let _ = tx.send(result);
        });
        self.jobs.send(job).map_err(|_| Error::ExecutorGone)?;
        rx.await.map_err(|_| Error::ExecutorGone)?
    }
}
