//! Pulling images from OCI / Docker v2 registries (OCI distribution spec) with `oci-client`.
//!
//! The manifest is fetched raw (OCI and Docker schema 2 manifests and indexes accepted) and its
//! sha256 computed here: that digest is the image's identity, and checked against the
//! reference's digest when it pins one. An index yields its linux/amd64 manifest, fetched by
//! digest and verified. The config and each layer not already in the store stream into a
//! [`BlobWriter`](crate::store::BlobWriter) and are stored only when their digest and size match
//! the manifest's descriptor. Layers download three at a time.
//!
//! A registry is untrusted. Manifests are requested here rather than by `oci-client` (which
//! reads a reply whole, however long): with the token `oci-client` negotiates (or basic
//! credentials), reading at most [`MAX_METADATA`] bytes within 60 s — a registry that sends an
//! endless body or drips is cut off. Declared sizes are checked before anything is fetched
//! ([`manifest::check_image`]: a config over 8 MiB, a layer over 1 TiB, more than 500 layers),
//! and a blob stream is stopped the moment it passes its descriptor's size. A pull that fails
//! after storing some blobs takes out those no image record names
//! ([`StoreLock::roll_back`](crate::store::StoreLock::roll_back)): the store is left as it was.
//!
//! Registries on this machine (`localhost`, 127.0.0.0/8, `::1`) are spoken to over plain HTTP, as
//! Docker does by default; all others over HTTPS (rustls with the ring provider, the system's
//! trust roots). Credentials come from `docker login`'s config file ([`crate::credentials`]);
//! without an entry for the registry, access is anonymous.

use std::io::Write;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::Descriptor;

use crate::error::IoContext;
use crate::manifest::{self, ACCEPTED, MAX_METADATA, Parsed};
use crate::progress::Progress;
use crate::{Digest, ImageError, ImageRecord, Reference, Store};

/// How many layers download at once.
const PARALLEL_LAYERS: usize = 3;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait for the next bytes of a reply.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a manifest or index may take to arrive whole.
const METADATA_DEADLINE: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("cela/", env!("CARGO_PKG_VERSION"));

/// A registry's error reply in one line: the `errors` of the distribution spec's JSON body
/// (`code: message`), else the start of the text.
fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Reply {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(r) = serde_json::from_slice::<Reply>(body) {
        let parts: Vec<String> = r
            .errors
            .iter()
            .map(|i| match (&i.code, &i.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(t), None) | (None, Some(t)) => t.clone(),
                (None, None) => "?".into(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ").replace(['\n', '\r'], " ");
        }
    }
    let text: String = String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().is_empty() {
        "(no explanation)".into()
    } else {
        text.trim().to_owned()
    }
}

/// Pulls `reference` into `store` and names it by the reference's tag.
pub fn pull(
    store: &Store,
    reference: &str,
    progress: &Progress,
) -> Result<ImageRecord, ImageError> {
    let r: Reference = reference.parse()?;
    // Only the first call in a process installs it; later ones find it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at("starting the network runtime for", "pull")?;
    let auth = match crate::credentials::docker_config_path() {
        Some(path) => crate::credentials::for_registry(&path, &r.registry)?,
        None => RegistryAuth::Anonymous,
    };
    let store = store.journaled();
    rt.block_on(Puller::new(&store, &r, auth, progress)?.run())
}

struct Puller<'a> {
    store: &'a Store,
    r: &'a Reference,
    progress: &'a Progress,
    client: oci_client::Client,
    /// For manifests, read here with a bound (oci-client reads a reply whole).
    http: reqwest::Client,
    oref: oci_client::Reference,
    auth: RegistryAuth,
}

