//! A real sandbox from a built template (`$KILN_TEST_IMAGES`, which `make test-image` fills),
//! on its own runtime (data dir, run dir, cgroup parent); everything is destroyed on drop.

use std::path::PathBuf;

use kiln_sandbox::{Runtime, RuntimeConfig, SandboxSpec};

pub struct TestSandbox {
    pub rt: Runtime,
    pub id: String,
    run_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The image store of the tests, if the template `name` is built there.
pub fn template_layers(name: &str) -> Option<Vec<PathBuf>> {
    let images = std::env::var_os("KILN_TEST_IMAGES")?;
    let store = kiln_template::ImageStore::open(PathBuf::from(images)).ok()?;
    let r = store.get(name).ok()?;
    Some(store.lower_dirs(&r))
}

impl TestSandbox {
    pub async fn start(template: &str) -> TestSandbox {
        let layers = template_layers(template).unwrap_or_else(|| {
            panic!(
                "template `{template}` is not built in $KILN_TEST_IMAGES (run `make test-image`)"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("kiln-devtools-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let mut tag = [0u8; 4];
        // SAFETY: getrandom into a local buffer.
        unsafe { libc::getrandom(tag.as_mut_ptr().cast(), tag.len(), 0) };
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let mut cfg = RuntimeConfig::new(dir.path().join("data"), crate::kilnd_bin());
        cfg.run_dir = PathBuf::from(format!("/run/kiln-dt-{tag}"));
        cfg.cgroup_parent = format!("kiln-dt/{tag}");
        cfg.disk_pool_bytes = 4 << 30;
        let rt = Runtime::new(cfg.clone()).await.expect("runtime");
        let id = format!("dt-{tag}");
        let mut spec = SandboxSpec::new(&id, layers);
        spec.memory_bytes = 1 << 30;
        spec.disk_bytes = 1 << 30;
        spec.cpus = 2.0;
        rt.create(&spec).await.expect("create sandbox");
        TestSandbox {
            rt,
            id,
            run_dir: cfg.run_dir,
            _dir: dir,
        }
    }

    pub fn client(&self) -> kilnd::Client {
        self.rt.client(&self.id)
    }

    pub async fn write(&self, path: &str, text: &str) {
        self.client()
            .write_file(path, None, true, text.as_bytes())
            .await
            .expect("write file");
    }

    /// Runs a shell script; returns stdout, panicking on a non-zero exit.
    pub async fn sh(&self, script: &str) -> String {
        let mut p = self
            .client()
            .exec(kiln_protocol::kilnd::ExecSpec {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            })
            .await
            .expect("exec");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(r) = p.next().await {
            match r.expect("reply") {
                kiln_protocol::kilnd::Reply::Output { stream, data, .. } => match stream {
                    kiln_protocol::kilnd::StreamKind::Stdout => out.extend(data),
                    kiln_protocol::kilnd::StreamKind::Stderr => err.extend(data),
                },
                kiln_protocol::kilnd::Reply::Exited(st) => assert_eq!(
                    st.exit_code,
                    Some(0),
                    "{script}: {}",
                    String::from_utf8_lossy(&err)
                ),
                _ => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let rt = self.rt.clone();
        let run_dir = self.run_dir.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(r) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = r.block_on(rt.destroy_all());
            }
            let _ = std::fs::remove_dir_all(run_dir);
        })
        .join();
    }
}
