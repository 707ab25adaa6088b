//! Language servers of the templates, for real, in sandboxes: pylsp (python template) finds
//! an undefined name, goes to a definition in another file, completes a member, lists
//! symbols, previews a rename, and is restarted by the manager after it is killed.
//! TypeScript (node template) runs the same checks when `KILN_TEST_ALL_TEMPLATES=1`.

use std::time::Duration;

use kiln_devtools::lsp::LspManager;

use crate::sandbox::{template_layers, TestSandbox};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pylsp_answers_about_a_python_project() {
    let sb = TestSandbox::start("python").await;
    sb.write(
        "/workspace/proj/util.py",
        "class Greeter:\n    def greet(self, name):\n        return 'hi ' + name\n\n\ndef helper(x):\n    return x * 2\n",
    )
    .await;
    sb.write(
        "/workspace/proj/main.py",
        "from util import Greeter, helper\n\nprint(helper(2))\ng = Greeter()\ng.gr\nprint(undefined_name)\n",
    )
    .await;
    let mgr = LspManager::new(Duration::from_secs(600));
    let client = sb.client();
    let s = mgr
        .session(&sb.id, &client, "python", "/workspace/proj", None)
        .await
        .expect("start pylsp");

    let diags = s
        .diagnostics("/workspace/proj/main.py", WAIT)
        .await
        .expect("diagnostics");
    let undefined = diags
        .iter()
        .find(|d| d.message.contains("undefined_name"))
        .unwrap_or_else(|| panic!("an undefined-name diagnostic: {diags:?}"));
    assert_eq!((undefined.line, undefined.column), (6, 7), "{undefined:?}");

    // `helper` on line 3, column 7 is defined in util.py line 6.
    let defs = s
        .definition("/workspace/proj/main.py", 3, 7)
        .await
        .expect("definition");
    assert_eq!(defs.len(), 1, "{defs:?}");
    assert_eq!(defs[0].path, "/workspace/proj/util.py");
    assert_eq!(defs[0].line, 6);

    let refs = s
        .references("/workspace/proj/util.py", 6, 5)
        .await
        .expect("references");
    assert!(
        refs.iter().any(|r| r.path.ends_with("main.py")),
        "a reference from main.py: {refs:?}"
    );

    // `g.gr|` completes to `greet`.
    let items = s
        .completion("/workspace/proj/main.py", 5, 5)
        .await
        .expect("completion");
    assert!(
        items.iter().any(|c| c.label.starts_with("greet")),
        "{items:?}"
    );

    let hover = s
        .hover("/workspace/proj/main.py", 3, 7)
        .await
        .expect("hover");
    assert!(hover.is_some_and(|h| h.contains("helper")));

    let symbols = s
        .document_symbols("/workspace/proj/util.py")
        .await
        .expect("symbols");
    let names: Vec<(&str, &str)> = symbols
        .iter()
        .map(|s| (s.name.as_str(), s.kind.as_str()))
        .collect();
    assert!(names.contains(&("Greeter", "class")), "{names:?}");
    assert!(names.contains(&("helper", "function")), "{names:?}");

    let edits = s
        .rename_preview("/workspace/proj/util.py", 6, 5, "double")
        .await
        .expect("rename preview");
    assert!(
        edits
            .iter()
            .any(|e| e.location.path.ends_with("main.py") && e.new_text.contains("double")),
        "{edits:?}"
    );
    assert!(
        sb.sh("grep -c helper /workspace/proj/main.py").await.trim() == "2",
        "a preview changes nothing"
    );

    // An edit shows up in fresh diagnostics.
    sb.write(
        "/workspace/proj/main.py",
        "from util import Greeter, helper\n\nprint(helper(2))\nprint(also_missing)\n",
    )
    .await;
    let diags = s
        .diagnostics("/workspace/proj/main.py", WAIT)
        .await
        .expect("diagnostics after edit");
    assert!(
        diags.iter().any(|d| d.message.contains("also_missing")),
        "{diags:?}"
    );
    assert!(
        !diags.iter().any(|d| d.message.contains("undefined_name")),
        "{diags:?}"
    );

    // Reused while alive; restarted after a crash.
    let again = mgr
        .session(&sb.id, &client, "python", "/workspace/proj", None)
        .await
        .expect("reuse");
    assert!(std::sync::Arc::ptr_eq(&s, &again));
    sb.sh("pkill -KILL -x pylsp").await;
    for _ in 0..200 {
        if !s.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!s.alive(), "the killed server is seen as dead");
    let s2 = mgr
        .session(&sb.id, &client, "python", "/workspace/proj", None)
        .await
        .expect("restart");
    assert_eq!(mgr.started(), 2);
    let defs = s2
        .definition("/workspace/proj/main.py", 3, 7)
        .await
        .expect("definition after restart");
    assert_eq!(defs[0].path, "/workspace/proj/util.py");

    // Idle sessions are stopped.
    let short = LspManager::new(Duration::ZERO);
    short
        .session(&sb.id, &client, "python", "/workspace/proj", None)
        .await
        .expect("start");
    assert_eq!(short.reap().await, 1);

    // A language whose server the template lacks: a clear error.
    let e = mgr
        .session(&sb.id, &client, "rust", "/workspace/proj", None)
        .await
        .expect_err("no rust-analyzer in the python template");
    assert!(e.to_string().contains("not installed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_language_server_answers_about_a_typescript_project() {
    if std::env::var("KILN_TEST_ALL_TEMPLATES").as_deref() != Ok("1")
        || template_layers("node").is_none()
    {
        eprintln!("skipped: set KILN_TEST_ALL_TEMPLATES=1 with the node template built");
        return;
    }
    let sb = TestSandbox::start("node").await;
    sb.write(
        "/workspace/ts/tsconfig.json",
        "{\"compilerOptions\": {\"strict\": true}}\n",
    )
    .await;
    sb.write(
        "/workspace/ts/util.ts",
        "export class Greeter {\n  greet(name: string): string {\n    return 'hi ' + name;\n  }\n}\n\nexport function helper(x: number): number {\n  return x * 2;\n}\n",
    )
    .await;
    sb.write(
        "/workspace/ts/main.ts",
        "import { Greeter, helper } from './util';\n\nconsole.log(helper(2));\nconst g = new Greeter();\ng.gr\nconsole.log(undefinedName);\n",
    )
    .await;
    let mgr = LspManager::new(Duration::from_secs(600));
    let client = sb.client();
    let s = mgr
        .session(&sb.id, &client, "typescript", "/workspace/ts", None)
        .await
        .expect("start typescript-language-server");
    let diags = s
        .diagnostics("/workspace/ts/main.ts", WAIT)
        .await
        .expect("diagnostics");
    assert!(
        diags.iter().any(|d| d.message.contains("undefinedName")),
        "{diags:?}"
    );
    let defs = s
        .definition("/workspace/ts/main.ts", 3, 13)
        .await
        .expect("definition");
    assert!(
        defs.iter()
            .any(|d| d.path == "/workspace/ts/util.ts" && d.line == 7),
        "{defs:?}"
    );
    let items = s
        .completion("/workspace/ts/main.ts", 5, 5)
        .await
        .expect("completion");
    assert!(items.iter().any(|c| c.label == "greet"), "{items:?}");
}
