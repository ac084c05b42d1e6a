//! The CDN edge cache: transformed results in two size-bounded LRU tiers, memory over disk,
//! the disk tier surviving restarts. Entries are keyed by an opaque digest (the server derives
//! it from the transformation, the source object and its ETag, and the negotiated format) and
//! remember their source object, so a purge by key or key prefix finds every derivative.
//!
//! A disk entry is one file `<2 hex>/<digest>`: a JSON header line, then the bytes; it is
//! written to a temporary name and renamed, so a crash leaves whole entries or none (no fsync:
//! a lost entry is only a future miss). At open the index is rebuilt from the headers; files
//! that do not parse are removed. Folders are `0700` and files `0600` ([`crate::files`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A cached result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub bytes: Bytes,
    pub content_type: String,
    /// Strong validator of the bytes (hex, without quotes).
    pub etag: String,
    pub created_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    bucket: String,
    key: String,
    content_type: String,
    etag: String,
    created_ms: i64,
}

struct Info {
    bucket: String,
    key: String,
    content_type: String,
    etag: String,
    created_ms: i64,
    size: u64,
    /// The bytes, when in the memory tier.
    memory: Option<Bytes>,
    /// Last use, in the order of `Index::clock`.
    used: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Info>,
    /// Use order: `used` → digest, for both tiers.
    lru: BTreeMap<u64, String>,
    clock: u64,
    memory_bytes: u64,
    disk_bytes: u64,
}

impl Index {
    fn touch(&mut self, digest: &str) {
        self.clock += 1;
        let now = self.clock;
        if let Some(info) = self.entries.get_mut(digest) {
            self.lru.remove(&info.used);
            info.used = now;
            self.lru.insert(now, digest.to_owned());
        }
    }

