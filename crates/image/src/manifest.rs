//! Manifests and indexes as registries and layouts serve them: OCI image manifests and indexes
//! (OCI image spec, "Image Manifest", "Image Index") and their Docker v2 schema 2 twins (same
//! JSON shape, other media types). Parsed with `oci-spec`; this module tells them apart, picks
//! linux/amd64 out of an index, checks that a manifest is a container image cela can unpack,
//! and turns it into an [`ImageRecord`].

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;

use crate::store::{ImageRecord, LayerRecord};
use crate::{Digest, ImageError, Store};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Every manifest media type cela accepts, for a registry's `Accept` header.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// The largest manifest, index or config cela reads (registries cap manifests at 4 MiB).
pub const MAX_METADATA: u64 = 8 << 20;

/// The largest layer a manifest may declare. Far above any real layer, far below what would
/// overflow an arithmetic on sizes or be taken for a fill-the-disk attempt unnoticed.
pub const MAX_LAYER: u64 = 1 << 40;

/// The most layers an image may have (OverlayFS stacks at most 500 lower directories).
pub const MAX_LAYERS: usize = 500;

/// A manifest or an index.
#[derive(Debug)]
pub enum Parsed {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
}

/// Parses manifest or index bytes; `what` names them in errors. The media type comes from the
/// JSON's `mediaType` (or, if absent, from its shape).
pub fn parse(what: &str, bytes: &[u8]) -> Result<Parsed, ImageError> {
    let bad = |why: String| ImageError::BadManifest {
        what: what.to_owned(),
        why,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    if probe.schema_version != Some(2) {
        return Err(bad(format!(
            "schemaVersion {:?} is not 2 (Docker schema 1 manifests are not supported)",
            probe.schema_version
        )));
    }
    let is_index = match probe.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => return Err(bad(format!("unsupported media type {other}"))),
        None => probe.manifests.is_some(),
    };
    if is_index {
        ImageIndex::from_reader(bytes)
            .map(|i| Parsed::Index(Box::new(i)))
            .map_err(|e| bad(format!("not an image index: {e}")))
    } else {
        ImageManifest::from_reader(bytes)
            .map(|m| Parsed::Manifest(Box::new(m)))
            .map_err(|e| bad(format!("not an image manifest: {e}")))
    }
}

/// Refuses a descriptor of a manifest or index that declares more than [`MAX_METADATA`].
pub fn check_metadata_size(what: &str, d: &Descriptor) -> Result<(), ImageError> {
    if d.size() > MAX_METADATA {
        return Err(ImageError::BadManifest {
            what: what.to_owned(),
            why: format!(
                "{} declares {} bytes, more than the {MAX_METADATA} a manifest may have",
                d.digest(),
                d.size()
            ),
        });
    }
    Ok(())
}

/// The linux/amd64 manifest of an index.
pub fn pick_platform<'a>(what: &str, index: &'a ImageIndex) -> Result<&'a Descriptor, ImageError> {
    let found = index.manifests().iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    });
    if let Some(d) = found {
        check_metadata_size(what, d)?;
    }
    found.ok_or_else(|| {
        let have: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| format!("{}/{}", p.os(), p.architecture()))
            .collect();
        ImageError::BadManifest {
            what: what.to_owned(),
            why: format!(
                "no linux/amd64 image in the index (it has: {})",
                if have.is_empty() {
                    "no platforms".into()
                } else {
                    have.join(", ")
                }
            ),
        }
    })
}

