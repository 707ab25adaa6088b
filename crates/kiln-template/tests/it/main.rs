//! Integration tests of template builds with the real `ansible-playbook` (root): layer caching
//! by key, failures that keep the previous ref, spec errors, and garbage collection with a
//! real overlay mount. Role builds start from the `debian` and `base` layers of the store in
//! `$KILN_TEST_IMAGES` (`make test-image` builds them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_template::template::{self, BuildEvent, BuildOptions};
use kiln_template::{ImageStore, Sources, TemplateError};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn test_store() -> ImageStore {
    let dir = std::env::var_os("KILN_TEST_IMAGES")
        .expect("KILN_TEST_IMAGES is not set: run the suite with `make test`");
    ImageStore::open(PathBuf::from(dir)).expect("open store")
}

/// A sources tree with the repo's `base` role (linked, so its layer is the cached one) and
/// small test roles.
struct TestSources {
    dir: tempfile::TempDir,
}

impl TestSources {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let roles = dir.path().join("ansible/roles");
        std::fs::create_dir_all(&roles).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("templates")).expect("mkdir");
        std::fs::copy(
            repo().join("ansible/ansible.cfg"),
            dir.path().join("ansible/ansible.cfg"),
        )
        .expect("cfg");
        std::os::unix::fs::symlink(repo().join("ansible/roles/base"), roles.join("base"))
            .expect("link base");
        let s = Self { dir };
        for r in ["t1", "t2"] {
            s.role(
                r,
                &format!(
                    "---\n- name: Write {r}\n  ansible.builtin.copy:\n    dest: /etc/kiln-{r}.txt\n    content: \"{{{{ {r}_msg }}}}\\n\"\n    mode: \"0644\"\n"
                ),
                &format!("---\n{r}_msg: default\n"),
            );
        }
        s.role(
            "tfail",
            "---\n- name: Fail on purpose\n  ansible.builtin.shell: echo boom-output; echo boom-err >&2; exit 3\n  when: tfail_fail | bool\n",
            "---\ntfail_fail: false\n",
        );
        s
    }

    fn role(&self, name: &str, tasks: &str, defaults: &str) {
        let d = self.dir.path().join("ansible/roles").join(name);
        for sub in ["tasks", "defaults", "meta"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        std::fs::write(d.join("tasks/main.yml"), tasks).expect("tasks");
        std::fs::write(d.join("defaults/main.yml"), defaults).expect("defaults");
        std::fs::write(d.join("meta/main.yml"), "---\ndependencies: []\n").expect("meta");
    }

    fn template(&self, name: &str, toml: &str) {
        std::fs::write(self.dir.path().join(format!("templates/{name}.toml")), toml).expect("spec");
    }

    fn sources(&self) -> Sources {
        Sources {
            templates: self.dir.path().join("templates"),
            ansible: self.dir.path().join("ansible"),
            private: None,
        }
    }
}

/// Builds and returns (ref, roles rebuilt in order).
fn build(
    store: &ImageStore,
    src: &Sources,
    name: &str,
) -> (Result<kiln_template::ImageRef, TemplateError>, Vec<String>) {
    let mut rebuilt = Vec::new();
    let r = template::build(store, src, name, &BuildOptions::default(), &mut |e| {
        if let BuildEvent::LayerStart {
            role,
            cached: false,
            ..
        } = e
        {
            rebuilt.push(role);
        }
    });
    (r, rebuilt)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (std::process::id() << 8))
        .unwrap_or(7)
}

fn read_in_stack(store: &ImageStore, r: &kiln_template::ImageRef, file: &str) -> Option<String> {
    store
        .lower_dirs(r)
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
}

