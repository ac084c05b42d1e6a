//! Media format detection from bytes only (never from a file name), and the per-format facts
//! the rest of the engine needs: MIME type, extension, whether it is video, whether we encode it.

use serde::Serialize;

/// Every container or codec the engine can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Webp,
    Avif,
    Heif,
    Bmp,
    Tiff,
    /// ISO BMFF with a `moov` (MP4, M4V, 3GP).
    Mp4,
    /// QuickTime movie (`qt  ` brand).
    Mov,
    /// Fragmented MP4 segment (`styp`/`moof` first, or a DASH/CMAF brand).
    Fmp4,
    /// MPEG transport stream (188-byte packets).
    MpegTs,
    /// MPEG program stream.
    MpegPs,
    /// MPEG-1/2 video elementary stream.
    MpegVideo,
    /// H.264 Annex B elementary stream.
    H264,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Gif => "gif",
            Format::Webp => "webp",
            Format::Avif => "avif",
            Format::Heif => "heif",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
            Format::Mp4 => "mp4",
            Format::Mov => "mov",
            Format::Fmp4 => "fmp4",
            Format::MpegTs => "mpeg-ts",
            Format::MpegPs => "mpeg-ps",
            Format::MpegVideo => "mpeg-video",
            Format::H264 => "h264",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Gif => "image/gif",
            Format::Webp => "image/webp",
            Format::Avif => "image/avif",
            Format::Heif => "image/heif",
            Format::Bmp => "image/bmp",
            Format::Tiff => "image/tiff",
            Format::Mp4 | Format::Fmp4 => "video/mp4",
            Format::Mov => "video/quicktime",
            Format::MpegTs => "video/mp2t",
            Format::MpegPs | Format::MpegVideo => "video/mpeg",
            Format::H264 => "video/h264",
        }
    }

    pub fn is_video(self) -> bool {
        matches!(
            self,
            Format::Mp4
                | Format::Mov
                | Format::Fmp4
                | Format::MpegTs
                | Format::MpegPs
                | Format::MpegVideo
                | Format::H264
        )
    }
}

/// Sniffs the format from the first bytes. `None` means "not a format we know".
pub fn sniff(b: &[u8]) -> Option<Format> {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Some(Format::Jpeg);
    }
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some(Format::Png);
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some(Format::Gif);
    }
    if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        return Some(Format::Webp);
    }
    if b.starts_with(b"BM") && b.len() >= 26 {
        return Some(Format::Bmp);
    }
    if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        return Some(Format::Tiff);
    }
    if let Some(f) = sniff_iso_bmff(b) {
        return Some(f);
    }
    if is_mpeg_ts(b) {
        return Some(Format::MpegTs);
    }
    if b.starts_with(&[0, 0, 1, 0xBA]) {
        return Some(Format::MpegPs);
    }
    if b.starts_with(&[0, 0, 1, 0xB3]) {
        return Some(Format::MpegVideo);
    }
    if (b.starts_with(&[0, 0, 0, 1]) && b.len() > 4 && b[4] & 0x1F == 7)
        || (b.starts_with(&[0, 0, 1]) && b.len() > 3 && b[3] & 0x1F == 7)
    {
        return Some(Format::H264);
    }
    None
}

fn is_mpeg_ts(b: &[u8]) -> bool {
    // Sync byte every 188 bytes; a short segment needs at least two packets to be believed.
    let packets = (b.len() / 188).min(5);
    packets >= 2 && (0..packets).all(|i| b[i * 188] == 0x47)
}

fn sniff_iso_bmff(b: &[u8]) -> Option<Format> {
    if b.len() < 12 {
        return None;
    }
    let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let kind = &b[4..8];
    match kind {
        b"styp" | b"moof" | b"sidx" => return Some(Format::Fmp4),
        b"moov" | b"mdat" | b"free" | b"wide" => return Some(Format::Mp4),
        b"ftyp" => {}
        _ => return None,
    }
    let end = size.clamp(16, b.len().min(4096));
    let major = &b[8..12];
    let compat: Vec<&[u8]> = b[16.min(end)..end].chunks_exact(4).collect();
    let has = |brand: &[u8]| major == brand || compat.contains(&brand);
    if has(b"avif") || has(b"avis") {
        return Some(Format::Avif);
    }
    if has(b"heic") || has(b"heix") || has(b"hevc") || has(b"heim") || has(b"mif1") || has(b"msf1") {
        return Some(Format::Heif);
    }
    if has(b"dash") || has(b"msdh") || has(b"msix") || has(b"cmfc") || has(b"cmf2") {
        return Some(Format::Fmp4);
    }
    if major == b"qt  " {
        return Some(Format::Mov);
    }
    // A top-level `moof` after the `ftyp`/`moov` makes it fragmented.
    if has_top_level_box(b, b"moof") {
        return Some(Format::Fmp4);
    }
    Some(Format::Mp4)
}

