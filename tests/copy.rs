//! COPY/ADD into a real root tree: Docker's placement rules, owners, modes, globs, excludes,
//! heredoc files, archive extraction, and containment of hostile symlinks (runs as root).

use kiln::build::context::BuildContext;
use kiln::build::copy::{
    CopyError, CopyRequest, Owner, SourceRoot, copy, resolve_owner, resolve_user_owner,
};
use kiln::ir::Source;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(&p, content).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn paths(sources: &[&str]) -> Vec<Source> {
    sources
        .iter()
        .map(|p| Source::Path {
            path: (*p).to_string(),
        })
        .collect()
}

fn req<'a>(sources: &'a [Source], dest: &'a str) -> CopyRequest<'a> {
    CopyRequest {
        sources,
        dest,
        owner: None,
        chmod: None,
        exclude: &[],
        parents: false,
        unpack_archives: false,
    }
}

struct Fixture {
    ctx: tempfile::TempDir,
    root: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let ctx = tempfile::tempdir().expect("ctx");
    write(ctx.path(), "app.py", "print(1)\n", 0o644);
    write(ctx.path(), "lib.py", "x = 1\n", 0o600);
    write(ctx.path(), "run.sh", "#!/bin/sh\n", 0o755);
    write(ctx.path(), "src/a/deep.txt", "deep\n", 0o640);
    write(ctx.path(), "src/b.md", "# b\n", 0o644);
    write(ctx.path(), "secret.env", "TOKEN=1\n", 0o600);
    write(ctx.path(), ".dockerignore", "secret.env\n", 0o644);
    symlink("a/deep.txt", ctx.path().join("src/link")).expect("symlink");
    let root = tempfile::tempdir().expect("root");
    write(
        root.path(),
        "etc/passwd",
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        0o644,
    );
    write(
        root.path(),
        "etc/group",
        "root:x:0:\napp:x:1001:\nstaff:x:50:\n",
        0o644,
    );
    std::fs::create_dir_all(root.path().join("existing")).expect("mkdir");
    Fixture { ctx, root }
}

fn open(f: &Fixture) -> BuildContext {
    BuildContext::open(f.ctx.path(), None).expect("context")
}

#[test]
fn a_file_to_a_path_without_slash_becomes_that_file() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["app.py"]);
    copy(
        SourceRoot::Context(&c),
        &req(&s, "/opt/main.py"),
        f.root.path(),
    )
    .expect("copy");
    assert_eq!(
        std::fs::read_to_string(f.root.path().join("opt/main.py")).expect("read"),
        "print(1)\n"
    );
}

#[test]
fn a_file_to_an_existing_directory_goes_inside() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["app.py"]);
    copy(
        SourceRoot::Context(&c),
        &req(&s, "/existing"),
        f.root.path(),
    )
    .expect("copy");
    assert!(f.root.path().join("existing/app.py").is_file());
}

#[test]
fn a_directory_copies_its_contents_with_modes_and_links() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["src"]);
    copy(SourceRoot::Context(&c), &req(&s, "/app/"), f.root.path()).expect("copy");
    let deep = f.root.path().join("app/a/deep.txt");
    assert_eq!(
        std::fs::metadata(&deep).expect("meta").permissions().mode() & 0o7777,
        0o640
    );
    assert_eq!(
        std::fs::read_link(f.root.path().join("app/link")).expect("link"),
        Path::new("a/deep.txt")
    );
    assert!(
        !f.root.path().join("app/src").exists(),
        "contents, not the directory"
    );
    let meta = std::fs::metadata(&deep).expect("meta");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "owners are 0:0 without --chown"
    );
}

#[test]
fn globs_match_several_files_into_a_directory() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["*.py"]);
    copy(SourceRoot::Context(&c), &req(&s, "/code/"), f.root.path()).expect("copy");
    assert!(f.root.path().join("code/app.py").is_file());
    assert!(f.root.path().join("code/lib.py").is_file());
    assert!(!f.root.path().join("code/run.sh").exists());
}

#[test]
fn dockerignored_files_are_not_copied() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["."]);
    copy(SourceRoot::Context(&c), &req(&s, "/all/"), f.root.path()).expect("copy");
    assert!(f.root.path().join("all/app.py").is_file());
    assert!(!f.root.path().join("all/secret.env").exists());
    let only = paths(&["secret.env"]);
    assert!(matches!(
        copy(SourceRoot::Context(&c), &req(&only, "/x"), f.root.path()),
        Err(CopyError::NoMatch { .. })
    ));
}