/// Checks that a manifest describes a container image whose layers cela can unpack.
pub fn check_image(what: &str, m: &ImageManifest) -> Result<(), ImageError> {
    let bad = |why: String| ImageError::BadManifest {
        what: what.to_owned(),
        why,
    };
    let cfg = m.config().media_type().to_string();
    if cfg != OCI_CONFIG && cfg != DOCKER_CONFIG {
        return Err(bad(format!(
            "not a container image (its config is {cfg}, an artifact rather than an image)"
        )));
    }
    if m.config().size() > MAX_METADATA {
        return Err(bad(format!(
            "its config declares {} bytes, more than the {MAX_METADATA} a config may have",
            m.config().size()
        )));
    }
    if m.layers().len() > MAX_LAYERS {
        return Err(bad(format!(
            "{} layers, more than the {MAX_LAYERS} cela stacks",
            m.layers().len()
        )));
    }
    for (i, l) in m.layers().iter().enumerate() {
        if l.size() > MAX_LAYER {
            return Err(bad(format!(
                "layer {} declares {} bytes, more than the {MAX_LAYER} a layer may have",
                i + 1,
                l.size()
            )));
        }
        let t = l.media_type().to_string();
        let ok = (t.starts_with("application/vnd.oci.image.layer.v1.tar")
            || t.starts_with("application/vnd.docker.image.rootfs.diff.tar"))
            && !t.contains("nondistributable");
        if !ok {
            return Err(bad(format!(
                "layer {} has media type {t}, which cela cannot unpack",
                i + 1
            )));
        }
    }
    Ok(())
}

/// A descriptor's digest as cela's [`Digest`] (sha256 only).
pub fn digest_of(what: &str, d: &Descriptor) -> Result<Digest, ImageError> {
    d.digest()
        .to_string()
        .parse()
        .map_err(|e: ImageError| ImageError::BadManifest {
            what: what.to_owned(),
            why: e.to_string(),
        })
}

/// The record of an image whose manifest, config and layers are stored.
pub fn record(
    store: &Store,
    digest: Digest,
    m: &ImageManifest,
    names: Vec<String>,
    source: String,
) -> Result<ImageRecord, ImageError> {
    let what = format!("image {digest}");
    let config = digest_of(&what, m.config())?;
    let cfg_bytes = store.read_blob(&config)?;
    let cfg =
        ImageConfiguration::from_reader(&cfg_bytes[..]).map_err(|e| ImageError::BadManifest {
            what: format!("config {config}"),
            why: format!("not an image config: {e}"),
        })?;
    let diff_ids = cfg.rootfs().diff_ids().len();
    if diff_ids != m.layers().len() {
        return Err(ImageError::BadManifest {
            what,
            why: format!(
                "the manifest has {} layers but the config lists {diff_ids}",
                m.layers().len()
            ),
        });
    }
    let layers = m
        .layers()
        .iter()
        .map(|l| {
            Ok(LayerRecord {
                digest: digest_of(&what, l)?,
                size: l.size(),
                media_type: l.media_type().to_string(),
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(ImageRecord {
        digest,
        names,
        config,
        size: layers.iter().map(|l| l.size).sum(),
        layers,
        created: cfg.created().clone(),
        added: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        source,
    })
}

/// An OCI manifest for a config and layers (for images cela assembles on import). The JSON
/// is deterministic, so the same content always gets the same digest.
pub fn synthesize(config: (&Digest, u64), layers: &[(Digest, u64, &str)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, size, t)| serde_json::json!({"mediaType": t, "digest": d.to_string(), "size": size}))
        .collect();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0.to_string(), "size": config.1},
        "layers": layers,
    });
    serde_json::to_vec(&m).expect("JSON values serialize")
}

