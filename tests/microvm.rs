//! The microvm builder and microVM sandboxes through the real binary: QEMU `-M microvm` (TCG
//! on CI and on hosts without hardware KVM), Debian's cloud kernel, the static `kiln-agent`
//! as PID 1.
//!
//! Needs root, `qemu-system-x86_64`, `qemu-img` and `/boot/vmlinuz-*-cloud-amd64`
//! (`scripts/test.sh` installs `qemu-system-x86`, `qemu-utils` and
//! `linux-image-cloud-amd64`); fails loudly without them.
//! The agent is built once, static, and VMs run one at a time (`vm_support`).

mod vm_support;

use std::path::Path;
use std::process::Command;
use vm_support::{agent, one_vm, require_tools};

/// `kiln sbx run --runtime microvm --image IMAGE` with `rest` after it.
fn sbx_run_vm(home: &Path, image: &str, rest: &[&str]) -> Run {
    let mut a = vec!["sbx", "run", "--runtime", "microvm", "--image", image];
    a.extend_from_slice(rest);
    kiln(home, &a)
}

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

fn kiln_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    require_tools();
    let agent = agent();
    let _one = one_vm();
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
        "--disk_mb",
        "64",
        "--progress",
        "plain",
        "--json",
    ];
    a.extend_from_slice(vm_support::SMALL_VM);
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
    let disk = disk_of(&v);
    assert_eq!(debugfs_cat(&disk, "/srv/hello.txt"), "hello from Linux\n");
    // The RUN ran on the guest's Debian cloud kernel, not on this host's.
    let built_on = debugfs_cat(&disk, "/srv/built-on.txt");
    let host = nix::sys::utsname::uname().expect("uname");
    let host = host.release().to_string_lossy();
    assert!(built_on.contains("cloud-amd64"), "{built_on}");
    assert_ne!(built_on, format!("built on {host}\n"));
    let d = kiln(home.path(), &["image", "describe", "hello", "--json"]).json();
    assert_eq!(d["builder"], "microvm");

    // The done-when of the microVM runtime: a sandbox booted from the image's snapshot.
    let r = sbx_run_vm(home.path(), "hello", &["--", "cat", "/etc/os-release"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("ID=kiln-busybox"), "{}", r.stdout);
    // The image's CMD, ENV and WORKDIR apply in the guest as on the host runtime.
    let r = sbx_run_vm(home.path(), "hello", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["stdout"], "hello from Linux\n");
    let cmd = "echo $GREETING in $PWD on $(uname -r); exit 3";
    let r = sbx_run_vm(home.path(), "hello", &["--json", "--", "sh", "-c", cmd]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let out = r.json()["stdout"].as_str().unwrap_or_default().to_string();
    assert!(out.starts_with("hello in /srv on "), "{out}");
    assert!(out.contains("cloud-amd64"), "{out}");
    assert_eq!(sandboxes(home.path()), 0, "sbx run leaves no sandbox");
}

fn sandboxes(home: &Path) -> usize {
    let ls = kiln(home, &["sbx", "ls", "--json"]).json();
    ls.as_array().map_or(0, Vec::len)
}

#[test]
fn a_microvm_sandbox_keeps_its_files_and_snapshots_into_an_image() {
    let home = tempfile::tempdir().expect("home");
    let ctx = context("FROM kiln/busybox\nRUN echo base > /base.txt\n");
    let path = ctx.path().to_string_lossy().into_owned();
    let r = kiln(home.path(), &create_args(&path, "base", &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let snap = r.json()["snapshot_id"].as_str().expect("id").to_string();

    let r = kiln(
        home.path(),
        &[
            "sbx",
            "create",
            "--runtime",
            "microvm",
            "--image",
            "base",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = r.json();
    assert_eq!(rec["runtime"], "microvm");
    let id = rec["sandbox_id"].as_str().expect("id").to_string();
    // Copy-on-write: the sandbox's disk is a small qcow2 over the snapshot, not a copy.
    let qcow = home
        .path()
        .join("sandboxes-v1")
        .join(&id)
        .join("root.qcow2");
    let size = std::fs::metadata(&qcow).expect("the sandbox's disk").len();
    assert!(size < 4 << 20, "{size} bytes");

    let exec = |cmd: &str| {
        kiln(
            home.path(),
            &["sbx", "exec", &id, "--json", "--", "sh", "-c", cmd],
        )
    };
    let r =
        exec("echo changed > /base.txt && mkdir -p /data && echo kept > /data/x && rm -f /bin/vi");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let r = exec("cat /base.txt /data/x; test -e /bin/vi || echo no-vi");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["stdout"], "changed\nkept\nno-vi\n");
    // Docker's code for a command that is not there.
    let r = kiln(
        home.path(),
        &["sbx", "exec", &id, "--json", "--", "no-such-cmd"],
    );
    assert_eq!(r.code, 127, "{} {}", r.stdout, r.stderr);

    // The snapshot disk itself is never written.
    let disk = {
        let d = kiln(home.path(), &["snapshot", "describe", &snap, "--json"]).json();
        d["snapshot_uri"]
            .as_str()
            .and_then(|u| u.strip_prefix("file://"))
            .expect("uri")
            .to_string()
    };
    assert_eq!(debugfs_cat(&disk, "/base.txt"), "base\n");

    let r = kiln(home.path(), &["sbx", "snapshot", &id, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let child = r.json()["snapshot_id"].as_str().expect("id").to_string();
    let r = kiln(
        home.path(),
        &["image", "register", "changed", &child, "--json"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The registered child runs on the namespace runtime too.
    let r = kiln(
        home.path(),
        &[
            "sbx",
            "run",
            "--runtime",
            "namespace",
            "--image",
            "changed",
            "--json",
            "--",
            "cat",
            "/base.txt",
            "/data/x",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["stdout"], "changed\nkept\n");

    let r = kiln(home.path(), &["sbx", "rm", &id, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!qcow.exists());
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
    // The panic's own line, not just "it crashed".
    assert!(msg.contains("(guest Kernel panic - not syncing: "), "{msg}");
    assert!(!r.stderr.contains("| never runs"), "{}", r.stderr);
    assert!(!names(home.path()).contains(&"crash".to_string()));
}
