//! File operations of the protocol: path normalisation, error mapping, stat, list, mkdir, move,
//! remove, and the blocking halves of streamed reads and atomic writes. Everything here blocks:
//! the server runs it under `spawn_blocking`.
//!
//! Ownership: when kilnd runs as root, files and directories it creates get the owner of their
//! parent directory (so a file written into `/home/agent` belongs to `agent`), and a replaced
//! file keeps the owner and mode of the file it replaces.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode, FileKind, FileStat};

/// Most entries one `ListDir` returns (the reply must fit in one frame).
const MAX_ENTRIES: usize = 20_000;

pub fn err(code: DaemonErrorCode, message: impl Into<String>) -> DaemonError {
    DaemonError {
        code,
        message: message.into(),
    }
}

/// Lexically normalises `path` (relative paths are taken from `/`); refuses `..` above `/`.
pub fn normalize(path: &str) -> Result<String, DaemonError> {
    if path.is_empty() {
        return Err(err(DaemonErrorCode::Invalid, "empty path"));
    }
    if path.contains('\0') {
        return Err(err(DaemonErrorCode::Invalid, "path contains a NUL byte"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(err(
                        DaemonErrorCode::Invalid,
                        format!("path escapes the sandbox root: {path}"),
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Maps an I/O error on `path` to the protocol's error codes.
pub fn io_error(e: &io::Error, path: &str) -> DaemonError {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => DaemonErrorCode::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => DaemonErrorCode::PermissionDenied,
        Some(libc::ENOSPC | libc::EDQUOT) => DaemonErrorCode::NoSpace,
        Some(libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY) => DaemonErrorCode::WrongKind,
        Some(libc::EEXIST) => DaemonErrorCode::AlreadyExists,
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP | libc::EXDEV) => {
            DaemonErrorCode::Invalid
        }
        _ => DaemonErrorCode::Internal,
    };
    err(code, format!("{path}: {}", describe(e)))
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn file_stat(path: &str, md: &Metadata) -> FileStat {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let symlink_target = if ft.is_symlink() {
        fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    let name = Path::new(path)
        .file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    let modified_ms =
        (md.mtime().max(0) as u64) * 1000 + (md.mtime_nsec().max(0) as u64) / 1_000_000;
    FileStat {
        path: path.to_string(),
        name,
        kind,
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        modified_ms,
        symlink_target,
    }
}

/// `lstat` of a normalised path.
fn lstat_norm(p: &str) -> Result<FileStat, DaemonError> {
    let md = fs::symlink_metadata(p).map_err(|e| io_error(&e, p))?;
    Ok(file_stat(p, &md))
}

/// Metadata of a path (symlinks are not followed).
pub fn stat(path: &str) -> Result<FileStat, DaemonError> {
    lstat_norm(&normalize(path)?)
}

/// Entries under a directory, `depth` levels deep (1 = its own entries).
pub fn list_dir(path: &str, depth: u32) -> Result<Vec<FileStat>, DaemonError> {
    let p = normalize(path)?;
    let md = fs::metadata(&p).map_err(|e| io_error(&e, &p))?;
    if !md.is_dir() {
        return Err(err(
            DaemonErrorCode::WrongKind,
            format!("{p}: Not a directory"),
        ));
    }
    let mut out = Vec::new();
    walk(&p, depth.max(1), &mut out, true)?;
    Ok(out)
}

fn walk(dir: &str, depth: u32, out: &mut Vec<FileStat>, is_root: bool) -> Result<(), DaemonError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if is_root => return Err(io_error(&e, dir)),
        Err(_) => return Ok(()),
    };
    let mut entries: Vec<(String, Metadata)> = rd
        .flatten()
        .filter_map(|ent| {
            let child = join(dir, &ent.file_name().to_string_lossy());
            ent.metadata().ok().map(|md| (child, md))
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (child, md) in entries {
        if out.len() >= MAX_ENTRIES {
            return Err(err(
                DaemonErrorCode::Invalid,
                format!("more than {MAX_ENTRIES} entries under {dir}; list with a smaller depth"),
            ));
        }
        out.push(file_stat(&child, &md));
        if md.is_dir() && depth > 1 {
            walk(&child, depth - 1, out, false)?;
        }
    }
    Ok(())
}

fn is_root_user() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Gives `path` the owner of `parent` (when running as root; best effort).
fn inherit_owner(path: &Path, parent: &Metadata) {
    if is_root_user() && (parent.uid() != 0 || parent.gid() != 0) {
        let _ = std::os::unix::fs::lchown(path, Some(parent.uid()), Some(parent.gid()));
    }
}

/// `mkdir -p` of a normalised path, each new directory inheriting its parent's owner.
fn mkdir_p(p: &str) -> Result<(), DaemonError> {
    let mut cur = String::from("/");
    let mut parent_md = fs::metadata("/").map_err(|e| io_error(&e, "/"))?;
    for comp in p.split('/').filter(|c| !c.is_empty()) {
        let next = join(&cur, comp);
        match fs::metadata(&next) {
            Ok(md) if md.is_dir() => parent_md = md,
            Ok(_) => {
                return Err(err(
                    DaemonErrorCode::AlreadyExists,
                    format!("{next}: exists and is not a directory"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::create_dir(&next) {
                    Ok(()) => inherit_owner(Path::new(&next), &parent_md),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_error(&e, &next)),
                }
                parent_md = fs::metadata(&next).map_err(|e| io_error(&e, &next))?;
            }
            Err(e) => return Err(io_error(&e, &next)),
        }
        cur = next;
    }
    Ok(())
}

/// Creates a directory (`parents`: and its missing parents, no error if it exists).
pub fn mkdir(path: &str, parents: bool) -> Result<FileStat, DaemonError> {
    let p = normalize(path)?;
    if parents {
        mkdir_p(&p)?;
    } else {
        fs::create_dir(&p).map_err(|e| io_error(&e, &p))?;
        if let Some(parent) = Path::new(&p).parent() {
            if let Ok(md) = fs::metadata(parent) {
                inherit_owner(Path::new(&p), &md);
            }
        }
    }
    lstat_norm(&p)
}

fn rename_noreplace(from: &str, to: &str) -> io::Result<()> {
    let f =
        std::ffi::CString::new(from).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let t =
        std::ffi::CString::new(to).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Renames `from` to `to` (copying across filesystems); refuses to replace `to` unless
/// `overwrite`.
pub fn move_path(from: &str, to: &str, overwrite: bool) -> Result<FileStat, DaemonError> {
    let f = normalize(from)?;
    let t = normalize(to)?;
    if f == "/" || t == "/" {
        return Err(err(
            DaemonErrorCode::Invalid,
            "cannot move the root directory",
        ));
    }
    fs::symlink_metadata(&f).map_err(|e| io_error(&e, &f))?;
    if f == t {
        return lstat_norm(&t);
    }
    let exists = |p: &str| fs::symlink_metadata(p).is_ok();
    let already = || {
        err(
            DaemonErrorCode::AlreadyExists,
            format!("{t}: already exists"),
        )
    };
    let result = if overwrite {
        fs::rename(&f, &t)
    } else {
        match rename_noreplace(&f, &t) {
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
                    && !is_subpath(&t, &f) =>
            {
                // Filesystem without RENAME_NOREPLACE.
                if exists(&t) {
                    return Err(already());
                }
                fs::rename(&f, &t)
            }
            other => other,
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !overwrite => return Err(already()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            if exists(&t) {
                if !overwrite {
                    return Err(already());
                }
                remove_any(&t, true).map_err(|e| io_error(&e, &t))?;
            }
            copy_tree(Path::new(&f), Path::new(&t)).map_err(|e| io_error(&e, &t))?;
            remove_any(&f, true).map_err(|e| io_error(&e, &f))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && is_subpath(&t, &f) => {
            return Err(err(
                DaemonErrorCode::Invalid,
                format!("cannot move {f} into itself"),
            ));
        }
        Err(e) => return Err(io_error(&e, &f)),
    }
    lstat_norm(&t)
}

/// Whether `p` is `base` or below it.
fn is_subpath(p: &str, base: &str) -> bool {
    p == base || p.starts_with(&format!("{}/", base.trim_end_matches('/')))
}

fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(src)?;
    let ft = md.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        fs::create_dir(dst)?;
        for ent in fs::read_dir(src)? {
            let ent = ent?;
            copy_tree(&ent.path(), &dst.join(ent.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    } else {
        fs::copy(src, dst)?;
    }
    if is_root_user() {
        let _ = std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()));
    }
    Ok(())
}

fn remove_any(p: &str, recursive: bool) -> io::Result<()> {
    let md = fs::symlink_metadata(p)?;
    if md.is_dir() {
        if recursive {
            fs::remove_dir_all(p)
        } else {
            fs::remove_dir(p)
        }
    } else {
        fs::remove_file(p)
    }
}

/// Removes a file or directory (`recursive` for non-empty directories).
pub fn remove(path: &str, recursive: bool) -> Result<(), DaemonError> {
    let p = normalize(path)?;
    if p == "/" {
        return Err(err(
            DaemonErrorCode::Invalid,
            "refusing to remove the root directory",
        ));
    }
    remove_any(&p, recursive).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY | libc::EEXIST) => err(
            DaemonErrorCode::WrongKind,
            format!("{p}: Directory not empty (use recursive)"),
        ),
        _ => io_error(&e, &p),
    })
}

/// Opens a file for streaming; returns it with its metadata.
pub fn open_read(path: &str) -> Result<(File, FileStat), DaemonError> {
    let p = normalize(path)?;
    let file = File::open(&p).map_err(|e| io_error(&e, &p))?;
    let md = file.metadata().map_err(|e| io_error(&e, &p))?;
    if md.is_dir() {
        return Err(err(
            DaemonErrorCode::WrongKind,
            format!("{p}: Is a directory"),
        ));
    }
    Ok((file, file_stat(&p, &md)))
}

/// Reads the next chunk (`Ok(None)` at the end).
pub fn read_chunk(file: &mut File, size: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; size];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written atomically: data goes to a temp file in the target's directory, which
/// `commit` fsyncs and renames over the target. Dropping it uncommitted removes the temp file.
#[derive(Debug)]
pub struct AtomicWriter {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    path: String,
    mode: u32,
    owner: Option<(u32, u32)>,
    committed: bool,
}

impl AtomicWriter {
    /// Validates the destination and creates the temp file.
    pub fn create(
        path: &str,
        mode: Option<u32>,
        parents: bool,
    ) -> Result<AtomicWriter, DaemonError> {
        let p = normalize(path)?;
        let pp = Path::new(&p);
        let (Some(parent), Some(name)) = (pp.parent(), pp.file_name()) else {
            return Err(err(
                DaemonErrorCode::Invalid,
                "cannot write to the root directory",
            ));
        };
        let parent_str = parent.to_string_lossy().into_owned();
        if parents {
            mkdir_p(&parent_str)?;
        }
        let parent_md = fs::metadata(parent).map_err(|e| io_error(&e, &parent_str))?;
        if !parent_md.is_dir() {
            return Err(err(
                DaemonErrorCode::WrongKind,
                format!("{parent_str}: Not a directory"),
            ));
        }
        // Write through a symlink to its target, like a plain open() would.
        let mut target = pp.to_path_buf();
        if fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            if let Ok(real) = fs::canonicalize(&p) {
                target = real;
            }
        }
        let existing = fs::metadata(&target).ok();
        if existing.as_ref().is_some_and(Metadata::is_dir) {
            return Err(err(
                DaemonErrorCode::WrongKind,
                format!("{p}: Is a directory"),
            ));
        }
        let mode = match (mode, &existing) {
            (Some(m), _) => m & 0o7777,
            (None, Some(md)) => md.mode() & 0o7777,
            (None, None) => 0o644,
        };
        let owner = match &existing {
            Some(md) => Some((md.uid(), md.gid())),
            None => Some((parent_md.uid(), parent_md.gid())),
        }
        .filter(|_| is_root_user());
        let dir = target.parent().unwrap_or(parent).to_path_buf();
        let name = name.to_string_lossy();
        let mut attempt = 0;
        loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.kiln-tmp-{}-{n}", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(AtomicWriter {
                        file,
                        tmp,
                        target,
                        path: p,
                        mode,
                        owner,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(io_error(&e, &p)),
            }
        }
    }

    /// Appends data.
    pub fn write(&mut self, data: &[u8]) -> Result<(), DaemonError> {
        self.file
            .write_all(data)
            .map_err(|e| io_error(&e, &self.path))
    }

    /// fsyncs, applies owner and mode, and renames over the target.
    pub fn commit(mut self) -> Result<FileStat, DaemonError> {
        let p = self.path.clone();
        if let Some((uid, gid)) = self.owner {
            let _ = std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid));
        }
        self.file
            .set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(|e| io_error(&e, &p))?;
        self.file.sync_all().map_err(|e| io_error(&e, &p))?;
        fs::rename(&self.tmp, &self.target).map_err(|e| io_error(&e, &p))?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let md = fs::metadata(&self.target).map_err(|e| io_error(&e, &p))?;
        Ok(file_stat(&p, &md))
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        let cases = [
            "/",
            "a/b",
            "/a/./b/",
            "//a//b",
            "/a/b/../c",
            "/..",
            "a/../..",
            "/a/../../etc",
            "..",
            "",
        ];
        let out: Vec<String> = cases
            .iter()
            .map(|c| match normalize(c) {
                Ok(p) => format!("{c:?} -> {p}"),
                Err(e) => format!("{c:?} -> {:?}: {}", e.code, e.message),
            })
            .collect();
        expect_test::expect![[r#"
            [
                "\"/\" -> /",
                "\"a/b\" -> /a/b",
                "\"/a/./b/\" -> /a/b",
                "\"//a//b\" -> /a/b",
                "\"/a/b/../c\" -> /a/c",
                "\"/..\" -> Invalid: path escapes the sandbox root: /..",
                "\"a/../..\" -> Invalid: path escapes the sandbox root: a/../..",
                "\"/a/../../etc\" -> Invalid: path escapes the sandbox root: /a/../../etc",
                "\"..\" -> Invalid: path escapes the sandbox root: ..",
                "\"\" -> Invalid: empty path",
            ]
        "#]]
        .assert_debug_eq(&out);
    }
}
