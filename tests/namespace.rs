//! The namespace driver against real namespaces, overlayfs and cgroups (needs root, as CI).
mod namespace_common;

use kiln::build::cgroup::Limits;
use kiln::build::driver::DriverError;
use kiln::build::executor::{ExecError, ExitStatus, PreparedMount, Stream};
use kiln::build::overlay;
use kiln::ir;
use namespace_common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

#[test]
fn a_written_file_lands_in_upper_and_the_lower_is_untouched() {
    let f = Fixture::new();
    let upper = f.upper("l1");
    let before = tree(&f.base);
    let r = step(
        f.base_stack(),
        &upper,
        &shell("echo layer > /data/new && echo more >> /etc/motd"),
        Opts::default(),
    );
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    assert_eq!(
        std::fs::read_to_string(upper.join("data/new")).unwrap(),
        "layer\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/motd")).unwrap(),
        "hello\nmore\n"
    );
    assert_eq!(
        std::fs::read_to_string(f.base.join("etc/motd")).unwrap(),
        "hello\n"
    );
    assert_eq!(tree(&f.base), before);
    // Only the step's changes: no mount points, no work dir, no stub.
    assert_eq!(tree(&upper), vec!["data", "data/new", "etc", "etc/motd"]);
    for s in [".work", ".merged", ".stub"] {
        assert!(!f.upper(&format!("l1{s}")).exists(), "{s} left behind");
    }
    assert!(mounts_mentioning(f.dir.path()).is_empty());
}