    fn remove(&mut self, digest: &str) -> Option<Info> {
        let info = self.entries.remove(digest)?;
        self.lru.remove(&info.used);
        self.disk_bytes = self.disk_bytes.saturating_sub(info.size);
        if info.memory.is_some() {
            self.memory_bytes = self.memory_bytes.saturating_sub(info.size);
        }
        Some(info)
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// The edge cache.
pub struct EdgeCache {
    dir: PathBuf,
    memory_limit: u64,
    disk_limit: u64,
    index: Mutex<Index>,
}

fn lock(m: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Digests name files: anything but 16-128 hex digits is refused.
fn valid(digest: &str) -> bool {
    (16..=128).contains(&digest.len()) && digest.bytes().all(|b| b.is_ascii_hexdigit())
}

impl EdgeCache {
    /// Opens the cache in `dir`, rebuilding the index from the entries on disk (most recently
    /// written first in use order), and trims it to the limits.
    pub fn open(dir: &Path, memory_limit: u64, disk_limit: u64) -> std::io::Result<EdgeCache> {
        crate::files::create_dir_all(dir)?;
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir)? {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub)? {
                let path = f?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                match (valid(&name), read_header(&path)) {
                    (true, Ok((header, size, modified))) => found.push((modified, name, header, size)),
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|(modified, ..)| *modified);
        let mut index = Index::default();
        for (_, digest, h, size) in found {
            index.clock += 1;
            index.lru.insert(index.clock, digest.clone());
            index.disk_bytes += size;
            let info = Info {
                bucket: h.bucket,
                key: h.key,
                content_type: h.content_type,
                etag: h.etag,
                created_ms: h.created_ms,
                size,
                memory: None,
                used: index.clock,
            };
            index.entries.insert(digest, info);
        }
        let cache = EdgeCache { dir: dir.to_owned(), memory_limit, disk_limit, index: Mutex::new(index) };
        let evicted = cache.evict();
        cache.remove_files(&evicted);
        Ok(cache)
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(&digest[..2]).join(digest)
    }

    pub fn stats(&self) -> CacheStats {
        let i = lock(&self.index);
        CacheStats { entries: i.entries.len() as u64, memory_bytes: i.memory_bytes, disk_bytes: i.disk_bytes }
    }

    /// The entry under `digest`, from memory, else from disk (then kept in memory).
    pub async fn get(&self, digest: &str) -> Option<Entry> {
        if !valid(digest) {
            return None;
        }
        let (content_type, etag, created_ms) = {
            let mut i = lock(&self.index);
            let info = i.entries.get(digest)?;
            let found = (info.content_type.clone(), info.etag.clone(), info.created_ms, info.memory.clone());
            i.touch(digest);
            if let (ct, etag, created_ms, Some(bytes)) = found {
                return Some(Entry { bytes, content_type: ct, etag, created_ms });
            }
            (found.0, found.1, found.2)
        };
        let path = self.path(digest);
        let bytes = match tokio::task::spawn_blocking(move || read_body(&path)).await {
            Ok(Ok(b)) => Bytes::from(b),
            // Unreadable or gone from disk: forget it, file and all.
            _ => {
                lock(&self.index).remove(digest);
                let _ = std::fs::remove_file(self.path(digest));
                return None;
            }
        };
        let evicted = {
            let mut i = lock(&self.index);
            let size = bytes.len() as u64;
            let promoted = match i.entries.get_mut(digest) {
                Some(info) if info.memory.is_none() && size <= self.memory_limit => {
                    info.memory = Some(bytes.clone());
                    true
                }
                _ => false,
            };
            if promoted {
                i.memory_bytes += size;
            }
            drop(i);
            self.evict()
        };
        self.remove_files(&evicted);
        Some(Entry { bytes, content_type, etag, created_ms })
    }

    /// Stores an entry derived from `bucket`/`key`.
    pub async fn put(&self, digest: &str, bucket: &str, key: &str, entry: &Entry) -> std::io::Result<()> {
        if !valid(digest) {
            return Err(std::io::Error::other("cache digests are hex"));
        }
        let size = entry.bytes.len() as u64;
        if size > self.disk_limit {
            return Ok(());
        }
        let header = Header {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            content_type: entry.content_type.clone(),
            etag: entry.etag.clone(),
            created_ms: entry.created_ms,
        };
        let path = self.path(digest);
        let bytes = entry.bytes.clone();
        tokio::task::spawn_blocking(move || write_entry(&path, &header, &bytes))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let evicted = {
            let mut i = lock(&self.index);
            i.remove(digest);
            let keep_in_memory = size <= self.memory_limit;
            i.clock += 1;
            let used = i.clock;
            i.lru.insert(used, digest.to_owned());
            i.disk_bytes += size;
            if keep_in_memory {
                i.memory_bytes += size;
            }
            let info = Info {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                content_type: entry.content_type.clone(),
                etag: entry.etag.clone(),
                created_ms: entry.created_ms,
                size,
                memory: keep_in_memory.then(|| entry.bytes.clone()),
                used,
            };
            i.entries.insert(digest.to_owned(), info);
            drop(i);
            self.evict()
        };
        self.remove_files(&evicted);
        Ok(())
    }

    /// Drops memory copies, then whole entries, least recently used first, until both tiers
    /// fit; returns the digests whose files must go.
    fn evict(&self) -> Vec<String> {
        let mut i = lock(&self.index);
        // Walk the use order only as far as needed: eviction runs on every insertion.
        let mut after = 0;
        while i.memory_bytes > self.memory_limit {
            let Some((&used, digest)) = i.lru.range(after + 1..).next() else { break };
            let digest = digest.clone();
            after = used;
            if let Some(info) = i.entries.get_mut(&digest)
                && info.memory.take().is_some()
            {
                let size = info.size;
                i.memory_bytes = i.memory_bytes.saturating_sub(size);
            }
        }
        let mut gone = Vec::new();
        while i.disk_bytes > self.disk_limit {
            let Some((_, digest)) = i.lru.pop_first() else { break };
            if i.remove(&digest).is_some() {
                gone.push(digest);
            }
        }
        gone
    }

    fn remove_files(&self, digests: &[String]) {
        for d in digests {
            let _ = std::fs::remove_file(self.path(d));
        }
    }

    /// Removes every entry derived from `bucket`/`key` (`prefix`: from any key starting with
    /// it); returns how many went.
    pub fn purge(&self, bucket: &str, key: &str, prefix: bool) -> u64 {
        let gone: Vec<String> = {
            let mut i = lock(&self.index);
            let matching: Vec<String> = i
                .entries
                .iter()
                .filter(|(_, e)| e.bucket == bucket && if prefix { e.key.starts_with(key) } else { e.key == key })
                .map(|(d, _)| d.clone())
                .collect();
            for d in &matching {
                i.remove(d);
            }
            matching
        };
        self.remove_files(&gone);
        gone.len() as u64
    }

    /// Removes every entry; returns how many went.
    pub fn purge_all(&self) -> u64 {
        let gone: Vec<String> = {
            let mut i = lock(&self.index);
            let all: Vec<String> = i.entries.keys().cloned().collect();
            for d in &all {
                i.remove(d);
            }
            all
        };
        self.remove_files(&gone);
        gone.len() as u64
    }
}

fn read_header(path: &Path) -> std::io::Result<(Header, u64, std::time::SystemTime)> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut reader = std::io::BufReader::new(file).take(8 << 10);
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::other("no header"));
    }
    let header: Header = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
    let size = meta.len().saturating_sub(n as u64);
    Ok((header, size, meta.modified()?))
}

