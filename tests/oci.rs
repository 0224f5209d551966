//! Base images end to end, against real parts the tests start: Debian's `docker-registry`
//! on 127.0.0.1 (no auth, htpasswd Basic, Bearer tokens from a token server run here),
//! images pushed with skopeo, trees compared with `umoci unpack`, and the `kiln` binary.

mod oci_support;

use oci_support::*;
use std::path::Path;
use std::sync::atomic::Ordering;

fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read("/bin/busybox").expect("/bin/busybox: install busybox-static");
    tar_of(&[
        Entry::Dir("bin/", 0o755),
        Entry::File("bin/busybox".into(), bb, 0o755),
        Entry::Symlink("bin/sh", "/bin/busybox".into()),
        Entry::Symlink("bin/ls", "busybox".into()),
        Entry::Dir("etc/", 0o755),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::Dir("tmp/", 0o1777),
    ])
}

/// A layout under `dir` holding `x/busybox`-like image `tag`.
fn busybox_layout(dir: &Path, tag: &str) -> (Layout, Desc) {
    let mut l = Layout::new(dir);
    let m = l.image(&[(busybox_layer(), Comp::Gzip)], "amd64", &["PATH=/bin"]);
    l.tag(tag, &m);
    (l, m)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pull_reports_the_manifest_digest_skopeo_inspect_reports() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    busybox_layout(&t.path().join("layout"), "latest");
    let name = format!("{}/x/busybox:latest", reg.host);
    skopeo_copy(
        &format!("oci:{}:latest", t.path().join("layout").display()),
        &format!("docker://{name}"),
        None,
        false,
    );

    let home = t.path().join("home");
    let out = kiln(
        &home,
        None,
        &["base", "pull", &name, "--output", "json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json_of(&out);
    let inspect: serde_json::Value =
        serde_json::from_slice(&skopeo_inspect(&name, false, None)).expect("inspect");
    assert_eq!(j["digest"], inspect["Digest"]);
    assert_eq!(j["platform_digest"], inspect["Digest"]);
    assert_eq!(j["platform"], "linux/amd64");
    assert_eq!(j["reference"], name);
    let layers: Vec<&serde_json::Value> = j["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| &l["digest"])
        .collect();
    let theirs: Vec<&serde_json::Value> = inspect["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .collect();
    assert_eq!(layers, theirs);
    assert!(j["size_bytes"].as_u64().expect("size") > 500_000);

    // The unpacked tree is what umoci makes of the same image.
    let pulled = t.path().join("pulled");
    skopeo_copy(
        &format!("docker://{name}"),
        &format!("oci:{}:latest", pulled.display()),
        None,
        false,
    );
    umoci_unpack(&pulled, "latest", &t.path().join("bundle"));
    let layer_dirs: Vec<_> = std::fs::read_dir(home.join("layers-v1/sha256"))
        .expect("layers")
        .collect();
    assert_eq!(layer_dirs.len(), 1);
    let ours = layer_dirs[0].as_ref().expect("entry").path();
    assert_same_tree(&ours, &t.path().join("bundle/rootfs"));

    // A second pull finds everything in the store.
    let again = kiln(&home, None, &["base", "pull", &name], &[]);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("already here"),
        "{}",
        stderr(&again)
    );
    let ls = json_of(&kiln(&home, None, &["base", "ls", "--json"], &[]));
    assert_eq!(ls.as_array().map(Vec::len), Some(1));
    assert_eq!(ls[0]["reference"], name);
    assert_eq!(ls[0]["source"], "registry");
}

#[test]
fn multi_arch_index_resolves_to_linux_amd64() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    let mut l = Layout::new(&t.path().join("layout"));
    let arm = l.image(
        &[(tar_of(&[file("arch", "arm64\n")]), Comp::Gzip)],
        "arm64",
        &[],
    );
    let amd = l.image(
        &[(tar_of(&[file("arch", "amd64\n")]), Comp::Gzip)],
        "amd64",
        &["MARK=amd64"],
    );
    let idx = l.index(&[(arm, "arm64"), (amd.clone(), "amd64")]);
    l.tag("multi", &idx);
    let name = format!("{}/x/multi:1", reg.host);
    skopeo_copy(
        &format!("oci:{}:multi", l.dir.display()),
        &format!("docker://{name}"),
        None,
        true,
    );

    let home = t.path().join("home");
    let out = kiln(&home, None, &["base", "pull", &name, "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json_of(&out);
    let raw = skopeo_inspect(&name, true, None);
    assert_eq!(
        j["digest"],
        format!("sha256:{}", sha256_hex(&raw)),
        "the index's own digest"
    );
    assert_eq!(j["digest"], idx.digest);
    assert_eq!(j["platform_digest"], amd.digest);
    let dirs: Vec<_> = std::fs::read_dir(home.join("layers-v1/sha256"))
        .expect("layers")
        .map(|e| e.expect("e").path())
        .collect();
    assert_eq!(dirs.len(), 1, "only the amd64 layer");
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("arch")).expect("arch"),
        "amd64\n"
    );

    // Pinned by digest: the same image.
    let pinned = format!("{}/x/multi@{}", reg.host, idx.digest);
    let out = kiln(&home, None, &["base", "pull", &pinned, "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_of(&out)["platform_digest"], amd.digest);
}

#[test]
fn gzip_zstd_and_plain_layers_unpack_and_whiteouts_match_umoci() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    let mut l = Layout::new(&t.path().join("layout"));
    let base = tar_of(&[
        Entry::Dir("etc/", 0o755),
        file("etc/gone", "removed above\n"),
        file("etc/kept", "kept\n"),
        Entry::Dir("var/", 0o755),
        Entry::Dir("var/cache/", 0o755),
        file("var/cache/old", "hidden by the opaque dir\n"),
        Entry::Dir("bin/", 0o755),
        Entry::File("bin/tool".into(), b"#!/bin/sh\n".to_vec(), 0o4755),
    ]);
    let middle = tar_of(&[
        Entry::Dir("opt/", 0o755),
        file("opt/zstd", "from a zstd layer\n"),
    ]);
    let top = tar_of(&[
        Entry::Dir("etc/", 0o755),
        file("etc/.wh.gone", ""),
        Entry::Dir("var/", 0o755),
        Entry::Dir("var/cache/", 0o700),
        file("var/cache/.wh..wh..opq", ""),
        file("var/cache/new", "new\n"),
        file("plain", "from a plain tar layer\n"),
    ]);
    let m = l.image(
        &[
            (base.clone(), Comp::Gzip),
            (middle.clone(), Comp::Zstd),
            (top.clone(), Comp::Plain),
        ],
        "amd64",
        &[],
    );
    l.tag("wh", &m);
    // umoci 0.4 reads no zstd: its twin, all gzip, has the same diff_ids and tree.
    let twin = l.image(
        &[(base, Comp::Gzip), (middle, Comp::Gzip), (top, Comp::Gzip)],
        "amd64",
        &[],
    );
    l.tag("wh-gzip", &twin);
    let name = format!("{}/x/layers:wh", reg.host);
    skopeo_copy(
        &format!("oci:{}:wh", l.dir.display()),
        &format!("docker://{name}"),
        None,
        false,
    );

    let home = t.path().join("home");
    let out = kiln(&home, None, &["base", "pull", &name, "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json_of(&out);
    let store = kiln::oci::store::Store::open(&kiln::home::Home::at(&home)).expect("store");
    let r = kiln::oci::Reference::parse(&name).expect("ref");
    let local = store.local(&r).expect("local").expect("present");
    assert_eq!(local.layer_dirs.len(), 3);
    assert_eq!(j["layers"].as_array().map(Vec::len), Some(3));
    let top_dir = &local.layer_dirs[2];
    let gone = std::fs::symlink_metadata(top_dir.join("etc/gone")).expect("whiteout");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &gone.file_type()
    ));
    assert_eq!(
        xattr::get(top_dir.join("var/cache"), "trusted.overlay.opaque")
            .expect("xattr")
            .as_deref(),
        Some(&b"y"[..])
    );

    // Flattened, our layers give umoci's tree of the same image.
    umoci_unpack(&l.dir, "wh-gzip", &t.path().join("bundle"));
    let flat = t.path().join("flat");
    std::fs::create_dir(&flat).expect("flat");
    kiln::oci::flatten::flatten(&local.layer_dirs, &flat).expect("flatten");
    assert!(!flat.join("etc/gone").exists() && !flat.join("var/cache/old").exists());
    assert_same_tree(&flat, &t.path().join("bundle/rootfs"));

    // And stacked by overlayfs (the builder's way) they show the same tree.
    let merged = t.path().join("merged");
    std::fs::create_dir(&merged).expect("merged");
    let lower: Vec<String> = local
        .layer_dirs
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!("ro,lowerdir={}", lower.join(":")),
        ])
        .arg(&merged)
        .status()
        .expect("mount");
    assert!(st.success(), "overlay mount (tests run as root)");
    let cmp =
        std::panic::catch_unwind(|| assert_same_tree(&merged, &t.path().join("bundle/rootfs")));
    let _ = std::process::Command::new("umount").arg(&merged).status();
    cmp.expect("overlay view matches umoci");
}

#[test]
fn a_tampered_blob_is_rejected_and_nothing_is_stored() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    let name = format!("{}/x/tampered:latest", reg.host);
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{name}"),
        None,
        false,
    );
    let inspect: serde_json::Value =
        serde_json::from_slice(&skopeo_inspect(&name, false, None)).expect("inspect");
    let layer = inspect["Layers"][0].as_str().expect("layer").to_string();
    let data = reg.blob_data(&layer);
    let mut bytes = std::fs::read(&data).expect("blob data");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).expect("tamper");

    let home = t.path().join("home");
    let out = kiln(&home, None, &["base", "pull", &name, "--json"], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let j = json_of(&out);
    assert_eq!(j["error"]["code"], "digest_mismatch");
    assert!(
        j["error"]["message"]
            .as_str()
            .expect("msg")
            .contains(&layer),
        "{j}"
    );
    assert_eq!(
        std::fs::read_dir(home.join("layers-v1/sha256"))
            .expect("layers")
            .count(),
        0
    );
    assert!(
        !home
            .join("blobs-v1/sha256")
            .join(layer.trim_start_matches("sha256:"))
            .exists()
    );
    assert_eq!(
        std::fs::read_dir(home.join("bases-v1/images"))
            .expect("images")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(home.join("tmp")).expect("tmp").count(),
        0,
        "temp files cleaned up"
    );
}