#[test]
fn removing_a_lower_file_leaves_a_whiteout_and_replacing_a_dir_makes_it_opaque() {
    let f = Fixture::new();
    let upper = f.upper("l1");
    let r = step(
        f.base_stack(),
        &upper,
        &shell("rm /etc/motd && rm -r /data && mkdir /data && echo n > /data/n"),
        Opts::default(),
    );
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    let m = std::fs::symlink_metadata(upper.join("etc/motd")).unwrap();
    assert!(
        m.file_type().is_char_device() && m.rdev() == 0,
        "not a whiteout"
    );
    assert_eq!(
        xattr::get(upper.join("data"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(f.base.join("etc/motd").exists());
}

#[test]
fn layers_stack_top_first() {
    let f = Fixture::new();
    let l1 = f.upper("l1");
    step(
        f.base_stack(),
        &l1,
        &shell("echo one > /data/v && echo one > /data/only1"),
        Opts::default(),
    );
    let l2 = f.upper("l2");
    step(
        &[l1.clone(), f.base.clone()],
        &l2,
        &shell("echo two > /data/v"),
        Opts::default(),
    );
    let r = step(
        &[l2, l1, f.base.clone()],
        &f.upper("l3"),
        &shell("cat /data/v /data/only1 /data/keep"),
        Opts::default(),
    );
    assert_eq!(r.stdout(), vec!["two", "one", "keep"]);
}

#[test]
fn exit_codes_are_kept() {
    let f = Fixture::new();
    for (i, code) in [0, 1, 42].into_iter().enumerate() {
        let r = step(
            f.base_stack(),
            &f.upper(&format!("u{i}")),
            &shell(&format!("exit {code}")),
            Opts::default(),
        );
        assert_eq!(r.outcome.exit_code, code);
        assert_eq!(r.outcome.status, ExitStatus::Exited(code));
    }
}

#[test]
fn stdout_and_stderr_are_streamed_line_by_line() {
    let f = Fixture::new();
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &shell("echo out1; echo err1 >&2; echo out2; printf tail"),
        Opts::default(),
    );
    assert_eq!(r.stdout(), vec!["out1", "out2", "tail"]);
    assert_eq!(r.stderr(), vec!["err1"]);
}

#[test]
fn env_user_and_workdir_are_applied() {
    let f = Fixture::new();
    let upper = f.upper("u");
    let mut run = shell("id -u; id -g; id -G; pwd; env");
    run.user = Some("alice".into());
    run.workdir = "/work/dir".into();
    run.env.push(("FOO".into(), "bar baz".into()));
    let r = step(f.base_stack(), &upper, &run, Opts::default());
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    let out = r.stdout();
    assert_eq!(&out[..4], &["1000", "1000", "1000 10", "/work/dir"]);
    let env: Vec<&str> = out[4..].to_vec();
    assert!(env.contains(&"FOO=bar baz"), "{env:?}");
    assert!(env.contains(&"HOME=/home/alice"), "{env:?}");
    assert!(env.contains(&format!("PATH={}", ir::DEFAULT_PATH).as_str()));
    // Nothing from Kiln's own environment leaks in (the shell adds only PWD and SHLVL).
    for l in &env {
        let k = l.split('=').next().unwrap();
        assert!(
            ["FOO", "HOME", "PATH", "PWD", "SHLVL"].contains(&k),
            "unexpected {l}"
        );
    }
    let wd = std::fs::metadata(upper.join("work/dir")).unwrap();
    assert_eq!((wd.uid(), wd.gid()), (1000, 1000));
}

#[test]
fn numeric_user_and_group_are_applied() {
    let f = Fixture::new();
    let mut run = shell("id -u; id -g; id -G");
    run.user = Some("4242:wheel".into());
    let r = step(f.base_stack(), &f.upper("u"), &run, Opts::default());
    assert_eq!(r.stdout(), vec!["4242", "10", "10"]);
}

#[test]
fn an_unknown_user_is_an_error() {
    let f = Fixture::new();
    let mut run = shell("true");
    run.user = Some("mallory".into());
    let e = try_step(f.base_stack(), &f.upper("u"), &run, Opts::default())
        .err()
        .expect("fails");
    assert!(
        matches!(e, DriverError::Exec(ExecError::User { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("unable to find user mallory"), "{e}");
}

#[test]
fn a_missing_executable_is_an_error() {
    let f = Fixture::new();
    let mut run = shell("");
    run.command = ir::Command::Exec {
        args: vec!["no-such-tool".into()],
    };
    let e = try_step(f.base_stack(), &f.upper("u"), &run, Opts::default())
        .err()
        .expect("fails");
    assert!(
        e.to_string()
            .contains("no-such-tool: executable file not found"),
        "{e}"
    );
}

#[test]
fn exec_form_runs_without_a_shell() {
    let f = Fixture::new();
    let mut run = shell("");
    run.command = ir::Command::Exec {
        args: vec!["echo".into(), "a  b".into(), "$HOME".into()],
    };
    let r = step(f.base_stack(), &f.upper("u"), &run, Opts::default());
    assert_eq!(r.stdout(), vec!["a  b $HOME"]);
}

#[test]
fn network_none_sees_only_loopback() {
    let f = Fixture::new();
    let mut run = shell("ls /sys/class/net");
    run.network = ir::Network::None;
    let r = step(f.base_stack(), &f.upper("u"), &run, Opts::default());
    assert_eq!(r.stdout(), vec!["lo"]);
    let host: Vec<_> = std::fs::read_dir("/sys/class/net").unwrap().collect();
    let r = step(
        f.base_stack(),
        &f.upper("u2"),
        &shell("ls /sys/class/net | wc -l"),
        Opts::default(),
    );
    assert_eq!(r.stdout(), vec![host.len().to_string()]);
}

#[test]
fn the_step_is_pid_one_and_sees_only_its_processes() {
    let f = Fixture::new();
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &shell("echo $$; ls /proc | grep -c '^[0-9]'"),
        Opts::default(),
    );
    // pid 1 (the shell) and the pipeline's ls and grep.
    assert_eq!(r.stdout()[0], "1");
    assert!(
        r.stdout()[1].parse::<u32>().unwrap() <= 3,
        "{:?}",
        r.stdout()
    );
}

#[test]
fn a_background_process_does_not_outlive_the_step() {
    let f = Fixture::new();
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &shell("sleep 7777 </dev/null >/dev/null 2>&1 & echo started"),
        Opts::default(),
    );
    assert_eq!(r.stdout(), vec!["started"]);
    assert!(processes_with_cmdline(&["sleep", "7777"]).is_empty());
}

#[test]
fn etc_files_are_visible_during_the_step_and_absent_from_the_layer() {
    let f = Fixture::new();
    let upper = f.upper("u");
    let r = step(
        f.base_stack(),
        &upper,
        &shell(
            "cat /etc/hostname /etc/resolv.conf; grep -c kiln-test /etc/hosts; hostname; echo x > /etc/new; ls -d /proc /dev/null /sys",
        ),
        Opts::default(),
    );
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    assert_eq!(
        r.stdout()[..4],
        ["kiln-test", "nameserver 192.0.2.53", "1", "kiln-test"]
    );
    assert_eq!(tree(&upper), vec!["etc", "etc/new"]);
    assert!(!f.base.join("etc/hosts").exists());
}

#[test]
fn etc_files_of_the_image_are_covered_but_unchanged() {
    let f = Fixture::new();
    std::fs::write(f.base.join("etc/hosts"), "10.0.0.1 image\n").unwrap();
    let upper = f.upper("u");
    let r = step(
        f.base_stack(),
        &upper,
        &shell("cat /etc/hosts; echo '1.2.3.4 x' >> /etc/hosts"),
        Opts::default(),
    );
    assert!(r.stdout()[0].starts_with("127.0.0.1"), "{:?}", r.stdout());
    assert!(tree(&upper).is_empty(), "{:?}", tree(&upper));
    assert_eq!(
        std::fs::read_to_string(f.base.join("etc/hosts")).unwrap(),
        "10.0.0.1 image\n"
    );
}

#[test]
fn a_memory_limit_kills_a_hog() {
    let layout = kiln::build::cgroup::Layout::host().unwrap();
    assert!(
        layout.memory.is_some(),
        "this test needs a memory cgroup controller"
    );
    let f = Fixture::new();
    let mut run = shell("dd if=/dev/zero of=/hog/fill bs=1M count=256");
    run.mounts = vec![ir::Mount::Tmpfs {
        target: "/hog".into(),
        size: None,
    }];
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &run,
        Opts {
            mounts: &[PreparedMount::Tmpfs],
            limits: Limits {
                memory_bytes: Some(64 << 20),
                ..Limits::default()
            },
            ..Opts::default()
        },
    );
    assert_eq!(r.outcome.exit_code, 137, "{:?}", r.lines);
    assert!(r.outcome.oom_killed);
}

#[test]
fn a_timeout_kills_the_step() {
    let f = Fixture::new();
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &shell("sleep 1000"),
        Opts {
            timeout: Some(Duration::from_millis(500)),
            ..Opts::default()
        },
    );
    assert!(r.outcome.timed_out);
    assert_eq!(r.outcome.status, ExitStatus::Signaled(9));
    assert!(processes_with_cmdline(&["sleep", "1000"]).is_empty());
}

#[test]
fn a_cache_mount_persists_across_steps_and_stays_out_of_the_layer() {
    let f = Fixture::new();
    let cache = f.dir.path().join("caches/pip");
    let mut run = shell("echo $(id -u) >> /root/.cache/log; cat /root/.cache/log");
    run.mounts = vec![ir::Mount::Cache {
        target: "/root/.cache".into(),
        id: "pip".into(),
        sharing: ir::CacheSharing::Shared,
        readonly: false,
        from: None,
        source: None,
        mode: 0o700,
        uid: 0,
        gid: 0,
    }];
    let prepared = [PreparedMount::Cache { dir: cache.clone() }];
    let u1 = f.upper("u1");
    step(
        f.base_stack(),
        &u1,
        &run,
        Opts {
            mounts: &prepared,
            ..Opts::default()
        },
    );
    let r = step(
        &[u1.clone(), f.base.clone()],
        &f.upper("u2"),
        &run,
        Opts {
            mounts: &prepared,
            ..Opts::default()
        },
    );
    assert_eq!(r.stdout(), vec!["0", "0"]);
    assert!(tree(&u1).is_empty(), "{:?}", tree(&u1));
    assert_eq!(std::fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn a_secret_is_readable_with_its_mode_but_never_in_the_layer() {
    let f = Fixture::new();
    let secret = f.dir.path().join("token");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let upper = f.upper("u");
    let mut run = shell(
        "cat /run/secrets/tok; echo; stat -c '%a %u' /run/secrets/tok; echo env=$TOKEN; echo x > /run/secrets/tok || echo readonly",
    );
    run.user = Some("alice".into());
    run.mounts = vec![
        ir::Mount::Secret {
            id: "tok".into(),
            target: None,
            env: None,
            required: true,
            mode: 0o400,
            uid: 1000,
            gid: 0,
        },
        ir::Mount::Secret {
            id: "tok".into(),
            target: None,
            env: Some("TOKEN".into()),
            required: true,
            mode: 0o400,
            uid: 0,
            gid: 0,
        },
    ];
    let prepared = [
        PreparedMount::Secret {
            file: Some(secret.clone()),
        },
        PreparedMount::Secret {
            file: Some(secret.clone()),
        },
    ];
    let r = step(
        f.base_stack(),
        &upper,
        &run,
        Opts {
            mounts: &prepared,
            ..Opts::default()
        },
    );
    assert_eq!(
        r.stdout(),
        vec!["s3cr3t", "400 1000", "env=s3cr3t", "readonly"],
        "{:?}",
        r.lines
    );
    assert!(tree(&upper).is_empty(), "{:?}", tree(&upper));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "s3cr3t");

    let mut missing = shell("true");
    missing.mounts = vec![ir::Mount::Secret {
        id: "absent".into(),
        target: None,
        env: None,
        required: true,
        mode: 0o400,
        uid: 0,
        gid: 0,
    }];
    let e = try_step(
        f.base_stack(),
        &f.upper("u2"),
        &missing,
        Opts {
            mounts: &[PreparedMount::Secret { file: None }],
            ..Opts::default()
        },
    );
    assert!(matches!(
        e,
        Err(DriverError::Exec(ExecError::SecretMissing { .. }))
    ));
}

#[test]
fn a_tmpfs_mount_is_writable_and_discarded() {
    let f = Fixture::new();
    let upper = f.upper("u");
    let mut run = shell(
        "echo x > /scratch/f && cat /scratch/f && df -k /scratch | tail -1 | awk '{print $2}'",
    );
    run.mounts = vec![ir::Mount::Tmpfs {
        target: "/scratch".into(),
        size: Some(1 << 20),
    }];
    let r = step(
        f.base_stack(),
        &upper,
        &run,
        Opts {
            mounts: &[PreparedMount::Tmpfs],
            ..Opts::default()
        },
    );
    assert_eq!(r.stdout(), vec!["x", "1024"], "{:?}", r.lines);
    assert!(tree(&upper).is_empty(), "{:?}", tree(&upper));
}

#[test]
fn a_read_only_bind_mount_shows_the_host_source() {
    let f = Fixture::new();
    let src = f.dir.path().join("ctx");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), "from context\n").unwrap();
    let mut run = shell("cat /ctx/a.txt; touch /ctx/b 2>/dev/null || echo readonly");
    run.mounts = vec![ir::Mount::Bind {
        target: "/ctx".into(),
        source: "/".into(),
        from: None,
        readwrite: false,
    }];
    let upper = f.upper("u");
    let r = step(
        f.base_stack(),
        &upper,
        &run,
        Opts {
            mounts: &[PreparedMount::Bind {
                source: src.clone(),
            }],
            ..Opts::default()
        },
    );
    assert_eq!(r.stdout(), vec!["from context", "readonly"]);
    assert!(!src.join("b").exists());
    assert!(tree(&upper).is_empty());
}

