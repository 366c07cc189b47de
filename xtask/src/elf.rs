//! Reads the `DT_SONAME` of a shared library, the way the dynamic loader finds it: program
//! headers -> `PT_DYNAMIC` -> `DT_STRTAB` (an address, mapped to a file offset through the
//! `PT_LOAD` segments) + `DT_SONAME` (an offset into that string table).
//!
//! Done here rather than with `readelf -d` because `setup` needs it before it has installed
//! binutils. Only 64-bit ELF is supported (either byte order); only the headers and the dynamic
//! segment are read, never the whole (200 MB) libLLVM.

use std::{fs::File, os::unix::fs::FileExt as _, path::Path};

use anyhow::{Context as _, Result, bail};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_SONAME: u64 = 14;
/// Longest SONAME accepted; real ones are tens of bytes.
const MAX_SONAME: u64 = 4096;

/// Whether `path` starts with the ELF magic (a linker script or other text file does not).
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).is_ok_and(|f| f.read_exact_at(&mut magic, 0).is_ok() && magic == *b"\x7fELF")
}

/// The SONAME recorded in the dynamic section of the ELF shared library at `path`.
pub fn soname(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    soname_of(&file).with_context(|| format!("cannot read the SONAME of {}", path.display()))
}

struct Reader<'a> {
    file: &'a File,
    big_endian: bool,
}

impl Reader<'_> {
    fn bytes(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("short read of {len} bytes at offset {offset}"))?;
        Ok(buf)
    }

    fn u16(&self, b: &[u8], at: usize) -> u16 {
        let a = [b[at], b[at + 1]];
        if self.big_endian {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }
    }

    fn u32(&self, b: &[u8], at: usize) -> u32 {
        let a = b[at..at + 4].try_into().expect("4 bytes");
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn u64(&self, b: &[u8], at: usize) -> u64 {
        let a = b[at..at + 8].try_into().expect("8 bytes");
        if self.big_endian {
            u64::from_be_bytes(a)
        } else {
            u64::from_le_bytes(a)
        }
    }
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn soname_of(file: &File) -> Result<String> {
    let mut ident = [0u8; 16];
    file.read_exact_at(&mut ident, 0)
        .context("too short for an ELF header")?;
    if ident[..4] != *b"\x7fELF" {
        bail!("not an ELF file");
    }
    if ident[4] != 2 {
        bail!("not a 64-bit ELF file (EI_CLASS {})", ident[4]);
    }
    let big_endian = match ident[5] {
        1 => false,
        2 => true,
        other => bail!("unknown ELF byte order (EI_DATA {other})"),
    };
    let r = Reader { file, big_endian };
    let header = r.bytes(0, 64)?;
    let phoff = r.u64(&header, 32);
    let phentsize = usize::from(r.u16(&header, 54));
    let phnum = usize::from(r.u16(&header, 56));
    if phentsize < 56 {
        bail!("program header entries of {phentsize} bytes are too small");
    }
    let table = r.bytes(phoff, phentsize * phnum)?;
    let segments: Vec<Segment> = table
        .chunks_exact(phentsize)
        .map(|ph| Segment {
            kind: r.u32(ph, 0),
            offset: r.u64(ph, 8),
            vaddr: r.u64(ph, 16),
            filesz: r.u64(ph, 32),
        })
        .collect();
    let dynamic = segments
        .iter()
        .find(|s| s.kind == PT_DYNAMIC)
        .context("no PT_DYNAMIC segment (not a shared library?)")?;
    let dyn_bytes = r.bytes(
        dynamic.offset,
        usize::try_from(dynamic.filesz).context("PT_DYNAMIC too large")?,
    )?;
    let (mut strtab, mut strsz, mut soname) = (None, None, None);
    for entry in dyn_bytes.chunks_exact(16) {
        match r.u64(entry, 0) {
            DT_NULL => break,
            DT_STRTAB => strtab = Some(r.u64(entry, 8)),
            DT_STRSZ => strsz = Some(r.u64(entry, 8)),
            DT_SONAME => soname = Some(r.u64(entry, 8)),
            _ => {}
        }
    }
    let soname = soname.context("no DT_SONAME entry")?;
    let strtab = strtab.context("no DT_STRTAB entry")?;
    let strtab_offset = segments
        .iter()
        .filter(|s| s.kind == PT_LOAD)
        .find(|s| s.vaddr <= strtab && strtab < s.vaddr + s.filesz)
        .map(|s| strtab - s.vaddr + s.offset)
        .context("DT_STRTAB is not inside any PT_LOAD segment")?;
    let limit = strsz.unwrap_or(u64::MAX);
    if soname >= limit {
        bail!("DT_SONAME offset {soname} is outside the string table ({limit} bytes)");
    }
    let len = (limit - soname).min(MAX_SONAME);
    // Read what is there (the string table may end near the end of the file).
    let mut buf = vec![0u8; usize::try_from(len).context("string too long")?];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], strtab_offset + soname + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .context("SONAME is not NUL-terminated")?;
    String::from_utf8(buf[..end].to_vec()).context("SONAME is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit little-endian shared object: ELF header, two program headers (a PT_LOAD
    /// mapping the file at address 0x1000, a PT_DYNAMIC), the dynamic entries, a string table.
    fn tiny_library(soname: &str) -> Vec<u8> {
        const PH: usize = 64;
        const DYN: usize = PH + 2 * 56;
        const STR: usize = DYN + 4 * 16;
        let mut strtab = vec![0u8];
        strtab.extend_from_slice(soname.as_bytes());
        strtab.push(0);
        let mut f = vec![0u8; STR];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // ELFDATA2LSB
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        f[32..40].copy_from_slice(&(PH as u64).to_le_bytes()); // e_phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let total = (STR + strtab.len()) as u64;
        let phdr = |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, vaddr: u64, size: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        };
        phdr(&mut f, PH, PT_LOAD, 0, 0x1000, total);
        phdr(
            &mut f,
            PH + 56,
            PT_DYNAMIC,
            DYN as u64,
            0x1000 + DYN as u64,
            64,
        );
        let dynent = |f: &mut Vec<u8>, i: usize, tag: u64, val: u64| {
            let at = DYN + 16 * i;
            f[at..at + 8].copy_from_slice(&tag.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&val.to_le_bytes());
        };
        dynent(&mut f, 0, DT_STRTAB, 0x1000 + STR as u64);
        dynent(&mut f, 1, DT_STRSZ, strtab.len() as u64);
        dynent(&mut f, 2, DT_SONAME, 1);
        dynent(&mut f, 3, DT_NULL, 0);
        f.extend_from_slice(&strtab);
        f
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("xtask-elf-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_the_soname_of_a_shared_object() {
        let path = temp_file("lib", &tiny_library("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert!(is_elf(&path));
        let got = soname(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.unwrap(), "libLLVM.so.22.1-rust-1.97.0-nightly");
    }

    #[test]
    fn rejects_a_linker_script() {
        let path = temp_file("script", b"INPUT(libLLVM.so.22.1-rust-1.97.0-nightly)\n");
        assert!(!is_elf(&path));
        let got = soname(&path);
        std::fs::remove_file(&path).unwrap();
        let err = format!("{:#}", got.unwrap_err());
        assert!(err.contains("not an ELF file"), "{err}");
    }
}
