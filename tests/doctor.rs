//! `kiln doctor` on this host: the JSON shape of CLI.md, the exit code, and real probes
//! (namespaces unshared, overlayfs mounted) as root and as an unprivileged user.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the doctor tests expect the namespace builder to work: run them as root (CI does)"
    );
}

fn run(mut cmd: Command) -> Run {
    let out = cmd
        .env_remove("KILN_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("kiln runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn doctor(home: &Path, json: bool) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("--home").arg(home).arg("doctor");
    if json {
        cmd.arg("--json");
    }
    run(cmd)
}

fn check<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v}"))
}

#[test]
fn json_has_the_contract_shape_and_the_namespace_builder_works_as_root() {
    require_root();
    let home = tempfile::tempdir().expect("tempdir");
    let r = doctor(home.path(), true);
    assert_eq!(r.code, 0, "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("one JSON document");
    let top: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(top, ["builders", "checks"], "{v}");
    let ns = &v["builders"]["namespace"];
    assert_eq!(ns, &serde_json::json!({"ok": true}), "{v}");
    let vm = v["builders"]["microvm"]
        .as_object()
        .expect("microvm object");
    let keys: Vec<&String> = vm.keys().collect();
    assert_eq!(keys, ["accel", "ok", "reason"], "{v}");
    assert!(vm["ok"].is_boolean());
    assert!(matches!(vm["accel"].as_str(), Some("kvm" | "tcg")), "{v}");
    assert!(!vm["reason"].as_str().expect("reason").is_empty());
    for c in v["checks"].as_array().expect("checks") {
        let keys: Vec<&String> = c.as_object().expect("check object").keys().collect();
        assert_eq!(keys, ["detail", "name", "ok"], "{c}");
    }
    for name in [
        "root",
        "namespaces.user",
        "namespaces.mount",
        "namespaces.pid",
        "overlayfs",
        "cgroups",
    ] {
        assert_eq!(check(&v, name)["ok"], true, "{name}: {v}");
    }
    // The overlay probe ran in the home's tmp/ (where the builder's layers live) and left
    // nothing there.
    let overlay = check(&v, "overlayfs")["detail"].as_str().expect("detail");
    assert!(
        overlay.contains(&home.path().display().to_string()),
        "{overlay}"
    );
    let left: Vec<_> = std::fs::read_dir(home.path().join("tmp"))
        .expect("tmp")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    for name in ["kvm", "qemu", "guest_kernel", "mkfs.ext4"] {
        check(&v, name);
    }
}

#[test]
fn kvm_check_follows_the_cpu_flags_and_pvm() {
    let home = tempfile::tempdir().expect("tempdir");
    let r = doctor(home.path(), true);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let dev = Path::new("/dev/kvm").exists();
    let accel = v["builders"]["microvm"]["accel"].as_str().expect("accel");
    assert_eq!(accel == "kvm", hw && dev, "{v}");
    assert_eq!(check(&v, "kvm")["ok"], hw && dev, "{v}");
    if dev && !hw && Path::new("/sys/module/kvm_pvm").exists() {
        let detail = check(&v, "kvm")["detail"].as_str().expect("detail");
        assert!(detail.contains("PVM"), "{detail}");
    }
}

#[test]
fn text_output_is_a_table_of_builders_and_checks() {
    require_root();
    let home = tempfile::tempdir().expect("tempdir");
    let r = doctor(home.path(), false);
    assert_eq!(r.code, 0, "{r}");
    let mut lines = r.stdout.lines();
    assert!(lines.next().expect("header").starts_with("builder"), "{r}");
    assert!(
        lines.next().expect("row").starts_with("namespace  yes"),
        "{r}"
    );
    assert!(lines.next().expect("row").starts_with("microvm"), "{r}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("overlayfs") && l.contains(" yes ")),
        "{r}"
    );
}

#[test]
fn no_working_builder_exits_5_and_still_prints_the_report() {
    require_root();
    // As nobody, with no QEMU on PATH: neither builder can work.
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // A copy of the binary nobody can run, wherever the build tree is.
    let bin = t.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &bin).expect("copy kiln");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let home = t.path().join("home");
    let mut cmd = Command::new(&bin);
    cmd.arg("--home")
        .arg(&home)
        .args(["doctor", "--json"])
        .env("PATH", t.path().join("empty-path"))
        .uid(65534)
        .gid(65534);
    let r = run(cmd);
    assert_eq!(r.code, 5, "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("the report, not an error");
    assert_eq!(v["builders"]["namespace"]["ok"], false, "{v}");
    let why = v["builders"]["namespace"]["reason"]
        .as_str()
        .expect("reason");
    assert!(why.contains("root"), "{why}");
    assert_eq!(check(&v, "namespaces.mount")["ok"], false, "{v}");
    assert_eq!(check(&v, "overlayfs")["ok"], false, "{v}");
    assert_eq!(v["builders"]["microvm"]["ok"], false, "{v}");
    let why = v["builders"]["microvm"]["reason"].as_str().expect("reason");
    assert!(why.contains("qemu-system-x86_64 not found"), "{why}");
}
