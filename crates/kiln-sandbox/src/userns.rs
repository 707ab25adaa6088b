//! User-namespace support: image layers shifted into the mapped id range, and ownership of a
//! sandbox's writable directories by its (mapped) root.
//!
//! runc 1.1 cannot id-map an overlay rootfs, so each read-only layer is used through a copy
//! whose owners are shifted by `host_base` (made once per layer and mapping, next to the
//! layer as `rootfs-userns-<base>-<size>`, published by an atomic rename). Inside the sandbox
//! the files show their original owners; on the host they belong to unprivileged ids.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::IdMap;
use crate::error::{Result, SandboxError};

/// Host id for a container id: shifted into the mapped range, `nobody` (65534) when outside it.
fn shift(id: u32, m: IdMap) -> u32 {
    m.host_base
        + if id < m.size {
            id
        } else {
            65_534.min(m.size - 1)
        }
}

/// Gives `path` (not following symlinks) to the mapped owner of its current owner.
pub fn chown_shifted(path: &Path, m: IdMap) -> Result<()> {
    let md = fs::symlink_metadata(path)
        .map_err(|e| SandboxError::io(format!("stat {}", path.display()), e))?;
    if md.uid() >= m.host_base && md.uid() < m.host_base + m.size {
        return Ok(()); // already shifted
    }
    std::os::unix::fs::lchown(path, Some(shift(md.uid(), m)), Some(shift(md.gid(), m)))
        .map_err(|e| SandboxError::io(format!("chown {}", path.display()), e))?;
    // chown clears set-id bits; put them back (never on symlinks).
    if !md.file_type().is_symlink() && md.mode() & 0o6000 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(|e| SandboxError::io(format!("chmod {}", path.display()), e))?;
    }
    Ok(())
}

fn shift_tree(dir: &Path, m: IdMap) -> Result<()> {
    chown_shifted(dir, m)?;
    let rd =
        fs::read_dir(dir).map_err(|e| SandboxError::io(format!("reading {}", dir.display()), e))?;
    for entry in rd {
        let entry = entry.map_err(|e| SandboxError::io(format!("reading {}", dir.display()), e))?;
        let p = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| SandboxError::io(format!("stat {}", p.display()), e))?;
        if ft.is_dir() {
            shift_tree(&p, m)?;
        } else {
            chown_shifted(&p, m)?;
        }
    }
    Ok(())
}

/// The shifted copy of `layer` for mapping `m`, made on first use.
pub fn shifted_layer(layer: &Path, m: IdMap) -> Result<PathBuf> {
    let parent = layer.parent().ok_or_else(|| {
        SandboxError::InvalidSpec(format!("layer {} has no parent directory", layer.display()))
    })?;
    let name = layer
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("rootfs");
    let target = parent.join(format!("{name}-userns-{}-{}", m.host_base, m.size));
    if target.is_dir() {
        return Ok(target);
    }
    let tmp = parent.join(format!(
        ".{name}-userns-tmp-{}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(layer)
        .arg(&tmp)
        .output()
        .map_err(|e| SandboxError::io("running cp".to_string(), e))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(SandboxError::Host(format!(
            "copying layer {} for the user namespace failed: {}",
            layer.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if let Err(e) = shift_tree(&tmp, m) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &target) {
        Ok(()) => Ok(target),
        // Another create published it first: use theirs.
        Err(_) if target.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(target)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(SandboxError::io(
                format!("publishing {}", target.display()),
                e,
            ))
        }
    }
}

/// Under a user namespace, runc's init runs as an unprivileged host id and must reach each
/// sandbox's rootfs: `data_dir` and `sandboxes` get search permission for others, and every
/// directory above `data_dir` must already have it (a clear error says which does not).
pub fn make_traversable(data_dir: &Path, sandboxes: &Path) -> Result<()> {
    for d in [data_dir, sandboxes] {
        let md =
            fs::metadata(d).map_err(|e| SandboxError::io(format!("stat {}", d.display()), e))?;
        if md.mode() & 0o001 == 0 {
            fs::set_permissions(d, fs::Permissions::from_mode((md.mode() & 0o7777) | 0o011))
                .map_err(|e| SandboxError::io(format!("chmod {}", d.display()), e))?;
        }
    }
    let canon = fs::canonicalize(data_dir)
        .map_err(|e| SandboxError::io(format!("resolving {}", data_dir.display()), e))?;
    for a in canon.ancestors().skip(1) {
        let md =
            fs::metadata(a).map_err(|e| SandboxError::io(format!("stat {}", a.display()), e))?;
        if md.mode() & 0o001 == 0 {
            return Err(SandboxError::InvalidConfig(format!(
                "sandboxes run in a user namespace and cannot reach the data dir: {} is not searchable by others (chmod o+x {} or choose another data dir)",
                a.display(),
                a.display()
            )));
        }
    }
    Ok(())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a local buffer; a short read only weakens a temp-name suffix.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_shift_into_the_range() {
        let m = IdMap {
            host_base: 100_000,
            size: 65_536,
        };
        assert_eq!(shift(0, m), 100_000);
        assert_eq!(shift(1000, m), 101_000);
        assert_eq!(shift(70_000, m), 165_534);
    }
}