#[test]
fn chown_resolves_names_in_the_image_and_chmod_applies() {
    let f = fixture();
    let c = open(&f);
    let owner = resolve_owner(f.root.path(), "app:staff").expect("owner");
    assert_eq!(owner, Owner { uid: 1000, gid: 50 });
    assert_eq!(
        resolve_owner(f.root.path(), "app").expect("owner"),
        Owner {
            uid: 1000,
            gid: 1000
        }
    );
    assert_eq!(
        resolve_owner(f.root.path(), "7:8").expect("owner"),
        Owner { uid: 7, gid: 8 }
    );
    assert!(matches!(
        resolve_owner(f.root.path(), "nobody"),
        Err(CopyError::UnknownOwner { .. })
    ));
    // WORKDIR's owner, as BuildKit resolves USER for file operations: a name alone takes
    // passwd's primary gid, a uid alone is also the gid, a group given wins.
    assert_eq!(
        resolve_user_owner(f.root.path(), "app").expect("owner"),
        Owner {
            uid: 1000,
            gid: 1001
        }
    );
    assert_eq!(
        resolve_user_owner(f.root.path(), "1234").expect("owner"),
        Owner {
            uid: 1234,
            gid: 1234
        }
    );
    assert_eq!(
        resolve_user_owner(f.root.path(), "app:staff").expect("owner"),
        Owner { uid: 1000, gid: 50 }
    );
    let s = paths(&["run.sh", "lib.py"]);
    let mut r = req(&s, "/bin2/");
    r.owner = Some(owner);
    r.chmod = Some(0o750);
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("copy");
    for name in ["run.sh", "lib.py"] {
        let m = std::fs::metadata(f.root.path().join("bin2").join(name)).expect("meta");
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (1000, 50, 0o750)
        );
    }
    let dir = std::fs::metadata(f.root.path().join("bin2")).expect("meta");
    assert_eq!(
        (dir.uid(), dir.gid()),
        (1000, 50),
        "created directories get the owner"
    );
}

#[test]
fn exclude_and_parents() {
    let f = fixture();
    let c = open(&f);
    let s = paths(&["src"]);
    let exclude = vec!["*.md".to_string()];
    let mut r = req(&s, "/x/");
    r.exclude = &exclude;
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("copy");
    assert!(f.root.path().join("x/a/deep.txt").is_file());
    assert!(!f.root.path().join("x/b.md").exists());
    let s = paths(&["src/a/deep.txt", "./src/b.md"]);
    let mut r = req(&s, "/p/");
    r.parents = true;
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("copy");
    assert!(f.root.path().join("p/src/a/deep.txt").is_file());
    assert!(f.root.path().join("p/src/b.md").is_file());
}

#[test]
fn heredoc_sources_become_files() {
    let f = fixture();
    let c = open(&f);
    let s = vec![Source::Inline {
        name: "hello.c".into(),
        content: "int main(){}\n".into(),
    }];
    copy(SourceRoot::Context(&c), &req(&s, "/src/"), f.root.path()).expect("copy");
    assert_eq!(
        std::fs::read_to_string(f.root.path().join("src/hello.c")).expect("read"),
        "int main(){}\n"
    );
}

#[test]
fn a_symlink_in_the_image_cannot_send_a_write_outside() {
    let f = fixture();
    let c = open(&f);
    let outside = tempfile::tempdir().expect("outside");
    let canary = outside.path().join("canary");
    std::fs::write(&canary, "untouched").expect("canary");
    // /app in the image is an absolute link to a host path; it must resolve inside the root.
    symlink(outside.path(), f.root.path().join("app")).expect("symlink");
    symlink(&canary, f.root.path().join("existing/canary-link")).expect("symlink");
    let s = paths(&["app.py"]);
    copy(
        SourceRoot::Context(&c),
        &req(&s, "/app/canary"),
        f.root.path(),
    )
    .expect("copy");
    copy(
        SourceRoot::Context(&c),
        &req(&s, "/existing/canary-link"),
        f.root.path(),
    )
    .expect("copy");
    assert_eq!(
        std::fs::read_to_string(&canary).expect("canary"),
        "untouched"
    );
    assert_eq!(std::fs::read_dir(outside.path()).expect("dir").count(), 1);
    let inside = f
        .root
        .path()
        .join(outside.path().strip_prefix("/").expect("abs"))
        .join("canary");
    assert_eq!(
        std::fs::read_to_string(inside).expect("inside"),
        "print(1)\n"
    );
}