/// The PATH of the configs cela writes (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Stores a config and manifest for a one-layer image whose layer blob is stored, and records
/// the image. `diff_id` is the digest of the uncompressed layer; the config runs `cmd` with
/// [`DEFAULT_PATH`] and says how it was made (`created_by`). No creation time is recorded, so the
/// same layer always makes the same image.
#[allow(clippy::too_many_arguments)]
pub(crate) fn single_layer_image(
    store: &Store,
    what: &str,
    layer: (Digest, u64, &str),
    diff_id: &Digest,
    cmd: &[&str],
    created_by: &str,
    names: Vec<String>,
    source: String,
) -> Result<ImageRecord, ImageError> {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [DEFAULT_PATH], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        "history": [{"created_by": created_by}],
    });
    let cfg_bytes = serde_json::to_vec(&config).expect("JSON values serialize");
    let config = store.put_bytes(&format!("config of {what}"), &cfg_bytes, None)?;
    let bytes = synthesize((&config, cfg_bytes.len() as u64), &[layer]);
    let digest = store.put_bytes(&format!("manifest of {what}"), &bytes, None)?;
    let Parsed::Manifest(m) = parse(what, &bytes)? else {
        unreachable!("a synthesized manifest is a manifest")
    };
    let rec = record(store, digest, &m, names, source)?;
    store.commit_image(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn docker_and_oci_manifests_parse_alike() {
        for t in [OCI_MANIFEST, DOCKER_MANIFEST] {
            let layer_t = if t == OCI_MANIFEST {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            };
            let cfg_t = if t == OCI_MANIFEST {
                OCI_CONFIG
            } else {
                DOCKER_CONFIG
            };
            let json = format!(
                r#"{{"schemaVersion":2,"mediaType":"{t}","config":{{"mediaType":"{cfg_t}","digest":"{}","size":10}},
                "layers":[{{"mediaType":"{layer_t}","digest":"{}","size":20}}]}}"#,
                d(1),
                d(2)
            );
            let Parsed::Manifest(m) = parse("m", json.as_bytes()).unwrap() else {
                panic!("{t} parsed as an index");
            };
            check_image("m", &m).unwrap();
            assert_eq!(digest_of("m", &m.layers()[0]).unwrap().to_string(), d(2));
        }
    }

    #[test]
    fn indexes_yield_linux_amd64_or_say_what_they_have() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d(1),
            d(2)
        );
        let Parsed::Index(i) = parse("i", json.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(pick_platform("i", &i).unwrap().digest().to_string(), d(2));
        let arm_only = json.replace("\"amd64\"", "\"s390x\"");
        let Parsed::Index(i) = parse("i", arm_only.as_bytes()).unwrap() else {
            panic!()
        };
        let e = pick_platform("busybox", &i).unwrap_err().to_string();
        assert!(
            e.contains("no linux/amd64") && e.contains("linux/arm64"),
            "{e}"
        );
    }

    #[test]
    fn artifacts_schema1_and_foreign_layers_are_refused() {
        let e = parse("x", br#"{"schemaVersion":1,"name":"a"}"#).unwrap_err();
        assert!(e.to_string().contains("schema 1"), "{e}");
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{}","size":10}},"layers":[]}}"#,
            d(1)
        );
        let Parsed::Manifest(m) = parse("chart", json.as_bytes()).unwrap() else {
            panic!()
        };
        assert!(
            check_image("chart", &m)
                .unwrap_err()
                .to_string()
                .contains("not a container image")
        );
    }

    #[test]
    fn synthesized_manifests_are_deterministic_and_parse() {
        let c = Digest::of(b"config");
        let l = Digest::of(b"layer");
        let a = synthesize(
            (&c, 6),
            &[(l.clone(), 5, "application/vnd.oci.image.layer.v1.tar")],
        );
        let b = synthesize((&c, 6), &[(l, 5, "application/vnd.oci.image.layer.v1.tar")]);
        assert_eq!(a, b);
        let Parsed::Manifest(m) = parse("s", &a).unwrap() else {
            panic!()
        };
        check_image("s", &m).unwrap();
    }

    #[test]
    fn absurd_declared_sizes_are_refused() {
        let m = |cfg_size: u64, layer_size: u64| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":{cfg_size}}},
                "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{layer_size}}}]}}"#,
                d(1),
                d(2)
            )
        };
        for (json, needle) in [
            (
                m(10, i64::MAX as u64),
                "layer 1 declares 9223372036854775807 bytes",
            ),
            (m(10, u64::MAX), "layer 1 declares"),
            (m(1 << 40, 10), "its config declares"),
        ] {
            let Parsed::Manifest(man) = parse("huge", json.as_bytes()).unwrap() else {
                panic!()
            };
            let e = check_image("huge", &man).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let Parsed::Manifest(ok) = parse("ok", m(10, MAX_LAYER).as_bytes()).unwrap() else {
            panic!()
        };
        check_image("ok", &ok).unwrap();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d(1),
            u64::MAX
        );
        let Parsed::Index(i) = parse("i", index.as_bytes()).unwrap() else {
            panic!()
        };
        let e = pick_platform("i", &i).unwrap_err().to_string();
        assert!(e.contains("a manifest may have"), "{e}");
    }
}
