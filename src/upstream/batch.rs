//! Requests to workers written together: every request a serving thread
//! writes to its workers in one turn goes out in one system call
//! (`io_uring_enter`), instead of a `writev` each.
//!
//! Why: a worker sharing the core with the edge (the load benchmark's
//! set-up, and a homeserver's box) is woken by the first request written to
//! it and, being owed CPU time, preempts the edge as that system call
//! returns. It answers the one request it has and sleeps again; the edge's
//! next `writev` wakes it again. On the benchmark's AMD machine that was
//! 0.41 preemptions per request. Submitted together, every request of the
//! turn is in the workers' sockets before the edge leaves the kernel, and a
//! worker that runs then finds all of them.
//!
//! Only the first write of a request (its head and whatever of the body had
//! arrived) is batched; what a socket did not take is written by the caller
//! the usual way. A thread batches only once [`enable`] set it up (the
//! serving threads, whose single-thread runtime never moves a task to
//! another thread); elsewhere, or where `io_uring` is refused (a seccomp
//! profile, `kernel.io_uring_disabled`), [`write_at_turn_end`] answers
//! `None` and the caller writes at the end of the turn itself.
//!
//! The one module with `unsafe` code: handing the kernel pointers to the
//! slices. Each is part of a pinned, live future, and every submission is
//! waited for before the flush returns (see [`flush`]).

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use rustc_hash::FxHashMap;

/// Submission queue size: a turn's writes beyond it go in further calls.
const RING_ENTRIES: u32 = 256;

/// How long a flush waits for its completions before cancelling what is
/// left. Sends with `MSG_DONTWAIT` complete while they are submitted (or
/// fail with `EAGAIN`), so this is only a guard.
const COMPLETION_GUARD: Duration = Duration::from_millis(100);

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Calls into the kernel to submit writes, for the tests.
    static SUBMISSIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Submissions made and the writes they carried, process-wide, for the
/// metrics (`synapse_edge_upstream_write_batches_total`,
/// `synapse_edge_upstream_batched_writes_total`): touched once per
/// submission, not per request.
static SUBMITTED: AtomicU64 = AtomicU64::new(0);
static SUBMITTED_WRITES: AtomicU64 = AtomicU64::new(0);

/// Submissions of requests to workers, and the requests' writes they
/// carried, since the process started: their ratio is the mean batch; both
/// stay at 0 where batching is off.
pub fn totals() -> (u64, u64) {
    (
        SUBMITTED.load(Ordering::Relaxed),
        SUBMITTED_WRITES.load(Ordering::Relaxed),
    )
}

/// This thread's ring and the writes queued in the current turn.
struct Batch {
    ring: IoUring,
    queued: Vec<Queued>,
    /// Results of flushed writes not yet collected by their futures: bytes
    /// sent, or a negated `errno`.
    done: FxHashMap<u64, i32>,
    /// Every write with a smaller id has been flushed (ids grow, and a
    /// flush takes everything queued).
    flushed_below: u64,
    next_id: u64,
    /// A flush failed: no more writes are queued.
    broken: bool,
}

/// A write waiting for the flush: the slices live in the future that
/// queued it, which removes the entry when dropped first.
struct Queued {
    id: u64,
    fd: RawFd,
    slices: *const IoSlice<'static>,
    count: usize,
}

/// Sets up batching on this thread. Call it only on a thread that alone
/// drives a current-thread runtime, for as long as that runtime has
/// requests in flight: a queued write points into its request's future,
/// which must be polled and dropped on this thread (the serving threads of
/// `listeners::Threaded`; a test's runtime). Fails where the kernel does
/// not allow it; writes then stay one call each.
pub fn enable() -> io::Result<()> {
    if enabled() {
        return Ok(());
    }
    let ring = new_ring()?;
    BATCH.with(|b| {
        let mut slot = b.borrow_mut();
        // A batch that stopped after a failed flush: its writes' results
        // and ids carry over, so that no future takes another's result.
        let (done, next_id) = slot
            .take()
            .map_or_else(Default::default, |old| (old.done, old.next_id));
        *slot = Some(Batch {
            ring,
            queued: Vec::new(),
            done,
            flushed_below: next_id,
            next_id,
            broken: false,
        })
    });
    Ok(())
}

