//! Kernel modules of an unpacked kernel package, and the order to load them in.
//!
//! A Debian kernel package ships `lib/modules/<ver>/kernel/**.ko` but no `modules.dep`: depmod
//! writes that at install time. We compute the same thing from the modules themselves: every
//! module's ELF section `.modinfo` holds NUL-separated `key=value` strings, and the build
//! (modpost) records there `depends=a,b`, the modules whose symbols it uses. Built-in modules
//! never appear in `depends=`; `modules.builtin` lists them, so asking for a built-in module is
//! satisfied without a file. Soft dependencies (`softdep=`, hints for modprobe) are not
//! followed; none of the modules cela loads has one.
//!
//! A module's name is its file name without `.ko[.xz|.zst|.gz]`, with `-` read as `_`
//! (`kvm-amd.ko` is `kvm_amd`). Compressed modules (Ubuntu, newer Debian) are decompressed with
//! the `xz`, `zstd` or `gzip` command.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::IoContext;
use crate::{AssetError, cmd};

/// The suffixes a module file may have, with the command that decompresses each.
const SUFFIXES: [(&str, Option<&str>); 4] = [
    (".ko", None),
    (".ko.xz", Some("xz")),
    (".ko.zst", Some("zstd")),
    (".ko.gz", Some("gzip")),
];

/// The canonical form of a module name: `-` and `_` are the same to the kernel.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a module file (`.../kvm-amd.ko.xz` → `kvm_amd`), or `None` when the file
/// is not a module.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    SUFFIXES
        .iter()
        .find_map(|(suffix, _)| file.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())
        .map(normalize)
}

/// The bytes of a module file, decompressed if needed.
pub fn read_module(path: &Path) -> Result<Vec<u8>, AssetError> {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let tool = SUFFIXES
        .iter()
        .find(|(suffix, _)| file.ends_with(suffix))
        .and_then(|(_, tool)| *tool);
    match tool {
        None => std::fs::read(path).at("reading kernel module", path),
        Some(tool) => {
            cmd::require(
                tool,
                "it decompresses the kernel's modules; install it (xz-utils, zstd, gzip)",
            )?;
            cmd::stdout(
                Command::new(tool).arg("-dc").arg(path),
                "the module file may be corrupt: remove the asset cache to fetch it again",
            )
        }
    }
}

/// The `key=value` strings of a module's `.modinfo` section, in order.
pub fn modinfo(image: &[u8]) -> Result<Vec<(String, String)>, String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(image).map_err(|e| format!("not an ELF object: {e}"))?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let data = section
        .data()
        .map_err(|e| format!("unreadable .modinfo section: {e}"))?;
    Ok(data
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect())
}

/// The names (normalized) in a module's `depends=` entry.
pub fn depends(path: &Path) -> Result<Vec<String>, AssetError> {
    let image = read_module(path)?;
    let info = modinfo(&image).map_err(|reason| AssetError::BadModule {
        path: path.to_owned(),
        reason,
    })?;
    Ok(info
        .iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .filter(|d| !d.is_empty())
        .map(normalize)
        .collect())
}

/// Every module of one kernel: files by name, and the names built into the kernel.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Indexes `lib/modules/<ver>` of an unpacked kernel. Files under `updates/` win over
    /// others of the same name, as with depmod's default search order.
    pub fn scan(modules_dir: &Path) -> Result<Self, AssetError> {
        let mut found = Vec::new();
        walk(modules_dir, &mut found)?;
        found.sort();
        let mut files = BTreeMap::new();
        for path in found {
            let Some(name) = module_name(&path) else {
                continue;
            };
            let is_update = path
                .strip_prefix(modules_dir)
                .is_ok_and(|p| p.starts_with("updates"));
            if is_update || !files.contains_key(&name) {
                files.insert(name, path);
            }
        }
        let builtin_list = modules_dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_list) {
            Ok(text) => text
                .lines()
                .filter_map(|l| module_name(Path::new(l)))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e).at("reading", builtin_list),
        };
        Ok(ModuleIndex {
            dir: modules_dir.to_owned(),
            files,
            builtin,
        })
    }

    /// The file of module `name` (either spelling), if it is a loadable module.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files.get(&normalize(name)).map(PathBuf::as_path)
    }

    /// Whether `name` is built into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The module files needed to load `names`: each with its dependencies, dependencies first,
    /// each once. Built-in modules need no file and are left out.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<PathBuf>, AssetError> {
        self.closure_with(names, depends)
    }

    fn closure_with(
        &self,
        names: &[&str],
        mut deps_of: impl FnMut(&Path) -> Result<Vec<String>, AssetError>,
    ) -> Result<Vec<PathBuf>, AssetError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in names {
            let mut path = Vec::new();
            self.visit(
                &normalize(name),
                None,
                &mut deps_of,
                &mut done,
                &mut path,
                &mut order,
            )?;
        }
        Ok(order)
    }

    /// Depth-first: a module is pushed after all of its dependencies. `stack` is the chain of
    /// modules being visited, to report a cycle.
    fn visit(
        &self,
        name: &str,
        needed_by: Option<&str>,
        deps_of: &mut impl FnMut(&Path) -> Result<Vec<String>, AssetError>,
        done: &mut HashSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), AssetError> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|n| n == name) {
            stack.push(name.to_owned());
            return Err(AssetError::ModuleCycle(stack.join(" -> ")));
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(AssetError::ModuleNotFound {
                name: name.to_owned(),
                needed_by: needed_by.map(str::to_owned),
                dir: self.dir.clone(),
            });
        };
        stack.push(name.to_owned());
        for dep in deps_of(file)? {
            self.visit(&dep, Some(name), deps_of, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(file.clone());
        Ok(())
    }
}

