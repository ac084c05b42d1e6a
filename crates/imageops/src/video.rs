//! Frames out of video: MP4/MOV and fragmented MP4 (with or without a separate init segment)
//! holding H.264, demuxed by `re_mp4` and decoded by OpenH264 (bundled source; nothing to
//! install). Only the groups of pictures that hold a requested frame are decoded: a frame at
//! 1:59:00 of a two-hour film costs one GOP, found from the sync-sample table, not two hours.
//! Each GOP is decoded in decode order with a fresh decoder and flushed; its pictures come out
//! in display order, which the GOP's composition timestamps (sorted) label.

use image::{DynamicImage, RgbImage};
use openh264::formats::YUVSource;

use crate::error::{Error, LimitKind, Result};
use crate::limits::Limits;
use crate::sequence::{FramePos, Select, Still};

/// One displayable picture of the track, in display order.
#[derive(Debug, Clone, Copy)]
struct Picture {
    /// Index into the track's samples (decode order).
    sample: usize,
    time_ms: u64,
    duration_ms: u64,
    keyframe: bool,
}

fn corrupt(detail: impl Into<String>) -> Error {
    Error::Corrupt { format: "mp4", detail: detail.into() }
}

/// Parses the container (prefixed by `init` for a media segment without its own `moov`).
fn open(bytes: &[u8], init: Option<&[u8]>) -> Result<(re_mp4::Mp4, Vec<u8>)> {
    let data = match init {
        Some(init) => [init, bytes].concat(),
        None => bytes.to_vec(),
    };
    let mp4 = re_mp4::Mp4::read_bytes(&data).map_err(|e| {
        let message = e.to_string();
        if message.contains("moov") || message.contains("ftyp") {
            let detail = format!("{message} (a media segment needs its init segment: frames init=NAME)");
            Error::Truncated { format: "mp4", detail }
        } else if message.contains("larger") || message.contains("eof") {
            // A box that claims more bytes than remain: the file was cut short.
            Error::Truncated { format: "mp4", detail: message }
        } else {
            corrupt(message)
        }
    })?;
    Ok((mp4, data))
}

