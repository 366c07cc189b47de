//! The `xdplb` binary as an operator uses it, for the commands that need no running agent.

use std::{path::PathBuf, process::Command};

fn xdplb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xdplb"))
}

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xdplb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const BAD: &str = r#"
[dataplane]
interface = "eth0"
xdp_mode = "native"

[[vip]]
address = "10.0.0.300"
port = 80
protocol = "tcp"
table_size = 65536

[[vip.backend]]
address = "10.0.0.11"
weight = 70000

[[vip.backend]]
adress = "10.0.0.12"
"#;

#[test]
fn check_config_accepts_the_shipped_configs() {
    for name in ["demo.toml", "xdplb.toml"] {
        let out = xdplb()
            .arg("check-config")
            .arg(configs().join(name))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": OK ("), "{stdout}");
    }
}

#[test]
fn check_config_reports_every_problem_with_file_line_and_field() {
    let path = scratch("bad.toml", BAD);
    let out = xdplb().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    // An unknown key stops further checking (the file's structure is in doubt); fix it first.
    assert!(
        err.contains(&format!(
            "{file}:17:1: vip[0].backend[1].adress: unknown key"
        )),
        "{err}"
    );

    let fixed = BAD.replace("adress", "address");
    let path = scratch("bad2.toml", &fixed);
    let out = xdplb().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "dataplane.xdp_mode: unknown xdp_mode \"native\"",
        "vip[0].address: `10.0.0.300` is not an IPv4 address",
        "vip[0].table_size: table_size 65536 is not a prime number",
        "vip[0].backend[0].weight: weight 70000 is too large",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    assert!(
        err.lines()
            .all(|l| l.starts_with(&path.display().to_string())),
        "{err}"
    );

    let out = xdplb()
        .args(["check-config", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(v["errors"][0]["path"], "dataplane.xdp_mode");
    assert!(v["errors"][0]["line"].as_u64().is_some());
}

#[test]
fn missing_config_file_is_named() {
    let out = xdplb()
        .args(["check-config", "/nonexistent/xdplb.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/xdplb.toml"), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn status_without_an_agent_says_how_to_fix_it() {
    let out = xdplb()
        .args(["--socket", "/nonexistent/xdplb.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the xdplb agent at /nonexistent/xdplb.sock"),
        "{err}"
    );
    assert!(err.contains("xdplb run"), "{err}");
}

#[test]
fn which_backend_from_config_is_deterministic_and_names_a_backend() {
    let demo = configs().join("demo.toml");
    let run = || {
        let out = xdplb()
            .args([
                "which-backend",
                "10.0.0.100:80/tcp",
                "10.0.0.1:40000",
                "--json",
                "--config",
            ])
            .arg(&demo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_eq!(a["vip"], "web");
    // The flow hash of this 5-tuple is pinned in lb-common's tests.
    assert_eq!(a["hash"], 0xb819_fe92_u32);
    assert_eq!(a["slot"], ((0xb819_fe92_u64 * 65537) >> 32) as u32);
    let backend = a["backend"].as_str().unwrap();
    assert!(
        ["10.0.0.11", "10.0.0.12", "10.0.0.13"].contains(&backend),
        "{a}"
    );

    let out = xdplb()
        .args([
            "which-backend",
            "10.0.0.100:81/tcp",
            "10.0.0.1:40000",
            "--config",
        ])
        .arg(&demo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no service 10.0.0.100:81/tcp"));
}