/// A ring as batching needs it: one submitter (Linux 6.0 and later, which
/// also fail a send that has `MSG_DONTWAIT` at once rather than waiting
/// for room) and waits with a time limit (5.11). An older kernel, or one
/// that refuses `io_uring`, gets the one-call-each path.
fn new_ring() -> io::Result<IoUring> {
    let ring = IoUring::builder()
        // The submitter is this one thread (lets the kernel skip locking).
        .setup_single_issuer()
        .build(RING_ENTRIES)?;
    if !ring.params().is_feature_ext_arg() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring without timed waits (Linux before 5.11)",
        ));
    }
    Ok(ring)
}

/// Whether this process may batch, and if not why (an old kernel, or a
/// seccomp profile or kernel setting that refuses `io_uring`): for the
/// start-up log line.
pub fn supported() -> io::Result<()> {
    new_ring().map(drop)
}

/// Whether this thread batches its writes to workers.
pub fn enabled() -> bool {
    BATCH.with(|b| b.borrow().as_ref().is_some_and(|b| !b.broken))
}

/// Sends `bufs` on `fd` at the end of the serving thread's turn, together
/// with every other write queued in that turn. `Some(Ok(n))`: the socket
/// took the first `n` bytes (0 if it was full); `Some(Err(_))`: the send
/// failed; `None`: this thread does not batch, nothing was sent.
pub async fn write_at_turn_end<const N: usize>(
    fd: RawFd,
    bufs: [&[u8]; N],
) -> Option<io::Result<usize>> {
    let slices: [IoSlice<'_>; N] = bufs.map(IoSlice::new);
    // `slices` lives in this future's state, which is pinned from its first
    // poll until it is dropped: the pointer stays good while it is queued.
    let queued = Entry::queue(fd, slices.as_ptr().cast(), N)?;
    // Resumed after the runtime has looked for I/O once more, with the
    // other requests of the turn queued by then.
    tokio::task::yield_now().await;
    let result = queued.take();
    drop(queued);
    // The slices are used through the pointer only: this use keeps them in
    // the future's state, at the address queued, until the write is done.
    std::hint::black_box(&slices);
    Some(match result {
        Some(n) if n >= 0 => Ok(n as usize),
        // Not sent: the socket was full, or the send was never made.
        Some(e) if -e == libc::EAGAIN || -e == libc::ECANCELED => Ok(0),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        // Every flushed write has a result (see `flush`); without one,
        // nothing was sent.
        None => Ok(0),
    })
}

/// A queued write, owned by its future: dropping it withdraws the write if
/// it has not gone yet (the client left), or forgets its result.
struct Entry {
    id: u64,
}

impl Entry {
    /// Queues a write for the end of the turn; `None` where this thread
    /// does not batch (or stopped after a failed flush).
    fn queue(fd: RawFd, slices: *const IoSlice<'static>, count: usize) -> Option<Entry> {
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let b = b.as_mut().filter(|b| !b.broken)?;
            let id = b.next_id;
            b.next_id += 1;
            b.queued.push(Queued {
                id,
                fd,
                slices,
                count,
            });
            Some(Entry { id })
        })
    }

    /// This write's result, flushing the turn's writes first if no other
    /// future of the turn did.
    fn take(&self) -> Option<i32> {
        BATCH.with(|cell| {
            let mut slot = cell.borrow_mut();
            let b = slot.as_mut()?;
            if self.id >= b.flushed_below
                && let Err(e) = flush(b)
            {
                // Every write of the turn has its result all the same
                // (see `flush`); new ones go one call each from now on.
                tracing::warn!(error = %e, "batched writes to workers failed; writing them one by one from now on");
                b.broken = true;
            }
            b.done.remove(&self.id)
        })
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        BATCH.with(|cell| {
            // Never re-entered: nothing drops a future while a flush runs.
            if let Some(b) = cell.borrow_mut().as_mut() {
                if self.id >= b.flushed_below {
                    b.queued.retain(|q| q.id != self.id);
                } else {
                    b.done.remove(&self.id);
                }
            }
        });
    }
}

