//! SIGTERM of Kiln during a step: the step dies and everything is cleaned up. Its own binary,
//! because the handler's "interrupted" state is process-wide.
mod namespace_common;

use kiln::build::cgroup::Limits;
use kiln::build::driver::DriverError;
use namespace_common::*;

#[test]
fn sigterm_during_a_step_kills_it_and_cleans_up() {
    let f = Fixture::new();
    let upper = f.upper("u");
    let mut lines = Vec::new();
    let mut sink = |_s: kiln::build::executor::Stream, l: &str| {
        lines.push(l.to_string());
        if l == "ready" {
            nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM)
                .unwrap();
        }
    };
    use kiln::build::driver::{Driver, NamespaceDriver, StepRequest};
    let run = shell("sleep 6666 & echo ready; wait");
    let r = NamespaceDriver.run_step(
        f.base_stack(),
        &upper,
        StepRequest {
            run: &run,
            hostname: "kiln-test",
            mounts: &[],
            resolv_conf: None,
            limits: Limits {
                pids: Some(64),
                ..Limits::default()
            },
            output: &mut sink,
            stdio: kiln::build::executor::Stdio::Capture,
            timeout: Some(std::time::Duration::from_secs(120)),
        },
    );
    assert!(
        matches!(r, Err(DriverError::Interrupted { signal: 15 })),
        "{r:?}"
    );
    assert_eq!(lines, vec!["ready"]);
    assert!(processes_with_cmdline(&["sleep", "6666"]).is_empty());
    assert!(mounts_mentioning(f.dir.path()).is_empty());
    assert!(leftover_step_cgroups().is_empty());
    for s in [".work", ".merged", ".stub"] {
        assert!(!f.upper(&format!("u{s}")).exists());
    }
}