/// Decodes the selected frames of the first video track.
pub fn frames(bytes: &[u8], init: Option<&[u8]>, select: &Select, limits: &Limits) -> Result<Vec<Still>> {
    let (mp4, data) = open(bytes, init)?;
    let track = mp4
        .tracks()
        .values()
        .find(|t| t.kind == Some(re_mp4::TrackKind::Video))
        .ok_or_else(|| corrupt("no video track"))?;
    let avcc = match &track.trak(&mp4).mdia.minf.stbl.stsd.contents {
        re_mp4::StsdBoxContent::Avc1(a) => &a.avcc.contents,
        _ => {
            let codec = track.codec_string(&mp4).unwrap_or_else(|| "unknown".into());
            return Err(Error::Unsupported {
                format: format!("video codec {codec}"),
                hint: Some("frames decode H.264 here; other codecs need the ffmpeg CLI".into()),
            });
        }
    };
    limits.check_source(u32::from(track.width), u32::from(track.height))?;
    let timescale = track.timescale.max(1);
    let ms = |t: i64| (u64::try_from(t).unwrap_or(0)).saturating_mul(1000) / timescale;
    let duration_ms = track.duration.saturating_mul(1000) / timescale;
    let max_ms = limits.max_video_seconds.saturating_mul(1000);
    if duration_ms > max_ms {
        return Err(Error::LimitExceeded {
            limit: LimitKind::VideoSeconds,
            max: limits.max_video_seconds,
            actual: duration_ms.div_ceil(1000),
        });
    }

    let samples = &track.samples;
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| (samples[i].composition_timestamp, i));
    let pictures: Vec<Picture> = order
        .iter()
        .enumerate()
        .map(|(d, &i)| {
            let start = ms(samples[i].composition_timestamp);
            let end = order.get(d + 1).map_or(duration_ms.max(start), |&n| ms(samples[n].composition_timestamp));
            Picture { sample: i, time_ms: start, duration_ms: end.saturating_sub(start), keyframe: samples[i].is_sync }
        })
        .collect();
    if pictures.is_empty() {
        return Err(corrupt("the video track has no samples"));
    }
    let wanted: Vec<usize> = match select {
        Select::Keyframes => (0..pictures.len()).filter(|&d| pictures[d].keyframe).collect(),
        other => {
            let starts: Vec<u64> = pictures.iter().map(|p| p.time_ms).collect();
            other.resolve(&starts, duration_ms.max(starts[starts.len() - 1]))?
        }
    };
    limits.check_frames(wanted.len() as u64)?;

    // Group the wanted pictures by the GOP (sync sample in decode order) that holds them.
    let gop_of = |sample: usize| (0..=sample).rev().find(|&s| samples[s].is_sync).unwrap_or(0);
    let mut by_gop: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for &d in &wanted {
        by_gop.entry(gop_of(pictures[d].sample)).or_default().push(d);
    }
    let length_size = usize::from(avcc.length_size_minus_one & 3) + 1;
    let mut params = Vec::new();
    for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
        params.extend_from_slice(&[0, 0, 0, 1]);
        params.extend_from_slice(&nal.bytes);
    }
    let mut out = Vec::with_capacity(wanted.len());
    let mut budget = limits.max_source_pixels;
    for (start, want) in by_gop {
        let end = (start + 1..samples.len()).find(|&s| samples[s].is_sync).unwrap_or(samples.len());
        // The GOP's pictures in display order, matched to the decoder's output order.
        let mut gop: Vec<usize> = (start..end).collect();
        gop.sort_by_key(|&i| (samples[i].composition_timestamp, i));
        let ranks: Vec<usize> =
            want.iter().map(|&d| gop.iter().position(|&s| s == pictures[d].sample).unwrap_or(usize::MAX)).collect();
        let mut decoded = decode_gop(&data, samples, start..end, &params, length_size, &ranks, &mut budget, limits)?;
        for (d, rank) in want.into_iter().zip(ranks) {
            let pic = pictures[d];
            let image = decoded.get_mut(rank).and_then(Option::take).ok_or_else(|| {
                corrupt(format!(
                    "frame at {} ms did not decode ({} of {} pictures did)",
                    pic.time_ms,
                    decoded.len(),
                    gop.len()
                ))
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

/// Decodes samples `range` (one GOP, decode order); returns its pictures in output order, as
/// RGB only at the `keep` ranks (the rest are decoded as references and dropped). Kept pixels
/// count against `budget`, shared by every GOP of one request.
#[allow(clippy::too_many_arguments, reason = "one private call site")]
fn decode_gop(
    data: &[u8],
    samples: &[re_mp4::Sample],
    range: std::ops::Range<usize>,
    params: &[u8],
    length_size: usize,
    keep_ranks: &[usize],
    budget: &mut u64,
    limits: &Limits,
) -> Result<Vec<Option<RgbImage>>> {
    let fail = |e: openh264::Error| corrupt(format!("H.264: {e}"));
    let api = openh264::OpenH264API::from_source();
    let config = openh264::decoder::DecoderConfig::new().flush_after_decode(openh264::decoder::Flush::NoFlush);
    let mut decoder = openh264::decoder::Decoder::with_api_config(api, config).map_err(fail)?;
    let mut pictures: Vec<Option<RgbImage>> = Vec::new();
    let mut keep = |yuv: &openh264::decoder::DecodedYUV<'_>, rank: usize| -> Result<Option<RgbImage>> {
        if !keep_ranks.contains(&rank) {
            return Ok(None);
        }
        let (w, h) = yuv.dimensions();
        let px = (w as u64).saturating_mul(h as u64);
        limits.check_source(w as u32, h as u32)?;
        *budget = budget.checked_sub(px).ok_or(Error::LimitExceeded {
            limit: LimitKind::SourcePixels,
            max: limits.max_source_pixels,
            actual: limits.max_source_pixels.saturating_add(px),
        })?;
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        Ok(RgbImage::from_raw(w as u32, h as u32, rgb))
    };
    let mut packet = Vec::new();
    for (n, s) in samples[range].iter().enumerate() {
        let sample = data.get(s.byte_range()).ok_or_else(|| Error::Truncated {
            format: "mp4",
            detail: format!("sample {} lies past the end of the data", s.id),
        })?;
        packet.clear();
        if n == 0 {
            packet.extend_from_slice(params);
        }
        let mut rest = sample;
        while !rest.is_empty() {
            let (len, body) = rest.split_at_checked(length_size).ok_or_else(|| corrupt("NAL length cut short"))?;
            let len = len.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            let (nal, tail) = body.split_at_checked(len).ok_or_else(|| corrupt("NAL unit runs past its sample"))?;
            packet.extend_from_slice(&[0, 0, 0, 1]);
            packet.extend_from_slice(nal);
            rest = tail;
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

    /// A small H.264 MP4, made here: `frames` 64x48 pictures of 40 ms whose luma is
    /// `20 + 10 * i`, a keyframe every `gop` pictures.
    pub(crate) fn mp4(frames: usize, gop: usize) -> Vec<u8> {
        let (w, h) = (64usize, 48usize);
        let mut enc = openh264::encoder::Encoder::new().unwrap();
        let (mut sps, mut pps) = (Vec::new(), Vec::new());
        let mut samples: Vec<Vec<u8>> = Vec::new();
        let mut sync = Vec::new();
        for i in 0..frames {
            let mut yuv = vec![(20 + 10 * i) as u8; w * h];
            yuv.extend(std::iter::repeat_n(128u8, w * h / 2));
            let buf = openh264::formats::YUVBuffer::from_vec(yuv, w, h);
            if i % gop == 0 {
                enc.force_intra_frame();
                sync.push(i as u32 + 1);
            }
            let stream = enc.encode(&buf).unwrap().to_vec();
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
        let stills = frames(&video, None, &Select::Times(vec![0, 130, 440]), &Limits::default()).unwrap();
        let got: Vec<(u32, u64, u8)> = stills.iter().map(|s| (s.pos.index, s.pos.time_ms, mean_luma(s))).collect();
        assert_eq!(got.len(), 3);
        for ((index, time, luma), want) in got.iter().zip([0u32, 3, 11]) {
            assert_eq!((*index, *time), (want, u64::from(want) * 40));
            // Video-range luma (16..235) expands to full range in RGB.
            let expected = ((20 + 10 * want as i32 - 16) * 255 / 219) as u8;
            assert!(luma.abs_diff(expected) <= 3, "frame {want}: luma {luma}, expected {expected}");
        }
        let keys = frames(&video, None, &Select::Keyframes, &Limits::default()).unwrap();
        assert_eq!(keys.iter().map(|s| s.pos.index).collect::<Vec<_>>(), [0, 4, 8]);
        let even = frames(&video, None, &Select::Count(2), &Limits::default()).unwrap();
        assert_eq!(even.iter().map(|s| s.pos.index).collect::<Vec<_>>(), [3, 9], "midpoints 120 and 360 ms");
        // Break the first GOP's first sample: frames of the last GOP still decode, because
        // nothing before their keyframe is read; the first GOP's do not.
        let mut broken = video.clone();
        let mdat = broken.windows(4).position(|w| w == b"mdat").unwrap() + 4;
        broken[mdat..mdat + 4].copy_from_slice(&[0xff; 4]);
        let late = frames(&broken, None, &Select::Indices(vec![9]), &Limits::default()).unwrap();
        assert_eq!(late[0].pos.index, 9);
        assert_eq!(
            frames(&broken, None, &Select::Indices(vec![1]), &Limits::default()).unwrap_err().code(),
            "corrupt_input"
        );
    }

    #[test]
    fn limits_and_damage_are_typed_errors() {
        let video = mp4(6, 3);
        let short = Limits { max_frames: 2, ..Limits::default() };
        assert_eq!(frames(&video, None, &Select::All, &short).unwrap_err().code(), "limit_exceeded");
        let tiny = Limits { max_source_pixels: 64 * 48 * 2, ..Limits::default() };
        assert_eq!(frames(&video, None, &Select::All, &tiny).unwrap_err().code(), "limit_exceeded");
        let err = frames(&video, None, &Select::Times(vec![999]), &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "bad_parameter");
        // Cut inside the sample data: the container parses, the samples are missing.
        let cut = &video[..video.len() - 200];
        let err = frames(cut, None, &Select::Indices(vec![5]), &Limits::default()).unwrap_err();
        assert!(matches!(err.code(), "truncated_input" | "corrupt_input"), "{err}");
        // Without its moov a media segment asks for the init segment.
        let err = frames(&video[..24], None, &Select::All, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("init"), "{err}");
        for n in [0, 7, 100, 1000, 3000] {
            let mut broken = video.clone();
            if n < broken.len() {
                broken[n] ^= 0xff;
            }
            let _ = frames(&broken, None, &Select::All, &Limits::default());
        }
    }
}
