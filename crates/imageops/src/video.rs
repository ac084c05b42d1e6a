//! Frames out of video: MP4/MOV and fragmented MP4 (with or without a separate init segment)
//! demuxed by `re_mp4`, MPEG-TS segments demuxed by `mpeg2ts`, H.264 decoded by OpenH264
//! (bundled source; nothing to install). Only the groups of pictures that hold a requested frame are decoded: a frame at
//! 1:59:00 of a two-hour film costs one GOP, found from the sync-sample table, not two hours.
//! Each GOP is decoded in decode order with a fresh decoder and flushed; its pictures come out
//! in display order, which the GOP's composition timestamps (sorted) label.

use image::{DynamicImage, RgbImage};
use openh264::formats::YUVSource;

use crate::error::{Error, LimitKind, Result};
use crate::format::Format;
use crate::limits::Limits;
use crate::sequence::{FramePos, Select, Still};

/// One displayable picture of the track, in display order.
#[derive(Debug, Clone, Copy)]
struct Picture {
    /// Index into the track's units (decode order).
    unit: usize,
    time_ms: u64,
    duration_ms: u64,
    keyframe: bool,
}

/// One coded picture (access unit) in decode order.
#[derive(Debug, Clone)]
struct Unit {
    range: std::ops::Range<usize>,
    /// Presentation time in milliseconds from the first picture.
    time_ms: u64,
    sync: bool,
}

/// How units are framed in `data`.
enum Framing {
    /// MP4: NAL units prefixed by their length; parameter sets live in `avcC`.
    Avcc { length_size: usize, params: Vec<u8> },
    /// MPEG-TS: start codes; parameter sets in the stream. `params[i]` holds the SPS/PPS NAL
    /// units (with start codes) last seen at or before unit `i`, for GOPs that do not repeat them.
    AnnexB { params: Vec<std::rc::Rc<Vec<u8>>> },
}

/// A video track reduced to what frame extraction needs.
struct Track {
    data: Vec<u8>,
    units: Vec<Unit>,
    framing: Framing,
    duration_ms: u64,
}

fn corrupt(format: &'static str, detail: impl Into<String>) -> Error {
    Error::Corrupt { format, detail: detail.into() }
}

fn unsupported_codec(codec: &str) -> Error {
    Error::Unsupported {
        format: format!("video codec {codec}"),
        hint: Some("frames decode H.264 here; other codecs need the ffmpeg CLI".into()),
    }
}

/// Sample counts an MP4 declares (`stsz`, `stz2`, `stts`, `trun`) may not exceed the bytes
/// that could hold them: the demuxer expands them into one entry per sample before anything
/// else can be checked, so a 300-byte file claiming four billion samples would otherwise
/// allocate hundreds of gigabytes.
fn check_sample_counts(data: &[u8]) -> Result<()> {
    fn walk(data: &[u8], depth: usize, total: usize) -> Result<()> {
        let mut at = 0usize;
        while at + 8 <= data.len() {
            let size32 = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            let kind = &data[at + 4..at + 8];
            let (header, size) = match size32 {
                0 => (8, data.len() - at),
                1 if at + 16 <= data.len() => {
                    let big = u64::from_be_bytes(data[at + 8..at + 16].try_into().expect("8 bytes"));
                    (16, usize::try_from(big).unwrap_or(usize::MAX))
                }
                1 => return Ok(()),
                n => (8, n),
            };
            if size < header {
                return Ok(()); // the demuxer reports malformed boxes itself
            }
            let end = at.saturating_add(size).min(data.len());
            let body = &data[(at + header).min(end)..end];
            let count_at = |offset: usize| {
                body.get(offset..offset + 4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            };
            let declared = match kind {
                b"stsz" | b"stz2" => count_at(8),
                b"trun" => count_at(4),
                b"stts" => {
                    // Sum of the run lengths.
                    let entries = count_at(4).min(body.len() / 8);
                    (0..entries).map(|i| count_at(8 + i * 8)).fold(0usize, usize::saturating_add)
                }
                _ => 0,
            };
            if declared > total {
                return Err(corrupt(
                    "mp4",
                    format!("{} declares {declared} samples in a {total}-byte file", String::from_utf8_lossy(kind)),
                ));
            }
            if depth < 8 && matches!(kind, b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" | b"moof" | b"traf") {
                walk(body, depth + 1, total)?;
            }
            if end <= at {
                break;
            }
            at = end;
        }
        Ok(())
    }
    walk(data, 0, data.len())
}

/// Parses an MP4 with `re_mp4` after [`check_sample_counts`], turning a demuxer panic on
/// malformed tables into a typed error, and its errors into ours: a missing `ftyp`/`moov`
/// (a media segment without its init segment) or a box longer than the data is truncation.
pub(crate) fn read_mp4(data: &[u8]) -> Result<re_mp4::Mp4> {
    check_sample_counts(data)?;
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| re_mp4::Mp4::read_bytes(data)))
        .map_err(|_| corrupt("mp4", "malformed sample tables"))?;
    parsed.map_err(|e| {
        let message = e.to_string();
        if message.contains("moov") || message.contains("ftyp") {
            let detail = format!("{message} (a media segment needs its init segment: frames init=NAME)");
            Error::Truncated { format: "mp4", detail }
        } else if message.contains("larger") || message.contains("eof") {
            // A box that claims more bytes than remain: the file was cut short.
            Error::Truncated { format: "mp4", detail: message }
        } else {
            corrupt("mp4", message)
        }
    })
}

