//! The L1 initramfs: a file tree assembled in memory (paths and where their bytes come from),
//! then streamed into a newc cpio archive with `cela_assets::cpio::CpioWriter`.
//!
//! The tree is a sorted map from archive path (relative, `bin/busybox`) to entry, so every
//! directory is written before anything below it, each path is written once, and a conflict (a
//! file where a directory is needed) is found before any byte is written.
//!
//! Host files copied in follow symlinks (the L1 gets the file's contents, like `cp -L`),
//! directories are copied recursively, and an ELF program that names an interpreter (a
//! dynamically linked one) brings its shared libraries and the loader along, at the same paths
//! as on the host, as `ldd` lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cela_assets::cpio::CpioWriter;

use crate::error::{IoContext, LabError};

/// Where an entry's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: String },
}

/// The archive-to-be: archive path → entry.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    entries: BTreeMap<String, Entry>,
}

/// Turns an absolute L1 path (`/lab/x`) into an archive path (`lab/x`), refusing relative paths
/// and `.`/`..` components.
pub(crate) fn archive_path(l1_path: &str) -> Result<String, String> {
    let Some(rel) = l1_path.strip_prefix('/') else {
        return Err(format!("L1 path {l1_path:?} is not absolute"));
    };
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(format!("L1 path {l1_path:?} names the root directory"));
    }
    if parts
        .iter()
        .any(|p| *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(format!("L1 path {l1_path:?} has a '.' or '..' component"));
    }
    Ok(parts.join("/"))
}

