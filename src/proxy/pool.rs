//! Upstream connections driven by the device connection's own task.
//!
//! A pooled client (hyper-util's) runs each upstream connection in a task of its own, so
//! every request crosses two tasks and a channel each way. Here the device connection's task
//! drives the upstream connection its request is on: [`Lane::drive`] polls it next to the
//! device's HTTP connection, so a request and its response move within one task, as they do
//! in an event-loop proxy's callback.
//!
//! Between requests an upstream connection waits in the [`Pool`], polled by nobody; taking
//! one out polls it once to learn whether the upstream closed it meanwhile. A connection is
//! given back when its response body has ended, and closed if the body was abandoned: a
//! device that goes away during a held Ping closes that Ping's upstream connection at once.
//! In Kerberos mode the pool is keyed by account, so a connection never carries two users.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::audit::CountingBody;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Whose connections a pool entry holds: `None` in header mode (any request may use any
/// connection), the account in Kerberos mode.
pub type PoolKey = Option<Arc<str>>;

/// One upstream HTTP/1 connection: the handle requests go out on, and the future that does
/// the connection's I/O (boxed: it moves between the pool and device tasks).
pub struct UpstreamConn {
    sender: http1::SendRequest<CountingBody>,
    io: Pin<Box<http1::Connection<Io, CountingBody>>>,
    key: PoolKey,
    idle_since: Instant,
}

impl UpstreamConn {
    pub async fn open(io: Io, key: PoolKey) -> hyper::Result<UpstreamConn> {
        let (sender, io) = http1::Builder::new().handshake(io).await?;
        Ok(UpstreamConn {
            sender,
            io: Box::pin(io),
            key,
            idle_since: Instant::now(),
        })
    }

    /// Polls the connection once, outside any task: false when it has ended (the upstream
    /// closed it while it was idle) or cannot take a request now.
    fn still_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.as_mut().poll(&mut cx) {
            Poll::Ready(_) => false,
            Poll::Pending => self.sender.is_ready(),
        }
    }
}

/// Idle upstream connections by key, newest last.
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<UpstreamConn>>>,
    max_idle_per_key: usize,
    max_keys: usize,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

impl Pool {
    pub fn new(max_idle_per_key: usize, max_keys: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_key,
            max_keys: max_keys.max(1),
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    /// An empty pool with these settings, for at most `max_keys` keys.
    pub fn with_max_keys(&self, max_keys: usize) -> Arc<Pool> {
        Pool::new(self.max_idle_per_key, max_keys, self.idle_timeout)
    }

    /// The most recently used idle connection for `key` that is still open.
    fn take(&self, key: &PoolKey) -> Option<UpstreamConn> {
        let mut closed = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let conns = idle.get_mut(key)?;
            let mut found = None;
            while let Some(mut conn) = conns.pop() {
                if conn.idle_since.elapsed() < self.idle_timeout && conn.still_usable() {
                    found = Some(conn);
                    break;
                }
                closed.push(conn);
            }
            if conns.is_empty() {
                idle.remove(key);
            }
            found
        };
        drop(closed); // closes their sockets outside the lock
        found
    }

    /// Keeps a connection whose exchange ended cleanly for the next request, within bounds.
    fn give_back(self: &Arc<Pool>, mut conn: UpstreamConn) {
        if self.max_idle_per_key == 0 || conn.sender.is_closed() {
            return;
        }
        conn.idle_since = Instant::now();
        let refused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let full = idle.len() >= self.max_keys && !idle.contains_key(&conn.key);
            let conns = idle.entry(conn.key.clone()).or_default();
            if full || conns.len() >= self.max_idle_per_key {
                Some(conn)
            } else {
                conns.push(conn);
                None
            }
        };
        drop(refused);
        self.start_sweeper();
    }

    /// Closes idle connections past the idle timeout, every half timeout, while the pool
    /// exists (from the first connection given back: a runtime is running by then).
    fn start_sweeper(self: &Arc<Pool>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Pool> = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    fn sweep(&self) {
        let expired: Vec<UpstreamConn> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut expired = Vec::new();
            idle.retain(|_, conns| {
                let (old, fresh): (Vec<_>, Vec<_>) = conns
                    .drain(..)
                    .partition(|c| c.idle_since.elapsed() >= self.idle_timeout);
                expired.extend(old);
                *conns = fresh;
                !conns.is_empty()
            });
            expired
        };
        drop(expired);
    }
}

/// The upstream connection of one device connection, at most one at a time (HTTP/1 serves
/// its requests in turn).
#[derive(Default)]
pub struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    active: Option<(UpstreamConn, Arc<Pool>)>,
    /// Installed during the device connection's poll, not yet polled by the lane.
    fresh: bool,
}

