//! A TCP proxy in the test process between one daemon and a server (PostgreSQL, Redis), which
//! the test switches between passing traffic, refusing it and silently dropping it: a network
//! partition between that one instance and the server, without touching the server.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Closes (resets) every connection it carries and every new one at once.
    Refuse,
    /// Accepts connections and keeps them open but forwards nothing, either way: bytes wait in
    /// the kernel's buffers until the mode is `Pass` again (a partition that heals), or are
    /// thrown away with the connection by `Refuse`.
    Blackhole,
}

struct Shared {
    mode: Mutex<Mode>,
    /// Raised by every switch to `Refuse`: connections opened under an older value close.
    refusals: AtomicU64,
    stopped: AtomicBool,
}

/// A proxy on a loopback port of its own to `upstream`; stops when dropped.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

/// How often a stalled forwarder looks at the mode again.
const POLL: Duration = Duration::from_millis(20);

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            refusals: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let shared = accepting.clone();
                std::thread::spawn(move || carry(client, upstream, shared));
            }
        });
        Proxy { port, shared }
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap()
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        if mode == Mode::Refuse {
            self.shared.refusals.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.set(Mode::Refuse);
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Closes a socket with a reset (SO_LINGER 0), as a refused or broken connection looks.
pub fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

fn carry(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let born = shared.refusals.load(Ordering::SeqCst);
    // A new connection waits (accepted, silent) while the proxy drops traffic.
    loop {
        if shared.stopped.load(Ordering::SeqCst) || shared.refusals.load(Ordering::SeqCst) != born {
            return reset(client);
        }
        match *shared.mode.lock().unwrap() {
            Mode::Pass => break,
            Mode::Refuse => return reset(client),
            Mode::Blackhole => {}
        }
        std::thread::sleep(POLL);
    }
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up_shared = shared.clone();
    let up = std::thread::spawn(move || pump(c2, s2, &up_shared, born));
    pump(server, client, &shared, born);
    let _ = up.join();
}

/// Copies `from` to `to` while the mode is `Pass`; stalls (reads nothing) while it is
/// `Blackhole`; closes both sockets on `Refuse`, stop, end of stream or error.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, born: u64) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.stopped.load(Ordering::SeqCst) || shared.refusals.load(Ordering::SeqCst) != born {
            break;
        }
        if *shared.mode.lock().unwrap() == Mode::Blackhole {
            std::thread::sleep(POLL);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
