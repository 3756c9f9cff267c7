//! A Unix `SOCK_SEQPACKET` socket that can carry file descriptors.
//!
//! Sequenced packets keep message boundaries (one protobuf message per
//! packet, no framing of our own) and descriptors travel in the same packet
//! as the message that explains them. The standard library offers neither,
//! so this wraps the system calls through `rustix`, which hands back owned
//! descriptors; only the peer's credentials are read through `libc` (see
//! [`Conn::peer_uid`]).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};

/// Largest message accepted; handoff messages are a few hundred bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors accepted with one message.
const MAX_FDS: usize = 4;

fn new_socket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds `path` (replacing a stale socket file) and listens. The socket
    /// file has `mode` (less the umask) from the moment it exists: Linux
    /// gives it the mode of the socket itself, which is set before binding,
    /// so there is no window in which others could connect.
    pub fn bind(path: &Path, mode: u32) -> std::io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let fd = new_socket()?;
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(mode))?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        rustix::net::listen(&fd, 64)?;
        Ok(Listener { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> std::io::Result<Conn> {
        let fd = rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC)?;
        Ok(Conn { fd })
    }
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    /// Connects to a listener at `path`.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let fd = new_socket()?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(Conn { fd })
    }

    /// The user id of the process at the other end, as the kernel recorded it
    /// when it connected (`SO_PEERCRED`): not something the peer can claim.
    ///
    /// Read with `libc` rather than rustix's `socket_peercred`: the kernel
    /// reports pid 0 for a peer whose process is not visible in this pid
    /// namespace (the CNI plugin runs in the host's, the ztunnel in its
    /// container's), and rustix's `UCred` cannot hold a pid of 0. Only the
    /// uid matters here, and it is always translated into our user namespace.
    pub fn peer_uid(&self) -> std::io::Result<u32> {
        use std::os::fd::AsRawFd;
        let mut credentials = libc::ucred {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        };
        let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the descriptor is open for as long as `self`; the kernel
        // writes at most `length` bytes into `credentials`, a `ucred` that
        // lives on this stack frame, and reports how many it wrote.
        #[allow(unsafe_code)]
        let result = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut credentials).cast(),
                &mut length,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if length as usize != std::mem::size_of::<libc::ucred>() {
            return Err(std::io::Error::other(format!(
                "SO_PEERCRED returned {length} bytes"
            )));
        }
        Ok(credentials.uid)
    }

    /// Bounds how long `recv` waits (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, timeout)?;
        Ok(())
    }

    /// Sends one message, with `fds` attached.
    pub fn send(&self, message: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other(
                "too many descriptors for one message",
            ));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(message)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != message.len() {
            return Err(std::io::Error::other("message truncated on send"));
        }
        Ok(())
    }

    /// Receives one message and the descriptors attached to it. An empty
    /// message means the peer closed the connection.
    pub fn recv(&self) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received_fds) = message {
                fds.extend(received_fds);
            }
        }
        if received.flags.contains(rustix::net::ReturnFlags::TRUNC)
            || received.flags.contains(rustix::net::ReturnFlags::CTRUNC)
        {
            return Err(std::io::Error::other(format!(
                "message larger than {MAX_MESSAGE} bytes or with more than {MAX_FDS} descriptors"
            )));
        }
        buf.truncate(received.bytes);
        Ok((buf, fds))
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_messages_and_descriptors() {
        let dir = std::env::temp_dir().join(format!("kanava-seqpacket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = Listener::bind(&path, 0o600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "the socket is private from the moment it exists"
        );
        let server = std::thread::spawn(move || {
            let conn = listener.accept().unwrap();
            assert_eq!(
                conn.peer_uid().unwrap(),
                rustix::process::getuid().as_raw(),
                "the kernel names the connecting user"
            );
            let (msg, fds) = conn.recv().unwrap();
            assert_eq!(msg, b"hello");
            assert_eq!(fds.len(), 1);
            let file = std::fs::File::from(fds.into_iter().next().unwrap());
            let len = file.metadata().unwrap().len();
            conn.send(format!("{len}").as_bytes(), &[]).unwrap();
            let (end, _) = conn.recv().unwrap();
            assert!(end.is_empty(), "close reads as an empty message");
        });
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let conn = Conn::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.send(b"hello", &[file.as_fd()]).unwrap();
        let (reply, _) = conn.recv().unwrap();
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            file.metadata().unwrap().len().to_string()
        );
        drop(conn);
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Where the helper below listens; set only when the test runs it.
    const HELPER_SOCKET: &str = "KANAVA_TEST_PEERCRED_SOCKET";

    /// Not a test of its own: the server half of the next test, run in a
    /// pid namespace of its own (as the ztunnel runs in its container's).
    /// It reads the uid of each of two peers and prints it.
    #[test]
    #[ignore = "run by names_a_peer_whose_pid_is_invisible_here"]
    fn peer_uid_server() {
        let Some(path) = std::env::var_os(HELPER_SOCKET) else {
            return;
        };
        let listener = Listener::bind(Path::new(&path), 0o666).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        println!("listening");
        for _ in 0..2 {
            let conn = listener.accept().unwrap();
            match conn.peer_uid() {
                Ok(uid) => println!("peer uid {uid}"),
                Err(error) => println!("peer uid error {error}"),
            }
            let _ = conn.send(b"ok", &[]);
        }
    }

    /// The ztunnel runs in its container's pid namespace and the CNI plugin
    /// in the host's: the kernel reports the plugin's pid as 0 to the
    /// ztunnel. Its uid must still be read, and a non-root peer told apart.
    /// Needs root to make the namespace; fails, not skips, without it.
    #[test]
    fn names_a_peer_whose_pid_is_invisible_here() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test makes a pid namespace and must run as root"
        );
        let dir = tempfile_dir("pidns");
        let path = dir.join("s.sock");
        let server = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seqpacket::tests::peer_uid_server",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_SOCKET, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) starts the server; the test needs root");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for uid in [None, Some(65534)] {
            let path = path.clone();
            std::thread::spawn(move || {
                if let Some(uid) = uid {
                    // Only this thread becomes that user.
                    rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).unwrap();
                }
                let conn = Conn::connect(&path).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                conn.recv().unwrap();
            })
            .join()
            .unwrap();
        }
        let output = server.wait_with_output().unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(printed.contains("peer uid 0\n"), "root is named: {printed}");
        assert!(
            printed.contains("peer uid 65534\n"),
            "a non-root peer is told apart: {printed}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir(what: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kanava-seqpacket-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
