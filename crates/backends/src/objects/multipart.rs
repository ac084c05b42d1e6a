//! Multipart uploads of the embedded store (S3's CreateMultipartUpload / UploadPart /
//! CompleteMultipartUpload / AbortMultipartUpload). Each part is a durable blob named by a
//! `parts` row; completing streams the listed parts, in order, into one new upload and commits
//! it like any write (so the object appears whole or not at all, with a `multipart` record in
//! the change feed), then drops the parts. Part
//! rules are S3's: numbers 1-10000, every part but the last at least 5 MiB, the completion
//! listing parts in ascending order with their ETags.

use std::collections::BTreeMap;

use sqlx::Row;
use tokio::io::AsyncReadExt;

use super::embedded::{decode_metadata, encode_metadata, is_foreign_key_error, remove_blob};
use super::{Condition, ObjectError, ObjectMeta, Objects, Result, check_attributes, check_key};
use crate::state::now_ms;

/// Smallest part but the last (S3's limit).
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// Highest part number (S3's limit).
pub const MAX_PART_NUMBER: u32 = 10_000;
/// Incomplete uploads older than this are aborted when garbage is collected (a week).
pub const EXPIRE_AFTER_MS: i64 = 7 * 86_400_000;

/// A stored part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub size: u64,
    /// Hex MD5 of the part.
    pub etag: String,
}

/// Upload ids are 32 hex digits; anything else names no upload.
fn check_id(id: &str) -> Result<()> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ObjectError::NoSuchUpload(id.chars().take(64).collect()))
    }
}

