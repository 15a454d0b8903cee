//! A bound on concurrent work against a dependency (directory lookups, KDC exchanges), with a
//! bounded queue: past the queue a caller is refused at once, so a storm of devices becomes
//! fast 503s instead of an unbounded pile of waiting tasks.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

pub struct WorkLimiter {
    permits: Semaphore,
    queued: AtomicUsize,
    max_queued: usize,
}

/// One place in the queue, given back however the wait ends.
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WorkLimiter {
    pub fn new(max_concurrent: usize, max_queued: usize) -> WorkLimiter {
        WorkLimiter {
            permits: Semaphore::new(max_concurrent),
            queued: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// A permit, waiting in the queue if there is room; `None` when the queue is full.
    pub async fn acquire(&self) -> Option<SemaphorePermit<'_>> {
        if let Some(permit) = self.try_acquire() {
            return Some(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _slot = QueueSlot(&self.queued);
        self.permits.acquire().await.ok()
    }

    /// A permit if one is free now, without queueing.
    pub fn try_acquire(&self) -> Option<SemaphorePermit<'_>> {
        self.permits.try_acquire().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_refuses_past_the_queue() {
        let limiter = WorkLimiter::new(1, 1);
        let first = limiter.acquire().await.unwrap();
        let queued = limiter.acquire();
        tokio::pin!(queued);
        // Poll once so the second caller takes the one queue slot.
        assert!(poll_once(queued.as_mut()).await.is_none());
        assert!(limiter.acquire().await.is_none(), "past the queue");
        drop(first);
        assert!(queued.await.is_some());
        assert_eq!(limiter.queued.load(Ordering::Acquire), 0);
        let none_queued = WorkLimiter::new(1, 0);
        let only = none_queued.acquire().await;
        assert!(only.is_some());
        assert!(none_queued.acquire().await.is_none());
    }

    async fn poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
