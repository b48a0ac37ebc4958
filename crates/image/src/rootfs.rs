//! Root file systems from stored images, for the instance code: the layers as separate
//! directories to stack with OverlayFS (containers: lowest first; add a fresh upper directory
//! per instance), or flattened into one tree (the input of an ext4 disk for microVMs).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::unpack::{UnpackStats, Whiteouts, apply_layer};
use crate::{ImageError, ImageRecord, Store};

/// Unpacks `image`'s layers, in order, into `dest` (an existing, normally empty directory) with
/// whiteouts applied.
pub fn flatten(store: &Store, image: &ImageRecord, dest: &Path) -> Result<UnpackStats, ImageError> {
    let _lock = store.content_lock()?;
    let mut total = UnpackStats::default();
    let n = image.layers.len();
    for (i, l) in image.layers.iter().enumerate() {
        let label = format!(
            "layer {}/{n} ({}) of image {}",
            i + 1,
            l.digest.short(),
            image.digest.short()
        );
        let s = apply_layer(&store.blob_path(&l.digest), &label, dest, Whiteouts::Apply)?;
        total.entries += s.entries;
        total.whiteouts += s.whiteouts;
        total.skipped_devices += s.skipped_devices;
        total.dropped_xattrs += s.dropped_xattrs;
    }
    Ok(total)
}

/// The image's layers, each unpacked into its own directory with OverlayFS whiteout markers,
/// lowest first: the `lowerdir`s of an overlay mount (which lists them highest first). The
/// directories are cached in the store by layer digest and shared between images; they must
/// not be written to. Needs root.
pub fn layer_dirs(store: &Store, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
    let _lock = store.content_lock()?;
    let n = image.layers.len();
    let mut dirs = Vec::with_capacity(n);
    for (i, l) in image.layers.iter().enumerate() {
        let dest = store.layers_dir().join(l.digest.hex());
        if !dest.is_dir() {
            let tmp = tempfile::Builder::new()
                .prefix("layer-")
                .tempdir_in(store.tmp_dir())
                .at("creating a temporary directory in", store.tmp_dir())?;
            let label = format!(
                "layer {}/{n} ({}) of image {}",
                i + 1,
                l.digest.short(),
                image.digest.short()
            );
            apply_layer(
                &store.blob_path(&l.digest),
                &label,
                tmp.path(),
                Whiteouts::Overlay,
            )?;
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
                .at("setting mode of", tmp.path())?;
            // Another process may have finished the same layer meanwhile: theirs is as good.
            if let Err(e) = fs::rename(tmp.path(), &dest)
                && !dest.is_dir()
            {
                return Err(e).at("storing unpacked layer", &dest);
            }
        }
        dirs.push(dest);
    }
    Ok(dirs)
}
