//! One call of a function, whoever makes it (an HTTP request, the asynchronous workers, a CDN
//! preset; triggers and workflows later): where its inputs are ([`Source`]: bytes it carries,
//! a stored object, a URL), reading them under the function's limits and the node's memory
//! ticket ([`resolve`]), running the function, and storing the results where the call or the
//! manifest says ([`store_results`]), described as objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use pixflow_runtime::function::NodeTicket;
use pixflow_runtime::{Function, Invocation, Output, Produced};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Error;
use crate::App;

/// How the caller spoke, so the answer (now or from the queue) speaks the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Raw,
    Json,
}

/// A stored object named as an input; with `etag`, only that content is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectRef {
    pub bucket: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// An input the node reads itself: a stored object or a URL (queued as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Remote {
    Object(ObjectRef),
    Url(String),
}

/// Where an input's bytes are.
pub(crate) enum Source {
    /// Carried by the call (bounded by the function's request limit).
    Inline(Vec<u8>),
    /// Read by the node when the call runs.
    Remote(Remote),
    /// Read by the node already, on the caller's behalf (the CDN's source object), and held
    /// under the caller's ticket.
    Read(Vec<u8>),
}

impl Remote {
    /// Refuses now what would only fail when read: a missing object, a URL the policy refuses.
    pub(crate) async fn check(&self, app: &App) -> Result<(), Error> {
        match self {
            Remote::Object(r) => app.objects.head(&r.bucket, &r.key).await.map(|_| ()).map_err(Error::from),
            Remote::Url(u) => app.config.url_policy.check(u).map(|_| ()).map_err(Error::from),
        }
    }

    /// Reads the bytes under the function's input limit; they join the call's ticket.
    async fn read(&self, app: &App, f: &Function, ticket: Option<&mut NodeTicket>) -> Result<Vec<u8>, Error> {
        match self {
            Remote::Object(r) => read_stored(app, f, r, ticket).await,
            Remote::Url(u) => fetch_url(app, f, u, ticket).await,
        }
    }
}

/// Where results go, as a call names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputRequest {
    pub bucket: String,
    /// Key template (see `pixflow_runtime::output`).
    pub key: String,
}

impl OutputRequest {
    pub(crate) fn target(&self) -> Result<pixflow_runtime::OutputTarget, Error> {
        pixflow_backends::objects::check_bucket(&self.bucket)?;
        let spec = pixflow_runtime::OutputSpec { bucket: self.bucket.clone(), key: self.key.clone() };
        pixflow_runtime::OutputTarget::parse(&spec).map_err(|e| Error::Invalid(format!("output.{e}")))
    }
}

/// Where a call's results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// Where the manifest's `output` says, else back to the caller.
    Default,
    /// Stored where the call says.
    To(OutputRequest),
    /// Back to the caller, whatever the manifest says (the CDN serves them).
    Caller,
}

/// A call of a function, before its stored inputs are read.
pub(crate) struct Call {
    pub input: Option<Source>,
    pub inputs: BTreeMap<String, Source>,
    pub params: Vec<(String, String)>,
    /// Parameters the platform sets (the CDN's negotiated format), not the caller.
    pub platform: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub mode: Mode,
    pub output: Destination,
    /// An asynchronous invocation's attempt: it waits for the function's capacity behind the
    /// callers waiting for an answer (see `pixflow_runtime::Invocation::background`).
    pub background: bool,
}

impl Call {
    /// Bytes the call carried itself (what `max_request_bytes` bounds).
    pub(crate) fn inline_bytes(&self) -> u64 {
        let inline = |s: &Source| if let Source::Inline(b) = s { b.len() as u64 } else { 0 };
        self.input.as_ref().map_or(0, inline) + self.inputs.values().map(inline).sum::<u64>()
    }

    /// The key of the main input when it is a stored object (what `{source_key}` fills in).
    fn source_key(&self) -> Option<&str> {
        match &self.input {
            Some(Source::Remote(Remote::Object(r))) => Some(&r.key),
            _ => None,
        }
    }

    /// Where this call's results are stored, if anywhere; refuses an output key template
    /// that names the source key of an input that has none.
    pub(crate) fn target(&self, f: &Function) -> Result<Option<pixflow_runtime::OutputTarget>, Error> {
        let target = match &self.output {
            Destination::Default => f.deployment.output.clone(),
            Destination::To(o) => Some(o.target()?),
            Destination::Caller => None,
        };
        match &target {
            Some(t) if t.key.needs_source() && self.source_key().is_none() => Err(Error::Invalid(format!(
                "output key `{}` names the source key: send the input as an object reference",
                t.key.as_str()
            ))),
            _ => Ok(target),
        }
    }
}

