//! Command-line and environment overrides of the engine's limits (`PIXFLOW_MAX_*`).

use pixflow_imageops::Limits;

#[derive(clap::Args, Debug, Default)]
pub struct LimitArgs {
    /// Largest input in bytes [default: 64 MiB].
    #[arg(long, env = "PIXFLOW_MAX_INPUT_BYTES")]
    max_input_bytes: Option<u64>,
    /// Largest source image in pixels [default: 100 000 000].
    #[arg(long, env = "PIXFLOW_MAX_SOURCE_PIXELS")]
    max_source_pixels: Option<u64>,
    /// Largest output image in pixels [default: 50 000 000].
    #[arg(long, env = "PIXFLOW_MAX_OUTPUT_PIXELS")]
    max_output_pixels: Option<u64>,
    /// Most animation frames [default: 1000].
    #[arg(long, env = "PIXFLOW_MAX_FRAMES")]
    max_frames: Option<u64>,
    /// Longest video in seconds [default: 14400].
    #[arg(long, env = "PIXFLOW_MAX_VIDEO_SECONDS")]
    max_video_seconds: Option<u64>,
    /// Time budget per operation in milliseconds [default: 30000].
    #[arg(long, env = "PIXFLOW_MAX_OP_MILLIS")]
    max_op_millis: Option<u64>,
}

impl LimitArgs {
    pub fn resolve(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_input_bytes: self.max_input_bytes.unwrap_or(d.max_input_bytes),
            max_source_pixels: self.max_source_pixels.unwrap_or(d.max_source_pixels),
            max_source_dimension: d.max_source_dimension,
            max_output_pixels: self.max_output_pixels.unwrap_or(d.max_output_pixels),
            max_frames: self.max_frames.unwrap_or(d.max_frames),
            max_video_seconds: self.max_video_seconds.unwrap_or(d.max_video_seconds),
            max_op_millis: self.max_op_millis.unwrap_or(d.max_op_millis),
        }
    }
}