impl Tree {
    /// Adds directory `path` (and its parents, mode 0755). An existing directory keeps its mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), String> {
        self.parents(path)?;
        match self.entries.get(path) {
            None => {
                self.entries.insert(path.to_owned(), Entry::Dir { mode });
                Ok(())
            }
            Some(Entry::Dir { .. }) => Ok(()),
            Some(_) => Err(format!(
                "/{path} is already a file; cannot make it a directory"
            )),
        }
    }

    /// Adds a file or symlink at `path`, replacing a file or symlink already there.
    pub fn put(&mut self, path: &str, entry: Entry) -> Result<(), String> {
        self.parents(path)?;
        if let Some(Entry::Dir { .. }) = self.entries.get(path) {
            return Err(format!(
                "/{path} is already a directory; cannot put a file there"
            ));
        }
        self.entries.insert(path.to_owned(), entry);
        Ok(())
    }

    /// Like [`Tree::put`], but leaves an existing entry alone (for shared libraries, which the
    /// caller's own files take precedence over). Returns whether the entry was added.
    pub fn put_if_absent(&mut self, path: &str, entry: Entry) -> Result<bool, String> {
        if self.entries.contains_key(path) {
            return Ok(false);
        }
        self.put(path, entry)?;
        Ok(true)
    }

    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    fn parents(&mut self, path: &str) -> Result<(), String> {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            let parent = &path[..end + slash];
            match self.entries.get(parent) {
                None => {
                    self.entries
                        .insert(parent.to_owned(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => {
                    return Err(format!(
                        "/{parent} is a file, so /{path} cannot be created below it"
                    ));
                }
            }
            end += slash + 1;
        }
        Ok(())
    }

    /// Streams the tree into an uncompressed newc archive at `out`.
    pub fn write_cpio(&self, out: &Path) -> Result<(), LabError> {
        let file = File::create(out).at("creating the L1 initramfs", out)?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for (path, entry) in &self.entries {
            let written = match entry {
                Entry::Dir { mode } => cpio.dir(path, *mode),
                Entry::File {
                    source: Source::Bytes(bytes),
                    mode,
                } => cpio.file(path, *mode, bytes),
                Entry::File {
                    source: Source::Host(src),
                    mode,
                } => cpio
                    .file_from_path(path, *mode, src)
                    .map_err(|e| io::Error::new(e.kind(), format!("from {}: {e}", src.display()))),
                Entry::Symlink { target } => cpio.symlink(path, target),
            };
            written.at("writing initramfs entry", format!("/{path}"))?;
        }
        let mut w = cpio.finish().at("finishing the L1 initramfs", out)?;
        w.flush().at("writing the L1 initramfs", out)?;
        Ok(())
    }
}

/// Copies the host file or directory `src` into the tree at archive path `dest`, and the shared
/// libraries of any dynamically linked ELF program among them.
pub(crate) fn add_host_path(tree: &mut Tree, src: &Path, dest: &str) -> Result<(), LabError> {
    let mut ancestors = BTreeSet::new();
    let mut programs = Vec::new();
    add_recursive(tree, src, dest, &mut ancestors, &mut programs)?;
    for program in programs {
        for lib in shared_libraries(&program)? {
            let lib_str = lib.to_str().ok_or_else(|| {
                LabError::InvalidRun(format!(
                    "shared library path {} (of {}) is not UTF-8",
                    lib.display(),
                    program.display()
                ))
            })?;
            let path = archive_path(lib_str).map_err(LabError::InvalidRun)?;
            let mode = fs::metadata(&lib)
                .at("reading shared library", &lib)?
                .permissions()
                .mode();
            let entry = Entry::File {
                source: Source::Host(lib.clone()),
                mode: mode & 0o7777,
            };
            tree.put_if_absent(&path, entry)
                .map_err(LabError::InvalidRun)?;
        }
    }
    Ok(())
}

fn add_recursive(
    tree: &mut Tree,
    src: &Path,
    dest: &str,
    ancestors: &mut BTreeSet<PathBuf>,
    programs: &mut Vec<PathBuf>,
) -> Result<(), LabError> {
    // fs::metadata follows symlinks: the L1 gets what the link points at.
    let meta = fs::metadata(src).at("reading lab file", src)?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        let real = fs::canonicalize(src).at("resolving lab directory", src)?;
        if !ancestors.insert(real.clone()) {
            return Err(LabError::InvalidRun(format!(
                "{} leads back into one of its own parent directories (a symlink loop)",
                src.display()
            )));
        }
        tree.dir(dest, mode).map_err(LabError::InvalidRun)?;
        let mut children: Vec<_> = fs::read_dir(src)
            .at("listing lab directory", src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .at("listing lab directory", src)?;
        children.sort();
        for name in children {
            let Some(name_str) = name.to_str() else {
                return Err(LabError::InvalidRun(format!(
                    "{} holds a name that is not UTF-8: {name:?}",
                    src.display()
                )));
            };
            let child_dest = format!("{dest}/{name_str}");
            add_recursive(tree, &src.join(&name), &child_dest, ancestors, programs)?;
        }
        ancestors.remove(&real);
    } else if meta.is_file() {
        let entry = Entry::File {
            source: Source::Host(src.to_owned()),
            mode,
        };
        tree.put(dest, entry).map_err(LabError::InvalidRun)?;
        // A file named directly (not found inside a directory) is checked for ELF even without
        // an execute bit; inside directories only executables are, to keep big trees cheap.
        if mode & 0o111 != 0 || ancestors.is_empty() {
            let mut file = File::open(src).at("opening lab file", src)?;
            if names_interpreter(&mut file).at("reading ELF header of", src)? {
                programs.push(src.to_owned());
            }
        }
    } else {
        return Err(LabError::InvalidRun(format!(
            "{} is neither a regular file nor a directory",
            src.display()
        )));
    }
    Ok(())
}

/// Whether `file` is an ELF file with a `PT_INTERP` program header, i.e. a program the kernel
/// starts through a dynamic loader (ELF spec, "Program Header"; 32- and 64-bit, little endian).
pub(crate) fn names_interpreter(file: &mut (impl Read + Seek)) -> io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let mut ident = [0u8; 64];
    let n = read_up_to(file, &mut ident)?;
    if n < 52 || ident[..4] != *b"\x7fELF" || ident[5] != 1 {
        return Ok(false);
    }
    let u16_at = |o: usize| u16::from_le_bytes([ident[o], ident[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(ident[o..o + 4].try_into().unwrap()) as u64;
    let (phoff, phentsize, phnum) = match ident[4] {
        1 => (u32_at(28), u16_at(42), u16_at(44)),
        2 if n >= 64 => (
            u64::from_le_bytes(ident[32..40].try_into().unwrap()),
            u16_at(54),
            u16_at(56),
        ),
        _ => return Ok(false),
    };
    if phentsize < 4 {
        return Ok(false);
    }
    let mut p_type = [0u8; 4];
    for i in 0..phnum {
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        if read_up_to(file, &mut p_type)? < 4 {
            return Ok(false);
        }
        if u32::from_le_bytes(p_type) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The shared libraries and loader `ldd` lists for `program`.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, LabError> {
    let command = format!("ldd {}", program.display());
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| LabError::Command {
            command: command.clone(),
            detail: format!("{e} (ldd comes with libc-bin)"),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            detail: format!(
                "{}: {}{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    parse_ldd(&stdout).map_err(|detail| LabError::Command { command, detail })
}

/// Reads `ldd` output: `name => /path (0x…)`, `/path/to/loader (0x…)`, and `linux-vdso.so.1
/// (0x…)` (in the kernel, nothing to copy). A library ldd could not find is an error.
pub(crate) fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("shared library {} not found", name.trim()));
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn archive_paths_are_relative_and_clean() {
        assert_eq!(archive_path("/lab/x").unwrap(), "lab/x");
        assert_eq!(
            archive_path("//usr//share/qemu/").unwrap(),
            "usr/share/qemu"
        );
        assert!(archive_path("lab/x").is_err());
        assert!(archive_path("/").is_err());
        assert!(archive_path("/lab/../init").is_err());
    }

    #[test]
    fn tree_creates_parents_and_refuses_conflicts() {
        let mut t = Tree::default();
        let file = |b: &[u8]| Entry::File {
            source: Source::Bytes(b.to_vec()),
            mode: 0o644,
        };
        t.dir("tmp", 0o1777).unwrap();
        t.put("a/b/c", file(b"1")).unwrap();
        assert_eq!(t.get("a"), Some(&Entry::Dir { mode: 0o755 }));
        assert_eq!(t.get("a/b"), Some(&Entry::Dir { mode: 0o755 }));
        assert!(t.put("a/b", file(b"x")).is_err());
        assert!(t.put("a/b/c/d", file(b"x")).is_err());
        assert!(t.dir("a/b/c", 0o755).is_err());
        // A later put replaces; put_if_absent does not.
        t.put("a/b/c", file(b"2")).unwrap();
        assert!(!t.put_if_absent("a/b/c", file(b"3")).unwrap());
        assert_eq!(t.get("a/b/c"), Some(&file(b"2")));
        // Sorted order puts every directory before its contents.
        let order: Vec<&str> = t.entries.keys().map(String::as_str).collect();
        assert_eq!(order, ["a", "a/b", "a/b/c", "tmp"]);
    }

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd7d5f2000)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f0e1c0b0000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1becf000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c0f4000)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libz.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let err = parse_ldd("\tlibfoo.so.2 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.2"));
    }

    /// A minimal ELF64 header with `phnum` program headers of the given types.
    fn elf64(types: &[u32]) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            f.extend(ph);
        }
        f
    }

    #[test]
    fn finds_pt_interp() {
        assert!(names_interpreter(&mut Cursor::new(elf64(&[6, 3, 1]))).unwrap());
        assert!(!names_interpreter(&mut Cursor::new(elf64(&[1, 1]))).unwrap());
        assert!(!names_interpreter(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec())).unwrap());
        // Truncated program headers are "no", not an error.
        let mut cut = elf64(&[1, 3]);
        cut.truncate(64 + 56 + 2);
        assert!(!names_interpreter(&mut Cursor::new(cut)).unwrap());
    }

    #[test]
    fn a_host_program_brings_its_loader() {
        // /bin/sh on a Debian host is dynamically linked.
        if let Ok(mut sh) = File::open("/bin/sh") {
            let dynamic = names_interpreter(&mut sh).unwrap();
            if dynamic {
                let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
                assert!(
                    libs.iter()
                        .any(|l| l.to_string_lossy().contains("ld-linux"))
                );
            }
        }
    }
}