/// Submits every queued write and waits for each one's completion, so
/// that no slice is read by the kernel after this returns. Every queued
/// write gets a result in `done`: writes not submitted, or cancelled, get
/// `-EAGAIN` (nothing sent). An error means the ring cannot be trusted
/// with more; the caller stops batching.
fn flush(b: &mut Batch) -> io::Result<()> {
    let mut failed = None;
    while !b.queued.is_empty() && failed.is_none() {
        let take = b.queued.len().min(RING_ENTRIES as usize);
        let writes: Vec<Queued> = b.queued.drain(..take).collect();
        let headers: Vec<libc::msghdr> = writes
            .iter()
            .map(|w| {
                // SAFETY: msghdr is plain old data; all-zero is "no name,
                // no control data, no flags".
                let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
                // IoSlice is ABI-compatible with iovec on Unix.
                m.msg_iov = w.slices as *mut libc::iovec;
                m.msg_iovlen = w.count as _;
                m
            })
            .collect();
        let mut waiting = Vec::with_capacity(writes.len());
        {
            let mut sq = b.ring.submission();
            for (w, m) in writes.iter().zip(&headers) {
                let sqe = opcode::SendMsg::new(types::Fd(w.fd), m)
                    .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                    .build()
                    .user_data(w.id);
                // SAFETY: the header and the slices it points to outlive
                // the operation: `headers` is dropped only after every
                // completion was reaped below (or the send cancelled and
                // its cancellation reaped), and the slices belong to live
                // futures (a dropped one removed its entry from `queued`
                // before it went away).
                if unsafe { sq.push(&sqe) }.is_ok() {
                    waiting.push(w.id);
                } else {
                    b.done.insert(w.id, -libc::EAGAIN);
                }
            }
        }
        SUBMITTED.fetch_add(1, Ordering::Relaxed);
        SUBMITTED_WRITES.fetch_add(waiting.len() as u64, Ordering::Relaxed);
        if let Err(e) = wait_for(b, &mut waiting) {
            cancel(b, &mut waiting);
            failed = Some(e);
        }
        drop(headers);
    }
    b.flushed_below = b.next_id;
    match failed {
        None => Ok(()),
        Some(e) => {
            let left: Vec<Queued> = b.queued.drain(..).collect();
            b.done.extend(left.iter().map(|w| (w.id, -libc::EAGAIN)));
            Err(e)
        }
    }
}

/// Submits what is in the queue and reaps completions until every id in
/// `waiting` has its result, or the guard time passed.
fn wait_for(b: &mut Batch, waiting: &mut Vec<u64>) -> io::Result<()> {
    let guard = types::Timespec::from(COMPLETION_GUARD);
    let args = types::SubmitArgs::new().timespec(&guard);
    loop {
        reap(b, waiting);
        if waiting.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        SUBMISSIONS.with(|c| c.set(c.get() + 1));
        match b.ring.submitter().submit_with_args(waiting.len(), &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                reap(b, waiting);
                if waiting.is_empty() {
                    return Ok(());
                }
                return Err(io::Error::other("a send to a worker did not complete"));
            }
            Err(e) => {
                reap(b, waiting);
                return Err(e);
            }
        }
    }
}

fn reap(b: &mut Batch, waiting: &mut Vec<u64>) {
    for cqe in b.ring.completion() {
        let id = cqe.user_data();
        if let Some(at) = waiting.iter().position(|w| *w == id) {
            waiting.swap_remove(at);
            b.done.insert(id, cqe.result());
        }
    }
}