impl<'a> Puller<'a> {
    fn new(
        store: &'a Store,
        r: &'a Reference,
        auth: RegistryAuth,
        progress: &'a Progress,
    ) -> Result<Self, ImageError> {
        let protocol = if r.is_loopback_registry() {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = oci_client::Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..Default::default()
        });
        // Built as oci-client builds its own.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| ImageError::Registry {
                registry: r.registry.clone(),
                message: format!("cannot be spoken to: no HTTP client ({e})"),
            })?;
        let oref = match (&r.tag, &r.digest) {
            (_, Some(d)) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.to_string(),
            ),
            (Some(t), None) => {
                oci_client::Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
            }
            (None, None) => unreachable!("a parsed reference has a tag or a digest"),
        };
        Ok(Puller {
            store,
            r,
            progress,
            client,
            http,
            oref,
            auth,
        })
    }

    /// Fetches a manifest or index (`oref` names it by tag or digest), reading no more than
    /// [`MAX_METADATA`] bytes and for no longer than [`METADATA_DEADLINE`]: a registry that
    /// sends without end, or drips, is cut off. Authenticates as oci-client does (a bearer
    /// token from the registry's challenge, else basic credentials).
    async fn get_manifest(
        &self,
        oref: &oci_client::Reference,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let token = self
            .client
            .auth(oref, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.registry_error(&e))?;
        let scheme = if self.r.is_loopback_registry() {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{}",
            oref.resolve_registry(),
            oref.repository(),
            oref.digest().or(oref.tag()).unwrap_or("latest")
        );
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPTED.join(", "));
        match (token, &self.auth) {
            (Some(t), _) => req = req.bearer_auth(t),
            (None, RegistryAuth::Basic(user, password)) => {
                req = req.basic_auth(user, Some(password))
            }
            _ => {}
        }
        let refuse = |message: String| ImageError::Registry {
            registry: self.r.registry.clone(),
            message,
        };
        let too_large = || {
            refuse(format!(
                "sent more than {MAX_METADATA} bytes for {what}, more than a manifest may have; refused"
            ))
        };
        let read = async {
            let mut resp = req.send().await.map_err(|e| self.registry_error(&e))?;
            let status = resp.status();
            if resp.content_length().is_some_and(|n| n > MAX_METADATA) {
                return Err(too_large());
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.registry_error(&e))? {
                if (body.len() + chunk.len()) as u64 > MAX_METADATA {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                return Err(refuse(format!(
                    "answered {status}: Not authorized to read {what} ({}); are the credentials of `docker login` for it right?",
                    error_text(&body)
                )));
            }
            if !status.is_success() {
                return Err(refuse(format!(
                    "answered {status} for {what}: {}",
                    error_text(&body)
                )));
            }
            Ok(body)
        };
        tokio::time::timeout(METADATA_DEADLINE, read)
            .await
            .unwrap_or_else(|_| {
                Err(refuse(format!(
                    "did not send {what} within {} s; refused",
                    METADATA_DEADLINE.as_secs()
                )))
            })
    }

    fn registry_error(&self, e: &(dyn std::error::Error + 'static)) -> ImageError {
        // A connection that never happened is said plainly, with the innermost cause.
        let unreachable = match e.downcast_ref::<OciDistributionError>() {
            Some(OciDistributionError::RequestError(r)) => r.is_connect() || r.is_timeout(),
            _ => e
                .downcast_ref::<reqwest::Error>()
                .is_some_and(|r| r.is_connect() || r.is_timeout()),
        };
        let mut chain = vec![e.to_string()];
        let mut source = e.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !chain.iter().any(|c| c.contains(&text)) {
                chain.push(text);
            }
            source = s.source();
        }
        let message = if unreachable {
            format!(
                "cannot be reached ({}) while pulling {}; is it running, and is the address right?",
                chain.last().expect("at least one"),
                self.r.familiar()
            )
        } else {
            format!(
                "failed while pulling {}: {}",
                self.r.familiar(),
                chain.join(": ")
            )
        };
        ImageError::Registry {
            registry: self.r.registry.clone(),
            message,
        }
    }

    async fn run(self) -> Result<ImageRecord, ImageError> {
        let what = self.r.familiar();
        let step = self.progress.step(format!("resolving {what}"));
        let bytes = self
            .get_manifest(&self.oref, &format!("the manifest of {what}"))
            .await?;
        let mut digest = Digest::of(&bytes);
        if let Some(pinned) = &self.r.digest {
            crate::digest::verify(
                &format!("manifest of {what}"),
                pinned,
                None,
                &digest,
                bytes.len() as u64,
            )?;
        }
        let (m, bytes) = match manifest::parse(&format!("manifest of {what}"), &bytes)? {
            Parsed::Manifest(m) => (m, bytes),
            Parsed::Index(index) => {
                let desc = manifest::pick_platform(&what, &index)?;
                let d = manifest::digest_of(&what, desc)?;
                let by_digest = oci_client::Reference::with_digest(
                    self.r.registry.clone(),
                    self.r.repository.clone(),
                    d.to_string(),
                );
                let bytes = self
                    .get_manifest(&by_digest, &format!("the linux/amd64 manifest of {what}"))
                    .await?;
                let actual = Digest::of(&bytes);
                let what = format!("linux/amd64 manifest of {what}");
                crate::digest::verify(&what, &d, Some(desc.size()), &actual, bytes.len() as u64)?;
                digest = actual;
                match manifest::parse(&what, &bytes)? {
                    Parsed::Manifest(m) => (m, bytes),
                    Parsed::Index(_) => {
                        return Err(ImageError::BadManifest {
                            what,
                            why: "an index inside an index".into(),
                        });
                    }
                }
            }
        };
        manifest::check_image(&what, &m)?;
        step.done();

        let lock = self.store.content_lock()?;
        let stored = self.store_image(&what, &m, &bytes, digest).await;
        if stored.is_err() {
            lock.roll_back(self.store);
        }
        stored
    }

    /// Fetches the config and layers of a checked manifest and records the image.
    async fn store_image(
        &self,
        what: &str,
        m: &oci_spec::image::ImageManifest,
        bytes: &[u8],
        digest: Digest,
    ) -> Result<ImageRecord, ImageError> {
        self.fetch(m.config(), &format!("config of {what}"), false)
            .await?;
        let n = m.layers().len();
        let layers: Vec<(&Descriptor, String)> = m
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| (l, format!("layer {}/{n} of {what}", i + 1)))
            .collect();
        // Up to PARALLEL_LAYERS downloads at once; the first failure drops the others (and
        // with them their unfinished temporary blobs).
        futures_util::stream::iter(layers.iter().map(Ok))
            .try_for_each_concurrent(PARALLEL_LAYERS, |(l, w)| self.fetch(l, w, true))
            .await?;
        self.store
            .put_bytes(&format!("manifest of {what}"), bytes, Some(&digest))?;
        let rec = manifest::record(
            self.store,
            digest,
            m,
            self.r.name().into_iter().collect(),
            format!("pull {}", self.r),
        )?;
        self.store.commit_image(rec)
    }

    /// Streams one blob into the store, verified; a blob already there is not fetched. A
    /// layer's step is keyed by its short digest, for a reader of progress events (Docker's
    /// pull shows layers by it).
    async fn fetch(&self, desc: &Descriptor, what: &str, layer: bool) -> Result<(), ImageError> {
        let d = manifest::digest_of(what, desc)?;
        let key = layer.then(|| d.short());
        if self.store.has_blob(&d) {
            if let Some(k) = key {
                self.progress.present(k, what);
            }
            return Ok(());
        }
        let size = desc.size();
        let step = self
            .progress
            .step_keyed(key, format!("pulling {what} ({})", d.short()));
        step.set_total_bytes(size);
        let oci_desc = OciDescriptor {
            media_type: desc.media_type().to_string(),
            digest: d.to_string(),
            size: size as i64,
            ..Default::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.oref, &oci_desc)
            .await
            .map_err(|e| self.registry_error(&e))?;
        let mut w = self.store.blob_writer()?;
        let tmp = self.store.root().join("tmp");
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too, at the end of the stream: let the store's
                // own check name a mismatch the same way for every source.
                Err(e) if w.written() == size => {
                    w.commit(what, Some(&d), Some(size))?;
                    return Err(self.registry_error(&e));
                }
                Err(e) => return Err(self.registry_error(&e)),
            };
            w.write_all(&chunk).at("writing to", &tmp)?;
            step.set_bytes(w.written());
            if w.written() > size {
                return Err(ImageError::TooLong {
                    what: what.to_owned(),
                    expected: size,
                });
            }
        }
        w.commit(what, Some(&d), Some(size))?;
        step.done();
        Ok(())
    }
}