#[test]
fn only_layers_whose_inputs_changed_are_rebuilt() {
    let store = test_store();
    let ts = TestSources::new();
    let src = ts.sources();
    let name = unique("cache");
    // A fresh value per run so the first build really builds t1 and t2.
    let salt = unique("v");
    let spec = |a: &str, b: &str| {
        format!("roles = [\"base\", \"t1\", \"t2\"]\n[vars]\nt1_msg = \"{a}-{salt}\"\nt2_msg = \"{b}-{salt}\"\n")
    };
    ts.template(&name, &spec("a", "b"));
    let (r1, rebuilt) = build(&store, &src, &name);
    let r1 = r1.expect("first build");
    assert_eq!(
        rebuilt,
        ["t1", "t2"],
        "base comes from the cache, t1 and t2 are new"
    );
    assert_eq!(r1.layers.len(), 4);
    assert_eq!(
        read_in_stack(&store, &r1, "etc/kiln-t2.txt"),
        Some(format!("b-{salt}\n"))
    );

    let (r2, rebuilt) = build(&store, &src, &name);
    assert!(rebuilt.is_empty(), "no-change rebuild rebuilt {rebuilt:?}");
    assert_eq!(r2.expect("second build").layers, r1.layers);

    ts.template(&name, &spec("a", "c"));
    let (r3, rebuilt) = build(&store, &src, &name);
    let r3 = r3.expect("t2 change");
    assert_eq!(rebuilt, ["t2"]);
    assert_eq!(r3.layers[1..], r1.layers[1..], "layers below t2 are shared");
    assert_ne!(r3.layers[0], r1.layers[0]);
    assert_eq!(
        read_in_stack(&store, &r3, "etc/kiln-t2.txt"),
        Some(format!("c-{salt}\n"))
    );

    ts.template(&name, &spec("z", "c"));
    let (r4, rebuilt) = build(&store, &src, &name);
    r4.expect("t1 change");
    assert_eq!(
        rebuilt,
        ["t1", "t2"],
        "a change in t1 rebuilds t1 and everything above it"
    );

    // A role file edit (not only a variable) also invalidates the layer.
    let tasks = ts.dir.path().join("ansible/roles/t2/tasks/main.yml");
    let mut text = std::fs::read_to_string(&tasks).expect("read");
    text.push_str("# edited\n");
    std::fs::write(&tasks, text).expect("write");
    let (r5, rebuilt) = build(&store, &src, &name);
    let r5 = r5.expect("t2 edit");
    assert_eq!(rebuilt, ["t2"]);
    let info = template::info(&store, &src, &name).expect("info");
    assert_eq!(info.cache, kiln_template::CacheState::Fresh);
    let m = r5.template.expect("manifest");
    assert_eq!(
        m.roles.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ["base", "t1", "t2"]
    );
    assert_eq!(
        m.roles[2].vars.get("t2_msg"),
        Some(&serde_json::json!(format!("c-{salt}")))
    );
    assert!(
        !m.roles[2].vars.contains_key("t1_msg"),
        "t2 does not see t1's variables"
    );
    assert!(
        m.tools.contains_key("curl"),
        "base records its tools: {:?}",
        m.tools
    );
    ts.template(&name, &spec("y", "c"));
    assert_eq!(
        template::info(&store, &src, &name).expect("info").cache,
        kiln_template::CacheState::Stale
    );
    template::remove(&store, &name).expect("rm");
}