/// The video track of an MP4/MOV/fMP4 (prefixed by `init` for a media segment without its own
/// `moov`).
fn mp4_track(bytes: &[u8], init: Option<&[u8]>, limits: &Limits) -> Result<Track> {
    let data = match init {
        Some(init) => [init, bytes].concat(),
        None => bytes.to_vec(),
    };
    let mp4 = read_mp4(&data)?;
    let track = mp4
        .tracks()
        .values()
        .find(|t| t.kind == Some(re_mp4::TrackKind::Video))
        .ok_or_else(|| corrupt("mp4", "no video track"))?;
    let avcc = match &track.trak(&mp4).mdia.minf.stbl.stsd.contents {
        re_mp4::StsdBoxContent::Avc1(a) => &a.avcc.contents,
        _ => return Err(unsupported_codec(&track.codec_string(&mp4).unwrap_or_else(|| "unknown".into()))),
    };
    limits.check_source(u32::from(track.width), u32::from(track.height))?;
    let timescale = track.timescale.max(1);
    let ms = |t: i64| u64::try_from(t).unwrap_or(0).saturating_mul(1000) / timescale;
    let mut params = Vec::new();
    for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
        params.extend_from_slice(&[0, 0, 0, 1]);
        params.extend_from_slice(&nal.bytes);
    }
    let units = track
        .samples
        .iter()
        .map(|s| Unit { range: s.byte_range(), time_ms: ms(s.composition_timestamp), sync: s.is_sync })
        .collect();
    let framing = Framing::Avcc { length_size: usize::from(avcc.length_size_minus_one & 3) + 1, params };
    let duration_ms = track.duration.saturating_mul(1000) / timescale;
    drop(mp4);
    Ok(Track { data, units, framing, duration_ms })
}

/// The first video stream of an MPEG-TS segment: PES packets of its PID, one picture each,
/// timed by their PTS (90 kHz) from the earliest.
fn ts_track(bytes: &[u8]) -> Result<Track> {
    use mpeg2ts::ts::{ReadTsPacket, TsPacketReader, TsPayload};
    let fail = |e: mpeg2ts::Error| {
        let message = e.to_string();
        if message.contains("UnexpectedEof") || message.contains("failed to fill whole buffer") {
            Error::Truncated { format: "mpeg-ts", detail: message }
        } else {
            corrupt("mpeg-ts", message)
        }
    };
    let mut reader = TsPacketReader::new(bytes);
    let mut video: Option<(u16, mpeg2ts::es::StreamType)> = None;
    let mut data = Vec::with_capacity(bytes.len());
    // (start in data, PTS) of each PES packet of the video PID.
    let mut packets: Vec<(usize, Option<u64>)> = Vec::new();
    while let Some(packet) = reader.read_ts_packet().map_err(fail)? {
        let pid = packet.header.pid.as_u16();
        match packet.payload {
            Some(TsPayload::Pmt(pmt)) if video.is_none() => {
                video = pmt
                    .es_info
                    .iter()
                    .find(|es| is_video_stream(es.stream_type))
                    .map(|es| (es.elementary_pid.as_u16(), es.stream_type));
            }
            Some(TsPayload::PesStart(pes)) if video.is_some_and(|(v, _)| v == pid) => {
                packets.push((data.len(), pes.header.pts.map(|t| t.as_u64())));
                data.extend_from_slice(&pes.data);
            }
            Some(TsPayload::PesContinuation(more)) if video.is_some_and(|(v, _)| v == pid) && !packets.is_empty() => {
                data.extend_from_slice(&more);
            }
            _ => {}
        }
    }
    let Some((_, stream_type)) = video else {
        return Err(corrupt("mpeg-ts", "no video stream in the program map"));
    };
    if stream_type != mpeg2ts::es::StreamType::H264 {
        return Err(unsupported_codec(&format!("{stream_type:?}").to_lowercase()));
    }
    let first = packets.iter().filter_map(|(_, pts)| *pts).min().unwrap_or(0);
    let mut units: Vec<Unit> = packets
        .iter()
        .enumerate()
        .map(|(i, &(start, pts))| {
            let end = packets.get(i + 1).map_or(data.len(), |p| p.0);
            let time_ms = pts.map_or(0, |p| p.saturating_sub(first) / 90);
            Unit { sync: has_idr(&data[start..end]), range: start..end, time_ms }
        })
        .collect();
    // Pictures before the first keyframe cannot be decoded on their own.
    if let Some(k) = units.iter().position(|u| u.sync) {
        units.drain(..k);
    }
    let mut times: Vec<u64> = units.iter().map(|u| u.time_ms).collect();
    times.sort_unstable();
    let step = times.windows(2).map(|w| w[1] - w[0]).filter(|d| *d > 0).min().unwrap_or(40);
    let duration_ms = times.last().map_or(0, |t| t + step);
    // The parameter sets in force at each unit: streams may send them once, at the start.
    let mut params = Vec::with_capacity(units.len());
    let mut current = std::rc::Rc::new(Vec::new());
    for u in &units {
        let sets = parameter_sets(&data[u.range.clone()]);
        if !sets.is_empty() {
            current = std::rc::Rc::new(sets);
        }
        params.push(current.clone());
    }
    Ok(Track { data, units, framing: Framing::AnnexB { params }, duration_ms })
}

