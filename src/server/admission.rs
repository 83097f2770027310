//! Admission control: how many sockets the accept loop keeps open, in total and per client address.
//!
//! Why at accept time: `limits.max_connections` counts streams, and a socket that never sends a request
//! never becomes one. Before this, a few thousand silent or trickling sockets took every file descriptor;
//! then `accept` itself failed, and health checks and real subscribers could not get in. Every accepted
//! socket now holds a [`Permit`] for its whole life (lean stream, hyper, upgraded WebSocket); when none is
//! left a new socket is closed at once, never queued, and since the header-read deadline closes the silent
//! ones, real clients get in again within that deadline. The limit is kept below the open-file limit, so
//! `accept` does not fail for want of descriptors.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Descriptors kept for what is not a client socket: the listener, the log's files, the runtime's epoll and
/// eventfds, stdio, spawned tasks that open files.
pub(super) const FD_RESERVE: u64 = 64;

/// Sockets kept beyond `max_connections` by default: requests that are not streams (publishes, health
/// checks, the API) and sockets still reading their first request.
const DEFAULT_HEADROOM: usize = 1024;

/// The shared socket count of one [`super::Server`].
pub(super) struct Admission {
    max: usize,
    /// 0: no per-address limit, and `by_ip` stays empty.
    per_ip: usize,
    header_read_timeout: Duration,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    sockets: metrics::Gauge,
}

/// Why a socket was closed without being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `limits.max_sockets` reached.
    Limit,
    /// `limits.max_sockets_per_ip` reached for its address.
    PerIp,
    /// No complete request head within `limits.header_read_timeout` (first request or keep-alive).
    Timeout,
}

impl Refusal {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::Limit => "limit",
            Refusal::PerIp => "per_ip",
            Refusal::Timeout => "timeout",
        }
    }

    pub(super) fn count(self) {
        metrics::counter!("herald_sockets_refused_total", "reason" => self.as_str()).increment(1);
    }
}

/// One accepted socket's place; dropping it gives the place back. Small on purpose: every idle
/// subscriber's connection carries one.
pub(super) struct Permit {
    admission: Arc<Admission>,
    /// Set only when the per-address limit is on.
    ip: Option<IpAddr>,
}

impl Admission {
    pub(super) fn new(max: usize, per_ip: usize, header_read_timeout: Duration) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            per_ip,
            header_read_timeout,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            sockets: metrics::gauge!("herald_sockets"),
        })
    }

    /// A place for a socket from `ip`, or why there is none (counted in the refusal metric).
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if taken.is_err() {
            Refusal::Limit.count();
            return Err(Refusal::Limit);
        }
        let ip = if self.per_ip == 0 {
            None
        } else {
            // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d; it is the same address.
            let ip = ip.to_canonical();
            let mut by_ip = self.by_ip.lock();
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip {
                drop(by_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                Refusal::PerIp.count();
                return Err(Refusal::PerIp);
            }
            *n += 1;
            Some(ip)
        };
        self.sockets.increment(1.0);
        Ok(Permit {
            admission: Arc::clone(self),
            ip,
        })
    }

    pub(super) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    pub(super) fn header_read_timeout(&self) -> Duration {
        self.header_read_timeout
    }
}

impl Permit {
    pub(super) fn header_read_timeout(&self) -> Duration {
        self.admission.header_read_timeout
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let a = &self.admission;
        if let Some(ip) = self.ip {
            let mut by_ip = a.by_ip.lock();
            if let Entry::Occupied(mut e) = by_ip.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
            // After an attack from many addresses, give the table's memory back.
            if by_ip.capacity() > 1024 && by_ip.len() < by_ip.capacity() / 4 {
                let len = by_ip.len();
                by_ip.shrink_to(len * 2);
            }
        }
        a.open.fetch_sub(1, Ordering::AcqRel);
        a.sockets.decrement(1.0);
    }
}

/// The socket limit in force: `max_sockets` (0: `max_connections` plus headroom), never above the
/// open-file limit less [`FD_RESERVE`].
pub(super) fn socket_limit(max_sockets: usize, max_connections: usize, fds: Option<u64>) -> usize {
    let wanted = if max_sockets == 0 {
        max_connections.saturating_add(DEFAULT_HEADROOM)
    } else {
        max_sockets
    };
    match fds {
        Some(fds) => {
            let usable = usize::try_from(fds.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
            wanted.min(usable).max(1)
        }
        None => wanted,
    }
}

/// Raises the soft open-file limit to the hard one, as Go's runtime (and so Centrifugo) does at start-up:
/// the usual soft default of 1024 dates from select(2), which nothing here uses, and would cap a hub at a
/// thousand subscribers. Returns the soft limit in force afterwards; `None` when unlimited or unknown.
pub(super) fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
            if soft < hard {
                let raised = Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => return Some(hard),
                    Err(e) => {
                        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit")
                    }
                }
            }
        }
        limit.current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Lets a log line through at most once a second and counts the ones held back, for events that can
/// repeat thousands of times a second (a failing `accept`, refused sockets) and would otherwise flood the
/// log exactly when the operator needs to read it.
#[derive(Default)]
pub(super) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` when a line may be written now.
    pub(super) fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < Self::EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn permits_are_limited_in_total_and_per_address_and_given_back() {
        let a = Admission::new(3, 2, Duration::from_secs(1));
        let p1 = a.admit(ip("10.0.0.1")).unwrap();
        let p2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refusal::PerIp));
        assert_eq!(
            a.admit(ip("::ffff:10.0.0.1")).err(),
            Some(Refusal::PerIp),
            "the v4-mapped form is the same address"
        );
        let p3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refusal::Limit));
        assert_eq!(a.open(), 3);
        drop(p1);
        let p4 = a.admit(ip("10.0.0.1")).unwrap();
        drop((p2, p3, p4));
        assert_eq!(a.open(), 0);
        assert!(a.by_ip.lock().is_empty(), "no entry outlives its sockets");
    }

    #[test]
    fn without_a_per_address_limit_no_address_is_kept() {
        let a = Admission::new(2, 0, Duration::from_secs(1));
        let _p = a.admit(ip("10.0.0.1")).unwrap();
        let _q = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.2")).err(), Some(Refusal::Limit));
        assert!(a.by_ip.lock().is_empty());
    }

    #[test]
    fn the_socket_limit_stays_below_the_open_file_limit() {
        assert_eq!(socket_limit(0, 10_000, None), 11_024, "auto");
        assert_eq!(socket_limit(0, 10_000, Some(1_048_576)), 11_024);
        assert_eq!(socket_limit(0, 10_000, Some(1024)), 960, "reserve kept");
        assert_eq!(socket_limit(20, 10_000, Some(1024)), 20, "explicit");
        assert_eq!(socket_limit(5000, 10, Some(256)), 192);
        assert_eq!(socket_limit(0, 10, Some(10)), 1);
    }

    #[test]
    fn the_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.ready(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.ready(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.ready(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(t.ready(t0 + Duration::from_millis(1001)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(5)), Some(1));
    }
}
