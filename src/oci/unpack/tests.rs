//! The hostile-layer corpus and the fidelity checks of [`super::unpack_layer`]. Tests run as
//! root (CI does), so owners, device nodes and `trusted.*` xattrs are real.

use super::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

/// One raw tar entry; names are written byte for byte (`tar::Header::set_path` refuses `..`).
#[derive(Clone)]
struct E {
    kind: tar::EntryType,
    name: Vec<u8>,
    data: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: (u32, u32),
    xattrs: Vec<(String, Vec<u8>)>,
}

fn e(kind: tar::EntryType, name: impl AsRef<[u8]>) -> E {
    E {
        kind,
        name: name.as_ref().to_vec(),
        data: Vec::new(),
        link: Vec::new(),
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        dev: (0, 0),
        xattrs: Vec::new(),
    }
}
fn file(name: impl AsRef<[u8]>, data: &[u8]) -> E {
    E {
        data: data.to_vec(),
        ..e(tar::EntryType::Regular, name)
    }
}
fn dir(name: impl AsRef<[u8]>) -> E {
    e(tar::EntryType::Directory, name)
}
fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    E {
        link: target.as_ref().to_vec(),
        mode: 0o777,
        ..e(tar::EntryType::Symlink, name)
    }
}
fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    E {
        link: target.as_ref().to_vec(),
        ..e(tar::EntryType::Link, name)
    }
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for x in entries {
        if !x.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = x
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                .expect("pax");
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(x.kind);
        h.set_size(x.data.len() as u64);
        h.set_mode(x.mode);
        h.set_uid(x.uid);
        h.set_gid(x.gid);
        h.set_mtime(x.mtime);
        h.set_device_major(x.dev.0).expect("major");
        h.set_device_minor(x.dev.1).expect("minor");
        assert!(
            x.name.len() < 100 && x.link.len() < 100,
            "keep test names short"
        );
        h.as_old_mut().name[..x.name.len()].copy_from_slice(&x.name);
        h.as_old_mut().linkname[..x.link.len()].copy_from_slice(&x.link);
        h.set_cksum();
        b.append(&h, &x.data[..]).expect("append");
    }
    b.into_inner().expect("finish")
}

/// A layer dir inside a "store", and an `outside/` beside it holding a canary.
struct Scene {
    _t: tempfile::TempDir,
    layer: PathBuf,
    outside: PathBuf,
}

const CANARY: &[u8] = b"canary: must never change\n";

impl Scene {
    fn new() -> Scene {
        let t = tempfile::tempdir().expect("tempdir");
        let layer = t.path().join("store/layer");
        let outside = t.path().join("outside");
        fs::create_dir_all(&layer).expect("layer");
        fs::create_dir_all(outside.join("dir")).expect("outside");
        fs::write(outside.join("canary"), CANARY).expect("canary");
        Scene {
            _t: t,
            layer,
            outside,
        }
    }

    fn unpack(&self, entries: &[E]) -> Result<UnpackStats, UnpackError> {
        unpack_layer(&tar_of(entries)[..], &self.layer, &UnpackOptions::default())
    }

    /// The host is untouched: the canary is intact, single-linked, without xattrs, and
    /// `outside/` holds exactly what it held.
    fn assert_outside_untouched(&self) {
        let c = self.outside.join("canary");
        let md = fs::symlink_metadata(&c).expect("canary exists");
        assert!(md.file_type().is_file(), "canary replaced");
        assert_eq!(fs::read(&c).expect("read canary"), CANARY, "canary changed");
        assert_eq!(md.nlink(), 1, "canary gained a hard link");
        assert_eq!(md.mode() & 0o7777, 0o644, "canary mode changed");
        assert_eq!(
            xattr::list(&c).expect("xattrs").count(),
            0,
            "canary got xattrs"
        );
        assert_eq!(
            xattr::list(&self.outside).expect("xattrs").count(),
            0,
            "outside got xattrs"
        );
        let mut names: Vec<_> = fs::read_dir(&self.outside)
            .expect("outside")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        assert_eq!(names, ["canary", "dir"], "something was created outside");
        assert_eq!(
            fs::read_dir(self.outside.join("dir")).expect("dir").count(),
            0
        );
        let parent = self.layer.parent().expect("store");
        assert_eq!(
            fs::read_dir(parent).expect("store").count(),
            1,
            "wrote beside the layer"
        );
    }

    fn abs_outside(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.outside.display()).into_bytes()
    }
}

