//! The Kubernetes manifests in `deploy/kubernetes/`: the staybound config each ConfigMap carries is valid
//! (with the token from the manifest's own Secret), the transparent variant gives `NET_ADMIN` to the
//! rules' init container alone and exempts exactly the user the proxy runs as, and, when
//! `kubernetes-validate` (PyPI) is installed, every manifest passes its offline schemas.

use std::path::{Path, PathBuf};
use std::process::Command;

use staybound::config::Config;

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// The block scalar under `key: |` (its lines, less their common indentation).
fn block(text: &str, key: &str) -> Option<String> {
    let mut lines = text.lines();
    let head = lines.by_ref().find(|l| l.trim_start() == format!("{key}: |"))?;
    let indent = head.len() - head.trim_start().len();
    let body: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent).collect();
    let inner = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min()?;
    Some(body.iter().map(|l| l.get(inner..).unwrap_or("")).collect::<Vec<_>>().join("\n"))
}

/// The value of the first `key: "value"` line after `after`.
fn quoted_after(text: &str, after: &str, key: &str) -> Option<String> {
    let rest = &text[text.find(after)?..];
    let line = rest.lines().find(|l| l.trim_start().starts_with(&format!("{key}:")))?;
    Some(line.split_once(':')?.1.trim().trim_matches('"').to_string())
}

#[test]
fn every_manifest_s_config_is_valid_with_its_own_secret() {
    let files = manifests();
    assert!(files.len() >= 2, "the explicit and the transparent variant: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let toml = block(&text, "staybound.toml").unwrap_or_else(|| panic!("{}: a staybound.toml", file.display()));
        let dir = tempfile::tempdir().unwrap();
        // The Secret's placeholder token stands in for the mounted file.
        let token = quoted_after(&text, "kind: Secret", "admin.token").expect("the Secret's admin.token");
        std::fs::write(dir.path().join("admin.token"), token).unwrap();
        let toml = toml.replace("/etc/staybound-token/admin.token", dir.path().join("admin.token").to_str().unwrap());
        let config = Config::from_toml_str(&toml, &file).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("DEPLOY {}: {} service(s), valid", file.display(), config.services.len());
    }
}

#[test]
fn the_transparent_variant_gives_net_admin_to_the_rules_alone_and_exempts_the_proxy_s_user() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/staybound-transparent.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    // (The config itself is validated above, with the Secret's token.)
    let toml = block(&text, "staybound.toml").unwrap();
    assert!(toml.lines().any(|l| l.trim() == "intercept = true"), "an intercept service");
    // Containers in order: the rules' init container, the sidecar, the application.
    let rules = &text[text.find("- name: staybound-rules").unwrap()..text.find("- name: staybound\n").unwrap()];
    let sidecar =
        &text[text.find("- name: staybound\n").unwrap()..text.find("containers:\n        - name: app").unwrap()];
    let app = &text[text.find("- name: app").unwrap()..];
    assert!(rules.contains(r#"args: ["setup", "--config", "/etc/staybound/staybound.toml", "--exempt-uid", "65532"]"#));
    assert!(rules.contains(r#"add: ["NET_ADMIN"]"#), "the rules need NET_ADMIN");
    let uncommented = |s: &str, what: &str| s.lines().any(|l| !l.trim_start().starts_with('#') && l.contains(what));
    assert!(!uncommented(sidecar, "NET_ADMIN"), "the long-running proxy keeps no capability");
    assert!(!uncommented(app, "NET_ADMIN"));
    assert!(sidecar.contains("runAsUser: 65532"), "the exempt uid is the proxy's user");
    assert!(sidecar.contains("restartPolicy: Always"), "a native sidecar");
    assert!(app.contains("runAsUser: 1000"), "the application runs as another user, or it would bypass staybound");
}

#[test]
fn the_manifests_pass_kubernetes_validate_when_it_is_installed() {
    let Ok(out) = Command::new("kubernetes-validate").arg("--version").output() else {
        eprintln!("NOTE: kubernetes-validate (PyPI) is not installed: the manifests' schemas are not checked here");
        return;
    };
    assert!(out.status.success());
    for file in manifests() {
        let out = Command::new("kubernetes-validate").arg("--strict").arg(&file).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        assert!(out.status.success(), "{}: {text}", file.display());
    }
}