/// What probe reports for an MPEG-TS segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsSummary {
    pub frames: u64,
    pub duration_ms: u64,
    /// Coded size, from decoding the first keyframe alone.
    pub size: Option<(u32, u32)>,
}

pub fn ts_summary(bytes: &[u8], limits: &Limits) -> Result<TsSummary> {
    let track = ts_track(bytes)?;
    let size = if track.units.is_empty() {
        None
    } else {
        let mut budget = limits.max_source_pixels;
        let first = decode_gop(&track, 0..1, &[0], None, &mut budget, limits)?;
        first.into_iter().flatten().next().map(|img| img.dimensions())
    };
    Ok(TsSummary { frames: track.units.len() as u64, duration_ms: track.duration_ms, size })
}

fn is_video_stream(t: mpeg2ts::es::StreamType) -> bool {
    use mpeg2ts::es::StreamType as S;
    matches!(t, S::H264 | S::H265 | S::Mpeg1Video | S::Mpeg2Video | S::Mpeg4H263BasedVideo | S::UltraHdVideo)
}

/// The SPS and PPS NAL units (types 7 and 8) of an Annex B access unit, with start codes.
fn parameter_sets(au: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let starts: Vec<usize> = au.windows(3).enumerate().filter(|(_, w)| *w == [0, 0, 1]).map(|(i, _)| i + 3).collect();
    for (n, &s) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(au.len(), |&e| e - 3);
        if s < end && matches!(au[s] & 0x1f, 7 | 8) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(au[s..end].strip_suffix(&[0]).unwrap_or(&au[s..end]));
        }
    }
    out
}

/// Whether an Annex B access unit holds an IDR slice (NAL type 5).
fn has_idr(au: &[u8]) -> bool {
    au.windows(4).any(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && w[3] & 0x1f == 5)
}