fn assert_rejected_or_contained(s: &Scene, entries: &[E]) {
    let r = s.unpack(entries);
    s.assert_outside_untouched();
    if let Err(e) = &r {
        let msg = e.to_string();
        assert!(!msg.is_empty());
    }
}

#[test]
fn dotdot_entry_names_are_rejected() {
    for name in [
        "../outside/canary",
        "a/../../outside/canary",
        "../../../../../../x",
        "./..",
    ] {
        let s = Scene::new();
        let r = s.unpack(&[file(name, b"pwned")]);
        assert!(
            matches!(r, Err(UnpackError::Escape { .. })),
            "{name}: {r:?}"
        );
        s.assert_outside_untouched();
    }
}

#[test]
fn absolute_entry_names_land_under_the_root() {
    let s = Scene::new();
    let abs = s.abs_outside("/canary");
    s.unpack(&[file("/abs/evil", b"x"), file(&abs, b"pwned")])
        .expect("contained");
    assert_eq!(fs::read(s.layer.join("abs/evil")).expect("inside"), b"x");
    let inside = s.layer.join(
        String::from_utf8(abs)
            .expect("utf8")
            .trim_start_matches('/'),
    );
    assert_eq!(fs::read(inside).expect("inside copy"), b"pwned");
    s.assert_outside_untouched();
}

#[test]
fn writing_through_a_symlink_to_outside_stays_inside() {
    let s = Scene::new();
    let abs = s.abs_outside("");
    // Absolute and relative symlinks to the outside, then writes through each.
    assert_rejected_or_contained(&s, &[symlink("link", &abs), file("link/canary", b"pwned")]);
    assert_rejected_or_contained(
        &s,
        &[
            symlink("rel", "../../outside"),
            file("rel/canary", b"pwned"),
        ],
    );
    assert_rejected_or_contained(
        &s,
        &[
            symlink("rel2", "../../outside/dir"),
            file("rel2/new", b"pwned"),
        ],
    );
    assert_rejected_or_contained(
        &s,
        &[
            symlink("d", "../../../../../../.."),
            dir("d/x"),
            file("d/x/y", b"p"),
        ],
    );
    assert_rejected_or_contained(
        &s,
        &[
            dir("deep"),
            symlink("deep/link", "../../../outside"),
            file("deep/link/x/y", b"p"),
        ],
    );
    // A symlink to a file outside, then a file of the same name: the link is replaced.
    let target = s.abs_outside("/canary");
    s.unpack(&[symlink("f", &target), file("f", b"new")])
        .expect("replace");
    let md = fs::symlink_metadata(s.layer.join("f")).expect("f");
    assert!(md.file_type().is_file());
    // Directory entries and device nodes through links, too.
    assert_rejected_or_contained(&s, &[symlink("l2", &abs), dir("l2/newdir")]);
    assert_rejected_or_contained(
        &s,
        &[
            symlink("l3", &abs),
            E {
                dev: (1, 3),
                ..e(tar::EntryType::Char, "l3/null")
            },
        ],
    );
    assert_rejected_or_contained(&s, &[symlink("l4", &abs), symlink("l4/sl", "/x")]);
    s.assert_outside_untouched();
}

#[test]
fn rootfs_absolute_dir_symlinks_resolve_inside_the_root() {
    let s = Scene::new();
    s.unpack(&[
        dir("run"),
        dir("var"),
        symlink("var/run", "/run"),
        file("var/run/x", b"pid"),
    ])
    .expect("var/run -> /run is legal");
    assert_eq!(fs::read(s.layer.join("run/x")).expect("run/x"), b"pid");
    assert_eq!(
        fs::read_link(s.layer.join("var/run")).expect("link kept"),
        Path::new("/run")
    );
}

#[test]
fn hard_links_to_outside_are_refused() {
    let s = Scene::new();
    let abs = s.abs_outside("/canary");
    let r = s.unpack(&[hardlink("h", "../outside/canary")]);
    assert!(matches!(r, Err(UnpackError::Escape { .. })), "{r:?}");
    let r = s.unpack(&[hardlink("h", &abs)]);
    assert!(
        r.is_err(),
        "absolute target is looked up under the root: {r:?}"
    );
    let outside_dir = s.abs_outside("");
    let r = s.unpack(&[symlink("d", &outside_dir), hardlink("h2", "d/canary")]);
    assert!(
        r.is_err(),
        "link source through a symlink stays in the root: {r:?}"
    );
    // A hard link to a symlink that points outside links the symlink, not its target.
    s.unpack(&[symlink("s", &abs), hardlink("h3", "s")])
        .expect("links the symlink");
    assert!(
        fs::symlink_metadata(s.layer.join("h3"))
            .expect("h3")
            .file_type()
            .is_symlink()
    );
    s.assert_outside_untouched();
}

