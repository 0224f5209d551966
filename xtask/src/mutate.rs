//! Byte-level mutations for the fuzzer: bit flips, interesting bytes and Dockerfile tokens,
//! inserts, deletes, duplications, line swaps and splices of lines from other documents.
//!
//! Works on bytes; callers decode the result with `String::from_utf8_lossy`, as Kiln's own
//! `decode` does for a Dockerfile read from disk.

use fastrand::Rng;

/// Bytes that tend to matter to a Dockerfile or JSON parser.
const BYTES: &[u8] = b"\\`\n\r\t \"'$`{}[]()<>-=#:,/*%?+@&|;0\x00\x7f\xff\xc3\xa9\xe2\x80";

/// Short tokens that move a parser between states.
const TOKENS: &[&str] = &[
    "\\\n",
    "`\n",
    "\\\r\n",
    "\r\n",
    "\n\n",
    "\n#\n",
    "# escape=`\n",
    "# escape=\\\n",
    "# syntax=docker/dockerfile:1\n",
    "# check=error=true\n",
    "\u{feff}",
    "<<EOF",
    "<<-EOF",
    "<<'EOF'",
    "<<\"EOF\"",
    "3<<EOF",
    "\nEOF\n",
    "\tEOF\n",
    "${",
    "${A:-",
    "${A#*}",
    "$A",
    "}",
    "[\"",
    "\"]",
    "[",
    "]",
    "\",\"",
    "\\u00e9",
    "\\ud800",
    "--mount=",
    "--from=",
    "--chown=",
    "--chmod=",
    "--platform=",
    "--network=",
    "--",
    " AS ",
    "FROM ",
    "RUN ",
    "COPY ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "CMD ",
    "ENV ",
    "ARG ",
    "=",
    "\"",
    "'",
    "\u{e9}",
    "\u{65e5}\u{672c}",
    "\u{1f980}",
    "\u{0}",
    "\u{85}",
    "\u{2028}",
];

/// Applies 1 to 8 random mutations to `data`. `donors` supply lines to splice in (another
/// corpus file, say); an empty slice skips splices. The result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, donors: &[&[u8]], max_len: usize) {
    let rounds = 1 + rng.usize(..8);
    for _ in 0..rounds {
        mutate_once(rng, data, donors);
    }
    data.truncate(max_len);
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, donors: &[&[u8]]) {
    let len = data.len();
    match rng.u8(..12) {
        0 if len > 0 => {
            let i = rng.usize(..len);
            data[i] ^= 1 << rng.u8(..8);
        }
        1 if len > 0 => {
            let i = rng.usize(..len);
            data[i] = BYTES[rng.usize(..BYTES.len())];
        }
        2 => {
            let i = rng.usize(..=len);
            data.insert(i, BYTES[rng.usize(..BYTES.len())]);
        }
        3 | 4 => {
            let i = rng.usize(..=len);
            let t = TOKENS[rng.usize(..TOKENS.len())].as_bytes();
            data.splice(i..i, t.iter().copied());
        }
        5 if len > 0 => {
            let i = rng.usize(..len);
            let n = 1 + rng.usize(..(len - i).min(64));
            data.drain(i..i + n);
        }
        6 if len > 0 => {
            let i = rng.usize(..len);
            let n = 1 + rng.usize(..(len - i).min(256));
            let chunk = data[i..i + n].to_vec();
            let at = rng.usize(..=len);
            data.splice(at..at, chunk);
        }
        7 | 8 if !donors.is_empty() => {
            let donor = donors[rng.usize(..donors.len())];
            if let Some(line) = random_line(rng, donor) {
                let line = line.to_vec();
                let at = random_line_start(rng, data);
                if rng.bool() {
                    data.splice(at..at, line);
                } else {
                    let end = line_end(data, at);
                    data.splice(at..end, line);
                }
            }
        }
        9 => {
            let a = random_line_start(rng, data);
            let a_end = line_end(data, a);
            let b = random_line_start(rng, data);
            let b_end = line_end(data, b);
            if a_end <= b {
                let second = data[b..b_end].to_vec();
                let first = data[a..a_end].to_vec();
                data.splice(b..b_end, first);
                data.splice(a..a_end, second);
            }
        }
        10 if len > 0 => {
            data.truncate(rng.usize(..len));
        }
        _ => {
            // Repeat a line a few times: continuation and heredoc runs.
            let a = random_line_start(rng, data);
            let end = line_end(data, a);
            let line = data[a..end].to_vec();
            for _ in 0..1 + rng.usize(..4) {
                data.splice(a..a, line.iter().copied());
            }
        }
    }
}

/// A random line of `data`, with its newline.
fn random_line<'a>(rng: &mut Rng, data: &'a [u8]) -> Option<&'a [u8]> {
    if data.is_empty() {
        return None;
    }
    let start = random_line_start(rng, data);
    let end = line_end(data, start);
    (end > start).then(|| &data[start..end])
}

/// The start of a random line of `data` (or its end).
fn random_line_start(rng: &mut Rng, data: &[u8]) -> usize {
    let i = rng.usize(..=data.len());
    data[..i]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1)
}

/// Where the line starting at `start` ends, its newline included.
fn line_end(data: &[u8], start: usize) -> usize {
    data[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |p| start + p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds() {
        let mut rng = Rng::with_seed(7);
        let donor: &[u8] = b"FROM a\nRUN b\n";
        for _ in 0..10_000 {
            let mut data = b"FROM x\nRUN y \\\n  z\n".to_vec();
            mutate(&mut rng, &mut data, &[donor], 256);
            assert!(data.len() <= 256);
        }
    }
}