fn read_body(path: &Path) -> std::io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    let at = bytes.iter().position(|b| *b == b'\n').ok_or_else(|| std::io::Error::other("no header"))?;
    Ok(bytes[at + 1..].to_vec())
}

fn write_entry(path: &Path, header: &Header, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no folder"))?;
    crate::files::create_dir_all(dir)?;
    // A name of its own per writer: two writers of one digest never share a file.
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".{}.tmp", u64::from_le_bytes(nonce)));
    let tmp = dir.join(tmp_name);
    let mut f = crate::files::open_options().write(true).create_new(true).open(&tmp)?;
    serde_json::to_writer(&mut f, header).map_err(std::io::Error::other)?;
    f.write_all(b"\n")?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pixflow-edge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn entry(n: usize) -> Entry {
        Entry { bytes: Bytes::from(vec![7u8; n]), content_type: "image/webp".into(), etag: "ab".into(), created_ms: 1 }
    }

    fn digest(i: u8) -> String {
        format!("{i:02x}").repeat(16)
    }

    #[tokio::test]
    async fn entries_survive_a_restart_and_purges_find_derivatives() {
        let d = dir("restart");
        {
            let c = EdgeCache::open(&d, 1 << 20, 1 << 20).unwrap();
            c.put(&digest(1), "media", "a/cat.jpg", &entry(10)).await.unwrap();
            c.put(&digest(2), "media", "a/cat.jpg", &entry(20)).await.unwrap();
            c.put(&digest(3), "media", "b/dog.jpg", &entry(30)).await.unwrap();
            assert_eq!(c.get(&digest(1)).await.unwrap(), entry(10));
        }
        let c = EdgeCache::open(&d, 1 << 20, 1 << 20).unwrap();
        assert_eq!(c.stats(), CacheStats { entries: 3, memory_bytes: 0, disk_bytes: 60 });
        assert_eq!(c.get(&digest(3)).await.unwrap(), entry(30));
        assert_eq!(c.stats().memory_bytes, 30, "read from disk, then kept in memory");
        assert_eq!(c.purge("media", "a/cat.jpg", false), 2);
        assert!(c.get(&digest(1)).await.is_none());
        assert_eq!(c.purge("media", "b/", true), 1);
        assert_eq!(c.stats(), CacheStats::default());
        assert!(c.get("../../etc/passwd").await.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn tiers_stay_within_their_limits_least_recently_used_first() {
        let d = dir("lru");
        let c = EdgeCache::open(&d, 25, 45).unwrap();
        c.put(&digest(1), "m", "k1", &entry(10)).await.unwrap();
        c.put(&digest(2), "m", "k2", &entry(10)).await.unwrap();
        // Using 1 makes 2 the least recently used.
        c.get(&digest(1)).await.unwrap();
        c.put(&digest(3), "m", "k3", &entry(10)).await.unwrap();
        let s = c.stats();
        assert!(s.memory_bytes <= 25, "{s:?}");
        assert_eq!(s.disk_bytes, 30);
        c.put(&digest(4), "m", "k4", &entry(20)).await.unwrap();
        // 50 bytes > 45: the least recently used (2) leaves the disk too.
        assert!(c.get(&digest(2)).await.is_none());
        assert!(c.get(&digest(1)).await.is_some() && c.get(&digest(4)).await.is_some());
        assert!(c.stats().disk_bytes <= 45);
        // Larger than the whole disk tier: not kept.
        c.put(&digest(5), "m", "k5", &entry(100)).await.unwrap();
        assert!(c.get(&digest(5)).await.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn only_the_owner_reads_cached_files() {
        use crate::files::mode;
        let d = dir("private");
        let c = EdgeCache::open(&d, 1 << 20, 1 << 20).unwrap();
        c.put(&digest(1), "media", "a/cat.jpg", &entry(10)).await.unwrap();
        let sub = d.join(&digest(1)[..2]);
        let modes = [&d, &sub, &sub.join(digest(1))].map(|p| mode(p).unwrap());
        assert_eq!(modes, [0o700, 0o700, 0o600]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn damaged_files_are_dropped_at_open() {
        let d = dir("damaged");
        std::fs::create_dir_all(d.join("aa")).unwrap();
        std::fs::write(d.join("aa").join(digest(0xaa)), b"no header at all").unwrap();
        std::fs::write(d.join("aa").join("not-a-digest"), b"{}\n").unwrap();
        let c = EdgeCache::open(&d, 100, 100).unwrap();
        assert_eq!(c.stats().entries, 0);
        assert_eq!(std::fs::read_dir(d.join("aa")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