#[test]
fn basic_auth_works_through_the_docker_config_and_fails_with_exit_5_without() {
    let reg = Registry::start(RegistryAuth::Basic {
        user: "tester".into(),
        pass: "s3cret".into(),
    });
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    let name = format!("{}/private/busybox:latest", reg.host);
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{name}"),
        Some(("tester", "s3cret")),
        false,
    );
    let home = t.path().join("home");

    let out = kiln(&home, None, &["base", "pull", &name, "--json"], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let e = &json_of(&out)["error"];
    assert_eq!(e["code"], "unauthorized");
    assert!(e["message"].as_str().expect("m").contains(&reg.host), "{e}");
    assert!(
        e["hint"].as_str().expect("h").contains("docker login"),
        "{e}"
    );

    let wrong = tempfile::tempdir().expect("cfg");
    docker_config(wrong.path(), &reg.host, "tester", "wrong");
    let out = kiln(
        &home,
        Some(wrong.path()),
        &["base", "pull", &name, "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(5));
    let e = &json_of(&out)["error"];
    assert!(
        e["message"]
            .as_str()
            .expect("m")
            .contains("with the credentials"),
        "{e}"
    );
    assert!(e["hint"].as_str().expect("h").contains("refused"), "{e}");

    let good = tempfile::tempdir().expect("cfg");
    docker_config(good.path(), &reg.host, "tester", "s3cret");
    let out = kiln(
        &home,
        Some(good.path()),
        &["base", "pull", &name, "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let inspect: serde_json::Value =
        serde_json::from_slice(&skopeo_inspect(&name, false, Some(("tester", "s3cret"))))
            .expect("inspect");
    assert_eq!(json_of(&out)["digest"], inspect["Digest"]);
}

#[test]
fn bearer_token_registry_works_anonymously_and_with_credentials() {
    let tokens = TokenServer::start("tester", "s3cret");
    let reg = Registry::start(RegistryAuth::Token(tokens.clone()));
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    let src = format!("oci:{}:latest", l.dir.display());
    let public = format!("{}/public/busybox:latest", reg.host);
    let private = format!("{}/private/busybox:latest", reg.host);
    skopeo_copy(
        &src,
        &format!("docker://{public}"),
        Some(("tester", "s3cret")),
        false,
    );
    skopeo_copy(
        &src,
        &format!("docker://{private}"),
        Some(("tester", "s3cret")),
        false,
    );
    let home = t.path().join("home");

    let out = kiln(&home, None, &["base", "pull", &public, "--json"], &[]);
    assert!(
        out.status.success(),
        "anonymous token for a public repository: {}",
        stderr(&out)
    );
    assert!(
        tokens
            .log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("auth=anonymous scope=repository:public/busybox:pull"))
    );

    let out = kiln(&home, None, &["base", "pull", &private, "--json"], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(json_of(&out)["error"]["code"], "unauthorized");

    let wrong = tempfile::tempdir().expect("cfg");
    docker_config(wrong.path(), &reg.host, "tester", "nope");
    let out = kiln(
        &home,
        Some(wrong.path()),
        &["base", "pull", &private, "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(5));
    let e = &json_of(&out)["error"];
    assert!(
        e["message"]
            .as_str()
            .expect("m")
            .contains("wrong username or password"),
        "{e}"
    );

    let good = tempfile::tempdir().expect("cfg");
    docker_config(good.path(), &reg.host, "tester", "s3cret");
    let out = kiln(
        &home,
        Some(good.path()),
        &["base", "pull", &private, "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        tokens
            .log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("auth=basic-ok scope=repository:private/busybox:pull"))
    );
}

#[test]
fn unknown_tags_and_repositories_exit_3_and_dead_registries_exit_5() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{}/x/known:latest", reg.host),
        None,
        false,
    );
    let home = t.path().join("home");
    for (r, what) in [
        ("x/known:v9", "tag v9"),
        ("x/unknown:latest", "repository x/unknown"),
    ] {
        let out = kiln(
            &home,
            None,
            &["base", "pull", &format!("{}/{r}", reg.host), "--json"],
            &[],
        );
        assert_eq!(out.status.code(), Some(3), "{r}: {}", stderr(&out));
        let e = &json_of(&out)["error"];
        assert_eq!(e["code"], "not_found");
        let m = e["message"].as_str().expect("m");
        assert!(m.contains(what) && m.contains(&reg.host), "{m}");
    }
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let out = kiln(
        &home,
        None,
        &["base", "pull", &format!("127.0.0.1:{dead}/x/y"), "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(5));
    let e = &json_of(&out)["error"];
    assert_eq!(e["code"], "registry_unreachable");
    assert!(
        e["message"]
            .as_str()
            .expect("m")
            .contains(&format!("127.0.0.1:{dead}")),
        "{e}"
    );
    let out = kiln(&home, None, &["base", "pull", "Bad/Name", "--json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json_of(&out)["error"]["code"], "bad_reference");
}

#[test]
fn downloads_retry_on_5xx_and_resume_after_a_reset() {
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(&reg.host);
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{}/x/flaky:latest", reg.host),
        None,
        false,
    );
    proxy.faults.fail_blobs.store(2, Ordering::SeqCst);
    proxy.faults.cut_blobs.store(1, Ordering::SeqCst);
    let home = t.path().join("home");
    let out = kiln(
        &home,
        None,
        &[
            "base",
            "pull",
            &format!("{}/x/flaky:latest", proxy.host),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = proxy.faults.log.lock().expect("log").clone();
    assert!(
        log.iter()
            .any(|l| l.contains("/blobs/") && l.contains("range=bytes=")),
        "resumed with Range: {log:?}"
    );
    assert_eq!(proxy.faults.fail_blobs.load(Ordering::SeqCst), 0);
}

#[test]
fn redirects_to_blob_storage_do_not_carry_registry_credentials() {
    let reg = Registry::start(RegistryAuth::Basic {
        user: "tester".into(),
        pass: "s3cret".into(),
    });
    let proxy = FaultProxy::start(&reg.host);
    let storage = BlobStorage::start(&reg.host, "x/redirected", Some(("tester", "s3cret")));
    *proxy.faults.redirect_to.lock().expect("lock") = Some(storage.host.clone());
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{}/x/redirected:latest", reg.host),
        Some(("tester", "s3cret")),
        false,
    );
    let cfg = tempfile::tempdir().expect("cfg");
    docker_config(cfg.path(), &proxy.host, "tester", "s3cret");
    let home = t.path().join("home");
    let out = kiln(
        &home,
        Some(cfg.path()),
        &[
            "base",
            "pull",
            &format!("{}/x/redirected:latest", proxy.host),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = storage.seen_auth.lock().expect("seen").clone();
    assert!(!seen.is_empty(), "blobs came from the storage host");
    assert!(
        seen.iter().all(Option::is_none),
        "credentials leaked to blob storage: {seen:?}"
    );
}
