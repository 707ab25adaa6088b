//! Bounded output ring buffer of a process or PTY session, with numbered chunks, any number of
//! subscribers, and backpressure: the producer never evicts a chunk that a *live* subscriber has
//! not taken yet (it waits instead, so the child blocks on its pipe like with a slow reader),
//! while output nobody is attached to is simply dropped from the front (reported as a `Gap` to
//! whoever attaches later). A subscriber that has not taken anything for [`STALL`] while the
//! ring is full stops holding the producer back (it gets a `Gap` when it comes back): a client
//! that writes stdin without reading output must not deadlock the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_protocol::kilnd::{ExitStatus, StreamKind};
use tokio::sync::Notify;

/// One chunk of output.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub stream: StreamKind,
    pub data: Bytes,
}

/// How long a subscriber may take nothing before it stops exerting backpressure.
pub const STALL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Sub {
    /// Highest seq it has taken.
    cursor: u64,
    last_take: Instant,
}

#[derive(Debug)]
struct State {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    cap: usize,
    /// Seq of the next chunk (the first is 1).
    next_seq: u64,
    subs: HashMap<u64, Sub>,
    next_sub: u64,
    finished: Option<ExitStatus>,
}

impl State {
    fn first_seq(&self) -> u64 {
        self.chunks.front().map_or(self.next_seq, |c| c.seq)
    }

    /// Evicts what is needed to fit `len` more bytes, unless a subscriber still needs it.
    fn make_room(&mut self, len: usize) -> bool {
        let mut need = (self.bytes + len).saturating_sub(self.cap);
        if need == 0 {
            return true;
        }
        let now = Instant::now();
        let min_cursor = self
            .subs
            .values()
            .filter(|s| now.duration_since(s.last_take) < STALL)
            .map(|s| s.cursor)
            .min()
            .unwrap_or(u64::MAX);
        let mut n = 0;
        for c in &self.chunks {
            if need == 0 {
                break;
            }
            if c.seq > min_cursor {
                return false;
            }
            need = need.saturating_sub(c.data.len());
            n += 1;
        }
        for _ in 0..n {
            if let Some(c) = self.chunks.pop_front() {
                self.bytes -= c.data.len();
            }
        }
        true
    }
}

/// The ring. Shared between its producer(s) and subscribers.
#[derive(Debug)]
pub struct Ring {
    state: Mutex<State>,
    /// Output was appended or the ring finished.
    changed: Notify,
    /// A subscriber took chunks or went away.
    consumed: Notify,
}

/// What a subscriber gets next.
#[derive(Debug)]
pub enum Event {
    /// Chunks `from..=to` were dropped before this subscriber could take them.
    Gap { from: u64, to: u64 },
    /// New chunks, in order.
    Chunks(Vec<Chunk>),
    /// All output was taken and the process ended.
    Finished(ExitStatus),
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Upper bound of data handed out in one `Event::Chunks`.
const BATCH_BYTES: usize = 256 * 1024;

impl Ring {
    pub fn new(cap: usize) -> Arc<Ring> {
        Arc::new(Ring {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                bytes: 0,
                cap,
                next_seq: 1,
                subs: HashMap::new(),
                next_sub: 0,
                finished: None,
            }),
            changed: Notify::new(),
            consumed: Notify::new(),
        })
    }

    /// Appends a chunk, waiting while that would evict data a live subscriber has not taken.
    pub async fn push(&self, stream: StreamKind, data: Bytes) {
        if data.is_empty() {
            return;
        }
        loop {
            let consumed = self.consumed.notified();
            tokio::pin!(consumed);
            consumed.as_mut().enable();
            {
                let mut st = lock(&self.state);
                if st.make_room(data.len()) {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.bytes += data.len();
                    st.chunks.push_back(Chunk { seq, stream, data });
                    drop(st);
                    self.changed.notify_waiters();
                    return;
                }
            }
            // Re-check now and then: a stalled subscriber stops counting after STALL.
            let _ = tokio::time::timeout(Duration::from_millis(500), consumed).await;
        }
    }

    /// Marks the end of the output; `status.last_seq` is filled in. Returns the final status.
    pub fn finish(&self, mut status: ExitStatus) -> ExitStatus {
        let mut st = lock(&self.state);
        status.last_seq = st.next_seq - 1;
        st.finished = Some(status.clone());
        drop(st);
        self.changed.notify_waiters();
        status
    }

    /// Bytes of output currently held.
    pub fn bytes(&self) -> usize {
        lock(&self.state).bytes
    }

    /// The final status, once finished.
    pub fn finished(&self) -> Option<ExitStatus> {
        lock(&self.state).finished.clone()
    }

    /// Follows the ring from `after_seq` (0 = from the beginning).
    pub fn subscribe(self: &Arc<Self>, after_seq: u64) -> Subscription {
        let mut st = lock(&self.state);
        let id = st.next_sub;
        st.next_sub += 1;
        st.subs.insert(
            id,
            Sub {
                cursor: after_seq,
                last_take: Instant::now(),
            },
        );
        Subscription {
            ring: self.clone(),
            id,
        }
    }
}

