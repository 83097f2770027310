//! The bounded queue between the hub and one connection (its outbox).
//!
//! Why not `tokio::sync::mpsc`: it allocates its first 32-slot block and a cache-padded channel up front,
//! 1.8 KB for every connection, idle or not, which was a fifth of an idle subscriber's memory. This queue
//! allocates nothing until the first delivery, and gives its buffer back once drained after a burst. It has
//! the semantics the hub needs and no more: many senders (a connection's subscriptions), one receiver, a
//! `try_send` that never waits (a full queue means a slow client, which the hub disconnects), and `recv`
//! that ends when every sender is gone. A short mutex section per operation is cheap here: the fan-out is the
//! only producer that matters and it touches each queue once per publication.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// Buffers larger than this are released once the queue drains, so a burst does not pin memory on an idle
/// connection; smaller ones are kept for the next delivery.
const KEEP_CAPACITY: usize = 16;

struct Shared<T, E> {
    state: Mutex<State<T>>,
    waker: AtomicWaker,
    /// What both ends share besides the items, in the queue's own allocation (a Yjs connection's count of
    /// queued bytes): a separate `Arc` would cost every connection another allocation.
    extra: E,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// A drained buffer of more than this many items is released.
    keep: usize,
    senders: usize,
    receiver: bool,
    /// Closed by a sender: the receiver gets nothing more (the hub has disconnected this client).
    closed: bool,
}

/// Why `try_send` refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

pub struct Sender<T, E = ()>(Arc<Shared<T, E>>);

pub struct Receiver<T, E = ()>(Arc<Shared<T, E>>);

/// A queue holding at most `capacity` items (at least 1).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    channel_keeping(capacity, KEEP_CAPACITY)
}

/// A queue that gives its buffer back as soon as it holds more than `keep` items' room and is drained:
/// `keep = 0` for a queue that is rarely used (a connection's control queue, woken once per ping
/// interval), whose first delivery would otherwise pin a buffer of large items for the connection's life.
pub fn channel_keeping<T>(capacity: usize, keep: usize) -> (Sender<T>, Receiver<T>) {
    channel_with(capacity, keep, ())
}

/// [`channel_keeping`] with `extra` shared by both ends ([`Sender::extra`], [`Receiver::extra`]).
pub fn channel_with<T, E>(
    capacity: usize,
    keep: usize,
    extra: E,
) -> (Sender<T, E>, Receiver<T, E>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            keep,
            senders: 1,
            receiver: true,
            closed: false,
        }),
        waker: AtomicWaker::new(),
        extra,
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T, E> Sender<T, E> {
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut st = self.0.state.lock();
            if !st.receiver || st.closed {
                return Err(TrySendError::Closed(item));
            }
            if st.items.len() >= st.capacity {
                return Err(TrySendError::Full(item));
            }
            st.items.push_back(item);
        }
        self.0.waker.wake();
        Ok(())
    }
}

impl<T, E> Sender<T, E> {
    /// Ends the queue now: what is waiting is dropped, `recv` returns `None` and `closed` completes. A
    /// connection waits on this instead of a cancellation token of its own, which would cost every idle
    /// connection another allocation and a larger future.
    pub fn close(&self) {
        {
            let mut st = self.0.state.lock();
            st.closed = true;
            st.items = VecDeque::new();
        }
        self.0.waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.0.state.lock().closed
    }

    /// What this queue's ends share besides the items.
    pub fn extra(&self) -> &E {
        &self.0.extra
    }

    /// Takes everything waiting, leaving the queue open: for a producer that replaces a backlog with
    /// something shorter (a Yjs connection that fell behind is caught up with one merged update).
    pub fn take_all(&self) -> VecDeque<T> {
        std::mem::take(&mut self.0.state.lock().items)
    }
}

impl<T, E> Clone for Sender<T, E> {
    fn clone(&self) -> Self {
        self.0.state.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T, E> Drop for Sender<T, E> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.0.state.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.0.waker.wake();
        }
    }
}

impl<T, E> Receiver<T, E> {
    /// The next item; `None` once the queue is closed, or empty with every sender gone.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Register before looking, so a send between the look and the return still wakes us.
        self.0.waker.register(cx.waker());
        let mut st = self.0.state.lock();
        if st.closed {
            return Poll::Ready(None);
        }
        match pop(&mut st) {
            Some(item) => Poll::Ready(Some(item)),
            None if st.senders == 0 => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// What this queue's ends share besides the items.
    pub fn extra(&self) -> &E {
        &self.0.extra
    }

    /// An item if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        pop(&mut self.0.state.lock())
    }

    /// Completes when a sender closes the queue. Not to be awaited together with `recv` (they share one
    /// waker): a connection awaits it while a write of its own is stuck.
    pub async fn closed(&self) {
        poll_fn(|cx| {
            self.0.waker.register(cx.waker());
            if self.0.state.lock().closed {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl<T, E> Drop for Receiver<T, E> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.receiver = false;
        st.items = VecDeque::new();
    }
}

fn pop<T>(st: &mut State<T>) -> Option<T> {
    let item = st.items.pop_front();
    if st.items.is_empty() && st.items.capacity() > st.keep {
        st.items = VecDeque::new();
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_fifo_that_ends_when_senders_are_gone() {
        let (tx, mut rx) = channel::<u32>(2);
        let tx2 = tx.clone();
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx2.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
        drop(tx);
        assert_eq!(tx2.try_send(4), Ok(()), "one sender is enough");
        drop(tx2);
        assert_eq!(rx.recv().await, Some(4), "items outlive their senders");
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_from_another_task() {
        let (tx, mut rx) = channel::<u32>(4);
        let waiter = tokio::spawn(async move { (rx.recv().await, rx.recv().await) });
        tokio::task::yield_now().await;
        tokio::spawn(async move {
            tx.try_send(7).unwrap();
            // Dropping the last sender must wake the receiver too.
        });
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("receiver was not woken")
            .unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[tokio::test]
    async fn close_ends_the_queue_at_once_and_wakes_a_waiter() {
        let (tx, mut rx) = channel::<u32>(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        let waiter = tokio::spawn(async move {
            rx.closed().await;
            rx.recv().await
        });
        tokio::task::yield_now().await;
        assert!(!tx2.is_closed());
        tx2.close();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("closed() was not woken")
            .unwrap();
        assert_eq!(got, None, "a closed queue delivers nothing more");
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
    }

    #[test]
    fn take_all_empties_the_queue_and_leaves_it_open() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.take_all(), VecDeque::from([1, 2]));
        assert_eq!(rx.try_recv(), None);
        assert_eq!(tx.try_send(3), Ok(()), "room again, still open");
        assert_eq!(rx.try_recv(), Some(3));
    }

    #[test]
    fn sending_to_a_dropped_receiver_is_closed() {
        let (tx, rx) = channel::<u32>(4);
        tx.try_send(1).unwrap();
        drop(rx);
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let (tx, mut rx) = channel::<u64>(1000);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.0.state.lock().items.capacity() >= 500);
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.state.lock().items.capacity(), 0);
        tx.try_send(1).unwrap();
        rx.try_recv();
        assert!(
            rx.0.state.lock().items.capacity() <= KEEP_CAPACITY,
            "small buffers stay"
        );
        let (tx, mut rx) = channel_keeping::<u64>(64, 0);
        tx.try_send(1).unwrap();
        assert!(rx.0.state.lock().items.capacity() > 0);
        rx.try_recv();
        assert_eq!(
            rx.0.state.lock().items.capacity(),
            0,
            "a rarely used queue keeps nothing"
        );
    }
}
