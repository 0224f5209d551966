//! Random SDK image definitions (the JSON an SDK sends): valid documents of every op and
//! option, then structural mutations (dropped keys, wrong types, unknown fields, deep
//! nesting) and, sometimes, byte mutations of the serialized text.

use crate::mutate;
use fastrand::Rng;
use serde_json::{Map, Value, json};

const STRINGS: &[&str] = &[
    "",
    " ",
    "apt-get update && apt-get install -y curl",
    "/app",
    "rel/dir",
    "src",
    "..",
    "1000:1000",
    "root",
    "$HOME",
    "${A:-x}",
    "type=cache,target=/root/.cache",
    "type=secret,id=tok",
    "type=bogus",
    "https://example.com/a.tar.gz",
    "https://github.com/moby/buildkit.git#v0.13",
    "sha256:0123456789abcdef",
    "755",
    "u+x",
    "SIGTERM",
    "9",
    "53/udp",
    "8000-8010",
    "99999",
    "\u{e9}\u{65e5}\u{1f980}",
    "\u{0}\u{1}\u{7f}",
    "line\nbreak",
    "kiln/debian:bookworm",
];

fn s(rng: &mut Rng) -> Value {
    Value::String(STRINGS[rng.usize(..STRINGS.len())].to_string())
}

fn strings(rng: &mut Rng, max: usize) -> Value {
    Value::Array((0..rng.usize(..=max)).map(|_| s(rng)).collect())
}

fn op_name(rng: &mut Rng, name: &str) -> String {
    match rng.u8(..10) {
        0 => name.to_lowercase(),
        1 => {
            let mut c = name.chars();
            let first = c.next().map(|f| f.to_string()).unwrap_or_default();
            first + &c.as_str().to_lowercase()
        }
        2 => "rUn".to_string(),
        _ => name.to_string(),
    }
}

fn mode(rng: &mut Rng) -> Value {
    match rng.u8(..5) {
        0 => json!(755),
        1 => json!(99999999999u64),
        2 => json!(-1),
        3 => json!(1.5),
        _ => s(rng),
    }
}

fn operation(rng: &mut Rng) -> Value {
    let kind = [
        "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "SHELL", "FROM",
    ][rng.usize(..8)];
    let mut op = Map::new();
    op.insert("op".into(), Value::String(op_name(rng, kind)));
    op.insert("args".into(), strings(rng, 4));
    let mut options = Map::new();
    match kind {
        "RUN" => {
            if rng.bool() {
                options.insert("exec".into(), Value::Bool(rng.bool()));
            }
            if rng.bool() {
                let n = ["none", "host", "default", "bogus"][rng.usize(..4)];
                options.insert("network".into(), json!(n));
            }
            if rng.u8(..4) == 0 {
                let n = ["sandbox", "insecure", "x"][rng.usize(..3)];
                options.insert("security".into(), json!(n));
            }
            if rng.bool() {
                options.insert("mounts".into(), strings(rng, 3));
            }
            if rng.u8(..4) == 0 {
                options.insert("devices".into(), strings(rng, 2));
            }
        }
        "COPY" | "ADD" => {
            if kind == "COPY" && rng.bool() {
                options.insert("from".into(), s(rng));
            }
            if rng.bool() {
                options.insert("chown".into(), s(rng));
            }
            if rng.bool() {
                options.insert("chmod".into(), mode(rng));
            }
            if rng.bool() {
                options.insert("link".into(), Value::Bool(rng.bool()));
            }
            if rng.bool() {
                options.insert("exclude".into(), strings(rng, 2));
            }
            if kind == "COPY" {
                if rng.bool() {
                    options.insert("parents".into(), Value::Bool(rng.bool()));
                }
            } else {
                if rng.bool() {
                    options.insert("checksum".into(), s(rng));
                }
                if rng.bool() {
                    options.insert("keep_git_dir".into(), Value::Bool(rng.bool()));
                }
                if rng.bool() {
                    let u = [json!(true), json!(false), Value::Null][rng.usize(..3)].clone();
                    options.insert("unpack".into(), u);
                }
            }
        }
        _ => {}
    }
    if !options.is_empty() || rng.u8(..10) == 0 {
        op.insert("options".into(), Value::Object(options));
    }
    Value::Object(op)
}

