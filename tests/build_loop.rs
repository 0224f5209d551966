//! The step loop end to end on the namespace driver: a Dockerfile lowered to IR, built on a
//! real busybox layer with real overlayfs and namespaces, cached, and rebuilt after a context
//! change (runs as root).

#[path = "namespace_common/mod.rs"]
mod namespace_common;

use kiln::build::cache::LayerCache;
use kiln::build::cgroup::Limits;
use kiln::build::context::BuildContext;
use kiln::build::driver::NamespaceDriver;
use kiln::build::run::{Bases, BuildError, BuildOptions, Event, ResolvedBase, View, build};
use kiln::frontend::dockerfile::parse;
use kiln::frontend::{LowerOptions, NoBaseImages, lower_dockerfile};
use kiln::ir::ImageConfig;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `kiln/busybox` as one real unpacked layer made from Debian's busybox-static.
struct OneLayer(PathBuf);

impl Bases for OneLayer {
    fn resolve(&self, reference: &str) -> Result<ResolvedBase, String> {
        if reference != "kiln/busybox" {
            return Err(format!("{reference}: only kiln/busybox in this test"));
        }
        Ok(ResolvedBase {
            layers: vec![self.0.clone()],
            digest: "sha256:busybox-test-layer".into(),
            config: ImageConfig::default(),
        })
    }
}

struct Setup {
    _base: tempfile::TempDir,
    home: tempfile::TempDir,
    ctx: tempfile::TempDir,
    bases: OneLayer,
}

fn setup() -> Setup {
    let base = tempfile::tempdir().expect("base");
    namespace_common::busybox_root(base.path());
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("app.sh"), "echo app v1\n").expect("write");
    std::fs::write(ctx.path().join("notes.txt"), "unrelated\n").expect("write");
    let bases = OneLayer(base.path().to_path_buf());
    Setup {
        _base: base,
        home: tempfile::tempdir().expect("home"),
        ctx,
        bases,
    }
}

const DOCKERFILE: &str = "FROM kiln/busybox AS build
RUN echo compiled > /artifact
FROM kiln/busybox
ENV GREETING=hi
WORKDIR /srv/app
RUN echo \"$GREETING from $(pwd)\" > greeting.txt
COPY app.sh ./
COPY --from=build /artifact /opt/artifact
USER alice
RUN id -u > /tmp/uid
";

/// Per step: served from the cache; the target's layers; the RUN output lines.
type Built = (Vec<bool>, Vec<PathBuf>, Vec<String>);

fn run_build(s: &Setup, dockerfile: &str, no_cache: bool) -> Result<Built, BuildError> {
    let spec = lower_dockerfile(
        &parse(dockerfile).expect("parse"),
        &LowerOptions::default(),
        &NoBaseImages,
    )
    .expect("lower")
    .spec;
    let ctx = BuildContext::open(s.ctx.path(), None).expect("context");
    let cache = LayerCache::open(&s.home.path().join("cache-v1")).expect("cache");
    let scratch = s.home.path().join("cache-v1");
    let mut lines = Vec::new();
    let mut events = |e: Event<'_>| {
        if let Event::Output { line, .. } = e {
            lines.push(line.to_string());
        }
    };
    let mut opts = BuildOptions {
        no_cache,
        limits: Limits::default(),
        step_timeout: None,
        secrets: BTreeMap::new(),
        cache_mounts: s.home.path().join("cache-mounts-v1"),
        scratch,
        builder_disk_mb: None,
        disk_dir: s.home.path().join("tmp"),
        events: &mut events,
    };
    let out = build(&spec, &ctx, &s.bases, &cache, &NamespaceDriver, &mut opts)?;
    let cached = out.steps.iter().map(|r| r.cached).collect();
    let layers = out.target().expect("target").layers.clone();
    Ok((cached, layers, lines))
}

fn read(view: &Path, rel: &str) -> String {
    std::fs::read_to_string(view.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn builds_caches_and_rebuilds_only_from_the_changed_file() {
    let s = setup();
    let (cached, layers, _) = run_build(&s, DOCKERFILE, false).expect("build");
    assert_eq!(
        cached,
        [false, true, false, false, false, false, true, false]
    );
    {
        let view = View::mount(&layers, s.home.path()).expect("view");
        assert_eq!(
            read(view.path(), "srv/app/greeting.txt"),
            "hi from /srv/app\n"
        );
        assert_eq!(read(view.path(), "srv/app/app.sh"), "echo app v1\n");
        assert_eq!(read(view.path(), "opt/artifact"), "compiled\n");
        assert_eq!(read(view.path(), "tmp/uid"), "1000\n");
        let meta = std::fs::metadata(view.path().join("srv/app/app.sh")).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
        assert!(
            !view.path().join("etc/hostname").exists(),
            "build-time files stay out"
        );
    }
    let (again, _, _) = run_build(&s, DOCKERFILE, false).expect("rebuild");
    assert!(
        again.iter().all(|c| *c),
        "a no-op rebuild is all cached: {again:?}"
    );
    std::fs::write(s.ctx.path().join("notes.txt"), "changed but unread\n").expect("write");
    let (unread, _, _) = run_build(&s, DOCKERFILE, false).expect("rebuild");
    assert!(
        unread.iter().all(|c| *c),
        "an unread file changes nothing: {unread:?}"
    );
    std::fs::write(s.ctx.path().join("app.sh"), "echo app v2\n").expect("write");
    let (changed, layers, _) = run_build(&s, DOCKERFILE, false).expect("rebuild");
    // Steps before the COPY of app.sh stay cached; it and everything after run again.
    assert_eq!(changed, [true, true, true, true, false, false, true, false]);
    let view = View::mount(&layers, s.home.path()).expect("view");
    assert_eq!(read(view.path(), "srv/app/app.sh"), "echo app v2\n");
    let (none_cached, _, _) = run_build(&s, DOCKERFILE, true).expect("no-cache");
    assert!(
        none_cached.iter().all(|c| !*c),
        "--no-cache runs everything"
    );
}

#[test]
fn a_failing_step_reports_its_number_code_and_last_lines() {
    let s = setup();
    let df = "FROM kiln/busybox\nRUN echo one && echo two >&2 && exit 3\n";
    let err = run_build(&s, df, false).expect_err("must fail");
    match err {
        BuildError::StepFailed {
            step, code, tail, ..
        } => {
            assert_eq!((step, code), (1, 3));
            assert_eq!(tail, ["one", "two"]);
        }
        other => panic!("wrong error: {other}"),
    }
}
