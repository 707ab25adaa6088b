//! `Watch`: change streams over inotify. Recursive watches add a watch for every directory
//! below the root, and for new directories as they appear (reporting what they already hold
//! as `Create`), skipping `/proc`, `/sys`, `/dev` and `/.kiln`. A watched *file* is followed
//! through its parent directory, so atomic replacements (write temp + rename) are seen.
//! Consecutive identical events of one read are merged (a large write is one `Modify`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode, Reply, WatchEvent, WatchKind};
use kilnd::frame;
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::files::{err, io_error, normalize};

/// The inotify descriptor as seen by the reactor (owned by the `Watcher`, which outlives it).
struct Raw(RawFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Pseudo filesystems (and kilnd's own directory) a recursive watch does not descend into.
const SKIP: [&str; 4] = ["/proc", "/sys", "/dev", "/.kiln"];

fn dir_mask() -> F {
    F::IN_CREATE
        | F::IN_MODIFY
        | F::IN_DELETE
        | F::IN_DELETE_SELF
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_MOVE_SELF
        | F::IN_ONLYDIR
        | F::IN_DONT_FOLLOW
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// An armed watch (created blocking, run async).
pub struct Watcher {
    ino: Inotify,
    wds: HashMap<WatchDescriptor, String>,
    root: String,
    root_is_dir: bool,
    /// A watched file: only events for this path are reported.
    only: Option<String>,
    recursive: bool,
}

impl Watcher {
    /// Arms a watch on `path` (blocking: walks the tree).
    pub fn arm(path: &str, recursive: bool) -> Result<Watcher, DaemonError> {
        let p = normalize(path)?;
        let md = fs::metadata(&p).map_err(|e| io_error(&e, &p))?;
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| io_error(&io::Error::from(e), &p))?;
        let mut w = Watcher {
            ino,
            wds: HashMap::new(),
            root: p.clone(),
            root_is_dir: md.is_dir(),
            only: None,
            recursive,
        };
        if md.is_dir() {
            w.add_tree(&p, None)?;
        } else {
            let parent = std::path::Path::new(&p)
                .parent()
                .map_or("/".to_string(), |d| d.to_string_lossy().into_owned());
            w.recursive = false;
            w.only = Some(p.clone());
            w.add_dir(&parent)?;
        }
        Ok(w)
    }

    fn add_dir(&mut self, dir: &str) -> Result<bool, DaemonError> {
        match self.ino.add_watch(dir, dir_mask()) {
            Ok(wd) => {
                self.wds.insert(wd, dir.to_string());
                Ok(true)
            }
            Err(Errno::ENOSPC) => Err(err(
                DaemonErrorCode::NoSpace,
                "inotify watch limit reached (fs.inotify.max_user_watches); watch a smaller tree",
            )),
            // Vanished, or replaced by a non-directory, meanwhile.
            Err(Errno::ENOENT | Errno::ENOTDIR) if dir != self.root => Ok(false),
            Err(e) => Err(io_error(&io::Error::from(e), dir)),
        }
    }

    /// Watches `dir` and, if recursive, every directory below it. With `found`, reports the
    /// entries met on the way as `Create` (they appeared before the watch existed).
    fn add_tree(
        &mut self,
        dir: &str,
        mut found: Option<&mut Vec<WatchEvent>>,
    ) -> Result<(), DaemonError> {
        if !self.add_dir(dir)? || !self.recursive {
            return Ok(());
        }
        let Ok(rd) = fs::read_dir(dir) else {
            return Ok(());
        };
        for ent in rd.flatten() {
            let child = join(dir, &ent.file_name().to_string_lossy());
            if SKIP.contains(&child.as_str()) && child != self.root {
                continue;
            }
            let is_dir = ent.file_type().is_ok_and(|t| t.is_dir());
            if let Some(out) = found.as_deref_mut() {
                out.push(WatchEvent {
                    kind: WatchKind::Create,
                    path: child.clone(),
                    is_dir,
                });
            }
            if is_dir {
                self.add_tree(&child, found.as_deref_mut())?;
            }
        }
        Ok(())
    }

    fn translate(
        &mut self,
        ev: InotifyEvent,
        out: &mut Vec<WatchEvent>,
        moves: &mut HashMap<u32, String>,
    ) {
        let m = ev.mask;
        if m.contains(F::IN_Q_OVERFLOW) {
            out.push(WatchEvent {
                kind: WatchKind::Overflow,
                path: self.root.clone(),
                is_dir: self.root_is_dir,
            });
            return;
        }
        if m.contains(F::IN_IGNORED) {
            self.wds.remove(&ev.wd);
            return;
        }
        let Some(base) = self.wds.get(&ev.wd).cloned() else {
            return;
        };
        let path = match &ev.name {
            Some(n) => join(&base, &n.to_string_lossy()),
            None => base.clone(),
        };
        let is_dir = m.contains(F::IN_ISDIR);
        let is_root_self = ev.name.is_none() && base == self.root;
        let mut push = |kind, path: &str| {
            out.push(WatchEvent {
                kind,
                path: path.to_string(),
                is_dir,
            })
        };
        if m.contains(F::IN_CREATE) {
            push(WatchKind::Create, &path);
        }
        if m.contains(F::IN_MODIFY) {
            push(WatchKind::Modify, &path);
        }
        if m.contains(F::IN_DELETE) {
            push(WatchKind::Remove, &path);
        }
        if m.contains(F::IN_DELETE_SELF) && is_root_self {
            out.push(WatchEvent {
                kind: WatchKind::Remove,
                path: path.clone(),
                is_dir: true,
            });
        }
        if m.contains(F::IN_MOVE_SELF) && is_root_self {
            out.push(WatchEvent {
                kind: WatchKind::Rename,
                path: path.clone(),
                is_dir: true,
            });
        }
        let mut push = |kind, path: &str| {
            out.push(WatchEvent {
                kind,
                path: path.to_string(),
                is_dir,
            })
        };
        if m.contains(F::IN_MOVED_FROM) {
            push(WatchKind::Rename, &path);
            if is_dir {
                moves.insert(ev.cookie, path.clone());
            }
        }
        if m.contains(F::IN_MOVED_TO) {
            push(WatchKind::Rename, &path);
        }
        if let Some(only) = &self.only {
            out.retain(|e| &e.path == only);
            return;
        }
        if !self.recursive || !is_dir {
            return;
        }
        if m.contains(F::IN_CREATE) {
            if let Err(e) = self.add_tree(&path, Some(out)) {
                tracing::warn!("watch {}: {}", self.root, e.message);
            }
        }
        if m.contains(F::IN_MOVED_TO) {
            match moves.remove(&ev.cookie) {
                // Moved within the tree: its watches stay, their paths change.
                Some(old) => {
                    let prefix = format!("{old}/");
                    for p in self.wds.values_mut() {
                        if *p == old {
                            *p = path.clone();
                        } else if let Some(rest) = p.strip_prefix(&prefix) {
                            *p = format!("{path}/{rest}");
                        }
                    }
                }
                None => {
                    if let Err(e) = self.add_tree(&path, Some(out)) {
                        tracing::warn!("watch {}: {}", self.root, e.message);
                    }
                }
            }
        }
    }

    /// Forgets directories moved out of the tree.
    fn drop_moved_out(&mut self, moves: HashMap<u32, String>) {
        for old in moves.into_values() {
            let prefix = format!("{old}/");
            let gone: Vec<WatchDescriptor> = self
                .wds
                .iter()
                .filter(|(_, p)| **p == old || p.starts_with(&prefix))
                .map(|(wd, _)| *wd)
                .collect();
            for wd in gone {
                let _ = self.ino.rm_watch(wd);
                self.wds.remove(&wd);
            }
        }
    }

    /// Streams `Watch` replies to `w` until the client closes its side (or a write fails).
    pub async fn run<R, W>(mut self, r: &mut R, w: &mut W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // SAFETY: `self` owns the inotify descriptor and outlives `fd` (dropped first).
        let fd = unsafe { AsyncFd::register(Raw(self.ino.as_fd().as_raw_fd())) }
            .map_err(io::Error::from)?;
        let st = &mut self;
        let mut scratch = [0u8; 256];
        loop {
            tokio::select! {
                n = r.read(&mut scratch) => match n {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {} // the client has nothing to say here
                },
                guard = fd.readable() => {
                    let mut guard = guard?;
                    let events = match guard.try_io(|_| st.ino.read_events().map_err(io::Error::from)) {
                        Ok(r) => r?,
                        Err(_would_block) => continue,
                    };
                    let mut out = Vec::new();
                    let mut moves = HashMap::new();
                    for ev in events {
                        st.translate(ev, &mut out, &mut moves);
                    }
                    st.drop_moved_out(moves);
                    // A large write is a burst of identical `Modify` events: send one.
                    out.dedup();
                    if out.is_empty() {
                        continue;
                    }
                    let mut buf = Vec::new();
                    for ev in out {
                        frame::encode_json(&mut buf, &Reply::Watch(ev))?;
                    }
                    w.write_all(&buf).await?;
                }
            }
        }
    }
}
