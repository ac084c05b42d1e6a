//! An S3 server in the calling process, for tests of the S3 backend: `s3s-fs` over a folder
//! (each subfolder a bucket), SigV4 with one key pair, on a loopback port.

use std::path::Path;

/// The key pair the server accepts.
pub const ACCESS_KEY: &str = "pixflow-test";
pub const SECRET_KEY: &str = "pixflow-test-secret-key";

/// Starts the server over `root` (the folder must exist); returns its URL. It runs until the
/// process's runtime stops.
pub async fn start(root: &Path) -> std::io::Result<String> {
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let service = service.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// A configuration of the S3 backend that reaches the server at `endpoint`.
pub fn config(endpoint: String) -> super::S3Config {
    super::S3Config {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        access_key: Some(ACCESS_KEY.into()),
        secret_key: Some(SECRET_KEY.into()),
        virtual_hosted: false,
    }
}
