//! Encryption at rest of an index (`encrypted: true` at create): AES-256-GCM with keys of the
//! index's organisation, derived from the server's master key (itself derived from the server
//! secret, `<data dir>/secret`) and never written anywhere. A [`Sealer`] seals values with a
//! random nonce (chunk text, symbols, vectors), seals paths deterministically (equal paths give
//! equal ciphertexts, so `WHERE path = ?` still works; the nonce is an HMAC of the path, as in
//! SIV), and turns content hashes into keyed hashes (a plain SHA-256 of a chunk would confirm a
//! guessed text). [`SealedDirectory`] is the tantivy directory of an encrypted index: every file
//! is sealed on disk and held decrypted in memory only.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;

type Nonce = aes_gcm::aead::Nonce<Aes256Gcm>;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tantivy::directory::error::{DeleteError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    AntiCallToken, Directory, FileHandle, FileSlice, TerminatingWrite, WatchCallback,
    WatchCallbackList, WatchHandle, WritePtr,
};

use crate::Error;

/// First byte of every sealed value (the format's version).
const VERSION: u8 = 1;
const NONCE: usize = 12;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The server's knowledge master key. Organisation keys are derived from it on demand.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// The master key of a server secret (any length; the server's is 32 random bytes).
    pub fn from_secret(secret: &[u8]) -> MasterKey {
        MasterKey(hmac(secret, &[b"kiln knowledge master key v1"]))
    }

    /// The sealer of an organisation.
    pub fn org(&self, org: &str) -> Sealer {
        let k = hmac(&self.0, &[b"org", org.as_bytes()]);
        Sealer {
            aead: Aes256Gcm::new(&hmac(&k, &[b"aead"]).into()),
            siv: hmac(&k, &[b"siv"]),
            ids: hmac(&k, &[b"ids"]),
        }
    }
}

/// Seals and opens the values of one organisation's encrypted indexes.
pub struct Sealer {
    aead: Aes256Gcm,
    /// Derives the nonce of a deterministic seal from the value.
    siv: [u8; 32],
    /// Keys content hashes.
    ids: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    fn seal_with(&self, nonce: [u8; NONCE], purpose: &[u8], plain: &[u8]) -> Vec<u8> {
        let ct = self
            .aead
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: purpose,
                },
            )
            // Only inputs over 64 GiB fail.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Seals `plain` with a random nonce; `purpose` is authenticated (a text cannot be passed
    /// off as a path).
    pub fn seal(&self, purpose: &[u8], plain: &[u8]) -> Vec<u8> {
        use rand::RngCore;
        let mut nonce = [0u8; NONCE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_with(nonce, purpose, plain)
    }

    /// Seals deterministically: the same value gives the same bytes (lookups by equality).
    pub fn seal_det(&self, purpose: &[u8], plain: &[u8]) -> Vec<u8> {
        let h = hmac(&self.siv, &[purpose, plain]);
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&h[..NONCE]);
        self.seal_with(nonce, purpose, plain)
    }

    /// Opens what [`Self::seal`] or [`Self::seal_det`] sealed for `purpose`.
    pub fn open(&self, purpose: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Error> {
        if sealed.len() < 1 + NONCE + 16 || sealed[0] != VERSION {
            return Err(Error::Storage(
                "a sealed value is truncated or of an unknown format".into(),
            ));
        }
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&sealed[1..1 + NONCE]);
        self.aead
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &sealed[1 + NONCE..],
                    aad: purpose,
                },
            )
            .map_err(|_| {
                Error::Storage(
                    "a sealed value does not open with this server's key (was <data dir>/secret replaced?)"
                        .into(),
                )
            })
    }

    /// A keyed hash (hex, 64 characters) standing in for a content hash.
    pub fn keyed_hash(&self, purpose: &[u8], data: &[u8]) -> String {
        hex::encode(hmac(&self.ids, &[purpose, data]))
    }
}

struct Inner {
    disk: PathBuf,
    sealer: Arc<Sealer>,
    files: RwLock<HashMap<PathBuf, FileSlice>>,
    watchers: WatchCallbackList,
}

/// A tantivy directory whose files are sealed on disk and decrypted into memory when opened.
/// Tantivy files are write-once, so a file is sealed whole when its writer terminates.
#[derive(Clone)]
pub struct SealedDirectory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SealedDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedDirectory({})", self.inner.disk.display())
    }
}

fn purpose(path: &Path) -> Vec<u8> {
    let mut p = b"bm25:".to_vec();
    p.extend_from_slice(path.to_string_lossy().as_bytes());
    p
}

fn lock_poisoned() -> io::Error {
    io::Error::other("sealed directory lock poisoned")
}

