//! The probe's event: the raw record of `bpf/synwake.h`, its parsed form, and the async
//! source that reads them from the ring buffer.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use crate::header::{
    SYNWAKE_EVENT_SIZE, SYNWAKE_FAMILY_IPV4, SYNWAKE_FAMILY_IPV6, SYNWAKE_TRIGGER_SHARED_PORT,
    SYNWAKE_TRIGGER_SYN, SYNWAKE_TRIGGER_TCP_OPTION,
};

/// Errors turning ring-buffer records into events.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("ring buffer record is {len} bytes, struct synwake_event is {expected}")]
    Size { len: usize, expected: usize },
    #[error("event has unknown trigger {trigger}")]
    Trigger { trigger: u8 },
    #[error("event has unknown address family {family}")]
    Family { family: u8 },
    #[error("cannot register the ring buffer with the tokio reactor (is a runtime running?)")]
    Register {
        #[source]
        source: io::Error,
    },
    #[error("waiting for the ring buffer to become readable failed")]
    Wait {
        #[source]
        source: io::Error,
    },
}

/// `struct synwake_event` from `bpf/synwake.h`, byte for byte.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub ktime_ns: u64,
    pub function_id: u32,
    pub ifindex: u32,
    pub src_addr: [u8; 16],
    pub dst_port: u16,
    pub src_port: u16,
    pub trigger: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

// The C side asserts sizeof(struct synwake_event) == SYNWAKE_EVENT_SIZE; this pins Rust to it.
const _: () = assert!(std::mem::size_of::<RawEvent>() == SYNWAKE_EVENT_SIZE as usize);
const _: () = assert!(std::mem::align_of::<RawEvent>() == 8);

impl RawEvent {
    /// Reads a record as the kernel wrote it (native endianness, any alignment).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EventError> {
        if bytes.len() != std::mem::size_of::<Self>() {
            return Err(EventError::Size {
                len: bytes.len(),
                expected: std::mem::size_of::<Self>(),
            });
        }
        // SAFETY: length checked; RawEvent is repr(C) of integers, valid for any bytes.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// Which part of the SYN named the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeTrigger {
    /// The SYN's destination port is a watched port (a function's own port).
    Syn,
    /// The SYN carries the synwake TCP option with a watched function id.
    TcpOption,
    /// The SYN's destination port is a watched shared port: no function is named, the
    /// client address may be (affinity).
    SharedPort,
}

impl ProbeTrigger {
    /// The name used in config, logs and metric labels: `syn`, `tcp_option` or
    /// `shared_port`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::TcpOption => "tcp_option",
            Self::SharedPort => "shared_port",
        }
    }
}

/// A SYN that should wake a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeEvent {
    /// When the probe saw the SYN, CLOCK_MONOTONIC ns (compare with [`crate::ktime_now_ns`]).
    pub ktime_ns: u64,
    pub trigger: ProbeTrigger,
    /// The SYN's destination port (for [`ProbeTrigger::TcpOption`] too).
    pub dst_port: u16,
    /// The function id from the option; `Some` exactly when the trigger is `TcpOption`.
    pub function_id: Option<u32>,
    /// The client's address and port.
    pub src: SocketAddr,
    /// The interface the SYN arrived on.
    pub ifindex: u32,
}

impl TryFrom<RawEvent> for ProbeEvent {
    type Error = EventError;

    fn try_from(raw: RawEvent) -> Result<Self, EventError> {
        let (trigger, function_id) = match u64::from(raw.trigger) {
            SYNWAKE_TRIGGER_SYN => (ProbeTrigger::Syn, None),
            SYNWAKE_TRIGGER_TCP_OPTION => (ProbeTrigger::TcpOption, Some(raw.function_id)),
            SYNWAKE_TRIGGER_SHARED_PORT => (ProbeTrigger::SharedPort, None),
            _ => {
                return Err(EventError::Trigger {
                    trigger: raw.trigger,
                })
            }
        };
        let ip = match u64::from(raw.family) {
            SYNWAKE_FAMILY_IPV4 => IpAddr::V4(Ipv4Addr::new(
                raw.src_addr[0],
                raw.src_addr[1],
                raw.src_addr[2],
                raw.src_addr[3],
            )),
            SYNWAKE_FAMILY_IPV6 => IpAddr::V6(Ipv6Addr::from(raw.src_addr)),
            _ => return Err(EventError::Family { family: raw.family }),
        };
        Ok(Self {
            ktime_ns: raw.ktime_ns,
            trigger,
            dst_port: raw.dst_port,
            function_id,
            src: SocketAddr::new(ip, raw.src_port),
            ifindex: raw.ifindex,
        })
    }
}

/// The stream of probe events, read from the BPF ring buffer.
///
/// [`ProbeEvents::next`] drains everything already buffered before it waits, and waits on
/// the ring buffer's epoll readiness (tokio `AsyncFd`), so there is no polling delay.
pub struct ProbeEvents {
    ring: Ring,
}