impl Objects {
    /// Starts a multipart upload of `bucket`/`key`; returns its id.
    pub async fn create_multipart(
        &self,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<String> {
        self.check(bucket)?;
        check_key(key)?;
        check_attributes(content_type, metadata)?;
        let id = super::blob_id()?;
        let r = sqlx::query(
            "INSERT INTO uploads (id, bucket, key, content_type, metadata, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(bucket)
        .bind(key)
        .bind(content_type)
        .bind(encode_metadata(metadata))
        .bind(now_ms())
        .execute(&self.embedded()?.db)
        .await;
        match r {
            Ok(_) => Ok(id),
            Err(e) if is_foreign_key_error(&e) => Err(ObjectError::NoSuchBucket(bucket.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// The bucket and key an upload was started for.
    async fn upload_target(&self, id: &str) -> Result<(String, String, String, String)> {
        check_id(id)?;
        let r = sqlx::query("SELECT bucket, key, content_type, metadata FROM uploads WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.embedded()?.db)
            .await?
            .ok_or_else(|| ObjectError::NoSuchUpload(id.to_owned()))?;
        Ok((r.get("bucket"), r.get("key"), r.get("content_type"), r.get("metadata")))
    }

    /// Stores part `number` of upload `id` (replacing an earlier part with that number).
    pub async fn put_part(
        &self,
        id: &str,
        bucket: &str,
        key: &str,
        number: u32,
        upload: super::Upload,
    ) -> Result<Part> {
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(ObjectError::InvalidPart(format!("part numbers go from 1 to {MAX_PART_NUMBER}")));
        }
        let (b, k, _, _) = self.upload_target(id).await?;
        if (b.as_str(), k.as_str()) != (bucket, key) {
            return Err(ObjectError::NoSuchUpload(id.to_owned()));
        }
        let blob = self.embedded()?.persist(upload).await?;
        let size = i64::try_from(blob.size).unwrap_or(i64::MAX);
        // Compare-and-swap on the part's blob, as object writes do: two uploads of one part
        // number never both think they replaced the same blob.
        for _ in 0..64 {
            let old = sqlx::query("SELECT blob FROM parts WHERE upload = ? AND number = ?")
                .bind(id)
                .bind(i64::from(number))
                .fetch_optional(&self.embedded()?.db)
                .await?
                .map(|r| r.get::<String, _>("blob"));
            let r =
                match &old {
                    None => {
                        sqlx::query(
                            "INSERT INTO parts (upload, number, blob, size, etag) VALUES (?, ?, ?, ?, ?)
                         ON CONFLICT (upload, number) DO NOTHING",
                        )
                        .bind(id)
                        .bind(i64::from(number))
                        .bind(&blob.id)
                        .bind(size)
                        .bind(&blob.etag)
                        .execute(&self.embedded()?.db)
                        .await
                    }
                    Some(old) => sqlx::query(
                        "UPDATE parts SET blob = ?, size = ?, etag = ? WHERE upload = ? AND number = ? AND blob = ?",
                    )
                    .bind(&blob.id)
                    .bind(size)
                    .bind(&blob.etag)
                    .bind(id)
                    .bind(i64::from(number))
                    .bind(old)
                    .execute(&self.embedded()?.db)
                    .await,
                };
            match r {
                Ok(done) if done.rows_affected() == 1 => {
                    if let Some(old) = old {
                        remove_blob(&self.embedded()?.blob_path(&old)).await;
                    }
                    return Ok(Part { number, size: blob.size, etag: blob.etag });
                }
                Ok(_) => continue,
                Err(e) => {
                    remove_blob(&blob.path).await;
                    let gone = is_foreign_key_error(&e);
                    return Err(if gone { ObjectError::NoSuchUpload(id.to_owned()) } else { e.into() });
                }
            }
        }
        remove_blob(&blob.path).await;
        Err(ObjectError::Io(std::io::Error::other("too many concurrent writers of one part")))
    }

    /// The parts of an upload, by number.
    pub async fn parts(&self, id: &str) -> Result<Vec<Part>> {
        self.upload_target(id).await?;
        Ok(self.part_rows(id).await?.into_iter().map(|(p, _)| p).collect())
    }

    async fn part_rows(&self, id: &str) -> Result<Vec<(Part, String)>> {
        let rows = sqlx::query("SELECT number, blob, size, etag FROM parts WHERE upload = ? ORDER BY number")
            .bind(id)
            .fetch_all(&self.embedded()?.db)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let part = Part {
                    number: u32::try_from(r.get::<i64, _>("number")).unwrap_or(0),
                    size: u64::try_from(r.get::<i64, _>("size")).unwrap_or(0),
                    etag: r.get("etag"),
                };
                (part, r.get("blob"))
            })
            .collect())
    }

    /// Joins the listed parts (`(number, etag)`, ascending) into the object, if `condition`
    /// holds, and ends the upload.
    pub async fn complete_multipart(
        &self,
        id: &str,
        bucket: &str,
        key: &str,
        listed: &[(u32, String)],
        condition: &Condition,
        limit: u64,
    ) -> Result<ObjectMeta> {
        let (b, k, content_type, metadata) = self.upload_target(id).await?;
        if (b.as_str(), k.as_str()) != (bucket, key) {
            return Err(ObjectError::NoSuchUpload(id.to_owned()));
        }
        if listed.is_empty() {
            return Err(ObjectError::InvalidPart("list at least one part".into()));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ObjectError::InvalidPartOrder);
        }
        let stored: BTreeMap<u32, (Part, String)> =
            self.part_rows(id).await?.into_iter().map(|(p, blob)| (p.number, (p, blob))).collect();
        let mut chosen = Vec::with_capacity(listed.len());
        for (i, (number, etag)) in listed.iter().enumerate() {
            let (part, blob) = stored
                .get(number)
                .ok_or_else(|| ObjectError::InvalidPart(format!("part {number} was not uploaded")))?;
            if part.etag != etag.trim_matches('"') {
                return Err(ObjectError::InvalidPart(format!("part {number}: the ETag does not match")));
            }
            if i + 1 < listed.len() && part.size < MIN_PART_BYTES {
                return Err(ObjectError::EntityTooSmall { part: *number, size: part.size });
            }
            chosen.push(blob.clone());
        }
        let total: u64 = listed.iter().filter_map(|(n, _)| stored.get(n)).map(|(p, _)| p.size).sum();
        if total > limit {
            return Err(ObjectError::TooLarge { limit, actual: total });
        }
        let mut joined = self.upload(limit).await?;
        let mut buf = vec![0u8; 256 << 10];
        for blob in &chosen {
            let mut f = tokio::fs::File::open(self.embedded()?.blob_path(blob)).await?;
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                joined.write(&buf[..n]).await?;
            }
        }
        let metadata = decode_metadata(&metadata);
        let kind = crate::feed::ChangeKind::Multipart;
        let meta = self.commit_as(joined, bucket, key, &content_type, &metadata, condition, kind).await?;
        self.drop_upload(id).await?;
        Ok(meta)
    }

    /// Ends an upload without an object; its parts go.
    pub async fn abort_multipart(&self, id: &str, bucket: &str, key: &str) -> Result<()> {
        let (b, k, _, _) = self.upload_target(id).await?;
        if (b.as_str(), k.as_str()) != (bucket, key) {
            return Err(ObjectError::NoSuchUpload(id.to_owned()));
        }
        self.drop_upload(id).await
    }

    /// Aborts uploads started before `before_ms`; returns how many.
    pub(super) async fn expire_uploads(&self, before_ms: i64) -> Result<u64> {
        let ids: Vec<String> = sqlx::query("SELECT id FROM uploads WHERE created_ms < ?")
            .bind(before_ms)
            .fetch_all(&self.embedded()?.db)
            .await?
            .iter()
            .map(|r| r.get("id"))
            .collect();
        for id in &ids {
            self.drop_upload(id).await?;
        }
        Ok(ids.len() as u64)
    }

    /// Fails unless upload `id` is in progress for `bucket`/`key` (checked before a part's body
    /// is received).
    pub async fn check_upload(&self, id: &str, bucket: &str, key: &str) -> Result<()> {
        let (b, k, _, _) = self.upload_target(id).await?;
        if (b.as_str(), k.as_str()) != (bucket, key) {
            return Err(ObjectError::NoSuchUpload(id.to_owned()));
        }
        Ok(())
    }

    async fn drop_upload(&self, id: &str) -> Result<()> {
        // A part that lands between the two deletes keeps the upload row (its foreign key):
        // delete again, so every part's blob is known and removed.
        for _ in 0..64 {
            let blobs: Vec<String> = sqlx::query("DELETE FROM parts WHERE upload = ? RETURNING blob")
                .bind(id)
                .fetch_all(&self.embedded()?.db)
                .await?
                .iter()
                .map(|r| r.get("blob"))
                .collect();
            for blob in &blobs {
                remove_blob(&self.embedded()?.blob_path(blob)).await;
            }
            match sqlx::query("DELETE FROM uploads WHERE id = ?").bind(id).execute(&self.embedded()?.db).await {
                Ok(_) => return Ok(()),
                Err(e) if is_foreign_key_error(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ObjectError::Io(std::io::Error::other("parts kept arriving while the upload ended")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::embedded::tests::{Dir, blobs, store};
    use super::*;

    async fn part(o: &Objects, id: &str, n: u32, bytes: &[u8]) -> Result<Part> {
        let mut u = o.upload(u64::MAX).await?;
        u.write(bytes).await?;
        o.put_part(id, "media", "big.bin", n, u).await
    }

    #[tokio::test]
    async fn parts_join_into_one_object_in_order() {
        let dir = Dir::new("multipart");
        let o = store(&dir).await;
        let meta = BTreeMap::from([("origin".to_owned(), "s3".to_owned())]);
        let id = o.create_multipart("media", "big.bin", "application/x-test", &meta).await.unwrap();
        let a = vec![b'a'; MIN_PART_BYTES as usize];
        let b = b"tail".to_vec();
        // Uploaded out of order, one part replaced.
        let pb = part(&o, &id, 2, &b).await.unwrap();
        part(&o, &id, 1, b"too short").await.unwrap();
        let pa = part(&o, &id, 1, &a).await.unwrap();
        assert_eq!(o.parts(&id).await.unwrap().len(), 2);
        assert_eq!(blobs(&dir), 2, "the replaced part's blob is gone");
        // Garbage collection keeps what parts name, and recent uploads.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(o.collect_garbage(later).await.unwrap(), 0);
        assert_eq!(blobs(&dir), 2);
        let listed = [(1, pa.etag.clone()), (2, pb.etag.clone())];
        let m = o.complete_multipart(&id, "media", "big.bin", &listed, &Condition::None, u64::MAX).await.unwrap();
        let (_, bytes) = o.read("media", "big.bin", u64::MAX).await.unwrap();
        assert_eq!(bytes.len(), a.len() + b.len());
        assert_eq!(&bytes[..a.len()], &a[..]);
        assert_eq!(&bytes[a.len()..], &b[..]);
        assert_eq!((m.content_type.as_str(), m.metadata["origin"].as_str()), ("application/x-test", "s3"));
        // Parts and the upload are gone; only the object's blob is left.
        assert!(matches!(o.parts(&id).await, Err(ObjectError::NoSuchUpload(_))));
        assert_eq!(blobs(&dir), 1);
    }

    #[tokio::test]
    async fn racing_uploads_of_one_part_leave_one_blob() {
        let dir = Dir::new("multipart-race");
        let o = store(&dir).await;
        let id = o.create_multipart("media", "big.bin", "application/octet-stream", &BTreeMap::new()).await.unwrap();
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let (o, id) = (o.clone(), id.clone());
                tokio::spawn(async move { part(&o, &id, 1, &[i; 64]).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(o.parts(&id).await.unwrap().len(), 1);
        assert_eq!(blobs(&dir), 1, "every replaced part's blob is gone");
        o.abort_multipart(&id, "media", "big.bin").await.unwrap();
        assert_eq!(blobs(&dir), 0);
    }

    #[tokio::test]
    async fn completions_follow_s3s_part_rules() {
        let dir = Dir::new("multipart-rules");
        let o = store(&dir).await;
        let id = o.create_multipart("media", "big.bin", "application/octet-stream", &BTreeMap::new()).await.unwrap();
        let p1 = part(&o, &id, 1, b"small").await.unwrap();
        let p2 = part(&o, &id, 2, b"last").await.unwrap();
        let complete = |listed: Vec<(u32, String)>| {
            let o = o.clone();
            let id = id.clone();
            async move { o.complete_multipart(&id, "media", "big.bin", &listed, &Condition::None, u64::MAX).await }
        };
        assert!(matches!(
            complete(vec![(1, p1.etag.clone()), (2, p2.etag.clone())]).await,
            Err(ObjectError::EntityTooSmall { part: 1, .. })
        ));
        assert!(matches!(
            complete(vec![(2, p2.etag.clone()), (1, p1.etag.clone())]).await,
            Err(ObjectError::InvalidPartOrder)
        ));
        assert!(matches!(complete(vec![(3, p2.etag.clone())]).await, Err(ObjectError::InvalidPart(_))));
        assert!(matches!(complete(vec![(2, "0000".into())]).await, Err(ObjectError::InvalidPart(_))));
        assert!(matches!(complete(vec![]).await, Err(ObjectError::InvalidPart(_))));
        assert!(matches!(part(&o, &id, 0, b"x").await, Err(ObjectError::InvalidPart(_))));
        assert!(matches!(part(&o, &id, 10_001, b"x").await, Err(ObjectError::InvalidPart(_))));
        assert!(matches!(part(&o, "not-an-id", 1, b"x").await, Err(ObjectError::NoSuchUpload(_))));
        // A single last part may be small; a failed completion left the upload usable.
        complete(vec![(2, p2.etag.clone())]).await.unwrap();
        assert_eq!(o.read("media", "big.bin", 100).await.unwrap().1, b"last");
        let id = o.create_multipart("media", "gone.bin", "application/octet-stream", &BTreeMap::new()).await.unwrap();
        let mut u = o.upload(10).await.unwrap();
        u.write(b"x").await.unwrap();
        o.put_part(&id, "media", "gone.bin", 1, u).await.unwrap();
        o.abort_multipart(&id, "media", "gone.bin").await.unwrap();
        assert!(matches!(o.abort_multipart(&id, "media", "gone.bin").await, Err(ObjectError::NoSuchUpload(_))));
        assert!(matches!(o.head("media", "gone.bin").await, Err(ObjectError::NoSuchKey { .. })));
        assert_eq!(blobs(&dir), 1);
        assert!(matches!(
            o.create_multipart("nobucket", "k", "text/plain", &BTreeMap::new()).await,
            Err(ObjectError::NoSuchBucket(_))
        ));
        // Uploads left incomplete expire with their parts.
        let stale = o.create_multipart("media", "stale.bin", "text/plain", &BTreeMap::new()).await.unwrap();
        let mut u = o.upload(10).await.unwrap();
        u.write(b"x").await.unwrap();
        o.put_part(&stale, "media", "stale.bin", 1, u).await.unwrap();
        assert_eq!(o.expire_uploads(now_ms() + 1).await.unwrap(), 1);
        assert!(matches!(o.check_upload(&stale, "media", "stale.bin").await, Err(ObjectError::NoSuchUpload(_))));
        assert_eq!(blobs(&dir), 1);
    }
}
