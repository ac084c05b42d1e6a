//! Fuzzes the engine's untrusted-input surface: sniff + probe + decode + small pipelines, video
//! frame extraction, and the same bytes read as a `compose` template (YAML/JSON or SVG).
//! Any panic, abort or unbounded allocation is a bug; typed errors are the expected outcome.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use pixflow_imageops::{EncodeOptions, Limits, OutFormat, Pipeline, RunOptions, probe};

fuzz_target!(|data: &[u8]| {
    // Small limits keep each iteration fast; the checks themselves are what is under test.
    let limits = Limits { max_source_pixels: 4_000_000, max_output_pixels: 4_000_000, max_frames: 64, ..Limits::default() };
    let out = EncodeOptions { format: Some(OutFormat::Png), compression: Some(1), ..Default::default() };
    let run = RunOptions { limits, final_output: Some(&out), ..Default::default() };
    let _ = probe(data, &limits, None);
    let still = Pipeline::from_steps([
        ("resize", vec![("width", "64"), ("height", "64"), ("fit", "cover")]),
        ("rotate", vec![("angle", "30")]),
    ])
    .expect("static pipeline");
    let _ = still.run(data, &run);
    // Animations and video (MP4/MOV/fMP4/TS demux, H.264 decode) through `frames`.
    let frames = Pipeline::from_steps([("frames", vec![("count", "2")]), ("resize", vec![("width", "32")])])
        .expect("static pipeline");
    let _ = frames.run(data, &run);
    // The bytes as an untrusted poster template.
    let compose = Pipeline::from_steps([("compose", vec![("template", "t")])]).expect("static pipeline");
    let inputs = BTreeMap::from([("t".to_owned(), data.to_vec())]);
    let _ = compose.run(&[], &RunOptions { inputs: Some(&inputs), ..run });
});