#[test]
fn whiteouts_naming_dotdot_are_refused() {
    for name in [".wh..", "a/.wh..", ".wh..."] {
        let s = Scene::new();
        let r = s.unpack(&[dir("a"), file(name, b"")]);
        assert!(
            matches!(r, Err(UnpackError::BadWhiteout { .. })),
            "{name}: {r:?}"
        );
        s.assert_outside_untouched();
    }
    let s = Scene::new();
    let r = s.unpack(&[file("../.wh.canary", b"")]);
    assert!(matches!(r, Err(UnpackError::Escape { .. })), "{r:?}");
    let abs = s.abs_outside("");
    assert_rejected_or_contained(&s, &[symlink("w", &abs), file("w/.wh.canary", b"")]);
    assert_rejected_or_contained(&s, &[symlink("o", &abs), file("o/.wh..wh..opq", b"")]);
    assert_rejected_or_contained(
        &s,
        &[symlink("o2", "../../outside"), file("o2/.wh..wh..opq", b"")],
    );
}

#[test]
fn overlay_xattrs_in_a_layer_are_ignored() {
    let s = Scene::new();
    let mut d = dir("d");
    d.xattrs = vec![("trusted.overlay.opaque".into(), b"y".to_vec())];
    s.unpack(&[d]).expect("unpack");
    assert_eq!(
        xattr::get(s.layer.join("d"), OPAQUE_XATTR).expect("get"),
        None
    );
}

#[test]
fn decompression_bomb_is_stopped_at_the_limit() {
    use flate2::{Compression, write::GzEncoder};
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").expect("path");
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, io::repeat(0).take(64 << 20)).expect("append");
    let gz = b.into_inner().expect("tar").finish().expect("gz");
    assert!(gz.len() < 1 << 20, "the bomb is small: {}", gz.len());
    let opts = UnpackOptions {
        max_bytes: 8 << 20,
        ..UnpackOptions::default()
    };
    let s = Scene::new();
    // The file-content limit.
    let r = unpack_layer(flate2::read::GzDecoder::new(&gz[..]), &s.layer, &opts);
    assert!(
        matches!(r, Err(UnpackError::TooLarge { limit }) if limit == 8 << 20),
        "{r:?}"
    );
    // The stream limit (what the store puts in front of every layer).
    let s = Scene::new();
    let stream =
        crate::oci::digest::HashReader::new(flate2::read::GzDecoder::new(&gz[..]), 8 << 20);
    let opts_big = UnpackOptions {
        max_bytes: u64::MAX,
        ..UnpackOptions::default()
    };
    let r = unpack_layer(stream, &s.layer, &opts_big);
    assert!(matches!(r, Err(UnpackError::TooLarge { .. })), "{r:?}");
    let written = fs::metadata(s.layer.join("zeros"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 9 << 20, "stopped early: {written}");
    s.assert_outside_untouched();
}