#[test]
fn a_script_heredoc_runs_from_dev_pipes() {
    let f = Fixture::new();
    let mut run = shell("");
    run.command = ir::Command::Script {
        name: "EOF".into(),
        content: "#!/bin/sh\necho \"from $0\"\n".into(),
    };
    let upper = f.upper("u");
    let r = step(f.base_stack(), &upper, &run, Opts::default());
    assert_eq!(r.stdout(), vec!["from /dev/pipes/EOF"], "{:?}", r.lines);
    assert!(tree(&upper).is_empty());
}

#[test]
fn ssh_mounts_are_not_supported_yet() {
    let f = Fixture::new();
    let mut run = shell("true");
    run.mounts = vec![ir::Mount::Ssh {
        id: "default".into(),
        target: None,
        required: false,
        mode: 0o600,
        uid: 0,
        gid: 0,
    }];
    let e = try_step(
        f.base_stack(),
        &f.upper("u"),
        &run,
        Opts {
            mounts: &[PreparedMount::Ssh],
            ..Opts::default()
        },
    );
    assert!(matches!(
        e,
        Err(DriverError::Exec(ExecError::SshUnsupported))
    ));
}

#[test]
fn a_scratch_base_runs_a_static_binary() {
    let f = Fixture::new();
    let bin = f.dir.path().join("bin-layer");
    std::fs::create_dir_all(bin.join("bin")).unwrap();
    std::fs::copy(BUSYBOX, bin.join("bin/busybox")).unwrap();
    let upper = f.upper("u");
    let mut run = shell("");
    run.command = ir::Command::Exec {
        args: vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            "/bin/busybox echo hi > /out".into(),
        ],
    };
    let r = step(&[bin], &upper, &run, Opts::default());
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    assert_eq!(tree(&upper), vec!["out"]);
    // And with no lower at all, the stub alone is the stack: the command is missing.
    let e = try_step(&[], &f.upper("u2"), &run, Opts::default());
    assert!(e.is_err());
}

