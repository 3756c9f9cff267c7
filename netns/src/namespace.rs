use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::Error;

/// An open handle to a network namespace.
///
/// Holding the handle keeps the namespace alive, even after its last process
/// exits or its name is removed.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    name: String,
}

impl NetNs {
    /// Opens a namespace by path: `/run/netns/<name>`, `/proc/<pid>/ns/net`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(NetNs {
            fd: file.into(),
            name: path.display().to_string(),
        })
    }

    /// Opens a namespace created by `ip netns add <name>`.
    pub fn named(name: &str) -> Result<Self, Error> {
        let mut ns = Self::open(Path::new("/run/netns").join(name))?;
        ns.name = name.to_string();
        ns.check_is_netns().map(|()| ns)
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, Error> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Wraps a descriptor received from elsewhere (e.g. over the handoff
    /// socket), after checking it really is a network namespace.
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> Result<Self, Error> {
        let ns = NetNs {
            fd,
            name: name.into(),
        };
        ns.check_is_netns()?;
        Ok(ns)
    }

    /// A label for logs: the name or path it was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Inode number: equal for two handles of the same namespace.
    pub fn inode(&self) -> Result<u64, Error> {
        let file = File::from(self.fd.try_clone()?);
        Ok(file.metadata()?.ino())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns
    /// its result. Sockets `f` creates stay in this namespace.
    ///
    /// The thread is created for the call and ends with it, so the caller's
    /// own thread never changes namespace. For frequent use from async code,
    /// see [`NetNsExecutor`](crate::NetNsExecutor).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_current_thread()?;
                    Ok(f())
                })
                .join()
                .map_err(|_| Error::Panicked {
                    name: self.name.clone(),
                })?
        })
    }

    /// Moves the calling thread into this namespace. Only for threads that
    /// exist to work in namespaces: a thread shared with other work must not
    /// change namespace under it.
    pub(crate) fn enter_current_thread(&self) -> Result<(), Error> {
        move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
            Error::Enter {
                name: self.name.clone(),
                source: e.into(),
            }
        })
    }

    /// Makes `command` start inside this namespace.
    ///
    /// The handle must stay open until the command is spawned.
    pub fn enter_in_child(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let raw = self.fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setns system call, which is async-signal-safe; `raw` is
        // open in the child because descriptors are closed on exec, not fork.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(raw);
                move_into_link_name_space(fd, Some(LinkNameSpaceType::Network))
                    .map_err(std::io::Error::from)
            });
        }
    }

    fn check_is_netns(&self) -> Result<(), Error> {
        // Entering it once, on a throwaway thread, is the one check that
        // cannot be fooled: setns refuses anything but a network namespace.
        // A bad descriptor fails here instead of later in the data path.
        self.run(|| ())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