/// Decodes the selected frames of the first video track of an MP4/MOV/fMP4 or MPEG-TS. With
/// `width`, each kept picture is scaled down to it as soon as it is decoded, and only the
/// scaled pixels count against the budget.
pub fn frames(
    format: Format,
    bytes: &[u8],
    init: Option<&[u8]>,
    select: &Select,
    width: Option<u32>,
    limits: &Limits,
) -> Result<Vec<Still>> {
    let track = match format {
        Format::Mp4 | Format::Mov | Format::Fmp4 => mp4_track(bytes, init, limits)?,
        Format::MpegTs => ts_track(bytes)?,
        other => {
            return Err(Error::Unsupported {
                format: format!("{} frames", other.name()),
                hint: Some(
                    "frames decode MP4, MOV, fragmented MP4 and MPEG-TS here; other containers need the ffmpeg CLI"
                        .into(),
                ),
            });
        }
    };
    // Headers can understate the length: the last picture's time counts too.
    let last_time = track.units.iter().map(|u| u.time_ms).max().unwrap_or(0);
    let track = Track { duration_ms: track.duration_ms.max(last_time), ..track };
    let max_ms = limits.max_video_seconds.saturating_mul(1000);
    if track.duration_ms > max_ms {
        return Err(Error::LimitExceeded {
            limit: LimitKind::VideoSeconds,
            max: limits.max_video_seconds,
            actual: track.duration_ms.div_ceil(1000),
        });
    }
    let units = &track.units;
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| (units[i].time_ms, i));
    let pictures: Vec<Picture> = order
        .iter()
        .enumerate()
        .map(|(d, &i)| {
            let start = units[i].time_ms;
            let end = order.get(d + 1).map_or(track.duration_ms.max(start), |&n| units[n].time_ms);
            Picture { unit: i, time_ms: start, duration_ms: end.saturating_sub(start), keyframe: units[i].sync }
        })
        .collect();
    let Some(last) = pictures.last() else {
        return Err(corrupt(format.name(), "the video track has no pictures"));
    };
    let wanted: Vec<usize> = match select {
        Select::Keyframes => (0..pictures.len()).filter(|&d| pictures[d].keyframe).collect(),
        other => {
            let starts: Vec<u64> = pictures.iter().map(|p| p.time_ms).collect();
            other.resolve(&starts, track.duration_ms.max(last.time_ms))?
        }
    };
    limits.check_frames(wanted.len() as u64)?;

    // Group the wanted pictures by the GOP (keyframe in decode order) that holds them.
    let gop_of = |unit: usize| (0..=unit).rev().find(|&u| units[u].sync).unwrap_or(0);
    let mut by_gop: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for &d in &wanted {
        by_gop.entry(gop_of(pictures[d].unit)).or_default().push(d);
    }
    let mut out = Vec::with_capacity(wanted.len());
    let mut budget = limits.max_source_pixels;
    for (start, want) in by_gop {
        // Decoding stops after the last wanted unit (decode order): flushed, the decoder gives
        // exactly the units fed so far, in display order, so the rest of the GOP is never read.
        let end = want.iter().map(|&d| pictures[d].unit + 1).max().unwrap_or(start + 1);
        // Leading pictures of an open GOP (shown before its keyframe) reference the previous
        // GOP: decode from the keyframe before it.
        let leading = want.iter().any(|&d| pictures[d].time_ms < units[start].time_ms);
        let start = if leading && start > 0 { gop_of(start - 1) } else { start };
        // The fed units in display order, matched to the decoder's output order.
        let mut gop: Vec<usize> = (start..end).collect();
        gop.sort_by_key(|&i| (units[i].time_ms, i));
        let ranks: Vec<usize> =
            want.iter().map(|&d| gop.iter().position(|&u| u == pictures[d].unit).unwrap_or(usize::MAX)).collect();
        let mut decoded = decode_gop(&track, start..end, &ranks, width, &mut budget, limits)?;
        if decoded.len() != gop.len() {
            // Pictures are matched to units by position; a unit that gave no picture (or two)
            // would shift every later one, so refuse rather than return the wrong frames.
            return Err(corrupt(
                format.name(),
                format!(
                    "{} of {} pictures decoded between {} and {} ms",
                    decoded.len(),
                    gop.len(),
                    units[start].time_ms,
                    units[end - 1].time_ms
                ),
            ));
        }
        for (d, rank) in want.into_iter().zip(ranks) {
            let pic = pictures[d];
            let image = decoded.get_mut(rank).and_then(Option::take).ok_or_else(|| {
                corrupt(
                    format.name(),
                    format!(
                        "frame at {} ms did not decode ({} of {} pictures did)",
                        pic.time_ms,
                        decoded.len(),
                        gop.len()
                    ),
                )
            })?;
            out.push(Still {
                image: DynamicImage::ImageRgb8(image),
                pos: FramePos { index: d as u32, time_ms: pic.time_ms, duration_ms: pic.duration_ms },
            });
        }
    }
    out.sort_by_key(|s| s.pos.index);
    Ok(out)
}

/// The Annex B bytes of one unit (length prefixes become start codes; the GOP's first unit
/// carries the parameter sets).
fn annex_b(track: &Track, index: usize, first: bool, packet: &mut Vec<u8>) -> Result<()> {
    packet.clear();
    let unit = &track.units[index];
    let sample = track.data.get(unit.range.clone()).ok_or_else(|| Error::Truncated {
        format: "video",
        detail: format!("a picture at {} ms lies past the end of the data", unit.time_ms),
    })?;
    match &track.framing {
        Framing::AnnexB { params } => {
            if first && let Some(sets) = params.get(index) {
                packet.extend_from_slice(sets);
            }
            packet.extend_from_slice(sample);
        }
        Framing::Avcc { length_size, params } => {
            if first {
                packet.extend_from_slice(params);
            }
            let mut rest = sample;
            while !rest.is_empty() {
                let (len, body) =
                    rest.split_at_checked(*length_size).ok_or_else(|| corrupt("mp4", "NAL length cut short"))?;
                let len = len.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                let (nal, tail) =
                    body.split_at_checked(len).ok_or_else(|| corrupt("mp4", "NAL unit runs past its sample"))?;
                packet.extend_from_slice(&[0, 0, 0, 1]);
                packet.extend_from_slice(nal);
                rest = tail;
            }
        }
    }
    Ok(())
}

