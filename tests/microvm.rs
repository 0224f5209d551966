//! The microvm builder through the real binary: QEMU `-M microvm` (TCG on CI and on hosts
//! without hardware KVM), Debian's cloud kernel, the static `kiln-agent` as PID 1.
//!
//! Needs root, `qemu-system-x86_64` and `/boot/vmlinuz-*-cloud-amd64` (`scripts/test.sh`
//! installs `qemu-system-x86` and `linux-image-cloud-amd64`); fails loudly without them.
//! The agent is built here once, static, into its own target directory (the outer
//! `cargo test` holds the lock of its own), so it is never stale. VMs run one at a time:
//! several TCG guests on a 2-core machine would only slow each other down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.stdout, self.stderr))
    }
}

/// One VM at a time (see the module docs).
static VMS: Mutex<()> = Mutex::new(());

/// The static agent, built once per test run.
fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-target");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(kiln::vm::agent::BUILD_ARGS)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building kiln-agent failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = target.join("agent").join(kiln::vm::agent::FILE_NAME);
        let bytes = std::fs::read(&path).expect("the agent was built");
        kiln::vm::agent::check_static(&bytes).expect("the agent is static");
        path
    })
}

fn require_tools() {
    assert!(
        kiln::doctor::on_path("qemu-system-x86_64").is_some(),
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (scripts/test.sh does)"
    );
    if let Err(e) = kiln::doctor::guest_kernel() {
        panic!("no guest kernel ({e}): apt-get install linux-image-cloud-amd64");
    }
}

fn kiln_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    require_tools();
    let agent = agent();
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_AGENT", agent)
        .env_remove("KILN_PROJECT")
        .env_remove("KILN_VM_APPEND")
        .env_remove("KILN_STEP_TIMEOUT")
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kiln runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn kiln(home: &Path, args: &[&str]) -> Run {
    kiln_env(home, args, &[])
}

/// `image create` on the microvm builder with small disks and one vCPU.
fn create_args<'a>(path: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "image",
        "create",
        path,
        "-n",
        name,
        "--builder",
        "microvm",
        "--cpus",
        "1",
        "--memory",
        "512",
        "--disk_mb",
        "64",
        "--builder_disk_mb",
        "256",
        "--progress",
        "plain",
        "--json",
    ];
    a.extend_from_slice(extra);
    a
}

fn context(dockerfile: &str) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().expect("context");
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).expect("write");
    ctx
}

fn debugfs_cat(disk: &str, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), disk])
        .output()
        .expect("debugfs runs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn disk_of(v: &serde_json::Value) -> String {
    v["snapshot_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("a file:// snapshot")
        .to_string()
}

fn names(home: &Path) -> Vec<String> {
    let ls = kiln(home, &["image", "ls", "--json"]).json();
    ls.as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn run_steps_run_in_the_guest_kernel_and_rebuild_from_cache() {
    let home = tempfile::tempdir().expect("home");
    let ctx = context(
        "FROM kiln/busybox\nRUN uname -r > /kernel.txt && echo built-in-vm\nRUN cat /kernel.txt > /again.txt\n",
    );
    let dir = ctx.path().to_str().expect("utf-8");
    let r = kiln(home.path(), &create_args(dir, "vm", &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("built-in-vm"), "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["builder"], "microvm");
    assert_eq!(v["status"], "Completed");
    let disk = disk_of(&v);
    let guest = debugfs_cat(&disk, "/kernel.txt");
    let kernel = kiln::doctor::guest_kernel().expect("kernel");
    let release = kiln::vm::kernel::open(&kernel).expect("bzImage").release;
    assert_eq!(guest.trim(), release, "the step ran on the guest kernel");
    assert_eq!(
        debugfs_cat(&disk, "/again.txt"),
        guest,
        "a step sees the one before"
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn", &disk])
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    let again = kiln(home.path(), &create_args(dir, "vm", &[]));
    assert_eq!(again.code, 0, "{}", again.stderr);
    let steps = again.json()["steps"].clone();
    assert!(
        steps
            .as_array()
            .expect("steps")
            .iter()
            .all(|s| s["cached"] == true),
        "{steps}"
    );
    let d = kiln(home.path(), &["image", "describe", "vm", "--json"]).json();
    assert_eq!(d["builder"], "microvm");
}

#[test]
fn hello_example_builds_on_the_microvm_builder() {
    let home = tempfile::tempdir().expect("home");
    let r = kiln(home.path(), &create_args("examples/hello", "hello", &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["builder"], "microvm");
    assert_eq!(
        debugfs_cat(&disk_of(&v), "/srv/hello.txt"),
        "hello from Linux\n"
    );
    let d = kiln(home.path(), &["image", "describe", "hello", "--json"]).json();
    assert_eq!(d["builder"], "microvm");
}

#[test]
fn a_failing_step_exits_1_and_registers_nothing() {
    let home = tempfile::tempdir().expect("home");
    let ctx = context("FROM kiln/busybox\nRUN echo going down && exit 7\n");
    let dir = ctx.path().to_str().expect("utf-8");
    let r = kiln(home.path(), &create_args(dir, "bad", &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let err = &r.json()["error"];
    assert_eq!(err["code"], "step_failed", "{err}");
    let msg = err["message"].as_str().expect("message");
    assert!(
        msg.contains("exit code 7") && msg.contains("going down"),
        "{msg}"
    );
    assert!(!names(home.path()).contains(&"bad".to_string()));
}

#[test]
fn a_hung_step_times_out_with_exit_1() {
    let home = tempfile::tempdir().expect("home");
    let ctx = context("FROM kiln/busybox\nRUN echo hanging && sleep 600\n");
    let dir = ctx.path().to_str().expect("utf-8");
    let r = kiln(
        home.path(),
        &create_args(dir, "hung", &["--step-timeout", "3"]),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let msg = r.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_string();
    assert!(msg.contains("timed out"), "{msg}");
    assert!(!names(home.path()).contains(&"hung".to_string()));
}

#[test]
fn a_guest_kernel_panic_fails_the_build() {
    let home = tempfile::tempdir().expect("home");
    let ctx = context("FROM kiln/busybox\nRUN echo never runs\n");
    let dir = ctx.path().to_str().expect("utf-8");
    // The agent crashes the guest kernel through sysrq when the step would start.
    let r = kiln_env(
        home.path(),
        &create_args(dir, "crash", &[]),
        &[("KILN_VM_APPEND", kiln::vm::protocol::CRASH_SWITCH)],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let err = &r.json()["error"];
    assert_eq!(err["code"], "builder_vm_failed", "{err}");
    let msg = err["message"].as_str().expect("message");
    assert!(msg.contains("guest kernel panic"), "{msg}");
    assert!(!r.stderr.contains("| never runs"), "{}", r.stderr);
    assert!(!names(home.path()).contains(&"crash".to_string()));
}