enum Ring {
    /// Not yet registered with a reactor (registration happens on the first `next`).
    Plain(RingBuf<MapData>),
    Registered(AsyncFd<RingBuf<MapData>>),
    /// Only while switching between the two.
    Empty,
}

impl ProbeEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring: Ring::Plain(ring),
        }
    }

    fn ring_mut(&mut self) -> &mut RingBuf<MapData> {
        match &mut self.ring {
            Ring::Plain(ring) => ring,
            Ring::Registered(fd) => fd.get_mut(),
            Ring::Empty => unreachable!("ring is only empty during registration"),
        }
    }

    /// The ring buffer's fd: readable (epoll/poll) when events are buffered. For a caller
    /// that waits on its own thread instead of through [`ProbeEvents::next`].
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.ring {
            Ring::Plain(ring) => ring.as_raw_fd(),
            Ring::Registered(fd) => fd.get_ref().as_raw_fd(),
            Ring::Empty => -1,
        }
    }

    /// The next event if one is buffered; never waits and needs no runtime.
    pub fn try_next(&mut self) -> Result<Option<ProbeEvent>, EventError> {
        let Some(item) = self.ring_mut().next() else {
            return Ok(None);
        };
        let raw = RawEvent::from_bytes(&item)?;
        drop(item);
        ProbeEvent::try_from(raw).map(Some)
    }

    /// The next event, waiting for one if none is buffered. Must run inside a tokio
    /// runtime with IO enabled. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<ProbeEvent, EventError> {
        loop {
            if let Some(event) = self.try_next()? {
                return Ok(event);
            }
            let fd = self.registered()?;
            let mut guard = fd
                .readable_mut()
                .await
                .map_err(|source| EventError::Wait { source })?;
            // Clear before draining: a record produced after the drain raises a new edge.
            guard.clear_ready();
        }
    }

    fn registered(&mut self) -> Result<&mut AsyncFd<RingBuf<MapData>>, EventError> {
        if let Ring::Plain(_) = self.ring {
            let Ring::Plain(ring) = std::mem::replace(&mut self.ring, Ring::Empty) else {
                unreachable!()
            };
            debug_assert!(ring.as_raw_fd() >= 0);
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for
            // as long as the AsyncFd (which owns the ring buffer) lives.
            match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
                Ok(fd) => self.ring = Ring::Registered(fd),
                Err(error) => {
                    let (ring, source) = error.into_parts();
                    self.ring = Ring::Plain(ring);
                    return Err(EventError::Register { source });
                }
            }
        }
        match &mut self.ring {
            Ring::Registered(fd) => Ok(fd),
            _ => unreachable!("registered above"),
        }
    }
}

impl std::fmt::Debug for ProbeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.ring {
            Ring::Plain(_) => "unregistered",
            Ring::Registered(_) => "registered",
            Ring::Empty => "empty",
        };
        f.debug_struct("ProbeEvents").field("ring", &state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(trigger: u8, family: u8) -> RawEvent {
        let mut src_addr = [0u8; 16];
        src_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        RawEvent {
            ktime_ns: 42,
            function_id: 7,
            ifindex: 3,
            src_addr,
            dst_port: 8080,
            src_port: 40000,
            trigger,
            family,
            _pad: [0; 2],
        }
    }

    #[test]
    fn parses_ipv4_syn_event() {
        let event = ProbeEvent::try_from(raw(1, 4)).unwrap();
        assert_eq!(event.trigger, ProbeTrigger::Syn);
        assert_eq!(event.function_id, None);
        assert_eq!(event.src, "10.1.2.3:40000".parse().unwrap());
        assert_eq!(
            (event.dst_port, event.ifindex, event.ktime_ns),
            (8080, 3, 42)
        );
    }

    #[test]
    fn parses_option_event_and_rejects_garbage() {
        let event = ProbeEvent::try_from(raw(2, 4)).unwrap();
        assert_eq!(event.trigger, ProbeTrigger::TcpOption);
        assert_eq!(event.function_id, Some(7));
        assert!(matches!(
            ProbeEvent::try_from(raw(9, 4)),
            Err(EventError::Trigger { trigger: 9 })
        ));
        assert!(matches!(
            ProbeEvent::try_from(raw(1, 5)),
            Err(EventError::Family { family: 5 })
        ));
        assert!(matches!(
            RawEvent::from_bytes(&[0u8; 39]),
            Err(EventError::Size { len: 39, .. })
        ));
    }

    #[test]
    fn raw_event_round_trips_through_bytes() {
        let event = raw(1, 6);
        // SAFETY: RawEvent is repr(C) plain data.
        let bytes: [u8; 40] = unsafe { std::mem::transmute(event) };
        assert_eq!(RawEvent::from_bytes(&bytes).unwrap(), event);
        let parsed = ProbeEvent::try_from(event).unwrap();
        assert!(parsed.src.is_ipv6());
    }
}
