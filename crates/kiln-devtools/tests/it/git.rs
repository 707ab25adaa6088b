//! git through kilnd against a real smart-HTTP server: clone with host-held credentials,
//! typed status/diff/log/branches, commit, push, a refused push (bad credentials), a
//! non-fast-forward rejection and a merge conflict on pull.

use std::path::Path;
use std::process::Command;

use kiln_devtools::git::{Credential, Identity};
use kiln_devtools::{Git, GitError};

use crate::Daemon;
use kiln_devtools::gitserver::GitServer;

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Seed")
        .env("GIT_AUTHOR_EMAIL", "seed@example.com")
        .env("GIT_COMMITTER_NAME", "Seed")
        .env("GIT_COMMITTER_EMAIL", "seed@example.com")
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn creds(password: &str) -> Vec<Credential> {
    vec![Credential {
        host: Some("127.0.0.1".into()),
        username: "alice".into(),
        password: password.into(),
        id: None,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_commit_push_pull_with_typed_errors() {
    let host = tempfile::tempdir().expect("tempdir");
    let root = host.path().join("srv");
    std::fs::create_dir_all(&root).expect("srv");
    // A bare repository with one commit, made on the host.
    sh(
        host.path(),
        "git init -q --bare -b main srv/project.git && git init -q -b main seed && cd seed && \
         printf 'line one\\nline two\\n' > README.md && git add README.md && git commit -q -m 'Initial commit' && \
         git push -q ../srv/project.git main",
    );
    let server = GitServer::start(&root, "alice", "right-token").expect("git server");
    let url = format!("{}/project.git", server.url);

    let d = Daemon::start().await;
    let git = Git::new(d.client.clone(), None);
    let work = d.dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work");
    let work_s = work.to_string_lossy().into_owned();

    // Wrong credentials: a typed auth failure with git's message.
    let e = git
        .clone(&work_s, &url, Some("nope"), None, &creds("wrong"))
        .await
        .expect_err("bad credentials");
    assert!(matches!(e, GitError::AuthFailed { .. }), "{e:?}");
    assert_eq!(e.code(), "auth_failed");

    // The right ones: cloned, nothing about them left in the repository.
    let st = git
        .clone(&work_s, &url, None, None, &creds("right-token"))
        .await
        .expect("clone");
    assert_eq!(st.branch.as_deref(), Some("main"));
    assert_eq!(st.upstream.as_deref(), Some("origin/main"));
    assert!(st.clean, "{st:?}");
    let repo = format!("{work_s}/project");
    let config = std::fs::read_to_string(format!("{repo}/.git/config")).expect("config");
    assert!(
        !config.contains("right-token") && !config.contains("alice"),
        "{config}"
    );

    // Changes: status, diff, add, staged diff, commit, log.
    std::fs::write(format!("{repo}/README.md"), "line one\nline 2\n").expect("edit");
    std::fs::write(format!("{repo}/notes.txt"), "new\n").expect("new file");
    let st = git.status(&repo).await.expect("status");
    let summary: Vec<(String, String, char, char)> = st
        .entries
        .iter()
        .map(|e| (e.path.clone(), e.kind.clone(), e.index, e.worktree))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("README.md".into(), "changed".into(), '.', 'M'),
            ("notes.txt".into(), "untracked".into(), '?', '?'),
        ]
    );
    let diff = git.diff(&repo, false, &[]).await.expect("diff");
    assert_eq!(diff.len(), 1);
    assert_eq!((diff[0].additions, diff[0].deletions), (1, 1));
    assert!(
        diff[0].patch.contains("-line two\n+line 2\n"),
        "{}",
        diff[0].patch
    );
    git.add(&repo, &[]).await.expect("add");
    let staged = git.diff(&repo, true, &[]).await.expect("staged diff");
    assert_eq!(
        staged.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        vec!["README.md", "notes.txt"]
    );
    let ada = Identity {
        name: "Ada Agent".into(),
        email: "ada@example.com".into(),
    };
    let c = git
        .commit(&repo, "Edit README, add notes", &ada, false)
        .await
        .expect("commit");
    assert_eq!(c.author, ada);
    assert_eq!(c.subject, "Edit README, add notes");
    let e = git
        .commit(&repo, "again", &ada, false)
        .await
        .expect_err("nothing staged");
    assert!(matches!(e, GitError::NothingToCommit { .. }), "{e:?}");
    let log = git.log(&repo, 10, None).await.expect("log");
    assert_eq!(
        log.iter().map(|c| c.subject.as_str()).collect::<Vec<_>>(),
        vec!["Edit README, add notes", "Initial commit"]
    );
    assert_eq!(git.status(&repo).await.expect("status").ahead, 1);

    // Push: refused with bad credentials, accepted with good ones.
    let e = git
        .push(&repo, "origin", None, false, &creds("wrong"))
        .await
        .expect_err("refused push");
    assert!(matches!(e, GitError::AuthFailed { .. }), "{e:?}");
    let st = git
        .push(&repo, "origin", None, false, &creds("right-token"))
        .await
        .expect("push");
    assert_eq!(st.ahead, 0);
    let head = sh(
        &root,
        "git --git-dir=project.git log -1 --format=%s%n%an main",
    );
    assert_eq!(head, "Edit README, add notes\nAda Agent\n");

    // Branches.
    git.create_branch(&repo, "feature", None)
        .await
        .expect("branch");
    let st = git
        .checkout(&repo, "feature", false)
        .await
        .expect("checkout");
    assert_eq!(st.branch.as_deref(), Some("feature"));
    let names: Vec<(String, bool)> = git
        .branches(&repo)
        .await
        .expect("branches")
        .into_iter()
        .map(|b| (b.name, b.current))
        .collect();
    assert_eq!(
        names,
        vec![("feature".into(), true), ("main".into(), false)]
    );
    git.checkout(&repo, "main", false)
        .await
        .expect("back to main");
    let e = git
        .checkout(&repo, "no-such-branch", false)
        .await
        .expect_err("unknown");
    assert!(
        matches!(e, GitError::NotFound { .. } | GitError::Failed { .. }),
        "{e:?}"
    );
    assert!(matches!(
        git.checkout(&repo, "--orphan", false).await,
        Err(GitError::Invalid(_))
    ));

    // Someone else pushes a change to the same line; our push is not a fast-forward, and
    // pulling conflicts.
    sh(
        host.path(),
        "git clone -q srv/project.git other && cd other && \
         printf 'line one\\nline TWO (theirs)\\n' > README.md && git commit -q -am theirs && git push -q origin main",
    );
    std::fs::write(format!("{repo}/README.md"), "line one\nline two (ours)\n").expect("edit");
    git.commit(&repo, "ours", &ada, true)
        .await
        .expect("commit ours");
    let e = git
        .push(&repo, "origin", None, false, &creds("right-token"))
        .await
        .expect_err("non-fast-forward");
    assert!(matches!(e, GitError::NonFastForward { .. }), "{e:?}");
    let e = git
        .pull(&repo, "origin", Some("main"), &ada, &creds("right-token"))
        .await
        .expect_err("conflict");
    match &e {
        GitError::MergeConflict { paths, .. } => assert_eq!(paths, &vec!["README.md".to_string()]),
        other => panic!("expected a merge conflict, got {other:?}"),
    }
    let st = git.status(&repo).await.expect("status");
    assert!(st
        .entries
        .iter()
        .any(|e| e.kind == "unmerged" && e.path == "README.md"));

    // Not a repository.
    let e = git.status(&work_s).await.expect_err("not a repo");
    assert!(matches!(e, GitError::NotARepository { .. }), "{e:?}");
    let e = git
        .status(&format!("{work_s}/missing"))
        .await
        .expect_err("missing dir");
    assert!(matches!(e, GitError::NotARepository { .. }), "{e:?}");
}
