//! A snapshot's digest: SHA-256 over the SHA-256 of each 4 MiB block of the disk file, in order
//! (the last block may be shorter), the construction of Dropbox's `content_hash`.
//!
//! Why not one SHA-256 of the file: a root disk is sparse, 10 GiB by default, and a few hundred
//! MB of it are written. SHA-256 cannot skip zeros, so a flat digest costs every byte of the
//! apparent size (5.5–7.7 s per 10 GiB snapshot on the machines of docs/benchmarks.md) whatever
//! the tree. Here a block of zeros has one known hash, so a hole costs nothing and the digest
//! costs what was written. It is still a function of the file's bytes alone, holes or written
//! zeros alike, so the same tree gives the same digest, and anyone can check it with
//! `split -b 4M --filter=sha256sum disk.ext4 | cut -c1-64 | xxd -r -p | sha256sum`.

use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// The block size of the digest.
pub const BLOCK: u64 = 4 << 20;

/// Streams a file's bytes, in order, into its block digest.
pub struct BlockDigest {
    outer: Sha256,
    block: Sha256,
    /// Bytes of the current block seen so far (`< BLOCK`).
    filled: u64,
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// The SHA-256 of a whole block of zeros.
fn zero_block() -> &'static [u8] {
    static HASH: OnceLock<Vec<u8>> = OnceLock::new();
    HASH.get_or_init(|| {
        let mut h = Sha256::new();
        for _ in 0..BLOCK / ZEROS.len() as u64 {
            h.update(ZEROS);
        }
        h.finalize().to_vec()
    })
}

impl Default for BlockDigest {
    fn default() -> Self {
        BlockDigest {
            outer: Sha256::new(),
            block: Sha256::new(),
            filled: 0,
        }
    }
}

impl BlockDigest {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next bytes of the file.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (BLOCK - self.filled).min(bytes.len() as u64) as usize;
            self.block.update(&bytes[..n]);
            self.advance(n as u64);
            bytes = &bytes[n..];
        }
    }

    /// The next `len` bytes of the file are zeros: whole blocks of them cost one update.
    pub fn zeros(&mut self, mut len: u64) {
        while len > 0 {
            if self.filled == 0 && len >= BLOCK {
                self.outer.update(zero_block());
                len -= BLOCK;
                continue;
            }
            let n = (BLOCK - self.filled).min(len).min(ZEROS.len() as u64);
            self.block.update(&ZEROS[..n as usize]);
            self.advance(n);
            len -= n;
        }
    }

    fn advance(&mut self, n: u64) {
        self.filled += n;
        if self.filled == BLOCK {
            let h = std::mem::take(&mut self.block).finalize();
            self.outer.update(h);
            self.filled = 0;
        }
    }

    /// The digest, lowercase hex.
    pub fn finish(mut self) -> String {
        if self.filled > 0 {
            let h = std::mem::take(&mut self.block).finalize();
            self.outer.update(h);
        }
        hex::encode(self.outer.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: hash each block of the bytes, then the hashes.
    fn plain(bytes: &[u8]) -> String {
        let mut outer = Sha256::new();
        for block in bytes.chunks(BLOCK as usize) {
            outer.update(Sha256::digest(block));
        }
        hex::encode(outer.finalize())
    }

    #[test]
    fn zeros_and_bytes_agree_with_the_plain_definition_at_every_boundary() {
        let b = BLOCK as usize;
        for (lead, zeros, tail) in [
            (0, 0, 0),
            (0, 0, 1),
            (0, 3 * b, 0),
            (1, 3 * b, 1),
            (b - 1, 1, b),
            (b + 7, 2 * b - 7, 5),
            (5, b - 5, 0),
        ] {
            let mut file = vec![0u8; lead + zeros + tail];
            for (i, x) in file[..lead].iter_mut().enumerate() {
                *x = (i % 251) as u8 + 1;
            }
            for x in &mut file[lead + zeros..] {
                *x = 0xa5;
            }
            let mut d = BlockDigest::new();
            d.update(&file[..lead]);
            d.zeros(zeros as u64);
            d.update(&file[lead + zeros..]);
            assert_eq!(d.finish(), plain(&file), "{lead} {zeros} {tail}");
        }
    }

    #[test]
    fn written_zeros_and_holes_give_the_same_digest() {
        let mut a = BlockDigest::new();
        a.update(&vec![0u8; 2 * BLOCK as usize + 3]);
        let mut b = BlockDigest::new();
        b.zeros(2 * BLOCK + 3);
        assert_eq!(a.finish(), b.finish());
    }

    #[test]
    fn an_empty_file_is_the_hash_of_nothing() {
        assert_eq!(
            BlockDigest::new().finish(),
            hex::encode(Sha256::new().finalize())
        );
    }
}
