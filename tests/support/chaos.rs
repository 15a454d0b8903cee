//! A loopback TCP chaos proxy put in front of a real server (slapd, the Samba KDC, the
//! upstream), switched between faults while the test runs.
//!
//! Every accepted connection is paired with a fresh connection to the target and relayed by
//! one task that reads whichever side has bytes and writes them to the other, one chunk at a
//! time; before each chunk it looks at the current mode. What each mode does:
//!
//! | mode | new connections | existing connections |
//! |---|---|---|
//! | `Pass` | relayed | relayed |
//! | `Refuse` | the port stops listening: connects get ECONNREFUSED | reset (RST), as if the server died |
//! | `Blackhole` | accepted, bytes read and dropped, never answered, target never contacted | bytes in both directions read and dropped: the peer waits forever |
//! | `Delay(d)` | relayed, each chunk held for `d` first | the same |
//! | `ResetAfter(n)` | relayed until `n` bytes went target → client, then both sides reset | the same, counting from the moment the mode was set |
//! | `Flap { up, down }` | alternates `Pass` for `up` and `Refuse` for `down`, starting with `Pass` | as those two |
//!
//! Chunks go one at a time per connection, so `Delay` also serialises a multiplexed
//! connection (LDAP): a slow link, not only a slow server. Resets use `SO_LINGER` 0, so the
//! peer sees a real RST, not a FIN.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A fault (or none) the proxy applies; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Blackhole,
    Delay(Duration),
    ResetAfter(usize),
    Flap { up: Duration, down: Duration },
}

/// A running chaos proxy; stops (and resets its connections) on drop.
pub struct Chaos {
    pub addr: SocketAddr,
    /// The mode the test asked for (a `Flap` stays `Flap` here).
    requested: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Chaos {
    /// A proxy on a fresh loopback port relaying to `target`, starting in `mode`.
    pub async fn start(target: SocketAddr, mode: Mode) -> Chaos {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("chaos bind");
        let addr = listener.local_addr().expect("chaos addr");
        let (requested, requested_rx) = watch::channel(mode);
        let (effective, effective_rx) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run(
            listener,
            target,
            requested_rx,
            effective,
            effective_rx,
            Arc::clone(&accepted),
        ));
        Chaos {
            addr,
            requested,
            accepted,
            task,
        }
    }

    /// Switches the mode; existing connections follow at their next chunk (or at once for
    /// `Refuse`).
    pub fn set(&self, mode: Mode) {
        self.requested.send_replace(mode);
    }

    /// Connections accepted so far (blackholed ones included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }

    /// `scheme://127.0.0.1:PORT`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Turns requested modes into effective ones (a flap alternates Pass and Refuse) and runs the
/// listener while the effective mode is not Refuse.
async fn run(
    listener: TcpListener,
    target: SocketAddr,
    mut requested: watch::Receiver<Mode>,
    effective: watch::Sender<Mode>,
    effective_rx: watch::Receiver<Mode>,
    accepted: Arc<AtomicUsize>,
) {
    let addr = listener.local_addr().expect("chaos addr");
    let mut listener = Some(listener);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let mode = *requested.borrow_and_update();
        // The phases of the requested mode: (effective mode, how long; None = until changed).
        let phases: Vec<(Mode, Option<Duration>)> = match mode {
            Mode::Flap { up, down } => vec![(Mode::Pass, Some(up)), (Mode::Refuse, Some(down))],
            other => vec![(other, None)],
        };
        'phases: for (phase, length) in phases.iter().cycle() {
            effective.send_replace(*phase);
            if *phase == Mode::Refuse {
                listener = None;
            } else if listener.is_none() {
                // The same port again (tokio sets SO_REUSEADDR); retried briefly if the
                // kernel still holds it.
                for _ in 0..50 {
                    if let Ok(l) = TcpListener::bind(addr).await {
                        listener = Some(l);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let until = async {
                match length {
                    Some(d) => tokio::time::sleep(*d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(until);
            loop {
                tokio::select! {
                    changed = requested.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break 'phases;
                    }
                    _ = &mut until => continue 'phases,
                    accept = async {
                        match &listener {
                            Some(l) => l.accept().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if let Ok((client, _)) = accept {
                            accepted.fetch_add(1, Ordering::AcqRel);
                            connections.spawn(relay(client, target, effective_rx.clone()));
                        }
                    }
                    // Reap finished relays so the set does not grow.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        }
    }
}

/// One client connection through the proxy.
async fn relay(mut client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    if *mode.borrow_and_update() == Mode::Blackhole {
        // Never contact the target; swallow whatever the client sends until it gives up, the
        // mode is Refuse (reset) or the proxy stops.
        let mut sink = [0u8; 4096];
        loop {
            tokio::select! {
                read = client.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                changed = mode.changed() => {
                    if changed.is_err() || *mode.borrow_and_update() == Mode::Refuse {
                        return reset(&client);
                    }
                }
            }
        }
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return reset(&client);
    };
    let _ = server.set_nodelay(true);
    let (mut up, mut down) = ([0u8; 16384], [0u8; 16384]);
    // Bytes sent target → client since the connection opened or the mode last changed.
    let mut sent_down = 0usize;
    loop {
        let (chunk, toward_client) = tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => (&up[..n], false),
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => (&down[..n], true),
            },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow_and_update() == Mode::Refuse {
                    reset(&server);
                    return reset(&client);
                }
                sent_down = 0;
                continue;
            }
        };
        let current = *mode.borrow();
        let (to, length) = match current {
            Mode::Blackhole | Mode::Refuse => continue,
            Mode::Delay(d) => {
                tokio::time::sleep(d).await;
                (chunk.len(), None)
            }
            Mode::ResetAfter(limit) if toward_client => {
                let room = limit.saturating_sub(sent_down);
                (chunk.len().min(room), Some(room))
            }
            _ => (chunk.len(), None),
        };
        let destination = if toward_client {
            &mut client
        } else {
            &mut server
        };
        if destination.write_all(&chunk[..to]).await.is_err() {
            return;
        }
        if toward_client {
            sent_down += to;
        }
        if length.is_some_and(|room| chunk.len() >= room) {
            // The limit is reached: the rest of this chunk is never delivered.
            let _ = client.flush().await;
            reset(&server);
            return reset(&client);
        }
    }
}

/// Closes with RST: `SO_LINGER` 0, then drop.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
