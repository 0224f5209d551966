//! Differential test of `.dockerignore` matching against the real Go `moby/patternmatcher`
//! (Debian's `golang-github-moby-patternmatcher-dev`, built offline in GOPATH mode):
//! 20,000 generated pattern sets and paths must be judged the same.

use kiln::build::dockerignore::Matcher;
use std::io::Write;
use std::process::{Command, Stdio};

/// ignorefile.ReadAll's line rules in Go, then patternmatcher.New + MatchesOrParentMatches.
const ORACLE: &str = r##"package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/moby/patternmatcher"
)

type Case struct {
	Ignore string `json:"ignore"`
	Path   string `json:"path"`
}

func readAll(text string) []string {
	var out []string
	for i, line := range strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n") {
		if i == 0 {
			line = strings.TrimPrefix(line, "\ufeff")
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		p := strings.TrimSpace(line)
		if p == "" {
			continue
		}
		invert := p[0] == '!'
		if invert {
			p = strings.TrimSpace(p[1:])
		}
		if len(p) > 0 {
			p = filepath.ToSlash(filepath.Clean(p))
			if len(p) > 1 && p[0] == '/' {
				p = p[1:]
			}
		}
		if invert {
			p = "!" + p
		}
		out = append(out, p)
	}
	return out
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		var c Case
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			panic(err)
		}
		pm, err := patternmatcher.New(readAll(c.Ignore))
		if err != nil {
			fmt.Fprintln(out, "E")
			continue
		}
		m, err := pm.MatchesOrParentMatches(c.Path)
		switch {
		case err != nil:
			fmt.Fprintln(out, "E")
		case m:
			fmt.Fprintln(out, "1")
		default:
			fmt.Fprintln(out, "0")
		}
	}
}
"##;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn generate(n: usize) -> Vec<(String, String)> {
    const ATOMS: &[&str] = &[
        "a", "b", "ab", "/", "*", "?", "**", "**/", "/**", "[ab]", "[^a]", ".", "..", "./", "c.go",
        "x", "\\*", " ", "#", "!", "[a-c]", ".md", "d",
    ];
    const SEGS: &[&str] = &[
        "a", "b", "ab", "c.go", "x", "d", "ba", ".env", "a.md", "#x", "*",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = Vec::with_capacity(n);
    for _ in 0..n {
        let mut lines = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let mut p = String::new();
            if rng.below(100) < 41 {
                p.push('!');
            }
            for _ in 0..1 + rng.below(4) {
                p.push_str(rng.pick(ATOMS));
            }
            lines.push(p);
        }
        let depth = 1 + rng.below(4);
        let path: Vec<&str> = (0..depth).map(|_| rng.pick(SEGS)).collect();
        cases.push((lines.join("\n"), path.join("/")));
    }
    cases
}

#[test]
fn matcher_agrees_with_go_patternmatcher() {
    let go = which("go").expect(
        "the Go toolchain is required for this test: apt-get install golang-go golang-github-moby-patternmatcher-dev",
    );
    assert!(
        std::path::Path::new("/usr/share/gocode/src/github.com/moby/patternmatcher").is_dir(),
        "apt-get install golang-github-moby-patternmatcher-dev"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("main.go"), ORACLE).expect("write main.go");
    let oracle = dir.path().join("oracle");
    let built = Command::new(&go)
        .args(["build", "-o"])
        .arg(&oracle)
        .arg("main.go")
        .current_dir(dir.path())
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", dir.path().join("gopath").display()),
        )
        .env("GOCACHE", dir.path().join("cache"))
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go build runs");
    assert!(
        built.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let cases = generate(20_000);
    let mut child = Command::new(&oracle)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("oracle runs");
    let mut input = String::new();
    for (ignore, path) in &cases {
        input.push_str(&serde_json::json!({"ignore": ignore, "path": path}).to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("oracle output");
    writer.join().expect("writer").expect("write cases");
    let answers: Vec<&str> = std::str::from_utf8(&out.stdout)
        .expect("utf-8")
        .lines()
        .collect();
    assert_eq!(answers.len(), cases.len(), "oracle answered every case");
    let count = |a: &str| answers.iter().filter(|x| **x == a).count();
    let (yes, no, err) = (count("1"), count("0"), count("E"));
    assert!(
        yes > 2_000 && no > 2_000 && err < 10_000,
        "a weak corpus: {yes} excluded, {no} included, {err} errors"
    );
    let mut mismatches = Vec::new();
    for ((ignore, path), want) in cases.iter().zip(&answers) {
        let got = match Matcher::parse(ignore) {
            Err(_) => "E",
            Ok(m) if m.excluded(path) => "1",
            Ok(_) => "0",
        };
        if got != *want {
            mismatches.push(format!("{ignore:?} {path:?}: go {want}, kiln {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ, e.g.:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches[..mismatches.len().min(30)].join("\n")
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}
