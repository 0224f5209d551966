//! Content digests (`sha256:HEX`): parsing, computing, and hashing readers and writers, so
//! every byte Kiln takes from a registry or a file is checked against the digest it claims.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read, Write};

/// A sha256 content digest. Kiln verifies sha256 only (what every registry uses).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// A string that is not a `sha256:` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `ALGO:` prefix.
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    Format(String),
    /// An algorithm other than sha256.
    #[error("unsupported digest algorithm {0:?}: Kiln verifies sha256 digests only")]
    Algorithm(String),
}

impl Digest {
    /// Parses `sha256:` followed by 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(DigestError::Format(s.to_string()));
        };
        if algo != "sha256" {
            let known = algo
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c));
            return Err(if known && !algo.is_empty() {
                DigestError::Algorithm(algo.to_string())
            } else {
                DigestError::Format(s.to_string())
            });
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::Format(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hash(Sha256::digest(bytes).into())
    }

    fn from_hash(h: [u8; 32]) -> Digest {
        Digest {
            hex: hex::encode(h),
        }
    }

    /// The 64 hex digits, without the algorithm (the store's file names).
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A running sha256 and byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        Digest::from_hash(self.sha.finalize().into())
    }
}

/// A reader that hashes what passes through it and fails once more than `limit` bytes have.
pub struct HashReader<R> {
    inner: R,
    hasher: Hasher,
    limit: u64,
}

impl<R: Read> HashReader<R> {
    /// Hashes everything read from `inner`; reading past `limit` bytes is an error
    /// ([`io::ErrorKind::FileTooLarge`]).
    pub fn new(inner: R, limit: u64) -> Self {
        HashReader {
            inner,
            hasher: Hasher::new(),
            limit,
        }
    }

    /// Reads and hashes the rest of the stream.
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    /// The inner reader back, with the digest and length of what was read.
    pub fn into_parts(self) -> (R, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }

    /// The digest and length so far.
    pub fn finish(self) -> (Digest, u64) {
        let len = self.hasher.len();
        (self.hasher.finish(), len)
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// True when nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if self.hasher.len() > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("more than {} bytes", self.limit),
            ));
        }
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
pub struct HashWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashWriter<W> {
    /// Hashes everything written to `inner`.
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// The inner writer, the digest and the length.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digest_parse_rejects_bad_forms() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert_eq!(
            Digest::parse(&format!("sha512:{}", "a".repeat(128))),
            Err(DigestError::Algorithm("sha512".into()))
        );
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn hash_reader_stops_past_its_limit() {
        let data = vec![7u8; 100];
        let mut r = HashReader::new(&data[..], 50);
        let e = io::copy(&mut r, &mut io::sink()).expect_err("over the limit");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        let mut r = HashReader::new(&data[..], 100);
        r.drain().expect("within the limit");
        assert_eq!(r.finish(), (Digest::of(&data), 100));
    }
}