impl SealedDirectory {
    /// Opens (creating) `disk` and decrypts every file in it.
    pub fn open(disk: &Path, sealer: Arc<Sealer>) -> Result<SealedDirectory, Error> {
        std::fs::create_dir_all(disk)?;
        let mut files = HashMap::new();
        for e in std::fs::read_dir(disk)? {
            let e = e?;
            let name = PathBuf::from(e.file_name());
            if name.extension().is_some_and(|x| x == "partial") {
                // A write interrupted by a crash: tantivy never referenced it.
                std::fs::remove_file(e.path())?;
                continue;
            }
            let sealed = std::fs::read(e.path())?;
            let plain = sealer.open(&purpose(&name), &sealed)?;
            files.insert(name, FileSlice::from(plain));
        }
        Ok(SealedDirectory {
            inner: Arc::new(Inner {
                disk: disk.to_path_buf(),
                sealer,
                files: RwLock::new(files),
                watchers: WatchCallbackList::default(),
            }),
        })
    }

    fn disk_path(&self, path: &Path) -> io::Result<PathBuf> {
        // Tantivy's files live at the top of its directory.
        match path.file_name() {
            Some(n) if path.parent().is_none_or(|p| p.as_os_str().is_empty()) => {
                Ok(self.inner.disk.join(n))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected tantivy file path {}", path.display()),
            )),
        }
    }

    /// Seals `data` to disk (temporary file, then rename) and makes it readable.
    fn persist(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let target = self.disk_path(path)?;
        let tmp = target.with_extension("partial");
        let sealed = self.inner.sealer.seal(&purpose(path), data);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&sealed)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &target)?;
        self.inner
            .files
            .write()
            .map_err(|_| lock_poisoned())?
            .insert(path.to_path_buf(), FileSlice::from(data.to_vec()));
        Ok(())
    }
}

/// Buffers a file until its writer terminates, then seals it.
struct SealedWriter {
    dir: SealedDirectory,
    path: PathBuf,
    buf: Vec<u8>,
}

impl Write for SealedWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TerminatingWrite for SealedWriter {
    fn terminate_ref(&mut self, _: AntiCallToken) -> io::Result<()> {
        self.dir.persist(&self.path, &self.buf)
    }
}

impl Directory for SealedDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        Ok(Arc::new(self.open_read(path)?))
    }

    fn open_read(&self, path: &Path) -> Result<FileSlice, OpenReadError> {
        let files = self
            .inner
            .files
            .read()
            .map_err(|_| OpenReadError::wrap_io_error(lock_poisoned(), path.to_path_buf()))?;
        files
            .get(path)
            .cloned()
            .ok_or_else(|| OpenReadError::FileDoesNotExist(path.to_path_buf()))
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        let io_err = |e: io::Error| DeleteError::IoError {
            io_error: Arc::new(e),
            filepath: path.to_path_buf(),
        };
        let existed = self
            .inner
            .files
            .write()
            .map_err(|_| io_err(lock_poisoned()))?
            .remove(path)
            .is_some();
        match std::fs::remove_file(self.disk_path(path).map_err(io_err)?) {
            Ok(()) => Ok(()),
            // Lock files live in memory only.
            Err(e) if e.kind() == io::ErrorKind::NotFound && existed => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DeleteError::FileDoesNotExist(path.to_path_buf()))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        Ok(self
            .inner
            .files
            .read()
            .map_err(|_| OpenReadError::wrap_io_error(lock_poisoned(), path.to_path_buf()))?
            .contains_key(path))
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        let mut files = self
            .inner
            .files
            .write()
            .map_err(|_| OpenWriteError::wrap_io_error(lock_poisoned(), path.to_path_buf()))?;
        if files.contains_key(path) {
            return Err(OpenWriteError::FileAlreadyExists(path.to_path_buf()));
        }
        // Reserved at once (tantivy's locks rely on it), sealed on disk when terminated.
        files.insert(path.to_path_buf(), FileSlice::from(Vec::new()));
        Ok(io::BufWriter::new(Box::new(SealedWriter {
            dir: self.clone(),
            path: path.to_path_buf(),
            buf: Vec::new(),
        })))
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        let f = self.open_read(path)?;
        f.read_bytes()
            .map(|b| b.as_slice().to_vec())
            .map_err(|e| OpenReadError::wrap_io_error(e, path.to_path_buf()))
    }

    fn atomic_write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.persist(path, data)?;
        if path == Path::new("meta.json") {
            drop(self.inner.watchers.broadcast());
        }
        Ok(())
    }

    fn sync_directory(&self) -> io::Result<()> {
        std::fs::File::open(&self.inner.disk)?.sync_all()
    }

    fn watch(&self, cb: WatchCallback) -> tantivy::Result<WatchHandle> {
        Ok(self.inner.watchers.subscribe(cb))
    }
}
