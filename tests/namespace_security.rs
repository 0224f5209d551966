//! What a hostile RUN can do to the host: nothing. One test in its own binary, so its checks
//! of mounts, processes and cgroups see no other test's steps.
mod namespace_common;

use kiln::build::cgroup::Limits;
use namespace_common::*;

#[test]
fn a_hostile_step_cannot_mount_write_sys_mknod_load_modules_or_reach_the_host() {
    let f = Fixture::new();
    let canary = f.dir.path().join("canary");
    std::fs::write(&canary, "intact\n").unwrap();
    let hostname = nix::unistd::gethostname().unwrap();
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        pids: Some(256),
        cpus: None,
    };
    let attempts: Vec<(&str, String)> = vec![
        ("mount a tmpfs", "mount -t tmpfs none /tmp".into()),
        ("bind the root elsewhere", "mount --bind / /tmp".into()),
        ("unmount /proc", "umount /proc".into()),
        ("unmount the masks", "umount -l /proc/sys".into()),
        ("remount /sys writable", "mount -o remount,rw /sys".into()),
        ("write to /sys", "echo 1 > /sys/kernel/mm/ksm/run".into()),
        ("write a sysctl", "echo 1 > /proc/sys/vm/drop_caches".into()),
        ("write sysrq", "echo h > /proc/sysrq-trigger".into()),
        ("make a block device", "mknod /tmp/sda b 8 0".into()),
        ("make a char device", "mknod /tmp/mem c 1 1".into()),
        ("load a module", "insmod /bin/busybox".into()),
        (
            "read kernel memory",
            "[ -s /proc/kcore ] && head -c 1 /proc/kcore | wc -c | grep -q 1".into(),
        ),
        ("change the hostname", "hostname evil".into()),
        (
            "reach the canary",
            format!("cat {0} || ls /proc/*/root{0}", canary.display()),
        ),
        (
            "write the canary",
            format!("echo pwned > {}", canary.display()),
        ),
        (
            "escape with chroot",
            format!(
                "mkdir -p /x && chroot /x /bin/true || cat /proc/1/root{}",
                canary.display()
            ),
        ),
        (
            "join a new mount namespace and mount",
            "unshare -m mount -t tmpfs none /tmp".into(),
        ),
    ];
    for (i, (what, script)) in attempts.iter().enumerate() {
        let r = step(
            f.base_stack(),
            &f.upper(&format!("u{i}")),
            &shell(script),
            Opts {
                limits,
                ..Opts::default()
            },
        );
        assert_ne!(r.outcome.exit_code, 0, "{what} succeeded: {:?}", r.lines);
    }
    // Root in the step has Docker's default capabilities and no more: no SYS_ADMIN, SYS_MODULE,
    // SYS_RAWIO or SYS_TIME, in the bounding set either.
    let r = step(
        f.base_stack(),
        &f.upper("caps"),
        &shell("grep -E '^Cap(Eff|Bnd)' /proc/self/status"),
        Opts::default(),
    );
    assert_eq!(
        r.stdout(),
        vec!["CapEff:\t00000000a80425fb", "CapBnd:\t00000000a80425fb"]
    );
    // What works stays inside: a user namespace of its own can mount only its own tmpfs.
    let r = step(
        f.base_stack(),
        &f.upper("inside"),
        &shell("unshare -U -r -m sh -c 'mount -t tmpfs none /tmp && touch /tmp/inside && ls /tmp'"),
        Opts {
            limits,
            ..Opts::default()
        },
    );
    assert_eq!(r.outcome.exit_code, 0, "{:?}", r.lines);
    assert_eq!(r.stdout(), vec!["inside"]);

    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "intact\n");
    assert_eq!(nix::unistd::gethostname().unwrap(), hostname);
    assert!(
        mounts_mentioning(f.dir.path()).is_empty(),
        "{:?}",
        mounts_mentioning(f.dir.path())
    );
    assert!(
        leftover_step_cgroups().is_empty(),
        "{:?}",
        leftover_step_cgroups()
    );
}