/// Files under `rel` in a layer's rootfs whose names contain `needle`.
fn layer_files(store: &ImageStore, digest: &str, rel: &str, needle: &str) -> Vec<String> {
    std::fs::read_dir(store.layer_rootfs(digest).join(rel))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn apt_lists_and_downloads_live_in_the_store_cache_not_in_layers() {
    let store = test_store();
    let ts = TestSources::new();
    ts.role(
        "tapt",
        "---\n- name: Install bc\n  ansible.builtin.apt:\n    name: bc\n    update_cache: true\n    cache_valid_time: 3600\n    install_recommends: false\n",
        "---\ntapt_salt: none\n",
    );
    let name = unique("apt");
    ts.template(
        &name,
        &format!(
            "roles = [\"base\", \"tapt\"]\n[vars]\ntapt_salt = \"{}\"\n",
            unique("s")
        ),
    );
    let (r, rebuilt) = build(&store, &ts.sources(), &name);
    let r = r.expect("build");
    assert_eq!(rebuilt, ["tapt"]);
    let (lists, archives) = store.apt_cache().expect("cache");
    let cached = |dir: &Path, needle: &str| {
        std::fs::read_dir(dir)
            .expect("cache dir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains(needle))
    };
    assert!(
        cached(&lists, "_Packages"),
        "the store cache holds the lists"
    );
    assert!(cached(&archives, "bc_"), "the download stays in the cache");
    let m = r.template.as_ref().expect("manifest");
    for (role, digest) in std::iter::once(("debian", &m.base))
        .chain(m.roles.iter().map(|l| (l.role.as_str(), &l.digest)))
    {
        assert_eq!(
            layer_files(&store, digest, "var/lib/apt/lists", "_Packages"),
            Vec::<String>::new(),
            "{role} layer carries package lists"
        );
        assert_eq!(
            layer_files(&store, digest, "var/cache/apt/archives", ".deb"),
            Vec::<String>::new(),
            "{role} layer carries downloads"
        );
    }
    assert!(
        store
            .layer_rootfs(&r.layers[0])
            .join("usr/bin/bc")
            .is_file(),
        "the role's package is in its layer"
    );
    template::remove(&store, &name).expect("rm");
}

#[test]
fn a_failing_role_names_the_task_and_keeps_the_previous_ref() {
    let store = test_store();
    let ts = TestSources::new();
    let src = ts.sources();
    let name = unique("fail");
    let salt = unique("v");
    ts.template(
        &name,
        &format!("roles = [\"base\", \"t1\", \"tfail\"]\n[vars]\nt1_msg = \"{salt}\"\ntfail_fail = false\n"),
    );
    let (good, _) = build(&store, &src, &name);
    let good = good.expect("good build");
    ts.template(
        &name,
        &format!("roles = [\"base\", \"t1\", \"tfail\"]\n[vars]\nt1_msg = \"{salt}\"\ntfail_fail = true\n"),
    );
    let (bad, rebuilt) = build(&store, &src, &name);
    assert_eq!(rebuilt, ["tfail"]);
    match bad {
        Err(TemplateError::RoleFailed { role, task, output }) => {
            assert_eq!(role, "tfail");
            assert_eq!(task, "tfail : Fail on purpose");
            assert!(output.contains("boom-output"), "{output}");
            assert!(output.contains("boom-err"), "{output}");
            assert!(output.contains("rc: 3"), "{output}");
        }
        other => panic!("expected RoleFailed, got {other:?}"),
    }
    assert_eq!(store.get(&name).expect("previous ref"), good);
    // No mount of the failed build is left on the host.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&store.root().join("tmp").display().to_string()));
    template::remove(&store, &name).expect("rm");
}

#[test]
fn spec_errors_are_clear() {
    let store = test_store();
    let ts = TestSources::new();
    let src = ts.sources();
    let e = build(&store, &src, "no-such-template")
        .0
        .expect_err("unknown");
    let msg = e.to_string();
    assert!(
        matches!(e, TemplateError::UnknownTemplate { .. })
            && msg.starts_with("unknown template `no-such-template`"),
        "{msg}"
    );
    ts.template("badrole", "roles = [\"base\", \"nope\"]\n");
    let e = build(&store, &src, "badrole").0.expect_err("unknown role");
    assert!(matches!(e, TemplateError::UnknownRole { .. }), "{e}");
    assert!(e.to_string().contains("unknown role `nope`"), "{e}");
    assert!(
        e.to_string().contains("known roles: base, t1, t2, tfail"),
        "{e}"
    );
    ts.template("badparent", "parent = \"ghost\"\nroles = [\"t1\"]\n");
    let e = build(&store, &src, "badparent")
        .0
        .expect_err("unknown parent");
    assert!(
        e.to_string()
            .contains("unknown template `ghost` (parent of `badparent`)"),
        "{e}"
    );
    ts.template("typo", "rolez = [\"t1\"]\n");
    let e = build(&store, &src, "typo").0.expect_err("bad key");
    assert!(matches!(e, TemplateError::InvalidSpec { .. }), "{e}");
    assert!(e.to_string().contains("rolez"), "{e}");
    ts.role(
        "needs",
        "---\n- name: x\n  ansible.builtin.debug: msg=x\n",
        "---\n",
    );
    std::fs::write(
        ts.dir.path().join("ansible/roles/needs/meta/main.yml"),
        "---\ndependencies:\n  - role: t1\n",
    )
    .expect("meta");
    ts.template("order", "roles = [\"needs\"]\n");
    let e = build(&store, &src, "order")
        .0
        .expect_err("dependency order");
    assert!(e.to_string().contains("depends on role `t1`"), "{e}");
}

#[test]
fn repo_templates_resolve() {
    let src = Sources::discover(Some(repo().join("templates")), Some(repo().join("ansible")));
    let want: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("base", vec!["base", "git", "ollama"]),
        ("python", vec!["base", "git", "ollama", "python"]),
        ("node", vec!["base", "git", "ollama", "node"]),
        ("rust", vec!["base", "git", "ollama", "rust"]),
        (
            "polyglot",
            vec!["base", "git", "ollama", "python", "node", "rust"],
        ),
    ]);
    for (name, roles) in want {
        let t = template::resolve(&src, name).expect(name);
        assert_eq!(t.roles, roles, "{name}");
        // The playbook for ordinary hosts applies the same roles.
        let pb = std::fs::read_to_string(repo().join(format!("ansible/playbooks/{name}.yml")))
            .expect("playbook");
        let listed: Vec<&str> = pb
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- "))
            .filter(|l| !l.starts_with("name:"))
            .collect();
        assert_eq!(listed, roles, "playbooks/{name}.yml");
        for r in &t.roles {
            assert!(
                repo()
                    .join(format!("ansible/roles/{r}/tests/verify.sh"))
                    .is_file(),
                "role {r} ships its checks"
            );
        }
    }
}