/// Decodes units `range` (one GOP, decode order); returns its pictures in output order, as
/// RGB only at the `keep_ranks` (the rest are decoded as references and dropped). Kept pixels
/// count against `budget`, shared by every GOP of one request.
fn decode_gop(
    track: &Track,
    range: std::ops::Range<usize>,
    keep_ranks: &[usize],
    width: Option<u32>,
    budget: &mut u64,
    limits: &Limits,
) -> Result<Vec<Option<RgbImage>>> {
    let fail = |e: openh264::Error| corrupt("h264", e.to_string());
    let api = openh264::OpenH264API::from_source();
    let config = openh264::decoder::DecoderConfig::new().flush_after_decode(openh264::decoder::Flush::NoFlush);
    let mut decoder = openh264::decoder::Decoder::with_api_config(api, config).map_err(fail)?;
    let mut pictures: Vec<Option<RgbImage>> = Vec::new();
    let mut keep = |yuv: &openh264::decoder::DecodedYUV<'_>, rank: usize| -> Result<Option<RgbImage>> {
        if !keep_ranks.contains(&rank) {
            return Ok(None);
        }
        let (w, h) = yuv.dimensions();
        limits.check_source(w as u32, h as u32)?;
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        let img = RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| corrupt("h264", "picture size"))?;
        let img = crate::sequence::shrink_to_width(DynamicImage::ImageRgb8(img), width)?.to_rgb8();
        let px = u64::from(img.width()) * u64::from(img.height());
        *budget = budget.checked_sub(px).ok_or(Error::LimitExceeded {
            limit: LimitKind::SourcePixels,
            max: limits.max_source_pixels,
            actual: limits.max_source_pixels.saturating_add(px),
        })?;
        Ok(Some(img))
    };
    let mut packet = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limits.max_op_millis);
    for index in range.clone() {
        annex_b(track, index, index == range.start, &mut packet)?;
        if std::time::Instant::now() > deadline {
            return Err(Error::Timeout { op: "frames".into(), limit_ms: limits.max_op_millis });
        }
        if let Some(yuv) = decoder.decode(&packet).map_err(fail)? {
            let picture = keep(&yuv, pictures.len())?;
            pictures.push(picture);
        }
    }
    for yuv in decoder.flush_remaining().map_err(fail)? {
        let picture = keep(&yuv, pictures.len())?;
        pictures.push(picture);
    }
    Ok(pictures)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Splits an Annex B stream into NAL units (without start codes).
    fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
        let mut starts = Vec::new();
        let mut i = 0;
        while i + 3 <= stream.len() {
            if stream[i..i + 3] == [0, 0, 1] {
                starts.push(i + 3);
                i += 3;
            } else {
                i += 1;
            }
        }
        starts
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                let mut end = starts.get(n + 1).map_or(stream.len(), |&e| e - 3);
                while end > s && stream[end - 1] == 0 {
                    end -= 1; // the extra zero of a four-byte start code
                }
                &stream[s..end]
            })
            .collect()
    }

    fn bx(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name);
        out.extend_from_slice(body);
        out
    }

    fn full(name: &[u8; 4], version_flags: u32, body: &[u8]) -> Vec<u8> {
        bx(name, &[&version_flags.to_be_bytes()[..], body].concat())
    }

    /// `frames` 64x48 H.264 pictures (Annex B, keyframe flag) whose luma is `20 + 10 * i`,
    /// a keyframe every `gop` pictures; made here with OpenH264's encoder.
    fn encoded(frames: usize, gop: usize) -> Vec<(Vec<u8>, bool)> {
        let (w, h) = (64usize, 48usize);
        let mut enc = openh264::encoder::Encoder::new().unwrap();
        (0..frames)
            .map(|i| {
                let mut yuv = vec![(20 + 10 * i) as u8; w * h];
                yuv.extend(std::iter::repeat_n(128u8, w * h / 2));
                let buf = openh264::formats::YUVBuffer::from_vec(yuv, w, h);
                if i % gop == 0 {
                    enc.force_intra_frame();
                }
                (enc.encode(&buf).unwrap().to_vec(), i % gop == 0)
            })
            .collect()
    }

    /// The same pictures as an MPEG-TS segment: PAT, PMT, one PES per picture at 25 fps,
    /// timestamps starting at 10 s as a mid-stream segment's would.
    pub(crate) fn ts(frames: usize, gop: usize) -> Vec<u8> {
        ts_with(frames, gop, false)
    }

    /// As [`ts`]; with `params_once`, SPS and PPS appear only in the first picture, as some
    /// streams send them.
    fn ts_with(frames: usize, gop: usize, params_once: bool) -> Vec<u8> {
        use mpeg2ts::es::{StreamId, StreamType};
        use mpeg2ts::pes::PesHeader;
        use mpeg2ts::time::Timestamp;
        use mpeg2ts::ts::payload::{Bytes, Pat, Pes, Pmt};
        use mpeg2ts::ts::{
            ContinuityCounter, EsInfo, Pid, ProgramAssociation, TransportScramblingControl, TsHeader, TsPacket,
            TsPacketWriter, TsPayload, VersionNumber, WriteTsPacket,
        };
        let (pmt_pid, video_pid) = (Pid::new(0x1000).unwrap(), Pid::new(0x100).unwrap());
        let mut counter = 0u8;
        let mut writer = TsPacketWriter::new(Vec::new());
        let mut put = |pid: Pid, payload: TsPayload, counter: &mut u8| {
            let header = TsHeader {
                transport_error_indicator: false,
                transport_priority: false,
                pid,
                transport_scrambling_control: TransportScramblingControl::NotScrambled,
                continuity_counter: ContinuityCounter::from_u8(*counter % 16).unwrap(),
            };
            *counter = counter.wrapping_add(1);
            writer.write_ts_packet(&TsPacket { header, adaptation_field: None, payload: Some(payload) }).unwrap();
        };
        let pat = Pat {
            transport_stream_id: 1,
            version_number: VersionNumber::default(),
            table: vec![ProgramAssociation { program_num: 1, program_map_pid: pmt_pid }],
        };
        put(Pid::new(0).unwrap(), TsPayload::Pat(pat), &mut 0);
        let es = EsInfo { stream_type: StreamType::H264, elementary_pid: video_pid, descriptors: vec![] };
        let pmt = Pmt {
            program_num: 1,
            pcr_pid: Some(video_pid),
            version_number: VersionNumber::default(),
            program_info: vec![],
            es_info: vec![es],
        };
        put(pmt_pid, TsPayload::Pmt(pmt), &mut 0);
        for (i, (au, _)) in encoded(frames, gop).into_iter().enumerate() {
            let au: Vec<u8> = if params_once && i > 0 {
                nal_units(&au)
                    .into_iter()
                    .filter(|n| !matches!(n[0] & 0x1f, 7 | 8))
                    .flat_map(|n| [&[0, 0, 0, 1][..], n].concat())
                    .collect()
            } else {
                au
            };
            let header = PesHeader {
                stream_id: StreamId::new(0xE0),
                priority: false,
                data_alignment_indicator: true,
                copyright: false,
                original_or_copy: false,
                pts: Some(Timestamp::new(900_000 + i as u64 * 3600).unwrap()),
                dts: None,
                escr: None,
            };
            let (head, mut rest) = au.split_at(au.len().min(150));
            let pes = Pes { header, pes_packet_len: 0, data: Bytes::new(head).unwrap() };
            put(video_pid, TsPayload::PesStart(pes), &mut counter);
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rest.len().min(150));
                put(video_pid, TsPayload::PesContinuation(Bytes::new(chunk).unwrap()), &mut counter);
                rest = tail;
            }
        }
        writer.into_stream()
    }

    /// The same pictures in a small MP4 (ftyp, moov, mdat), 40 ms each.
    pub(crate) fn mp4(frames: usize, gop: usize) -> Vec<u8> {
        let (w, h) = (64usize, 48usize);
        let (mut sps, mut pps) = (Vec::new(), Vec::new());
        let mut samples: Vec<Vec<u8>> = Vec::new();
        let mut sync = Vec::new();
        for (i, (stream, key)) in encoded(frames, gop).into_iter().enumerate() {
            if key {
                sync.push(i as u32 + 1);
            }
            let mut sample = Vec::new();
            for nal in nal_units(&stream) {
                match nal[0] & 0x1f {
                    7 => sps = nal.to_vec(),
                    8 => pps = nal.to_vec(),
                    _ => {
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
            samples.push(sample);
        }
        let duration = (frames * 40) as u32;
        let matrix: Vec<u8> =
            [0x10000u32, 0, 0, 0, 0x10000, 0, 0, 0, 0x4000_0000].iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
        avcc.extend_from_slice(&(sps.len() as u16).to_be_bytes());
        avcc.extend_from_slice(&sps);
        avcc.push(1);
        avcc.extend_from_slice(&(pps.len() as u16).to_be_bytes());
        avcc.extend_from_slice(&pps);
        let mut avc1 = vec![0u8; 6];
        avc1.extend_from_slice(&1u16.to_be_bytes());
        avc1.extend_from_slice(&[0u8; 16]);
        avc1.extend_from_slice(&(w as u16).to_be_bytes());
        avc1.extend_from_slice(&(h as u16).to_be_bytes());
        avc1.extend_from_slice(&0x0048_0000u32.to_be_bytes());
        avc1.extend_from_slice(&0x0048_0000u32.to_be_bytes());
        avc1.extend_from_slice(&0u32.to_be_bytes());
        avc1.extend_from_slice(&1u16.to_be_bytes());
        avc1.extend_from_slice(&[0u8; 32]);
        avc1.extend_from_slice(&0x0018u16.to_be_bytes());
        avc1.extend_from_slice(&0xffffu16.to_be_bytes());
        avc1.extend(bx(b"avcC", &avcc));
        let ftyp = bx(b"ftyp", b"isom\x00\x00\x02\x00isomavc1");
        let moov = |mdat_offset: u32| {
            let stsz: Vec<u8> = [0u32, frames as u32]
                .into_iter()
                .chain(samples.iter().map(|s| s.len() as u32))
                .flat_map(|v| v.to_be_bytes())
                .collect();
            let stss: Vec<u8> =
                std::iter::once(sync.len() as u32).chain(sync.iter().copied()).flat_map(|v| v.to_be_bytes()).collect();
            let stbl = [
                full(b"stsd", 0, &[&1u32.to_be_bytes()[..], &bx(b"avc1", &avc1)].concat()),
                full(b"stts", 0, &[1u32, frames as u32, 40].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>()),
                full(b"stss", 0, &stss),
                full(b"stsc", 0, &[1u32, 1, frames as u32, 1].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>()),
                full(b"stsz", 0, &stsz),
                full(b"stco", 0, &[1u32, mdat_offset].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>()),
            ]
            .concat();
            let dinf = bx(b"dinf", &full(b"dref", 0, &[&1u32.to_be_bytes()[..], &full(b"url ", 1, &[])].concat()));
            let minf = bx(b"minf", &[full(b"vmhd", 1, &[0u8; 8]), dinf, bx(b"stbl", &stbl)].concat());
            let mdhd = full(
                b"mdhd",
                0,
                &[0u32, 0, 1000, duration]
                    .iter()
                    .flat_map(|v| v.to_be_bytes())
                    .chain([0x55, 0xc4, 0, 0])
                    .collect::<Vec<_>>(),
            );
            let hdlr = full(b"hdlr", 0, &[&[0u8; 4][..], b"vide", &[0u8; 12], b"video\0"].concat());
            let mdia = bx(b"mdia", &[mdhd, hdlr, minf].concat());
            let mut tkhd = [0u32, 0, 1, 0, duration, 0, 0].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>();
            tkhd.extend_from_slice(&[0u8; 8]);
            tkhd.extend_from_slice(&matrix);
            tkhd.extend_from_slice(&((w as u32) << 16).to_be_bytes());
            tkhd.extend_from_slice(&((h as u32) << 16).to_be_bytes());
            let trak = bx(b"trak", &[full(b"tkhd", 3, &tkhd), mdia].concat());
            let mut mvhd = [0u32, 0, 1000, duration, 0x10000].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>();
            mvhd.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            mvhd.extend_from_slice(&matrix);
            mvhd.extend_from_slice(&[0u8; 24]);
            mvhd.extend_from_slice(&2u32.to_be_bytes());
            bx(b"moov", &[full(b"mvhd", 0, &mvhd), trak].concat())
        };
        let offset = (ftyp.len() + moov(0).len() + 8) as u32;
        [ftyp, moov(offset), bx(b"mdat", &samples.concat())].concat()
    }

    fn mean_luma(s: &Still) -> u8 {
        let l = s.image.to_luma8();
        (l.pixels().map(|p| u64::from(p.0[0])).sum::<u64>() / u64::from(l.width() * l.height())) as u8
    }

    #[test]
    fn frames_come_from_the_right_times_decoding_only_their_gops() {
        let video = mp4(12, 4);
        let probe = crate::probe(&video, &Limits::default(), None).unwrap();
        assert_eq!(
            (probe.width, probe.height, probe.frames, probe.duration_ms),
            (Some(64), Some(48), Some(12), Some(480))
        );
        let stills =
            frames(Format::Mp4, &video, None, &Select::Times(vec![0, 130, 440]), None, &Limits::default()).unwrap();
        let got: Vec<(u32, u64, u8)> = stills.iter().map(|s| (s.pos.index, s.pos.time_ms, mean_luma(s))).collect();
        assert_eq!(got.len(), 3);
        for ((index, time, luma), want) in got.iter().zip([0u32, 3, 11]) {
            assert_eq!((*index, *time), (want, u64::from(want) * 40));
            // Video-range luma (16..235) expands to full range in RGB.
            let expected = ((20 + 10 * want as i32 - 16) * 255 / 219) as u8;
            assert!(luma.abs_diff(expected) <= 3, "frame {want}: luma {luma}, expected {expected}");
        }
        let keys = frames(Format::Mp4, &video, None, &Select::Keyframes, None, &Limits::default()).unwrap();
        assert_eq!(keys.iter().map(|s| s.pos.index).collect::<Vec<_>>(), [0, 4, 8]);
        let even = frames(Format::Mp4, &video, None, &Select::Count(2), None, &Limits::default()).unwrap();
        assert_eq!(even.iter().map(|s| s.pos.index).collect::<Vec<_>>(), [3, 9], "midpoints 120 and 360 ms");
        // Break the first GOP's first sample: frames of the last GOP still decode, because
        // nothing before their keyframe is read; the first GOP's do not.
        let mut broken = video.clone();
        let mdat = broken.windows(4).position(|w| w == b"mdat").unwrap() + 4;
        broken[mdat..mdat + 4].copy_from_slice(&[0xff; 4]);
        let late = frames(Format::Mp4, &broken, None, &Select::Indices(vec![9]), None, &Limits::default()).unwrap();
        assert_eq!(late[0].pos.index, 9);
        assert_eq!(
            frames(Format::Mp4, &broken, None, &Select::Indices(vec![1]), None, &Limits::default()).unwrap_err().code(),
            "corrupt_input"
        );
    }

    #[test]
    fn mpeg_ts_segments_decode_by_pts() {
        let seg = ts(10, 5);
        assert_eq!(crate::format::sniff(&seg), Some(Format::MpegTs));
        let stills =
            frames(Format::MpegTs, &seg, None, &Select::Times(vec![0, 200, 360]), None, &Limits::default()).unwrap();
        let got: Vec<(u32, u64)> = stills.iter().map(|s| (s.pos.index, s.pos.time_ms)).collect();
        assert_eq!(got, [(0, 0), (5, 200), (9, 360)], "times count from the segment's first PTS");
        for s in &stills {
            let expected = ((20 + 10 * s.pos.index as i32 - 16) * 255 / 219) as u8;
            assert!(mean_luma(s).abs_diff(expected) <= 3, "frame {}", s.pos.index);
        }
        let summary = ts_summary(&seg, &Limits::default()).unwrap();
        assert_eq!(summary, TsSummary { frames: 10, duration_ms: 400, size: Some((64, 48)) });
        let keys = frames(Format::MpegTs, &seg, None, &Select::Keyframes, None, &Limits::default()).unwrap();
        assert_eq!(keys.iter().map(|s| s.pos.index).collect::<Vec<_>>(), [0, 5]);
        // Cut mid-packet: a typed error, never a panic.
        let err = frames(Format::MpegTs, &seg[..seg.len() / 2 + 7], None, &Select::All, None, &Limits::default());
        assert!(err.is_err() || err.is_ok_and(|v| v.len() < 10));
    }

    #[test]
    fn frames_shrink_as_they_are_decoded_within_the_pixel_budget() {
        let video = mp4(12, 4);
        // Twelve 64x48 pictures are 36 864 pixels: over a 20 000 budget at full size, under it at
        // 32x24.
        let tight = Limits { max_source_pixels: 20_000, ..Limits::default() };
        assert_eq!(frames(Format::Mp4, &video, None, &Select::All, None, &tight).unwrap_err().code(), "limit_exceeded");
        let small = frames(Format::Mp4, &video, None, &Select::All, Some(32), &tight).unwrap();
        assert_eq!(small.len(), 12);
        assert!(small.iter().all(|s| (s.image.width(), s.image.height()) == (32, 24)));
        let expected = ((20 + 10 * 5 - 16) * 255 / 219) as u8;
        assert!(mean_luma(&small[5]).abs_diff(expected) <= 3);
    }

    #[test]
    fn parameter_sets_sent_once_serve_every_gop() {
        let seg = ts_with(10, 5, true);
        let late = frames(Format::MpegTs, &seg, None, &Select::Indices(vec![7]), None, &Limits::default()).unwrap();
        assert_eq!(late[0].pos.index, 7);
        let expected = ((20 + 10 * 7 - 16) * 255 / 219) as u8;
        assert!(mean_luma(&late[0]).abs_diff(expected) <= 3);
    }

    #[test]
    fn malformed_sample_tables_are_refused_without_allocating_or_panicking() {
        let video = mp4(4, 2);
        // stsz claiming 2^32-1 samples: refused before the demuxer expands it.
        let mut huge = video.clone();
        let at = huge.windows(4).position(|w| w == b"stsz").unwrap();
        huge[at + 12..at + 16].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = frames(Format::Mp4, &huge, None, &Select::All, None, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("declares 4294967295 samples"), "{err}");
        assert_eq!(crate::probe(&huge, &Limits::default(), None).unwrap().problem.unwrap().code, "corrupt_input");
        // No chunk offsets: the demuxer panics inside; a typed error comes out.
        let mut no_stco = video.clone();
        let at = no_stco.windows(4).position(|w| w == b"stco").unwrap();
        no_stco[at..at + 4].copy_from_slice(b"free");
        assert!(frames(Format::Mp4, &no_stco, None, &Select::All, None, &Limits::default()).is_err());
        assert!(crate::probe(&no_stco, &Limits::default(), None).is_ok());
    }

    #[test]
    fn limits_and_damage_are_typed_errors() {
        let video = mp4(6, 3);
        let short = Limits { max_frames: 2, ..Limits::default() };
        assert_eq!(frames(Format::Mp4, &video, None, &Select::All, None, &short).unwrap_err().code(), "limit_exceeded");
        let tiny = Limits { max_source_pixels: 64 * 48 * 2, ..Limits::default() };
        assert_eq!(frames(Format::Mp4, &video, None, &Select::All, None, &tiny).unwrap_err().code(), "limit_exceeded");
        let err = frames(Format::Mp4, &video, None, &Select::Times(vec![999]), None, &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "bad_parameter");
        // Cut inside the sample data: the container parses, the samples are missing.
        let cut = &video[..video.len() - 200];
        let err = frames(Format::Mp4, cut, None, &Select::Indices(vec![5]), None, &Limits::default()).unwrap_err();
        assert!(matches!(err.code(), "truncated_input" | "corrupt_input"), "{err}");
        // Without its moov a media segment asks for the init segment.
        let err = frames(Format::Mp4, &video[..24], None, &Select::All, None, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("init"), "{err}");
        for n in [0, 7, 100, 1000, 3000] {
            let mut broken = video.clone();
            if n < broken.len() {
                broken[n] ^= 0xff;
            }
            let _ = frames(Format::Mp4, &broken, None, &Select::All, None, &Limits::default());
        }
    }
}
