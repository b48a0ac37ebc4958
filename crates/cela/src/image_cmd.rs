//! `cela pull` and `cela image import|ls|rm`: thin commands over the `cela-image` store.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cela_image::{ImageRecord, Progress, Store};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST] (registries on localhost or
    /// 127.0.0.0/8 are reached over plain HTTP).
    #[arg(value_name = "REF")]
    reference: String,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout (directory or tar), a `docker save` archive, or a plain
    /// rootfs tarball (which becomes a one-layer image).
    Import {
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// Name the imported image NAME[:TAG] (default: the names the archive carries).
        #[arg(long, value_name = "NAME[:TAG]")]
        name: Option<String>,
    },
    /// Build an image: `debian` makes a minimal Debian root file system with debootstrap
    /// (needs root and a reachable Debian mirror), stored as `debian:SUITE`.
    Build {
        #[arg(value_enum)]
        distro: Distro,
        /// The Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// The Debian mirror debootstrap fetches from.
        #[arg(long, default_value = cela_image::debootstrap::DEFAULT_MIRROR, value_name = "URL")]
        mirror: String,
        /// Name the image NAME[:TAG] (default: debian:SUITE).
        #[arg(long, value_name = "NAME[:TAG]")]
        name: Option<String>,
    },
    /// List stored images.
    #[command(alias = "list")]
    Ls {
        /// Output format: a table, or a JSON array of image records.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove an image name, or an image (by digest or its last name); blobs no image uses
    /// any more are deleted. An image an instance uses is refused.
    #[command(alias = "remove")]
    Rm {
        /// Take the names off an image instances use (it stays, as <none>, until none does).
        #[arg(short = 'f', long)]
        force: bool,
        /// NAME[:TAG], a digest, or a unique digest prefix.
        #[arg(value_name = "REF", required = true)]
        references: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Distro {
    Debian,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Format {
    Table,
    Json,
}

/// Bars on stderr only when it is a terminal.
pub fn progress() -> Progress {
    if std::io::stderr().is_terminal() {
        Progress::new()
    } else {
        Progress::hidden()
    }
}

pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
    Ok(Store::open(data_dir)?)
}

pub fn pull(args: PullArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let store = open(data_dir)?;
    let started = std::time::Instant::now();
    let rec = cela_image::pull(&store, &args.reference, &progress())?;
    out!(
        "pulled {} {} ({}, {}) in {:.1}s",
        rec.familiar_names()
            .first()
            .cloned()
            .unwrap_or_else(|| args.reference.clone()),
        rec.digest,
        layers(&rec),
        human_size(rec.size),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn image(cmd: ImageCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let store = open(data_dir)?;
    match cmd {
        ImageCommand::Import { path, name } => {
            let recs = cela_image::import(&store, &path, name.as_deref(), &progress())?;
            for rec in recs {
                let names = rec.familiar_names();
                out!(
                    "imported {} {} ({}, {})",
                    if names.is_empty() {
                        "<none>".to_owned()
                    } else {
                        names.join(", ")
                    },
                    rec.digest,
                    layers(&rec),
                    human_size(rec.size)
                );
            }
        }
        ImageCommand::Build {
            distro: Distro::Debian,
            suite,
            mirror,
            name,
        } => {
            let started = std::time::Instant::now();
            let rec =
                cela_image::build_debian(&store, &suite, &mirror, name.as_deref(), &progress())?;
            out!(
                "built {} {} ({}) in {:.0}s",
                rec.familiar_names().join(", "),
                rec.digest,
                human_size(rec.size),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Ls { format } => {
            let images = store.list()?;
            match format {
                Format::Json => {
                    let json = serde_json::to_string_pretty(&images).context("encoding JSON")?;
                    out!("{json}");
                }
                Format::Table => print_table(&images),
            }
        }
        ImageCommand::Rm { force, references } => {
            let instances = cela_instance::Instances::open(data_dir)?;
            for r in references {
                let removed = cela_instance::images::remove(&store, &instances, &r, force)
                    .map_err(|e| match e {
                        e @ cela_instance::InstanceError::ImageInUse { .. } => {
                            anyhow::anyhow!("{e} (--force untags it)")
                        }
                        e => e.into(),
                    })?;
                for n in &removed.untagged {
                    out!("untagged {}", cela_image::reference::familiar_name(n));
                }
                if let Some(d) = &removed.deleted {
                    out!(
                        "deleted {d} (freed {} in {} blobs)",
                        human_size(removed.bytes_freed),
                        removed.blobs_freed
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(images: &[ImageRecord]) {
    let mut rows = vec![[
        "NAME".to_owned(),
        "DIGEST".to_owned(),
        "LAYERS".to_owned(),
        "SIZE".to_owned(),
        "CREATED".to_owned(),
    ]];
    for i in images {
        let names = i.familiar_names();
        let names = if names.is_empty() {
            vec!["<none>".to_owned()]
        } else {
            names
        };
        for n in names {
            rows.push([
                n,
                i.digest.short().to_owned(),
                i.layers.len().to_string(),
                human_size(i.size),
                i.created.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out!("{}", line.join("  ").trim_end());
    }
}

fn layers(rec: &ImageRecord) -> String {
    match rec.layers.len() {
        1 => "1 layer".into(),
        n => format!("{n} layers"),
    }
}

/// Bytes in binary units, one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
    }
}