/// Cancels the writes still in flight and waits until each is gone, so no
/// slice is read afterwards. Only reached if a send did not complete as it
/// was submitted, which `MSG_DONTWAIT` rules out.
fn cancel(b: &mut Batch, waiting: &mut Vec<u64>) {
    for id in waiting.iter() {
        let sqe = opcode::AsyncCancel::new(*id).build().user_data(u64::MAX);
        // SAFETY: a cancellation points at no memory of ours.
        let _ = unsafe { b.ring.submission().push(&sqe) };
    }
    while !waiting.is_empty() {
        if let Err(e) = b.ring.submit_and_wait(1)
            && e.raw_os_error() != Some(libc::EINTR)
        {
            // Cannot wait: keep the memory alive for good rather than risk
            // the kernel reading freed slices.
            tracing::error!(error = %e, "cannot cancel a send to a worker");
            std::process::abort();
        }
        reap(b, waiting);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    use super::*;

    /// Batching on for this test's thread. These tests need `io_uring`, as
    /// the serving threads do to batch; where it is refused they fail
    /// with the reason.
    pub(crate) fn must_enable() {
        if let Err(e) = enable() {
            panic!(
                "io_uring refused ({e}): a seccomp profile or kernel.io_uring_disabled; \
                 these tests need it"
            );
        }
    }

    /// How many times this thread entered the kernel to submit writes.
    fn submissions() -> u64 {
        SUBMISSIONS.with(|c| c.get())
    }

    fn fd(s: &UnixStream) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(s)
    }

    async fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        s.read_exact(&mut got).await.expect("read");
        got
    }

    #[tokio::test]
    async fn a_turns_writes_to_many_workers_go_in_one_system_call() {
        must_enable();
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..20).map(|_| UnixStream::pair().expect("pair")).collect();
        let heads: Vec<String> = (0..20)
            .map(|i| format!("GET /{i} HTTP/1.1\r\n\r\n"))
            .collect();
        let before = submissions();
        let writes = pairs
            .iter()
            .zip(&heads)
            .map(|((edge, _), head)| write_at_turn_end(fd(edge), [head.as_bytes(), b"", b"body"]));
        let results = futures_util::future::join_all(writes).await;
        assert_eq!(
            submissions() - before,
            1,
            "one submission for the whole turn"
        );
        for (((_, mut worker), head), result) in pairs.into_iter().zip(&heads).zip(results) {
            let n = result.expect("batched").expect("sent");
            assert_eq!(n, head.len() + 4);
            assert_eq!(
                read_exactly(&mut worker, n).await,
                format!("{head}body").into_bytes()
            );
        }
    }

    #[tokio::test]
    async fn a_turn_with_more_writes_than_the_ring_holds_sends_them_all() {
        must_enable();
        let count = RING_ENTRIES as usize + 44;
        let pairs: Vec<(UnixStream, UnixStream)> = (0..count)
            .map(|_| UnixStream::pair().expect("pair"))
            .collect();
        let before = submissions();
        let writes = pairs
            .iter()
            .map(|(edge, _)| write_at_turn_end(fd(edge), [b"GET / HTTP/1.1\r\n\r\n".as_slice()]));
        let results = futures_util::future::join_all(writes).await;
        assert_eq!(
            submissions() - before,
            2,
            "a full ring's worth per submission"
        );
        for ((_, mut worker), result) in pairs.into_iter().zip(results) {
            let n = result.expect("batched").expect("sent");
            assert_eq!(
                read_exactly(&mut worker, n).await,
                b"GET / HTTP/1.1\r\n\r\n"
            );
        }
    }

    #[tokio::test]
    async fn a_full_socket_takes_nothing_and_the_turn_does_not_wait_for_it() {
        must_enable();
        let (edge, _worker) = UnixStream::pair().expect("pair");
        let chunk = vec![b'x'; 64 << 10];
        let mut filled = 0;
        loop {
            match edge.try_write(&chunk) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(filled > 0);
        let started = Instant::now();
        let n = write_at_turn_end(fd(&edge), [b"GET / HTTP/1.1\r\n\r\n".as_slice()])
            .await
            .expect("batched")
            .expect("not an error");
        assert_eq!(
            n, 0,
            "nothing taken: the caller writes it when there is room"
        );
        assert!(
            started.elapsed() < COMPLETION_GUARD,
            "the flush did not wait for room"
        );
        assert!(enabled(), "a full socket is not a failure of the batch");
    }

    #[tokio::test]
    async fn a_write_whose_request_went_away_is_never_sent() {
        must_enable();
        let (edge_a, mut worker_a) = UnixStream::pair().expect("pair");
        let (edge_b, mut worker_b) = UnixStream::pair().expect("pair");
        let mut gone = Box::pin(write_at_turn_end(fd(&edge_a), [b"abandoned".as_slice()]));
        // Queued, then dropped before the turn ends (the client left).
        assert!(futures_util::poll!(gone.as_mut()).is_pending());
        drop(gone);
        let n = write_at_turn_end(fd(&edge_b), [b"kept".as_slice()])
            .await
            .expect("batched")
            .expect("sent");
        assert_eq!(read_exactly(&mut worker_b, n).await, b"kept");
        drop(edge_a);
        let mut rest = Vec::new();
        worker_a.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty(), "the abandoned request reached its worker");
    }

    #[tokio::test]
    async fn a_worker_that_closed_its_end_is_an_error_not_a_signal() {
        must_enable();
        let (edge, worker) = UnixStream::pair().expect("pair");
        drop(worker);
        let err = write_at_turn_end(fd(&edge), [b"GET / HTTP/1.1\r\n\r\n".as_slice()])
            .await
            .expect("batched")
            .expect_err("the worker is gone");
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[tokio::test]
    async fn a_thread_that_does_not_batch_says_so_and_sends_nothing() {
        let (edge, mut worker) = UnixStream::pair().expect("pair");
        assert!(
            write_at_turn_end(fd(&edge), [b"x".as_slice()])
                .await
                .is_none()
        );
        drop(edge);
        let mut rest = Vec::new();
        worker.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
    }
}