/// A reader of a [`Ring`]; dropping it releases the backpressure it exerts.
#[derive(Debug)]
pub struct Subscription {
    ring: Arc<Ring>,
    id: u64,
}

impl Subscription {
    /// Waits for and returns what comes next. After `Finished` it keeps returning `Finished`.
    pub async fn next(&mut self) -> Event {
        loop {
            let changed = self.ring.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = lock(&self.ring.state);
                let cursor = st.subs.get(&self.id).map_or(0, |s| s.cursor);
                let first = st.first_seq();
                let wanted = cursor.saturating_add(1);
                if wanted < first {
                    st.subs.insert(
                        self.id,
                        Sub {
                            cursor: first - 1,
                            last_take: Instant::now(),
                        },
                    );
                    drop(st);
                    self.ring.consumed.notify_waiters();
                    return Event::Gap {
                        from: wanted,
                        to: first - 1,
                    };
                }
                let start = usize::try_from(wanted - first).unwrap_or(usize::MAX);
                if start < st.chunks.len() {
                    let mut out = Vec::new();
                    let mut size = 0;
                    for c in st.chunks.iter().skip(start) {
                        if size > 0 && size + c.data.len() > BATCH_BYTES {
                            break;
                        }
                        size += c.data.len();
                        out.push(c.clone());
                    }
                    if let Some(last) = out.last() {
                        st.subs.insert(
                            self.id,
                            Sub {
                                cursor: last.seq,
                                last_take: Instant::now(),
                            },
                        );
                    }
                    drop(st);
                    self.ring.consumed.notify_waiters();
                    return Event::Chunks(out);
                }
                if let Some(status) = &st.finished {
                    return Event::Finished(status.clone());
                }
            }
            changed.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.ring.state).subs.remove(&self.id);
        self.ring.consumed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn replay_gap_and_finish() {
        let ring = Ring::new(8);
        ring.push(StreamKind::Stdout, b("aaaa")).await;
        ring.push(StreamKind::Stderr, b("bbbb")).await;
        ring.push(StreamKind::Stdout, b("cccc")).await; // evicts seq 1
        ring.finish(ExitStatus {
            exit_code: Some(0),
            ..Default::default()
        });
        let mut sub = ring.subscribe(0);
        let mut out = Vec::new();
        loop {
            match sub.next().await {
                Event::Gap { from, to } => out.push(format!("gap {from}..={to}")),
                Event::Chunks(cs) => {
                    for c in cs {
                        out.push(format!(
                            "{} {:?} {}",
                            c.seq,
                            c.stream,
                            String::from_utf8_lossy(&c.data)
                        ));
                    }
                }
                Event::Finished(s) => {
                    out.push(format!("finished {s:?}"));
                    break;
                }
            }
        }
        expect_test::expect![[r#"
            [
                "gap 1..=1",
                "2 Stderr bbbb",
                "3 Stdout cccc",
                "finished ExitStatus { exit_code: Some(0), signal: None, timed_out: false, last_seq: 3 }",
            ]
        "#]]
        .assert_debug_eq(&out);
    }

    #[tokio::test]
    async fn live_subscriber_exerts_backpressure() {
        let ring = Ring::new(8);
        let mut sub = ring.subscribe(0);
        ring.push(StreamKind::Stdout, b("aaaa")).await;
        ring.push(StreamKind::Stdout, b("bbbb")).await;
        let producer = {
            let ring = ring.clone();
            tokio::spawn(async move {
                ring.push(StreamKind::Stdout, b("cccc")).await;
                ring.finish(ExitStatus::default());
            })
        };
        tokio::task::yield_now().await;
        assert!(!producer.is_finished(), "push must wait for the subscriber");
        let mut seqs = Vec::new();
        loop {
            match sub.next().await {
                Event::Chunks(cs) => seqs.extend(cs.iter().map(|c| c.seq)),
                Event::Gap { .. } => panic!("a live subscriber must not see a gap"),
                Event::Finished(_) => break,
            }
        }
        assert_eq!(seqs, vec![1, 2, 3]);
    }
}