#[test]
fn owners_modes_times_xattrs_links_and_nodes_are_kept() {
    let s = Scene::new();
    let mut root = dir("./");
    root.mode = 0o755;
    root.mtime = 0;
    let mut suid = file("bin/su", b"#!");
    suid.mode = 0o4755;
    suid.uid = 1234;
    suid.gid = 5678;
    suid.mtime = 0;
    suid.xattrs = vec![
        (
            "security.capability".into(),
            vec![
                1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        ("user.kiln".into(), b"hello".to_vec()),
    ];
    let mut sgid = dir("srv");
    sgid.mode = 0o2775;
    sgid.gid = 50;
    let mut tmp = dir("tmp");
    tmp.mode = 0o1777;
    let mut ro = dir("ro");
    ro.mode = 0o555;
    let mut lnk = symlink("etc/localtime", "/usr/share/zoneinfo/UTC");
    lnk.uid = 4321;
    lnk.gid = 8765;
    lnk.mtime = 12345;
    let entries = vec![
        root,
        dir("bin"),
        suid,
        hardlink("bin/su2", "bin/su"),
        sgid,
        tmp,
        ro,
        file("ro/inside", b"ok"),
        dir("etc"),
        lnk,
        dir("dev"),
        E {
            dev: (1, 3),
            mode: 0o666,
            ..e(tar::EntryType::Char, "dev/null")
        },
        E {
            dev: (7, 9),
            mode: 0o660,
            gid: 6,
            ..e(tar::EntryType::Block, "dev/loop9")
        },
        E {
            mode: 0o600,
            ..e(tar::EntryType::Fifo, "dev/fifo")
        },
        file("deep/implied/parent", b"p"),
    ];
    let stats = s.unpack(&entries).expect("unpack");
    assert_eq!(stats.file_bytes, 5);
    let l = &s.layer;
    let md = |p: &str| fs::symlink_metadata(l.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let su = md("bin/su");
    assert_eq!(
        (su.mode() & 0o7777, su.uid(), su.gid(), su.mtime()),
        (0o4755, 1234, 5678, 0)
    );
    assert_eq!(su.ino(), md("bin/su2").ino(), "hard link shares the inode");
    assert_eq!(su.nlink(), 2);
    let cap = xattr::get(l.join("bin/su"), "security.capability").expect("get");
    assert_eq!(cap.as_deref().map(<[u8]>::len), Some(20));
    assert_eq!(
        xattr::get(l.join("bin/su"), "user.kiln")
            .expect("get")
            .as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(md("srv").mode() & 0o7777, 0o2775);
    assert_eq!(md("srv").gid(), 50);
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(md("ro").mode() & 0o7777, 0o555);
    assert_eq!(fs::read(l.join("ro/inside")).expect("inside ro"), b"ok");
    let lt = md("etc/localtime");
    assert!(lt.file_type().is_symlink());
    assert_eq!((lt.uid(), lt.gid(), lt.mtime()), (4321, 8765, 12345));
    assert_eq!(
        fs::read_link(l.join("etc/localtime")).expect("link"),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o7777),
        (nix::sys::stat::makedev(1, 3), 0o666)
    );
    let lp = md("dev/loop9");
    assert!(lp.file_type().is_block_device());
    assert_eq!((lp.rdev(), lp.gid()), (nix::sys::stat::makedev(7, 9), 6));
    assert!(md("dev/fifo").file_type().is_fifo());
    assert_eq!(md("deep/implied").permissions().mode() & 0o777, 0o755);
    assert_eq!(md(".").mtime(), 0, "root mtime 0 stays 0");
    s.assert_outside_untouched();
}

#[test]
fn oci_whiteouts_become_overlay_whiteouts_and_opaque_dirs() {
    let s = Scene::new();
    s.unpack(&[
        dir("etc"),
        file("etc/.wh.gone", b""),
        dir("var/cache"),
        file("var/cache/.wh..wh..opq", b""),
        file("var/cache/kept", b"k"),
        file("keep/.wh.x", b""),
        file("keep/x", b"layer's own x wins"),
        file("own/y", b"y"),
        file("own/.wh.y", b""),
        file(".wh..wh.plnk", b""),
    ])
    .expect("unpack");
    let l = &s.layer;
    let gone = fs::symlink_metadata(l.join("etc/gone")).expect("whiteout");
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert!(!l.join("etc/.wh.gone").exists());
    assert_eq!(
        xattr::get(l.join("var/cache"), OPAQUE_XATTR)
            .expect("get")
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!l.join("var/cache/.wh..wh..opq").exists());
    assert_eq!(fs::read(l.join("var/cache/kept")).expect("kept"), b"k");
    assert_eq!(
        fs::read(l.join("keep/x")).expect("x"),
        b"layer's own x wins"
    );
    assert_eq!(fs::read(l.join("own/y")).expect("y"), b"y");
    assert!(!l.join(".wh..wh.plnk").exists());
}

#[test]
fn later_entries_replace_earlier_ones_of_another_kind() {
    let s = Scene::new();
    s.unpack(&[
        file("a", b"file"),
        dir("a"),
        file("a/child", b"c"),
        dir("b"),
        file("b/inner", b"i"),
        file("b", b"now a file"),
        dir("c"),
        file("c/kept", b"k"),
        dir("c"),
    ])
    .expect("unpack");
    assert_eq!(fs::read(s.layer.join("a/child")).expect("a/child"), b"c");
    assert_eq!(fs::read(s.layer.join("b")).expect("b"), b"now a file");
    assert_eq!(
        fs::read(s.layer.join("c/kept")).expect("merged dir keeps children"),
        b"k"
    );
}

#[test]
fn pax_times_keep_their_fraction() {
    assert_eq!(
        parse_pax_time("1700000000.25"),
        Some((1_700_000_000, 250_000_000))
    );
    assert_eq!(parse_pax_time("0"), Some((0, 0)));
    assert_eq!(parse_pax_time("-1.5"), Some((-2, 500_000_000)));
    assert_eq!(parse_pax_time("x"), None);
}
