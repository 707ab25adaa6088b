//! SSH public keys registered to an organisation (migration 5): what the SSH front door of
//! `kiln up` accepts for that organisation's sandboxes. Stored as the OpenSSH public-key
//! line plus its SHA-256 fingerprint; lookups at login are by fingerprint.

use crate::db::Row;
use crate::{vals, Store, StoreError};

/// A registered SSH public key.
#[derive(Debug, Clone, PartialEq)]
pub struct SshKeyRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    /// e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// `SHA256:...` as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The OpenSSH public-key line (`ALGORITHM BASE64 [COMMENT]`).
    pub public_key: String,
    pub created_at_ms: u64,
    /// The API key that registered it.
    pub created_by: Option<String>,
}

const COLS: &str =
    "id, org_id, name, algorithm, fingerprint, public_key, created_at_ms, created_by";

fn ssh_key_row(r: &Row) -> Result<SshKeyRow, StoreError> {
    Ok(SshKeyRow {
        id: r.text(0)?,
        org_id: r.text(1)?,
        name: r.text(2)?,
        algorithm: r.text(3)?,
        fingerprint: r.text(4)?,
        public_key: r.text(5)?,
        created_at_ms: r.u64(6)?,
        created_by: r.opt_text(7)?,
    })
}

impl Store {
    /// Registers a key; `Conflict` if the org already has a key with this fingerprint.
    pub async fn insert_ssh_key(&self, k: &SshKeyRow) -> Result<(), StoreError> {
        let n = self
            .exec(
                &format!(
                    "INSERT INTO ssh_keys ({COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING"
                ),
                &vals![
                    &k.id,
                    &k.org_id,
                    &k.name,
                    &k.algorithm,
                    &k.fingerprint,
                    &k.public_key,
                    k.created_at_ms,
                    k.created_by.clone(),
                ],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("ssh key {}", k.fingerprint)));
        }
        Ok(())
    }

    /// The org's keys, oldest first.
    pub async fn list_ssh_keys(&self, org_id: &str) -> Result<Vec<SshKeyRow>, StoreError> {
        self.query(
            &format!("SELECT {COLS} FROM ssh_keys WHERE org_id = $1 ORDER BY created_at_ms, id"),
            &vals![org_id],
        )
        .await?
        .iter()
        .map(ssh_key_row)
        .collect()
    }

    /// Every registration of the key with this fingerprint (one per org that added it).
    pub async fn ssh_keys_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Vec<SshKeyRow>, StoreError> {
        self.query(
            &format!("SELECT {COLS} FROM ssh_keys WHERE fingerprint = $1"),
            &vals![fingerprint],
        )
        .await?
        .iter()
        .map(ssh_key_row)
        .collect()
    }

    /// Removes a key of `org_id` by id or fingerprint; returns the removed row.
    pub async fn remove_ssh_key(
        &self,
        org_id: &str,
        which: &str,
    ) -> Result<Option<SshKeyRow>, StoreError> {
        let Some(row) = self
            .query(
                &format!(
                    "SELECT {COLS} FROM ssh_keys WHERE org_id = $1 AND (id = $2 OR fingerprint = $2)"
                ),
                &vals![org_id, which],
            )
            .await?
            .first()
            .map(ssh_key_row)
            .transpose()?
        else {
            return Ok(None);
        };
        let n = self
            .exec(
                "DELETE FROM ssh_keys WHERE org_id = $1 AND id = $2",
                &vals![org_id, &row.id],
            )
            .await?;
        Ok((n > 0).then_some(row))
    }
}
