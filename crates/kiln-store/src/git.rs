//! Organisation git settings (migration 9): the default commit author of an organisation and
//! its stored credentials for https git hosts. The store keeps a credential's secret exactly
//! as the server hands it over (the server encrypts it first); nothing here ever decrypts.

use crate::db::Row;
use crate::{vals, Store, StoreError};

/// A stored git credential: one per (organisation, host).
#[derive(Clone, PartialEq)]
pub struct GitCredentialRow {
    pub id: String,
    pub org_id: String,
    /// `example.com` or `example.com:8443`, lower-case.
    pub host: String,
    pub username: String,
    /// The sealed password (the server's encryption; opaque here).
    pub secret: String,
    pub created_at_ms: u64,
    /// The API key that stored it.
    pub created_by: Option<String>,
    pub last_used_at_ms: Option<u64>,
}

impl std::fmt::Debug for GitCredentialRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentialRow")
            .field("id", &self.id)
            .field("org_id", &self.org_id)
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

const COLS: &str = "id, org_id, host, username, secret, created_at_ms, created_by, last_used_at_ms";

fn credential_row(r: &Row) -> Result<GitCredentialRow, StoreError> {
    Ok(GitCredentialRow {
        id: r.text(0)?,
        org_id: r.text(1)?,
        host: r.text(2)?,
        username: r.text(3)?,
        secret: r.text(4)?,
        created_at_ms: r.u64(5)?,
        created_by: r.opt_text(6)?,
        last_used_at_ms: r.opt_u64(7)?,
    })
}

impl Store {
    /// Stores a credential; `Conflict` if the org already has one for this host.
    pub async fn insert_git_credential(&self, c: &GitCredentialRow) -> Result<(), StoreError> {
        let n = self
            .exec(
                &format!(
                    "INSERT INTO git_credentials ({COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING"
                ),
                &vals![
                    &c.id,
                    &c.org_id,
                    &c.host,
                    &c.username,
                    &c.secret,
                    c.created_at_ms,
                    c.created_by.clone(),
                    c.last_used_at_ms,
                ],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "git credential for {}",
                c.host
            )));
        }
        Ok(())
    }

    /// The org's credentials, by host.
    pub async fn list_git_credentials(
        &self,
        org_id: &str,
    ) -> Result<Vec<GitCredentialRow>, StoreError> {
        self.query(
            &format!("SELECT {COLS} FROM git_credentials WHERE org_id = $1 ORDER BY host, id"),
            &vals![org_id],
        )
        .await?
        .iter()
        .map(credential_row)
        .collect()
    }

    /// Removes a credential of `org_id` by id or host; returns the removed row.
    pub async fn remove_git_credential(
        &self,
        org_id: &str,
        which: &str,
    ) -> Result<Option<GitCredentialRow>, StoreError> {
        let Some(row) = self
            .query(
                &format!(
                    "SELECT {COLS} FROM git_credentials WHERE org_id = $1 AND (id = $2 OR host = $3)"
                ),
                &vals![org_id, which, which.to_ascii_lowercase()],
            )
            .await?
            .first()
            .map(credential_row)
            .transpose()?
        else {
            return Ok(None);
        };
        let n = self
            .exec(
                "DELETE FROM git_credentials WHERE org_id = $1 AND id = $2",
                &vals![org_id, &row.id],
            )
            .await?;
        Ok((n > 0).then_some(row))
    }

    /// Records that a credential was handed to git.
    pub async fn touch_git_credential(&self, id: &str, now_ms: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE git_credentials SET last_used_at_ms = $2 WHERE id = $1",
            &vals![id, now_ms],
        )
        .await
        .map(|_| ())
    }

    /// The org's default commit author as (name, email), if set.
    pub async fn git_author(&self, org_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let rows = self
            .query(
                "SELECT author_name, author_email FROM git_settings WHERE org_id = $1",
                &vals![org_id],
            )
            .await?;
        match rows.first() {
            Some(r) => match (r.opt_text(0)?, r.opt_text(1)?) {
                (Some(n), Some(e)) => Ok(Some((n, e))),
                _ => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Sets (or with `None` clears) the org's default commit author.
    pub async fn set_git_author(
        &self,
        org_id: &str,
        author: Option<(&str, &str)>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let (name, email) = match author {
            Some((n, e)) => (Some(n.to_string()), Some(e.to_string())),
            None => (None, None),
        };
        self.exec(
            "INSERT INTO git_settings (org_id, author_name, author_email, updated_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id) DO UPDATE SET author_name = excluded.author_name,
               author_email = excluded.author_email, updated_at_ms = excluded.updated_at_ms",
            &vals![org_id, name, email, now_ms],
        )
        .await
        .map(|_| ())
    }
}