/// What a call produced.
pub(crate) struct Done {
    /// The function that ran (a newer version than the one called, if that one was retired
    /// while the call's input arrived).
    pub function: Arc<Function>,
    pub output: Output,
    /// The objects the results were stored as, when the call stores them (a process
    /// function's error answer is never stored).
    pub stored: Option<Vec<Value>>,
}

/// Runs a call now: reads its stored inputs (joining `ticket`, the node's hold on the call's
/// bytes, when the caller has one), invokes the function (its newest version when `f` was
/// retired meanwhile), and stores the results when the call or the manifest says where, under
/// keys that may name `id` (a fresh invocation id when `None`).
pub(crate) async fn call(
    app: &App,
    f: Arc<Function>,
    call: Call,
    mut ticket: Option<NodeTicket>,
    id: Option<&str>,
) -> Result<Done, Error> {
    let target = call.target(&f)?;
    let (invocation, source_key) = resolve(app, &f, call, ticket.as_mut()).await?;
    // A new version may have rolled out while the input arrived: the call goes to it.
    let f = match app.registry.get(&f.deployment.name) {
        Some(latest) if f.is_retired() => latest,
        _ => f,
    };
    let output = pixflow_runtime::invoke(&app.node, &f, invocation, app.foreign.clone(), ticket).await?;
    let stored = match &target {
        // A process function's error is relayed, not stored.
        Some(_) if matches!(&output.produced, Produced::Reply(r) if !(200..300).contains(&r.status)) => None,
        Some(t) => {
            let id = match id {
                Some(id) => id.to_owned(),
                None => crate::auth::invocation_id().map_err(|e| Error::Internal(e.to_string()))?,
            };
            let results = storable(&output.produced);
            Some(store_results(app, &f.deployment.name, t, source_key.as_deref(), &id, results).await?)
        }
        None => None,
    };
    Ok(Done { function: f, output, stored })
}

/// Reads one stored input: refused before reading when larger than the function takes, or
/// when the node cannot hold it (the bytes join the call's ticket); `etag` pins the content.
async fn read_stored(
    app: &App,
    f: &Function,
    r: &ObjectRef,
    ticket: Option<&mut NodeTicket>,
) -> Result<Vec<u8>, Error> {
    let limit = f.deployment.quota.limits.max_input_bytes;
    let head = app.objects.head(&r.bucket, &r.key).await?;
    if head.size > limit {
        return Err(pixflow_backends::ObjectError::TooLarge { limit, actual: head.size }.into());
    }
    let mut ticket = ticket;
    if let Some(t) = ticket.as_deref_mut() {
        t.grow(head.size)?;
    }
    // Replaced by a larger version since the lookup: still within the limit, and held too.
    let (meta, bytes) = app.objects.read(&r.bucket, &r.key, limit).await?;
    if let Some(t) = ticket
        && bytes.len() as u64 > head.size
    {
        t.grow(bytes.len() as u64 - head.size)?;
    }
    if let Some(etag) = r.etag.as_ref().filter(|e| **e != meta.etag) {
        return Err(Error::Changed { bucket: r.bucket.clone(), key: r.key.clone(), etag: etag.clone() });
    }
    Ok(bytes)
}

/// Fetches a URL source (allowed origins, public addresses, the function's input limit); its
/// bytes join the call's ticket.
async fn fetch_url(app: &App, f: &Function, url: &str, mut ticket: Option<&mut NodeTicket>) -> Result<Vec<u8>, Error> {
    let mut reserve = |n: u64| match ticket.as_deref_mut() {
        Some(t) => t.grow(n),
        None => Ok(()),
    };
    let limit = f.deployment.quota.limits.max_input_bytes;
    Ok(crate::fetch::fetch(&app.config.url_policy, url, limit, &mut reserve).await?)
}

/// The invocation with every stored input read; the key of the stored main input, if any.
pub(crate) async fn resolve(
    app: &App,
    f: &Function,
    call: Call,
    mut ticket: Option<&mut NodeTicket>,
) -> Result<(Invocation, Option<String>), Error> {
    let source_key = call.source_key().map(str::to_owned);
    let mut referenced = 0u64;
    let input = match call.input {
        None => Vec::new(),
        Some(source) => bytes_of(app, f, source, ticket.as_deref_mut(), &mut referenced).await?,
    };
    let mut inputs = BTreeMap::new();
    for (name, source) in call.inputs {
        inputs.insert(name, bytes_of(app, f, source, ticket.as_deref_mut(), &mut referenced).await?);
    }
    let invocation = Invocation {
        input,
        params: call.params,
        inputs,
        content_type: call.content_type,
        referenced_bytes: referenced,
        platform_params: call.platform,
        background: call.background,
    };
    Ok((invocation, source_key))
}