/// Collects every regular file below `dir`, not following symlinks (an installed tree has
/// `build` and `source` links into kernel headers).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), AssetError> {
    for entry in std::fs::read_dir(dir).at("listing kernel modules in", dir)? {
        let entry = entry.at("listing kernel modules in", dir)?;
        let kind = entry.file_type().at("reading", entry.path())?;
        if kind.is_dir() {
            walk(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(
            module_name(Path::new("a/kvm-amd.ko")).as_deref(),
            Some("kvm_amd")
        );
        assert_eq!(
            module_name(Path::new("virtio-rng.ko.zst")).as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name(Path::new("tun.ko.xz")).as_deref(), Some("tun"));
        assert_eq!(module_name(Path::new("modules.order")), None);
        assert_eq!(module_name(Path::new(".ko")), None);
    }

    /// A minimal ELF64 relocatable object with a `.modinfo` section holding `modinfo`.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_at = 64;
        let shstrtab_at = modinfo_at + modinfo.len();
        let shdrs_at = (shstrtab_at + shstrtab.len()).next_multiple_of(8);
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&1u16.to_le_bytes()); // e_type: ET_REL
        elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
        elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_entry
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_phoff
        elf.extend_from_slice(&(shdrs_at as u64).to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 0, 0, 64, 3, 2] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            elf.extend_from_slice(&half.to_le_bytes());
        }
        elf.extend_from_slice(modinfo);
        elf.extend_from_slice(shstrtab);
        elf.resize(shdrs_at, 0);
        let shdr = |name: u32, kind: u32, offset: usize, size: usize| {
            let mut h = Vec::new();
            h.extend_from_slice(&name.to_le_bytes());
            h.extend_from_slice(&kind.to_le_bytes());
            for v in [0u64, 0, offset as u64, size as u64] {
                h.extend_from_slice(&v.to_le_bytes()); // flags, addr, offset, size
            }
            h.extend_from_slice(&[0; 8]); // link, info
            h.extend_from_slice(&1u64.to_le_bytes()); // addralign
            h.extend_from_slice(&0u64.to_le_bytes()); // entsize
            h
        };
        elf.extend(shdr(0, 0, 0, 0));
        elf.extend(shdr(1, 1, modinfo_at, modinfo.len())); // SHT_PROGBITS
        elf.extend(shdr(10, 3, shstrtab_at, shstrtab.len())); // SHT_STRTAB
        elf
    }

    #[test]
    fn modinfo_is_read_from_an_elf_section() {
        let elf = elf_with_modinfo(
            b"license=GPL\0depends=kvm,irq-bypass\0\0name=kvm_amd\0vermagic=6.1.0 SMP\0",
        );
        let info = modinfo(&elf).unwrap();
        assert_eq!(info[1], ("depends".into(), "kvm,irq-bypass".into()));
        assert_eq!(info[2], ("name".into(), "kvm_amd".into()));
        assert_eq!(info.len(), 4);

        let dir = tempfile::tempdir().unwrap();
        let ko = dir.path().join("kvm-amd.ko");
        std::fs::write(&ko, &elf).unwrap();
        assert_eq!(depends(&ko).unwrap(), ["kvm", "irq_bypass"]);
        std::fs::write(&ko, elf_with_modinfo(b"depends=\0")).unwrap();
        assert!(depends(&ko).unwrap().is_empty());

        std::fs::write(&ko, b"not an elf").unwrap();
        let err = depends(&ko).unwrap_err().to_string();
        assert!(
            err.contains("kvm-amd.ko") && err.contains("not an ELF"),
            "{err}"
        );
    }

    #[test]
    fn compressed_modules_are_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        let ko = dir.path().join("tun.ko");
        std::fs::write(&ko, elf_with_modinfo(b"depends=a-b\0")).unwrap();
        let status = Command::new("xz").arg(&ko).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("xz is not installed; skipping");
            return;
        }
        assert_eq!(depends(&dir.path().join("tun.ko.xz")).unwrap(), ["a_b"]);
    }

    /// An index over files that need not exist, with dependencies from a table.
    fn fake(
        modules: &[(&str, &[&str])],
        builtin: &[&str],
    ) -> (
        ModuleIndex,
        impl FnMut(&Path) -> Result<Vec<String>, AssetError>,
    ) {
        let files = modules
            .iter()
            .map(|(n, _)| (n.to_string(), PathBuf::from(format!("/m/{n}.ko"))))
            .collect();
        let deps: HashMap<PathBuf, Vec<String>> = modules
            .iter()
            .map(|(n, d)| {
                (
                    PathBuf::from(format!("/m/{n}.ko")),
                    d.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        let index = ModuleIndex {
            dir: "/m".into(),
            files,
            builtin: builtin.iter().map(|s| s.to_string()).collect(),
        };
        (index, move |p: &Path| Ok(deps[p].clone()))
    }

    fn names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| module_name(p).unwrap()).collect()
    }

    #[test]
    fn closure_puts_dependencies_first_once() {
        let (index, deps) = fake(
            &[
                ("kvm_amd", &["kvm"]),
                ("kvm", &["irqbypass"]),
                ("irqbypass", &[]),
                ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
                ("virtio", &["virtio_ring"]),
                ("virtio_ring", &[]),
                ("net_failover", &["failover"]),
                ("failover", &[]),
                ("virtio_rng", &["virtio", "rng_core"]),
            ],
            &["rng_core"],
        );
        let got = index
            .closure_with(&["kvm-amd", "virtio_net", "kvm", "virtio_rng"], deps)
            .unwrap();
        assert_eq!(
            names(&got),
            [
                "irqbypass",
                "kvm",
                "kvm_amd",
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
    }

    #[test]
    fn builtin_modules_need_no_file_and_unknown_ones_are_named() {
        let (index, deps) = fake(&[("a", &["b"])], &["rng_core"]);
        let (index2, deps2) = fake(&[("a", &[])], &["rng_core"]);
        assert!(
            index2
                .closure_with(&["rng-core"], deps2)
                .unwrap()
                .is_empty()
        );
        let err = index.closure_with(&["a"], deps).unwrap_err().to_string();
        assert!(
            err.starts_with("kernel module b (needed by a) is neither in /m"),
            "{err}"
        );
    }

    #[test]
    fn cycles_are_reported() {
        let (index, deps) = fake(&[("a", &["b"]), ("b", &["a"])], &[]);
        let err = index.closure_with(&["a"], deps).unwrap_err().to_string();
        assert!(err.ends_with("a -> b -> a"), "{err}");
    }

    #[test]
    fn scan_indexes_files_and_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("kernel/arch/x86/kvm")).unwrap();
        std::fs::create_dir_all(d.join("updates")).unwrap();
        std::fs::write(
            d.join("kernel/arch/x86/kvm/kvm-amd.ko"),
            elf_with_modinfo(b"depends=\0"),
        )
        .unwrap();
        std::fs::write(d.join("kernel/tun.ko"), b"").unwrap();
        std::fs::write(d.join("updates/tun.ko"), b"").unwrap();
        std::fs::write(d.join("modules.builtin"), "kernel/crypto/rng-core.ko\n").unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.join("build")).unwrap();
        let index = ModuleIndex::scan(d).unwrap();
        assert_eq!(
            index.path("kvm_amd"),
            Some(d.join("kernel/arch/x86/kvm/kvm-amd.ko").as_path())
        );
        assert_eq!(index.path("tun"), Some(d.join("updates/tun.ko").as_path()));
        assert!(index.is_builtin("rng_core"));
        assert_eq!(
            index.closure(&["kvm_amd"]).unwrap(),
            [d.join("kernel/arch/x86/kvm/kvm-amd.ko")]
        );
    }
}
