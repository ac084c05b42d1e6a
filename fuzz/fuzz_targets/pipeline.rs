//! Fuzzes the engine's untrusted-input surface: sniff + probe + decode + a small pipeline.
//! Any panic, abort or unbounded allocation is a bug; typed errors are the expected outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixflow_imageops::{EncodeOptions, Limits, OutFormat, Pipeline, RunOptions, probe};

fuzz_target!(|data: &[u8]| {
    // Small limits keep each iteration fast; the checks themselves are what is under test.
    let limits = Limits { max_source_pixels: 4_000_000, max_output_pixels: 4_000_000, max_frames: 64, ..Limits::default() };
    let _ = probe(data, &limits, None);
    let pipeline = Pipeline::from_steps([
        ("resize", vec![("width", "64"), ("height", "64"), ("fit", "cover")]),
        ("rotate", vec![("angle", "30")]),
    ])
    .expect("static pipeline");
    let out = EncodeOptions { format: Some(OutFormat::Png), compression: Some(1), ..Default::default() };
    let _ = pipeline.run(data, &RunOptions { limits, final_output: Some(&out), ..Default::default() });
});