/// An input's bytes; those the node read itself are added to `referenced`.
async fn bytes_of(
    app: &App,
    f: &Function,
    source: Source,
    ticket: Option<&mut NodeTicket>,
    referenced: &mut u64,
) -> Result<Vec<u8>, Error> {
    let bytes = match source {
        Source::Inline(b) => return Ok(b),
        Source::Read(b) => b,
        Source::Remote(r) => r.read(app, f, ticket).await?,
    };
    *referenced += bytes.len() as u64;
    Ok(bytes)
}

/// One result to store: its bytes and what it is.
pub(crate) struct Stored<'a> {
    pub bytes: &'a [u8],
    pub content_type: &'a str,
    pub ext: &'a str,
    pub name: Option<&'a str>,
    pub width: u32,
    pub height: u32,
    /// Facts about the result to show beside the object (size, frame, ...).
    pub meta: Value,
}

/// Stores results under the target's keys (all keys distinct, checked before anything is
/// written), as writes of `function` (invoked by a client: one hop), and describes the objects.
pub(crate) async fn store_results(
    app: &App,
    function: &str,
    target: &pixflow_runtime::OutputTarget,
    source_key: Option<&str>,
    id: &str,
    results: Vec<Stored<'_>>,
) -> Result<Vec<Value>, Error> {
    use sha2::Digest as _;
    let mut keys = Vec::with_capacity(results.len());
    for (index, r) in results.iter().enumerate() {
        let hash = hex::encode(sha2::Sha256::digest(r.bytes));
        let vars = pixflow_runtime::KeyVars {
            source_key,
            name: r.name,
            ext: r.ext,
            width: r.width,
            height: r.height,
            index,
            hash: &hash,
            id,
        };
        let key = target.key.expand(&vars).map_err(|e| Error::Invalid(format!("output: {e}")))?;
        pixflow_backends::objects::check_key(&key)
            .map_err(|e| Error::Invalid(format!("output key `{key}` (from `{}`): {e}", target.key.as_str())))?;
        if keys.contains(&key) {
            return Err(Error::Invalid(format!(
                "output: key template `{}` gives `{key}` to two renditions; use {{name}}, {{index}} or {{hash}}",
                target.key.as_str()
            )));
        }
        keys.push(key);
    }
    let public = app.objects.bucket(&target.bucket).await?.is_some_and(|b| b.config.public);
    let objects = app.objects.by(pixflow_backends::Actor::function(function, 1));
    let mut described = Vec::with_capacity(results.len());
    for (r, key) in results.into_iter().zip(keys) {
        let meta = objects
            .put(&target.bucket, &key, r.content_type, &BTreeMap::new(), &pixflow_backends::Condition::None, r.bytes)
            .await?;
        let mut v = r.meta;
        if let (Value::Object(v), Value::Object(o)) = (&mut v, crate::objects::describe_object(app, &meta, public)) {
            v.extend(o);
        }
        described.push(v);
    }
    Ok(described)
}

/// The results of a run as storable items.
pub(crate) fn storable(produced: &Produced) -> Vec<Stored<'_>> {
    match produced {
        Produced::Renditions(renditions) => renditions
            .iter()
            .map(|r| Stored {
                bytes: &r.bytes,
                content_type: r.format.mime(),
                ext: r.format.extension(),
                name: r.name.as_deref(),
                width: r.width,
                height: r.height,
                meta: rendition_meta(r),
            })
            .collect(),
        Produced::Reply(reply) => vec![Stored {
            bytes: &reply.bytes,
            content_type: &reply.content_type,
            ext: extension_of(&reply.content_type),
            name: None,
            width: 0,
            height: 0,
            meta: json!({"content_type": reply.content_type, "size": reply.bytes.len()}),
        }],
    }
}

/// The `{ext}` of a process function's answer: its media type's, `json`, else `bin`.
fn extension_of(content_type: &str) -> &'static str {
    match pixflow_imageops::OutFormat::from_mime(content_type) {
        Some(f) => f.extension(),
        None if content_type.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) => {
            "json"
        }
        None => "bin",
    }
}

/// What a rendition is, without its bytes.
pub(crate) fn rendition_meta(r: &pixflow_imageops::Rendition) -> Value {
    let mut v = json!({
        "name": r.name,
        "content_type": r.format.mime(),
        "width": r.width,
        "height": r.height,
        "size": r.bytes.len(),
    });
    if let Some(pos) = r.frame {
        v["frame"] = json!({"index": pos.index, "time_ms": pos.time_ms, "duration_ms": pos.duration_ms});
    }
    v
}