/// Walks top-level ISO BMFF boxes (bounded by the buffer) looking for `kind`.
fn has_top_level_box(b: &[u8], kind: &[u8]) -> bool {
    let mut pos = 0usize;
    let mut steps = 0;
    while b.len().saturating_sub(pos) >= 8 && steps < 10_000 {
        steps += 1;
        let size = u32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as u64;
        if &b[pos + 4..pos + 8] == kind {
            return true;
        }
        let size = match size {
            0 => return false,
            1 if b.len() - pos >= 16 => u64::from_be_bytes(b[pos + 8..pos + 16].try_into().unwrap_or([0; 8])),
            1 => return false,
            s => s,
        };
        if size < 8 {
            return false;
        }
        pos = match usize::try_from(size).ok().and_then(|s| pos.checked_add(s)) {
            Some(p) => p,
            None => return false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ftyp(major: &[u8], compat: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        let size = 16 + 4 * compat.len();
        v.extend_from_slice(&(size as u32).to_be_bytes());
        v.extend_from_slice(b"ftyp");
        v.extend_from_slice(major);
        v.extend_from_slice(&[0, 0, 0, 0]);
        for c in compat {
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn sniffs_from_magic_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"GIF89a...."), Some(Format::Gif));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::Webp));
        assert_eq!(sniff(b"II*\0...."), Some(Format::Tiff));
        assert_eq!(sniff(&[0, 0, 1, 0xBA, 0x44]), Some(Format::MpegPs));
        assert_eq!(sniff(&[0, 0, 1, 0xB3, 0x18]), Some(Format::MpegVideo));
        assert_eq!(sniff(&[0, 0, 0, 1, 0x67, 0x42]), Some(Format::H264));
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"hello world, not an image"), None);
    }

    #[test]
    fn sniffs_iso_bmff_brands() {
        assert_eq!(sniff(&ftyp(b"avif", &[b"mif1"])), Some(Format::Avif));
        assert_eq!(sniff(&ftyp(b"mif1", &[b"avif"])), Some(Format::Avif));
        assert_eq!(sniff(&ftyp(b"heic", &[b"mif1"])), Some(Format::Heif));
        assert_eq!(sniff(&ftyp(b"isom", &[b"iso2", b"avc1"])), Some(Format::Mp4));
        assert_eq!(sniff(&ftyp(b"qt  ", &[])), Some(Format::Mov));
        assert_eq!(sniff(&ftyp(b"iso6", &[b"dash"])), Some(Format::Fmp4));
        let mut seg = b"\0\0\0\x18stypmsdh\0\0\0\0msdhmsix".to_vec();
        seg.extend_from_slice(b"\0\0\0\x08moof");
        assert_eq!(sniff(&seg), Some(Format::Fmp4));
        let mut frag = ftyp(b"isom", &[b"iso5"]);
        frag.extend_from_slice(b"\0\0\0\x08moov\0\0\0\x08moof");
        assert_eq!(sniff(&frag), Some(Format::Fmp4));
    }

    #[test]
    fn sniffs_transport_stream_only_with_repeated_sync() {
        let mut ts = vec![0u8; 188 * 3];
        for i in 0..3 {
            ts[i * 188] = 0x47;
        }
        assert_eq!(sniff(&ts), Some(Format::MpegTs));
        ts[188] = 0;
        assert_eq!(sniff(&ts), None);
    }

    #[test]
    fn box_walk_survives_hostile_sizes() {
        assert!(!has_top_level_box(b"\0\0\0\x01ftyp\xff\xff\xff\xff\xff\xff\xff\xff", b"moof"));
        assert!(!has_top_level_box(b"\0\0\0\x04ftyp", b"moof"));
        assert!(!has_top_level_box(b"\xff\xff\xff\xffftyp", b"moof"));
    }
}
