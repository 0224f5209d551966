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

    // credHelpers and credsStore: docker-credential-* programs on PATH.
    let helpers = tempfile::tempdir().expect("helpers");
    let path = credential_helper(helpers.path(), "kilntest", &reg.host, "tester", "s3cret");
    for cfg_json in [
        serde_json::json!({"credHelpers": {reg.host.clone(): "kilntest"}}),
        serde_json::json!({"credsStore": "kilntest"}),
    ] {
        let cfg = tempfile::tempdir().expect("cfg");
        std::fs::write(cfg.path().join("config.json"), cfg_json.to_string()).expect("config.json");
        let h = tempfile::tempdir().expect("home");
        let out = kiln(
            h.path(),
            Some(cfg.path()),
            &["base", "pull", &name, "--json"],
            &[("PATH", &path)],
        );
        assert!(out.status.success(), "{cfg_json}: {}", stderr(&out));
    }
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

    // An identity token (OAuth2 refresh token) is exchanged at the realm.
    let idt = tempfile::tempdir().expect("cfg");
    let cfg_json =
        serde_json::json!({"auths": {reg.host.clone(): {"identitytoken": "refresh-ok"}}});
    std::fs::write(idt.path().join("config.json"), cfg_json.to_string()).expect("config.json");
    let h = tempfile::tempdir().expect("home");
    let out = kiln(
        h.path(),
        Some(idt.path()),
        &["base", "pull", &private, "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = tokens.log.lock().expect("log").clone();
    assert!(
        log.iter()
            .any(|l| l.starts_with("POST auth=refresh-ok scope=repository:private/busybox:pull")),
        "{log:?}"
    );

    // A credential store that knows nothing of this registry means anonymous, not an error.
    let helpers = tempfile::tempdir().expect("helpers");
    let path = credential_helper(helpers.path(), "kilnempty", "elsewhere.example", "u", "p");
    let store_cfg = tempfile::tempdir().expect("cfg");
    std::fs::write(
        store_cfg.path().join("config.json"),
        r#"{"credsStore": "kilnempty"}"#,
    )
    .expect("config.json");
    let h = tempfile::tempdir().expect("home");
    let out = kiln(
        h.path(),
        Some(store_cfg.path()),
        &["base", "pull", &public, "--json"],
        &[("PATH", &path)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
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
    // `localhost:PORT` is loopback too (plain HTTP), whichever address it resolves to first.
    let port = reg.host.rsplit(':').next().expect("port");
    let out = kiln(
        &home,
        None,
        &["base", "pull", &format!("localhost:{port}/x/known:latest")],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
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

#[test]
fn imports_from_a_layout_an_oci_archive_and_a_docker_archive_share_one_layer() {
    let t = tempfile::tempdir().expect("tmp");
    let mut l = Layout::new(&t.path().join("layout"));
    let m = l.image(
        &[(busybox_layer(), Comp::Gzip)],
        "amd64",
        &["MARK=imported"],
    );
    l.tag("v1", &m);
    let layout = format!("oci:{}:v1", l.dir.display());
    let oci_archive = t.path().join("img.oci.tar");
    let docker_archive = t.path().join("img.docker.tar");
    skopeo_copy(
        &layout,
        &format!("oci-archive:{}:v1", oci_archive.display()),
        None,
        false,
    );
    skopeo_copy(
        &layout,
        &format!("docker-archive:{}:example/img:v1", docker_archive.display()),
        None,
        false,
    );

    let home = t.path().join("home");
    let sources = [
        (format!("oci-layout:{}:v1", l.dir.display()), "local/one"),
        (
            format!("oci-archive:{}:v1", oci_archive.display()),
            "local/two:1.0",
        ),
        (
            format!("docker-archive:{}:example/img:v1", docker_archive.display()),
            "three",
        ),
    ];
    let mut digests = Vec::new();
    for (src, name) in &sources {
        let out = kiln(
            &home,
            None,
            &["base", "import", src, "--tag", name, "--json"],
            &[],
        );
        assert!(out.status.success(), "{src}: {}", stderr(&out));
        let j = json_of(&out);
        assert_eq!(j["source"], "import");
        digests.push(j["digest"].as_str().expect("digest").to_string());
    }
    assert_eq!(digests[0], m.digest, "a layout's manifest is kept as it is");
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        std::fs::read_dir(home.join("layers-v1/sha256"))
            .expect("layers")
            .count(),
        1,
        "one diff_id, one directory"
    );
    let ls = json_of(&kiln(&home, None, &["base", "ls", "--json"], &[]));
    let names: Vec<&str> = ls
        .as_array()
        .expect("ls")
        .iter()
        .map(|r| r["reference"].as_str().expect("ref"))
        .collect();
    assert_eq!(
        names,
        [
            "docker.io/library/three:latest",
            "docker.io/local/one:latest",
            "docker.io/local/two:1.0"
        ]
    );

    // FROM NAME resolves the local image first: no registry is asked (none would answer).
    let store = kiln::oci::store::Store::open(&kiln::home::Home::at(&home)).expect("store");
    let client = kiln::oci::client::RegistryClient::new(Default::default()).expect("client");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for name in ["local/one", "docker.io/local/two:1.0", "three:latest"] {
        let r = kiln::oci::Reference::parse(name).expect("ref");
        let img = rt
            .block_on(kiln::oci::pull::ensure(
                &store,
                &client,
                &r,
                &Default::default(),
                std::sync::Arc::new(kiln::oci::pull::Silent),
            ))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.config.image.env, ["MARK=imported"], "{name}");
        assert!(img.layer_dirs[0].join("bin/busybox").is_file());
    }
    use kiln::frontend::BaseImages;
    assert_eq!(
        store.config("local/one").map(|c| c.env),
        Some(vec!["MARK=imported".to_string()])
    );

    let out = kiln(&home, None, &["base", "rm", "local/one", "--json"], &[]);
    assert!(out.status.success());
    let out = kiln(&home, None, &["base", "rm", "local/one", "--json"], &[]);
    assert_eq!(out.status.code(), Some(3));
    let out = kiln(
        &home,
        None,
        &[
            "base",
            "import",
            "oci-layout:/nonexistent/dir",
            "--tag",
            "x",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}

/// A canary directory outside the store that no layer may touch.
struct Canary {
    dir: tempfile::TempDir,
}

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::tempdir().expect("canary");
        std::fs::write(dir.path().join("canary"), b"untouched").expect("canary");
        Canary { dir }
    }
    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }
    fn assert_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("canary dir")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, ["canary"], "something was written beside the canary");
        assert_eq!(
            std::fs::read(self.dir.path().join("canary")).expect("canary"),
            b"untouched"
        );
        let md = std::fs::metadata(self.dir.path().join("canary")).expect("md");
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&md),
            1,
            "the canary gained a hard link"
        );
    }
}