#[test]
fn a_source_that_links_to_a_directory_copies_the_directory_contents() {
    // BuildKit follows a source that is a symlink; entries below it keep their own
    // .dockerignore verdicts (secret.env stays out).
    let f = fixture();
    symlink("src", f.ctx.path().join("src-link")).expect("symlink");
    write(f.ctx.path(), "src/secret.env", "TOKEN=2\n", 0o600);
    std::fs::write(
        f.ctx.path().join(".dockerignore"),
        "secret.env\nsrc/secret.env\n",
    )
    .expect("write");
    let c = open(&f);
    let s = paths(&["src-link"]);
    copy(
        SourceRoot::Context(&c),
        &req(&s, "/via-link"),
        f.root.path(),
    )
    .expect("copy");
    let got = f.root.path().join("via-link");
    assert!(got.is_dir() && !got.is_symlink());
    assert_eq!(
        std::fs::read_to_string(got.join("a/deep.txt")).expect("read"),
        std::fs::read_to_string(f.ctx.path().join("src/a/deep.txt")).expect("read")
    );
    assert_eq!(
        std::fs::read_link(got.join("link")).expect("a nested link stays a link"),
        Path::new("a/deep.txt")
    );
    assert!(!got.join("secret.env").exists());
}

#[test]
fn a_symlink_in_the_context_cannot_read_outside() {
    let f = fixture();
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("passwd"), "host secret").expect("write");
    symlink(outside.path().join("passwd"), f.ctx.path().join("escape")).expect("symlink");
    let c = open(&f);
    let s = paths(&["escape"]);
    let r = copy(SourceRoot::Context(&c), &req(&s, "/got"), f.root.path());
    assert!(
        r.is_err(),
        "an absolute link resolves inside the context, where nothing is"
    );
    assert!(!f.root.path().join("got").exists());
}

#[test]
fn add_extracts_a_gzip_tar_and_rejects_dot_dot() {
    let f = fixture();
    let tarball = f.ctx.path().join("vendor.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&tarball).expect("create"),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o640);
        h.set_uid(5);
        h.set_gid(6);
        b.append_data(&mut h, "pkg/file", &b"abc"[..])
            .expect("append");
        b.into_inner().expect("tar").finish().expect("gz");
    }
    let c = open(&f);
    let s = paths(&["vendor.tar.gz"]);
    let mut r = req(&s, "/vendor");
    r.unpack_archives = true;
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("extract");
    let m = std::fs::metadata(f.root.path().join("vendor/pkg/file")).expect("extracted");
    assert_eq!(
        (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
        (5, 6, 0o640)
    );

    let evil = f.ctx.path().join("evil.tar");
    {
        let mut data = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        // Bypass the builder's own path checks to make a hostile entry.
        h.as_gnu_mut().expect("gnu").name[..10].copy_from_slice(b"../escaped");
        h.set_cksum();
        data.extend_from_slice(h.as_bytes());
        data.extend_from_slice(b"evil");
        data.resize(1024 + 512 * 2, 0);
        std::fs::write(&evil, data).expect("write");
    }
    let c = open(&f);
    let s = paths(&["evil.tar"]);
    let mut r = req(&s, "/v2/");
    r.unpack_archives = true;
    assert!(copy(SourceRoot::Context(&c), &r, f.root.path()).is_err());
    assert!(!f.root.path().join("escaped").exists());
    assert!(
        !f.root
            .path()
            .parent()
            .expect("parent")
            .join("escaped")
            .exists()
    );
}

#[test]
fn add_keeps_set_user_id_bits_and_xattrs_of_archive_members() {
    let f = fixture();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.kiln", &b"1"[..])])
        .expect("pax");
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o4755);
    h.set_uid(3);
    h.set_gid(4);
    b.append_data(&mut h, "bin/tool", &b"tool"[..])
        .expect("append");
    std::fs::write(f.ctx.path().join("tool.tar"), b.into_inner().expect("tar")).expect("write");
    let c = open(&f);
    let s = paths(&["tool.tar"]);
    let mut r = req(&s, "/opt/");
    r.unpack_archives = true;
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("copy");
    let p = f.root.path().join("opt/bin/tool");
    let m = std::fs::metadata(&p).expect("meta");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (3, 4, 0o4755));
    assert_eq!(
        xattr::get(&p, "user.kiln").expect("xattr"),
        Some(b"1".to_vec())
    );
}