/// A valid-looking definition.
fn definition(rng: &mut Rng) -> Value {
    let mut doc = Map::new();
    let bases = [
        "kiln/debian:bookworm",
        "kiln/busybox",
        "scratch",
        "SCRATCH",
        "alpine:3",
        "",
        "  ",
    ];
    doc.insert("base_image".into(), json!(bases[rng.usize(..bases.len())]));
    if rng.bool() {
        doc.insert("name".into(), s(rng));
    }
    if rng.u8(..4) == 0 {
        doc.insert("tag".into(), s(rng));
    }
    let ops: Vec<Value> = (0..rng.usize(..8)).map(|_| operation(rng)).collect();
    doc.insert("operations".into(), Value::Array(ops));
    if rng.bool() {
        let mut args = Map::new();
        for _ in 0..rng.usize(..3) {
            let k = ["A", "HTTP_PROXY", "no_proxy", "", "X Y"][rng.usize(..5)];
            args.insert(k.into(), s(rng));
        }
        doc.insert("build_args".into(), Value::Object(args));
    }
    for key in ["cmd", "entrypoint", "volumes"] {
        if rng.bool() {
            doc.insert(key.into(), strings(rng, 3));
        }
    }
    if rng.bool() {
        let mut labels = Map::new();
        labels.insert("org.example".into(), s(rng));
        doc.insert("labels".into(), Value::Object(labels));
    }
    if rng.bool() {
        let ports: Vec<Value> = (0..rng.usize(..3))
            .map(|_| match rng.u8(..4) {
                0 => json!(8080),
                1 => json!(70_000),
                2 => json!(-1),
                _ => s(rng),
            })
            .collect();
        doc.insert("expose".into(), Value::Array(ports));
    }
    if rng.u8(..4) == 0 {
        doc.insert("stop_signal".into(), s(rng));
    }
    Value::Object(doc)
}

/// A random JSON value of any type.
fn any(rng: &mut Rng, depth: u32) -> Value {
    match rng.u8(..8) {
        0 => Value::Null,
        1 => Value::Bool(rng.bool()),
        2 => json!(rng.i64(..)),
        3 => json!(rng.f64() * 1e10),
        4 if depth < 4 => Value::Array((0..rng.usize(..3)).map(|_| any(rng, depth + 1)).collect()),
        5 if depth < 4 => {
            let mut m = Map::new();
            m.insert("op".into(), json!("RUN"));
            m.insert("unknown".into(), any(rng, depth + 1));
            Value::Object(m)
        }
        _ => s(rng),
    }
}

/// Replaces, removes or adds one thing somewhere in `v`.
fn mutate_value(rng: &mut Rng, v: &mut Value) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.u8(..3) != 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = &keys[rng.usize(..keys.len())];
            match rng.u8(..5) {
                0 => {
                    m.remove(key);
                }
                1 => {
                    m.insert(key.clone(), any(rng, 0));
                }
                2 => {
                    m.insert(
                        ["bogus", "Op", "args ", "opts"][rng.usize(..4)].into(),
                        any(rng, 0),
                    );
                }
                _ => {
                    if let Some(child) = m.get_mut(key) {
                        mutate_value(rng, child);
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.u8(..3) != 0 => {
            let i = rng.usize(..a.len());
            match rng.u8(..4) {
                0 => {
                    a.remove(i);
                }
                1 => a[i] = any(rng, 0),
                2 => {
                    let dup = a[i].clone();
                    a.push(dup);
                }
                _ => mutate_value(rng, &mut a[i]),
            }
        }
        _ => *v = any(rng, 0),
    }
}

/// One SDK JSON document.
pub fn document(rng: &mut Rng) -> String {
    let mut doc = definition(rng);
    if rng.u8(..2) == 0 {
        for _ in 0..1 + rng.usize(..3) {
            mutate_value(rng, &mut doc);
        }
    }
    if rng.u8(..20) == 0 {
        let depth = 100 + rng.usize(..400);
        for _ in 0..depth {
            doc = Value::Array(vec![doc]);
        }
    }
    let text = if rng.bool() {
        serde_json::to_string_pretty(&doc)
    } else {
        serde_json::to_string(&doc)
    }
    .unwrap_or_default();
    if rng.u8(..4) == 0 {
        let mut bytes = text.into_bytes();
        mutate::mutate(rng, &mut bytes, &[], 64 * 1024);
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        text
    }
}