#[test]
fn gc_keeps_referenced_and_mounted_layers() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(dir.path()).expect("open");
    let mut digests = Vec::new();
    for i in 0..3 {
        let s = store.scratch("t").expect("scratch");
        let rootfs = s.join("rootfs");
        std::fs::create_dir_all(&rootfs).expect("mkdir");
        std::fs::write(rootfs.join("f"), format!("layer {i}")).expect("write");
        let l = store.publish(&rootfs, None, "k", "test").expect("publish");
        store
            .set_key(&format!("sha256:{i:064x}"), &l.digest)
            .expect("key");
        digests.push(l.digest);
    }
    store
        .set_ref(&kiln_template::ImageRef {
            name: "kept".into(),
            layers: vec![digests[0].clone()],
            build_key: "k".into(),
            size_bytes: 7,
            created_at_ms: 1,
            template: None,
        })
        .expect("ref");
    // A shifted copy next to the unused layer goes with it.
    let shifted = store
        .layer_rootfs(&digests[2])
        .with_file_name("rootfs-userns-100000-65536");
    std::fs::create_dir_all(&shifted).expect("shifted");
    // digests[1] is in use by a mounted overlay, as a live sandbox's rootfs would be.
    let (upper, work, merged) = (
        dir.path().join("u"),
        dir.path().join("w"),
        dir.path().join("m"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            store.layer_rootfs(&digests[1]).display(),
            upper.display(),
            work.display()
        ))
        .arg(&merged)
        .status()
        .expect("mount");
    assert!(st.success());
    assert!(
        template::mounted_layers(store.root()).contains(&digests[1]),
        "{}",
        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
    );
    let rep = template::gc(&store, &Default::default());
    let _ = std::process::Command::new("umount").arg(&merged).status();
    let rep = rep.expect("gc");
    assert_eq!(rep.removed, [digests[2].clone()], "layers {digests:?}");
    assert_eq!(rep.kept, 2);
    assert!(!shifted.exists());
    assert!(store.has_layer(&digests[0]) && store.has_layer(&digests[1]));
    assert!(store.layer_for_key(&format!("sha256:{:064x}", 2)).is_none());
    assert!(store.layer_for_key(&format!("sha256:{:064x}", 0)).is_some());
    template::remove(&store, "kept").expect("rm");
    assert!(matches!(
        template::remove(&store, "kept"),
        Err(TemplateError::NotBuilt(_))
    ));
    // Unreferenced and no longer mounted: both go.
    // gc also empties the apt download cache (the lists stay).
    let (lists, archives) = store.apt_cache().expect("cache");
    std::fs::write(archives.join("x_1.0_all.deb"), [0u8; 100]).expect("deb");
    std::fs::write(
        lists.join("m_dists_bookworm_main_binary-amd64_Packages"),
        "P",
    )
    .expect("list");
    let layer_bytes: u64 = digests[..2]
        .iter()
        .map(|d| store.layer(d).expect("layer").size_bytes)
        .sum();
    let rep = template::gc(&store, &Default::default()).expect("gc");
    assert!(!archives.join("x_1.0_all.deb").exists());
    assert!(lists
        .join("m_dists_bookworm_main_binary-amd64_Packages")
        .exists());
    assert_eq!(
        rep.freed_bytes,
        layer_bytes + 100,
        "the download counts as freed"
    );
    let mut both = vec![digests[0].clone(), digests[1].clone()];
    both.sort();
    assert_eq!(rep.removed, both);
    assert!(store.layer_digests().is_empty());
}
