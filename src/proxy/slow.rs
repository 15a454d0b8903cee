//! Slow devices: the request body that trickles and the device that stops reading.
//!
//! The TLS handshake (`listen.handshake_timeout`), the request head (`listen.idle_timeout`,
//! in `connection`) and a write the device does not read (`listen.write_timeout`, in
//! `tls_conn`) have their own limits. What is left is bounded here: a request body must
//! keep a minimum pace (`PacedBody`). No limit counts silence: a held Ping, which sends
//! nothing for up to an hour in either direction, is never cut by them.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::upstream::exchange::BodyFault;

/// The pace a request body must keep: `min_rate` bytes per second averaged over each window
/// of `window`, and never less than one byte per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    pub window: Duration,
    pub min_rate: u64,
}

impl BodyPace {
    /// Bytes one window must bring.
    fn required(self) -> u64 {
        let bytes = (self.min_rate as f64 * self.window.as_secs_f64()).ceil() as u64;
        bytes.max(1)
    }
}

/// A request body held to a `BodyPace`. Time counts only while the body is waiting for the
/// device: a window that ran out while nobody polled (the upstream not reading) starts over
/// rather than blaming the device. When the pace is missed it fails with
/// `BodyFault::TooSlow`, which the exchange hands back as the device's fault.
pub struct PacedBody<B> {
    inner: B,
    pace: BodyPace,
    window_start: Instant,
    window_bytes: u64,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll found nothing: the body is waiting for the device.
    waiting: bool,
}

impl<B> PacedBody<B> {
    pub fn new(inner: B, pace: BodyPace) -> PacedBody<B> {
        PacedBody {
            inner,
            pace,
            window_start: Instant::now(),
            window_bytes: 0,
            timer: None,
            waiting: false,
        }
    }

    fn next_window(&mut self, now: Instant) {
        self.window_start = now;
        self.window_bytes = 0;
    }

    fn cut(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyFault>>> {
        Poll::Ready(Some(Err(BodyFault::TooSlow {
            received: self.window_bytes,
            required: self.pace.required(),
            window: self.pace.window,
        })))
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyFault>,
{
    type Data = Bytes;
    type Error = BodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let now = Instant::now();
        let expired = now >= this.window_start + this.pace.window;
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if expired {
                    // Waiting through the window's end without its bytes is the device's
                    // doing; a window that ended while nobody polled is not.
                    if this.waiting && this.window_bytes < this.pace.required() {
                        return this.cut();
                    }
                    this.next_window(now);
                }
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    this.window_bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    if expired {
                        this.next_window(now);
                    }
                }
                loop {
                    let deadline = this.window_start + this.pace.window;
                    let now = Instant::now();
                    if now >= deadline {
                        if this.window_bytes < this.pace.required() {
                            return this.cut();
                        }
                        this.next_window(now);
                        continue;
                    }
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    ready!(timer.as_mut().poll(cx));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;

    /// A body fed by the test, one chunk at a time.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = BodyFault;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    fn paced(window_secs: u64, min_rate: u64) -> (mpsc::Sender<Bytes>, PacedBody<Fed>) {
        let (tx, rx) = mpsc::channel(16);
        let pace = BodyPace {
            window: Duration::from_secs(window_secs),
            min_rate,
        };
        (tx, PacedBody::new(Fed(rx), pace))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_its_pace_is_read_to_the_end() {
        let (tx, body) = paced(10, 10);
        let feeder = tokio::spawn(async move {
            // 200 bytes every 5 s for a minute: 400 per 10 s window, 100 required.
            for _ in 0..12 {
                tx.send(Bytes::from(vec![b'x'; 200])).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let collected = body.collect().await.expect("paced body");
        assert_eq!(collected.to_bytes().len(), 2400);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_rate_is_cut_at_the_end_of_its_window() {
        // One byte a second; 10 bytes/s required over 10 s windows.
        let (tx, body) = paced(10, 10);
        let _feeder = tokio::spawn(async move {
            loop {
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = Instant::now();
        let error = body.collect().await.expect_err("cut");
        assert!(matches!(error, BodyFault::TooSlow { .. }), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_cut_even_at_rate_zero() {
        let (tx, body) = paced(30, 0);
        tx.send(Bytes::from_static(b"head")).await.unwrap();
        let started = Instant::now();
        let error = body.collect().await.expect_err("cut");
        assert!(matches!(error, BodyFault::TooSlow { .. }), "{error}");
        // The first window brought 4 bytes (enough at rate 0); the second brought none.
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_that_ran_out_unpolled_is_not_held_against_the_device() {
        let (tx, mut body) = paced(10, 100);
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        // Nobody polls for 30 s (the upstream is not reading); then the body continues.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        drop(tx);
        assert!(body.frame().await.is_none());
    }
}
