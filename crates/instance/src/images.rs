//! Images and the instances made from them: an image an instance uses is not removed (its
//! layers would vanish under a running container, and `start` would fail later), and garbage
//! collection never takes what an instance's record names.
//!
//! The race with `cela run` is closed by the image store's locks: a run holds the store's
//! content lock (shared) from resolving its image until its instance is recorded
//! ([`Store::content_lock`]), and [`remove`] asks which images are in use only once the store's
//! gc lock is held exclusively.

use std::collections::HashSet;

use cela_image::{Digest, ImageError, Removed, Store};

use crate::error::InstanceError;
use crate::record::Instances;

/// Removes the image `input` names (a name, a digest, a unique digest prefix), unless an
/// instance uses it: then it is refused, naming the instances, or with `force` only untagged
/// (kept, listed as `<none>`, for its instances; a later removal by digest deletes it once
/// none uses it).
pub fn remove(
    store: &Store,
    instances: &Instances,
    input: &str,
    force: bool,
) -> Result<Removed, InstanceError> {
    let users = |digest: &Digest| -> Vec<String> {
        instances
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.config.image_digest == digest.to_string())
            .map(|i| i.config.name)
            .collect()
    };
    // An instance whose record cannot be read may use any image: then none is deleted.
    let in_use = || -> Result<HashSet<Digest>, String> {
        let (good, broken) = instances.scan().map_err(|e| e.to_string())?;
        if !broken.is_empty() {
            let ids: Vec<&str> = broken.iter().map(|b| b.id.as_str()).collect();
            return Err(format!(
                "the records of instances {} cannot be read",
                ids.join(", ")
            ));
        }
        Ok(good
            .iter()
            .filter_map(|i| i.config.image_digest.parse().ok())
            .collect())
    };
    match store.remove(input, in_use, force) {
        Err(ImageError::InUse { image, digest }) => Err(InstanceError::ImageInUse {
            image,
            users: users(&digest),
        }),
        other => Ok(other?),
    }
}