/// Whether a request went out (the upstream may have acted on it) when sending failed.
pub enum SendError {
    /// Not written (no connection, or it closed first): it may go out on another one.
    Unsent(Option<hyper::Error>, Box<hyper::Request<CountingBody>>),
    Failed(hyper::Error),
}

impl Lane {
    /// Runs `device` (the device's HTTP connection) and drives this lane's upstream
    /// connection in the same task; completes when `device` does.
    pub fn drive<F: Future + Unpin>(self: &Arc<Lane>, device: F) -> Driven<'_, F> {
        Driven { lane: self, device }
    }

    /// Readies a connection for `key`: the lane's own if it fits, else an idle one from the
    /// pool. False when a new one must be opened.
    pub fn ready_conn(&self, pool: &Arc<Pool>, key: &PoolKey) -> bool {
        let mut state = self.lock();
        if let Some((conn, _)) = &state.active {
            if conn.key == *key && conn.sender.is_ready() {
                return true;
            }
        }
        // Another account's connection (a reload changed the mapping) or one not ready:
        // never reused here.
        state.active = None;
        drop(state);
        match pool.take(key) {
            Some(conn) => {
                self.install(conn, pool);
                true
            }
            None => false,
        }
    }

    /// Makes `conn` this lane's connection. Only a request of this device connection
    /// installs one, so always within [`Driven::poll`], which polls it next.
    pub fn install(&self, conn: UpstreamConn, pool: &Arc<Pool>) {
        let mut state = self.lock();
        state.active = Some((conn, Arc::clone(pool)));
        state.fresh = true;
    }

    /// Polls the lane's connection, if any; drops it once it has ended.
    fn poll_upstream(&self, cx: &mut Context<'_>) {
        let mut state = self.lock();
        state.fresh = false;
        if let Some((conn, _)) = &mut state.active {
            if let Poll::Ready(result) = conn.io.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(target: "seg::upstream", error = %e, "upstream connection ended");
                }
                state.active = None;
            }
        }
    }

    /// Sends on the lane's connection; the response body keeps the lane so the connection
    /// goes back to the pool when the body ends.
    pub async fn send(
        self: &Arc<Lane>,
        request: hyper::Request<CountingBody>,
    ) -> Result<hyper::Response<UpstreamBody>, SendError> {
        let sent = {
            let mut state = self.lock();
            match &mut state.active {
                Some((conn, _)) => conn.sender.try_send_request(request),
                // Closed since it was installed.
                None => return Err(SendError::Unsent(None, Box::new(request))),
            }
        };
        match sent.await {
            Ok(response) => Ok(response.map(|body| UpstreamBody {
                inner: body,
                lane: Some(Arc::clone(self)),
            })),
            Err(mut e) => {
                self.lock().active = None;
                match e.take_message() {
                    Some(request) => {
                        Err(SendError::Unsent(Some(e.into_error()), Box::new(request)))
                    }
                    None => Err(SendError::Failed(e.into_error())),
                }
            }
        }
    }

    /// The exchange on the lane's connection ended: cleanly (the connection goes back to
    /// the pool) or not (it is closed).
    fn finish(&self, clean: bool) {
        let active = self.lock().active.take();
        if let (true, Some((conn, pool))) = (clean, active) {
            pool.give_back(conn);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The device connection and its lane, polled together; see [`Lane::drive`].
pub struct Driven<'a, F> {
    lane: &'a Arc<Lane>,
    device: F,
}

impl<F: Future + Unpin> Future for Driven<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Upstream first: a response that arrived is then handed on in this same poll.
        self.lane.poll_upstream(cx);
        let polled = Pin::new(&mut self.device).poll(cx);
        // A request just put a connection in the lane: polled now, so the request goes out
        // without another round through the scheduler.
        if polled.is_pending() && self.lane.lock().fresh {
            self.lane.poll_upstream(cx);
        }
        polled
    }
}

/// An upstream response body. When it ends the connection returns to the pool; dropped
/// before its end, the connection is closed (HTTP/1 cannot abandon half a response).
pub struct UpstreamBody {
    inner: Incoming,
    lane: Option<Arc<Lane>>,
}

impl UpstreamBody {
    fn ended(&mut self, clean: bool) {
        if let Some(lane) = self.lane.take() {
            lane.finish(clean);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended(true),
            Poll::Ready(Some(Err(_))) => self.ended(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended(true),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let clean = self.inner.is_end_stream();
        self.ended(clean);
    }
}