#[test]
fn hostile_layers_are_rejected_whether_imported_or_pulled_and_the_host_is_untouched() {
    let canary = Canary::new();
    let c = canary.path();
    let hostile: Vec<(&str, Vec<Entry>)> = vec![
        (
            "dotdot",
            vec![Entry::RawFile(
                format!(
                    "../../../../../../../../{}/canary",
                    c.trim_start_matches('/')
                )
                .into_bytes(),
                b"pwned".to_vec(),
            )],
        ),
        (
            "symlink-write-through",
            vec![
                Entry::Symlink("link", c.clone()),
                Entry::File("link/canary".into(), b"pwned".to_vec(), 0o644),
            ],
        ),
        (
            "relative-symlink",
            vec![
                Entry::Symlink("rel", format!("../../../../../../../..{c}")),
                Entry::File("rel/new".into(), b"pwned".to_vec(), 0o644),
            ],
        ),
        (
            "hardlink-out",
            vec![Entry::RawFile(b"placeholder".to_vec(), vec![])],
        ),
        (
            "whiteout-dotdot",
            vec![Entry::RawFile(b"a/.wh..".to_vec(), vec![])],
        ),
    ];
    let t = tempfile::tempdir().expect("tmp");
    let home = t.path().join("home");
    for (i, (what, entries)) in hostile.iter().enumerate() {
        let mut tar = tar_of(entries);
        if *what == "hardlink-out" {
            tar = hardlink_tar(&format!("../../../../../../../..{c}/canary"));
        }
        let mut l = Layout::new(&t.path().join(format!("evil{i}")));
        let m = l.image(&[(tar, Comp::Gzip)], "amd64", &[]);
        l.tag("evil", &m);
        let out = kiln(
            &home,
            None,
            &[
                "base",
                "import",
                &format!("oci-layout:{}:evil", l.dir.display()),
                "--tag",
                "evil",
                "--json",
            ],
            &[],
        );
        let must_reject = ["dotdot", "hardlink-out", "whiteout-dotdot"].contains(what);
        assert!(
            !(must_reject && out.status.success()),
            "{what} was accepted"
        );
        if out.status.success() {
            // Contained instead of rejected: then nothing may have escaped either.
            canary.assert_untouched();
            let _ = kiln(&home, None, &["base", "rm", "evil"], &[]);
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        assert_eq!(json_of(&out)["error"]["code"], "bad_image", "{what}");
        canary.assert_untouched();
    }
    assert_eq!(
        std::fs::read_dir(home.join("tmp")).expect("tmp").count(),
        0,
        "no half-made layers left"
    );

    // A decompression bomb stops at the limit.
    let mut l = Layout::new(&t.path().join("bomb"));
    let bomb = tar_of(&[Entry::File("zeros".into(), vec![0u8; 64 << 20], 0o644)]);
    let m = l.image(&[(bomb, Comp::Gzip)], "amd64", &[]);
    l.tag("bomb", &m);
    let src = format!("oci-layout:{}:bomb", l.dir.display());
    let out = kiln(
        &home,
        None,
        &["base", "import", &src, "--tag", "bomb", "--json"],
        &[("KILN_MAX_LAYER_BYTES", "8388608")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        json_of(&out)["error"]["message"]
            .as_str()
            .expect("m")
            .contains("8388608"),
        "names the limit"
    );

    // The same through a registry pull.
    let reg = Registry::start(RegistryAuth::None);
    let mut l = Layout::new(&t.path().join("evil-pushed"));
    let m = l.image(&[(tar_of(&hostile[1].1), Comp::Gzip)], "amd64", &[]);
    l.tag("evil", &m);
    skopeo_copy(
        &format!("oci:{}:evil", l.dir.display()),
        &format!("docker://{}/x/evil:1", reg.host),
        None,
        false,
    );
    let out = kiln(
        &home,
        None,
        &["base", "pull", &format!("{}/x/evil:1", reg.host), "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    canary.assert_untouched();
    assert_eq!(
        std::fs::read_dir(home.join("layers-v1/sha256"))
            .expect("layers")
            .count(),
        0
    );
}

/// A tar with one hard link `h` → `target` (tar::Builder refuses `..` in link names).
fn hardlink_tar(target: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o644);
    h.set_size(0);
    h.as_old_mut().name[..1].copy_from_slice(b"h");
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    h.set_cksum();
    b.append(&h, std::io::empty()).expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn two_processes_pulling_one_image_at_once_are_both_right() {
    let reg = Registry::start(RegistryAuth::None);
    let t = tempfile::tempdir().expect("tmp");
    let mut l = Layout::new(&t.path().join("layout"));
    let layers: Vec<(Vec<u8>, Comp)> = (0..4u8)
        .map(|i| {
            // Incompressible content, so each layer takes a moment to fetch.
            let data: Vec<u8> = (0..(3u32 << 20))
                .map(|j| (j.wrapping_mul(2_654_435_761).rotate_left(u32::from(i)) >> 13) as u8)
                .collect();
            (
                tar_of(&[Entry::File(format!("layer{i}"), data, 0o644)]),
                Comp::Gzip,
            )
        })
        .collect();
    let m = l.image(&layers, "amd64", &[]);
    l.tag("big", &m);
    let name = format!("{}/x/big:1", reg.host);
    skopeo_copy(
        &format!("oci:{}:big", l.dir.display()),
        &format!("docker://{name}"),
        None,
        false,
    );
    let home = t.path().join("home");
    let cfg = tempfile::tempdir().expect("cfg");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "--home",
                &home.display().to_string(),
                "base",
                "pull",
                &name,
                "--json",
            ])
            .env("DOCKER_CONFIG", cfg.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kiln")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    assert_eq!(json_of(&a)["digest"], json_of(&b)["digest"]);
    assert_eq!(
        std::fs::read_dir(home.join("layers-v1/sha256"))
            .expect("layers")
            .count(),
        4
    );
    assert_eq!(std::fs::read_dir(home.join("tmp")).expect("tmp").count(), 0);
    for (i, (tar, _)) in layers.iter().enumerate() {
        let dir = home.join("layers-v1/sha256").join(sha256_hex(tar));
        assert_eq!(
            std::fs::metadata(dir.join(format!("layer{i}")))
                .expect("file")
                .len(),
            3 << 20
        );
    }
}

#[test]
fn builtin_busybox_is_made_offline_and_runs() {
    let t = tempfile::tempdir().expect("tmp");
    let home = t.path().join("home");
    let out = kiln(
        &home,
        None,
        &["base", "pull", "kiln/busybox", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json_of(&out);
    assert_eq!(
        (j["reference"].as_str(), j["source"].as_str()),
        (Some("kiln/busybox:latest"), Some("builtin"))
    );
    let store = kiln::oci::store::Store::open(&kiln::home::Home::at(&home)).expect("store");
    let img = store
        .local(&kiln::oci::Reference::parse("kiln/busybox").expect("ref"))
        .expect("local")
        .expect("made");
    assert_eq!(
        Some(img.config.image),
        kiln::frontend::lower::builtin_config("kiln/busybox")
    );
    let root = &img.layer_dirs[0];
    let run = std::process::Command::new("chroot")
        .arg(root)
        .args([
            "/bin/sh",
            "-c",
            "echo hello from $(whoami); ls /usr/bin/awk >/dev/null && grep -c . /etc/group",
        ])
        .output()
        .expect("chroot");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello from root\n2\n");
    let again = json_of(&kiln(
        &home,
        None,
        &["base", "pull", "kiln/busybox", "--json"],
        &[],
    ));
    assert_eq!(again["digest"], j["digest"], "made once, then cached");
    // Reproducible: another store makes the same image from the same busybox.
    let other = kiln(
        &t.path().join("home2"),
        None,
        &["base", "pull", "kiln/busybox", "--json"],
        &[],
    );
    assert_eq!(json_of(&other)["digest"], j["digest"]);
    let out = kiln(&home, None, &["base", "pull", "kiln/alpine", "--json"], &[]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn builtin_debian_bookworm_is_made_from_the_configured_mirror_without_host_files() {
    need("mmdebstrap", "mmdebstrap");
    let t = tempfile::tempdir().expect("tmp");
    let home = t.path().join("home");
    let out = kiln(
        &home,
        None,
        &["base", "pull", "kiln/debian:bookworm", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json_of(&out);
    let store = kiln::oci::store::Store::open(&kiln::home::Home::at(&home)).expect("store");
    let img = store
        .local(&kiln::oci::Reference::parse("kiln/debian:bookworm").expect("ref"))
        .expect("local")
        .expect("made");
    assert_eq!(img.config.image.cmd, Some(vec!["bash".to_string()]));
    assert_eq!(
        Some(img.config.image.clone()),
        kiln::frontend::lower::builtin_config("kiln/debian:bookworm")
    );
    let root = &img.layer_dirs[0];
    assert!(
        !root.join("etc/resolv.conf").exists() && !root.join("etc/hostname").exists(),
        "host files left in"
    );
    let run = std::process::Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", "cat /etc/debian_version; command -v apt-get; stat -c %U /var/cache/apt/archives/partial"])
        .output()
        .expect("chroot");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(stdout.starts_with("12."), "{stdout}");
    assert!(
        stdout.contains("/usr/bin/apt-get") && stdout.ends_with("_apt\n"),
        "{stdout}"
    );
    // `kiln/debian` (latest) is the same image, not a second mmdebstrap run.
    let alias = json_of(&kiln(
        &home,
        None,
        &["base", "pull", "kiln/debian", "--json"],
        &[],
    ));
    assert_eq!(alias["digest"], j["digest"]);
}

#[test]
fn a_collected_tree_is_remade_from_the_stored_blob_without_refetching_it() {
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(&reg.host);
    let t = tempfile::tempdir().expect("tmp");
    let (l, _) = busybox_layout(&t.path().join("layout"), "latest");
    skopeo_copy(
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{}/x/again:latest", reg.host),
        None,
        false,
    );
    let name = format!("{}/x/again:latest", proxy.host);
    let home = t.path().join("home");
    assert!(
        kiln(&home, None, &["base", "pull", &name], &[])
            .status
            .success()
    );
    let layers = home.join("layers-v1/sha256");
    let dir = std::fs::read_dir(&layers)
        .expect("layers")
        .next()
        .expect("one")
        .expect("e")
        .path();
    std::fs::remove_dir_all(&dir).expect("collect the tree");
    proxy.faults.log.lock().expect("log").clear();
    let out = kiln(&home, None, &["base", "pull", &name], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("bin/busybox").is_file(), "tree remade");
    let log = proxy.faults.log.lock().expect("log").clone();
    let blob_gets = log
        .iter()
        .filter(|l| l.starts_with("GET") && l.contains("/blobs/"))
        .count();
    assert_eq!(
        blob_gets, 0,
        "config and layer came from the store: {log:?}"
    );
}