#[test]
fn a_stack_longer_than_a_mount_option_page_mounts() {
    let t = tempfile::tempdir_in("/tmp").unwrap();
    let mut lowers: Vec<PathBuf> = Vec::new();
    for i in 0..overlay::MAX_LOWERS {
        let l = t.path().join(format!("{}-{i:03}", "layer".repeat(16)));
        std::fs::create_dir(&l).unwrap();
        std::fs::write(l.join(format!("f{i}")), i.to_string()).unwrap();
        std::fs::write(l.join("top"), i.to_string()).unwrap();
        lowers.push(l);
    }
    lowers.reverse(); // top first: layer 499 on top
    let total: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(total > 4096);
    assert!(matches!(
        overlay::legacy_options(&lowers, &t.path().join("u"), &t.path().join("w")),
        Err(overlay::OverlayError::OptionsTooLong { .. })
    ));
    for d in ["u", "w", "m"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let m = overlay::mount(
        &overlay::Layers {
            lowers: &lowers,
            upper: &t.path().join("u"),
            work: &t.path().join("w"),
        },
        &t.path().join("m"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("m/top")).unwrap(),
        "499"
    );
    assert_eq!(std::fs::read_to_string(t.path().join("m/f0")).unwrap(), "0");
    m.unmount().unwrap();
    assert!(mounts_mentioning(t.path()).is_empty());
}

#[test]
fn outputs_are_routed_per_stream() {
    let f = Fixture::new();
    let r = step(
        f.base_stack(),
        &f.upper("u"),
        &shell("i=0; while [ $i -lt 500 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done"),
        Opts::default(),
    );
    assert_eq!(r.stdout().len(), 500);
    assert_eq!(r.stderr().len(), 500);
    assert_eq!(
        r.lines
            .iter()
            .filter(|(s, l)| *s == Stream::Stdout && l == "o499")
            .count(),
        1
    );
}
