//! Userspace delay line: holds every packet the router queues (NFQUEUE) for a fixed one-way
//! delay, then accepts it. tc netem is not available on these machines.
//!
//! One thread owns the netlink socket (verdicts must come from the socket that received the
//! packet). It waits with poll(2) on that socket, a timerfd armed at the earliest absolute
//! release deadline, and an eventfd used to stop it. Per direction the delay is constant, so
//! a FIFO per queue is already sorted by deadline and order is preserved.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nfq::{Message, Queue, Verdict};

use crate::netns::{self, NetnsError};

/// Kernel queue length per queue; long so a burst never overflows (we do not fail open).
const QUEUE_MAX_LEN: u32 = 65536;
/// Netlink receive buffer; raised with SO_RCVBUFFORCE so bursts are not lost to ENOBUFS.
const RCVBUF_BYTES: libc::c_int = 64 << 20;

/// Errors from the delay line.
#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("could not enter the router namespace")]
    Netns(#[from] NetnsError),
    #[error("nfqueue setup failed: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not find the nfqueue netlink socket's fd (found {found} new candidates)")]
    FdNotFound { found: usize },
    #[error("delay line stopped: {what}")]
    Runtime {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("delay line thread panicked")]
    Panicked,
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> DelayError {
    move |source| DelayError::Setup { what, source }
}

/// Counters the delay line keeps; read with [`DelayLine::stats`].
#[derive(Debug, Default)]
pub struct DelayStats {
    pub packets: AtomicU64,
    /// Sum of (actual release - deadline) in ns, for mean timer lateness.
    pub late_ns_sum: AtomicU64,
    pub late_ns_max: AtomicU64,
    /// Packets released more than 1 ms after their deadline.
    pub late_over_1ms: AtomicU64,
}

/// A running delay line. Drop stops the thread (queued packets are then dropped by the
/// kernel, never passed undelayed).
pub struct DelayLine {
    one_way_ns: Arc<AtomicU64>,
    stats: Arc<DelayStats>,
    stop_fd: RawFd,
    thread: Option<JoinHandle<Result<(), DelayError>>>,
}

impl DelayLine {
    /// Binds `queues` inside namespace `router` and starts delaying each packet by
    /// `one_way`. Returns once the queues are bound.
    pub fn start(router: &str, queues: &[u16], one_way: Duration) -> Result<Self, DelayError> {
        let one_way_ns = Arc::new(AtomicU64::new(one_way.as_nanos() as u64));
        let stats = Arc::new(DelayStats::default());
        // SAFETY: eventfd(2) returns a new fd or -1.
        let stop_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop_fd < 0 {
            return Err(DelayError::Setup {
                what: "eventfd",
                source: io::Error::last_os_error(),
            });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (router, queues) = (router.to_string(), queues.to_vec());
        let (ns2, st2) = (one_way_ns.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || {
                let prepared = netns::enter_netns(&router)
                    .map_err(DelayError::from)
                    .and_then(|()| prepare(&queues));
                match prepared {
                    Ok((queue, fd)) => {
                        let _ = ready_tx.send(Ok(()));
                        pump(queue, fd, stop_fd, &ns2, &st2)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
            .map_err(setup("spawn"))?;
        let line = DelayLine {
            one_way_ns,
            stats,
            stop_fd,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(line),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DelayError::Panicked),
        }
    }

    /// Changes the one-way delay for packets queued from now on.
    pub fn set_one_way(&self, one_way: Duration) {
        self.one_way_ns
            .store(one_way.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Current one-way delay.
    pub fn one_way(&self) -> Duration {
        Duration::from_nanos(self.one_way_ns.load(Ordering::Relaxed))
    }

    /// Packet and timer-lateness counters.
    pub fn stats(&self) -> &DelayStats {
        &self.stats
    }

    /// Whether the pump thread is still running (it exits only on stop or on an error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and returns the error that ended it, if any.
    pub fn stop(mut self) -> Result<(), DelayError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), DelayError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.stop_fd, (&one as *const u64).cast(), 8) };
        let res = thread.join().map_err(|_| DelayError::Panicked)?;
        // SAFETY: closing our own eventfd once, after the thread stopped using it.
        unsafe { libc::close(self.stop_fd) };
        res
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// netlink(NETFILTER) sockets this thread's process has open.
fn netfilter_sockets() -> HashSet<RawFd> {
    let mut out = HashSet::new();
    let Ok(rd) = std::fs::read_dir("/proc/thread-self/fd") else {
        return out;
    };
    for fd in rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
    {
        let domain = sockopt_int(fd, libc::SO_DOMAIN);
        let proto = sockopt_int(fd, libc::SO_PROTOCOL);
        if domain == Some(libc::AF_NETLINK) && proto == Some(libc::NETLINK_NETFILTER) {
            out.insert(fd);
        }
    }
    out
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt with a correctly sized out-parameter; fails harmlessly on non-sockets.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(val)
}

/// Opens and binds the queues. nfq does not expose its fd, so we find it as the one new
/// netlink-netfilter socket that appeared across `Queue::open`.
fn prepare(queues: &[u16]) -> Result<(Queue, RawFd), DelayError> {
    let before = netfilter_sockets();
    let mut queue = Queue::open().map_err(setup("open netlink socket"))?;
    let after = netfilter_sockets();
    let new: Vec<RawFd> = after.difference(&before).copied().collect();
    let [fd] = new[..] else {
        return Err(DelayError::FdNotFound { found: new.len() });
    };
    for &q in queues {
        queue.bind(q).map_err(setup("bind queue"))?;
        // bind() resets the copy range to 65535; metadata is all we need.
        queue
            .set_copy_range(q, 0)
            .map_err(setup("set copy range"))?;
        queue
            .set_queue_max_len(q, QUEUE_MAX_LEN)
            .map_err(setup("set queue max len"))?;
        queue.set_recv_gso(q, true).map_err(setup("set recv gso"))?;
    }
    queue.set_nonblocking(true);
    let size = RCVBUF_BYTES;
    // SAFETY: setsockopt on the netlink fd with an int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(DelayError::Setup {
            what: "SO_RCVBUFFORCE",
            source: io::Error::last_os_error(),
        });
    }
    // Best effort: a real-time priority and no timer slack keep release lateness low on a
    // 2-core box where the daemon, the function and the client compete for CPU.
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        let param = libc::sched_param { sched_priority: 10 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
    }
    Ok((queue, fd))
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Arms the timerfd at absolute monotonic time `at_ns`, or disarms it for `None`.
fn arm_timer(tfd: RawFd, at_ns: Option<u64>) -> io::Result<()> {
    let value = match at_ns {
        Some(ns) => libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            // Never all-zero (that would disarm): CLOCK_MONOTONIC is far past 0 here.
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    };
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: value,
    };
    // SAFETY: timerfd_settime on our timerfd with valid pointers.
    let rc =
        unsafe { libc::timerfd_settime(tfd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Held {
    deadline_ns: u64,
    msg: Message,
}

fn pump(
    mut queue: Queue,
    nfq_fd: RawFd,
    stop_fd: RawFd,
    one_way_ns: &AtomicU64,
    stats: &DelayStats,
) -> Result<(), DelayError> {
    let rt = |what| move |source| DelayError::Runtime { what, source };
    // SAFETY: timerfd_create returns a new fd or -1.
    let tfd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if tfd < 0 {
        return Err(rt("timerfd_create")(io::Error::last_os_error()));
    }
    struct CloseOnDrop(RawFd);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            // SAFETY: closing the timerfd we created.
            unsafe { libc::close(self.0) };
        }
    }
    let _tfd_guard = CloseOnDrop(tfd);

    // One FIFO per direction (index = queue number, small).
    let mut fifos: Vec<VecDeque<Held>> = Vec::new();
    let mut armed: Option<u64> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: nfq_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on three valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(rt("poll")(err));
        }
        if fds[2].revents != 0 {
            return Ok(());
        }
        if fds[1].revents != 0 {
            let mut buf = [0u8; 8];
            // SAFETY: draining the timerfd's expiry counter into an 8-byte buffer.
            unsafe { libc::read(tfd, buf.as_mut_ptr().cast(), 8) };
            armed = None;
        }
        if fds[0].revents != 0 {
            loop {
                match queue.recv() {
                    Ok(mut msg) => {
                        let delay = one_way_ns.load(Ordering::Relaxed);
                        stats.packets.fetch_add(1, Ordering::Relaxed);
                        if delay == 0 {
                            msg.set_verdict(Verdict::Accept);
                            queue.verdict(msg).map_err(rt("verdict"))?;
                            continue;
                        }
                        let q = msg.get_queue_num() as usize;
                        if fifos.len() <= q {
                            fifos.resize_with(q + 1, VecDeque::new);
                        }
                        fifos[q].push_back(Held {
                            deadline_ns: now_ns() + delay,
                            msg,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(rt("recv")(e)),
                }
            }
        }
        let now = now_ns();
        for fifo in fifos.iter_mut() {
            while fifo.front().is_some_and(|h| h.deadline_ns <= now) {
                let Some(held) = fifo.pop_front() else { break };
                let late = now - held.deadline_ns;
                stats.late_ns_sum.fetch_add(late, Ordering::Relaxed);
                stats.late_ns_max.fetch_max(late, Ordering::Relaxed);
                if late > 1_000_000 {
                    stats.late_over_1ms.fetch_add(1, Ordering::Relaxed);
                }
                let mut msg = held.msg;
                msg.set_verdict(Verdict::Accept);
                queue.verdict(msg).map_err(rt("verdict"))?;
            }
        }
        let next = fifos
            .iter()
            .filter_map(|f| f.front().map(|h| h.deadline_ns))
            .min();
        if next != armed {
            arm_timer(tfd, next).map_err(rt("timerfd_settime"))?;
            armed = next;
        }
    }
}