#[test]
fn add_copies_a_compressed_file_that_is_not_a_tar_as_it_is() {
    // Docker extracts only what decompresses to a tar; anything else is copied.
    let f = fixture();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"just text, no tar header\n").expect("gzip");
    let bytes = gz.finish().expect("gzip");
    std::fs::write(f.ctx.path().join("notes.txt.gz"), &bytes).expect("write");
    std::fs::write(f.ctx.path().join("zeros.tar"), vec![0u8; 1024]).expect("write");
    let c = open(&f);
    let s = paths(&["notes.txt.gz", "zeros.tar"]);
    let mut r = req(&s, "/files/");
    r.unpack_archives = true;
    copy(SourceRoot::Context(&c), &r, f.root.path()).expect("copy");
    assert_eq!(
        std::fs::read(f.root.path().join("files/notes.txt.gz")).expect("read"),
        bytes
    );
    assert_eq!(
        std::fs::read(f.root.path().join("files/zeros.tar")).expect("read"),
        vec![0u8; 1024],
        "an empty archive is a file, as Go's tar reader finds no header in it"
    );
}

#[test]
fn hardlinks_in_a_stage_tree_stay_linked() {
    let f = fixture();
    let tree = tempfile::tempdir().expect("tree");
    write(tree.path(), "bin/busybox", "ELF", 0o755);
    std::fs::hard_link(tree.path().join("bin/busybox"), tree.path().join("bin/sh")).expect("link");
    let s = paths(&["/bin"]);
    copy(
        SourceRoot::Tree(tree.path()),
        &req(&s, "/usr/bin/"),
        f.root.path(),
    )
    .expect("copy");
    let a = std::fs::metadata(f.root.path().join("usr/bin/busybox")).expect("a");
    let b = std::fs::metadata(f.root.path().join("usr/bin/sh")).expect("b");
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn a_stage_tree_keeps_owners_and_setuid_bits_unless_chown() {
    // BuildKit keeps a stage's owners (the reference's 0:0 rule is for the build context),
    // and chown must not clear a set-user-ID bit copied with the mode.
    let f = fixture();
    let tree = tempfile::tempdir().expect("tree");
    write(tree.path(), "out/tool", "ELF", 0o4755);
    std::os::unix::fs::chown(tree.path().join("out/tool"), Some(7), Some(8)).expect("chown");
    std::fs::set_permissions(
        tree.path().join("out/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("chmod");
    let s = paths(&["/out"]);
    copy(
        SourceRoot::Tree(tree.path()),
        &req(&s, "/kept"),
        f.root.path(),
    )
    .expect("copy");
    let m = std::fs::metadata(f.root.path().join("kept/tool")).expect("meta");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 8, 0o4755));
    let mut r = req(&s, "/chowned");
    r.owner = Some(Owner { uid: 5, gid: 6 });
    copy(SourceRoot::Tree(tree.path()), &r, f.root.path()).expect("copy");
    let m = std::fs::metadata(f.root.path().join("chowned/tool")).expect("meta");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5, 6, 0o4755));
    // From the build context, owners are 0:0 whatever they are on the host.
    std::os::unix::fs::chown(f.ctx.path().join("run.sh"), Some(9), Some(9)).expect("chown");
    let c = open(&f);
    let s = paths(&["run.sh"]);
    copy(SourceRoot::Context(&c), &req(&s, "/ctx/"), f.root.path()).expect("copy");
    let m = std::fs::metadata(f.root.path().join("ctx/run.sh")).expect("meta");
    assert_eq!((m.uid(), m.gid()), (0, 0));
}

#[test]
fn xattrs_of_context_files_and_directories_are_copied() {
    let f = fixture();
    xattr::set(f.ctx.path().join("app.py"), "user.kiln", b"file").expect("xattr");
    xattr::set(f.ctx.path().join("src/a"), "user.kiln", b"dir").expect("xattr");
    let c = open(&f);
    let s = paths(&["app.py", "src"]);
    copy(SourceRoot::Context(&c), &req(&s, "/x/"), f.root.path()).expect("copy");
    let get = |p: &str| xattr::get(f.root.path().join(p), "user.kiln").expect("xattr");
    assert_eq!(get("x/app.py"), Some(b"file".to_vec()));
    assert_eq!(get("x/a"), Some(b"dir".to_vec()));
}
