//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux, and a module's split BTF
//! beside it): the ids and parameter counts of functions (for kfunc calls), struct sizes
//! and the byte offsets of struct members (for reading kernel objects the way this
//! kernel build lays them out). aya 0.14 keeps struct members private, and
//! a function's id is all the kfunc loader needs, so the two lookups are done here on
//! the raw blob (format: Documentation/bpf/btf.rst).

use std::collections::{HashMap, hash_map::Entry};

const BTF_DIR: &str = "/sys/kernel/btf";
const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading the kernel's BTF ({path}): {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF ({path}) is malformed: {reason}")]
    Malformed { path: String, reason: String },
    #[error("struct {name} has no member {member} in the kernel's BTF")]
    NoMember { name: String, member: String },
    #[error("struct {name} is not in the kernel's BTF")]
    NoStruct { name: String },
    #[error(
        "opening module {module}'s BTF object ({operation}): {source}{hint}",
        hint = if source.raw_os_error() == Some(libc::EPERM) {
            " (walking the kernel's BTF objects needs CAP_SYS_ADMIN)"
        } else {
            ""
        }
    )]
    ModuleFd {
        module: String,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("module {module} is loaded but the kernel lists no BTF object of that name")]
    NoModuleBtf { module: String },
}

/// A function in BTF: its type id and how many parameters its prototype has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function {
    pub id: u32,
    pub params: u16,
}

/// A struct in BTF: its size and its members' byte offsets.
#[derive(Debug, Default)]
struct Struct {
    size: u32,
    members: HashMap<String, u32>,
}

/// Named functions and structs of one BTF blob: vmlinux's, or a module's (split BTF,
/// whose type ids and string offsets continue vmlinux's).
#[derive(Debug, Default)]
pub struct KernelBtf {
    functions: HashMap<String, Function>,
    /// First definition wins.
    structs: HashMap<String, Struct>,
    /// FUNC_PROTO type id -> parameter count (kept for the modules' split BTF).
    protos: HashMap<u32, u16>,
    /// The first type id after this blob's.
    next_id: u32,
    /// The string section (kept for the modules' split BTF, which refers into it).
    strings: Vec<u8>,
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::read(VMLINUX, None)
    }

    /// Module `name`'s BTF (/sys/kernel/btf/NAME), `None` when the module is not
    /// loaded or has no BTF. `vmlinux` is its base.
    pub fn module(name: &str, vmlinux: &KernelBtf) -> Result<Option<Self>, BtfError> {
        let path = format!("{BTF_DIR}/{name}");
        if !std::path::Path::new(&path).exists() {
            return Ok(None);
        }
        Self::read(&path, Some(vmlinux)).map(Some)
    }

    fn read(path: &str, base: Option<&KernelBtf>) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&data, base).map_err(|reason| BtfError::Malformed {
            path: path.to_owned(),
            reason,
        })
    }

    /// Function `name`, if this BTF has it.
    pub fn function(&self, name: &str) -> Option<Function> {
        self.functions.get(name).copied()
    }

    /// The size of struct `name`, if this BTF has it.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        self.structs.get(name).map(|s| s.size)
    }

    /// The byte offset of `member` in struct `name`.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let found = self.structs.get(name).ok_or_else(|| BtfError::NoStruct {
            name: name.to_owned(),
        })?;
        found
            .members
            .get(member)
            .copied()
            .ok_or_else(|| BtfError::NoMember {
                name: name.to_owned(),
                member: member.to_owned(),
            })
    }

    fn parse(data: &[u8], base: Option<&KernelBtf>) -> Result<Self, String> {
        let u16_at = |off: usize| -> Result<u16, String> {
            data.get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or_else(|| format!("truncated at {off}"))
        };
        let u32_at = |off: usize| -> Result<u32, String> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("truncated at {off}"))
        };
        if u16_at(0)? != MAGIC {
            return Err("bad magic (not little-endian BTF)".into());
        }
        let hdr_len = u32_at(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(format!("header length {hdr_len}"));
        }
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("string section out of bounds")?;
        // Split BTF: offsets below the base's string section are the base's strings.
        let base_strings: &[u8] = base.map_or(&[], |b| &b.strings);
        let name = |off: u32| -> Result<&str, String> {
            let off = off as usize;
            let rest = match off.checked_sub(base_strings.len()) {
                None => &base_strings[off..],
                Some(own) => strings
                    .get(own..)
                    .ok_or_else(|| format!("name offset {off} out of bounds"))?,
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            std::str::from_utf8(&rest[..end]).map_err(|e| format!("name at {off}: {e}"))
        };

        let mut btf = Self::default();
        // (name, id, prototype id) of each function, resolved once all types are read.
        let mut functions = Vec::new();
        let mut off = types.start;
        // Type ids start at 1 (0 is void), after the base's in split BTF.
        let mut id = base.map_or(1, |b| b.next_id);
        while off < types.end {
            let name_off = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let size_or_type = u32_at(off + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let body = off + TYPE_LEN;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                _ => 0,
            };
            match kind {
                KIND_FUNC => functions.push((name(name_off)?, id, size_or_type)),
                KIND_FUNC_PROTO => {
                    btf.protos.insert(id, vlen as u16);
                }
                KIND_STRUCT if name_off != 0 => {
                    if let Entry::Vacant(slot) = btf.structs.entry(name(name_off)?.to_owned()) {
                        let mut members = HashMap::new();
                        for m in 0..vlen {
                            let at = body + m * 12;
                            let bits = u32_at(at + 8)?;
                            // With kind_flag, the high 8 bits are a bitfield's size.
                            let bit_offset = if kind_flag { bits & 0x00ff_ffff } else { bits };
                            members.insert(name(u32_at(at)?)?.to_owned(), bit_offset / 8);
                        }
                        slot.insert(Struct {
                            size: size_or_type,
                            members,
                        });
                    }
                }
                _ => {}
            }
            off = body + extra;
            id += 1;
        }
        if off != types.end {
            return Err("type section does not end on a type boundary".into());
        }
        for (function, id, proto) in functions {
            let params = btf
                .protos
                .get(&proto)
                .or_else(|| base.and_then(|b| b.protos.get(&proto)))
                .copied()
                .ok_or_else(|| format!("function {function}: type {proto} is no prototype"))?;
            btf.functions
                .entry(function.to_owned())
                .or_insert(Function { id, params });
        }
        btf.next_id = id;
        if base.is_none() {
            btf.strings = strings.to_vec();
        }
        Ok(btf)
    }
}

/// `struct bpf_btf_info`.
#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// A file descriptor of module `name`'s BTF object, as the kernel wants it in a
/// program's `fd_array` for calls to the module's kfuncs. The kernel hands these out
/// by id only (`BPF_BTF_GET_NEXT_ID`, `BPF_BTF_GET_FD_BY_ID`: CAP_SYS_ADMIN).
pub fn module_btf_fd(name: &str) -> Result<std::os::fd::OwnedFd, BtfError> {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use crate::sys::{BPF_BTF_GET_FD_BY_ID, BPF_BTF_GET_NEXT_ID, bpf, obj_info};
    let error = |operation, source| BtfError::ModuleFd {
        module: name.to_owned(),
        operation,
        source,
    };
    let mut id = 0u32;
    loop {
        // { start_id, next_id, open_flags }
        let mut attr = [id, 0, 0];
        // SAFETY: BPF_BTF_GET_NEXT_ID's layout, no pointers.
        unsafe { bpf(BPF_BTF_GET_NEXT_ID, &mut attr) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                BtfError::NoModuleBtf {
                    module: name.to_owned(),
                }
            } else {
                error("BPF_BTF_GET_NEXT_ID", e)
            }
        })?;
        id = attr[1];
        // { btf_id, next_id, open_flags }
        let mut attr = [id, 0, 0];
        // SAFETY: BPF_BTF_GET_FD_BY_ID's layout, no pointers.
        let fd = match unsafe { bpf(BPF_BTF_GET_FD_BY_ID, &mut attr) } {
            // SAFETY: BPF_BTF_GET_FD_BY_ID returned a new fd, ours alone.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            // Gone since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(error("BPF_BTF_GET_FD_BY_ID", e)),
        };
        let mut found = [0u8; 64];
        let mut info = BtfInfo {
            name: found.as_mut_ptr() as u64,
            name_len: found.len() as u32,
            ..BtfInfo::default()
        };
        // SAFETY: a BTF object's info; `name` points at `found`, `name_len` long.
        unsafe { obj_info(fd.as_fd(), &mut info) }
            .map_err(|e| error("BPF_OBJ_GET_INFO_BY_FD", e))?;
        let len = found.iter().position(|&b| b == 0).unwrap_or(found.len());
        if info.kernel_btf != 0 && &found[..len] == name.as_bytes() {
            return Ok(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of these types and strings.
    fn blob_of(type_words: &[&[u32]], strings: &[u8]) -> Vec<u8> {
        let types: Vec<u8> = type_words
            .iter()
            .flat_map(|words| words.iter())
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            HEADER_LEN as u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        data
    }

    /// int, struct s { int a; int b; } (b at byte 4, size 8), int (*)(int, int), func f.
    fn blob() -> Vec<u8> {
        blob_of(
            &[
                // [1] int: name "int", kind INT, size 4, encoding word.
                &[1, KIND_INT << 24, 4, 32],
                // [2] struct s, 2 members, size 8.
                &[5, KIND_STRUCT << 24 | 2, 8, 7, 1, 0, 9, 1, 32],
                // [3] int (*)(int, int).
                &[0, KIND_FUNC_PROTO << 24 | 2, 1, 0, 1, 0, 1],
                // [4] func f, of type 3.
                &[11, KIND_FUNC << 24, 3],
            ],
            b"\0int\0s\0a\0b\0f\0",
        )
    }

    #[test]
    fn finds_functions_structs_and_member_offsets() {
        let btf = KernelBtf::parse(&blob(), None).expect("parse");
        assert_eq!(btf.function("f"), Some(Function { id: 4, params: 2 }));
        assert_eq!(btf.function("g"), None);
        assert_eq!(btf.struct_size("s"), Some(8));
        assert_eq!(btf.member_offset("s", "b").expect("member"), 4);
        assert!(matches!(
            btf.member_offset("s", "c"),
            Err(BtfError::NoMember { .. })
        ));
    }

    /// A module's split BTF: ids after the base's, names in either string section,
    /// a function whose prototype is the base's.
    #[test]
    fn reads_a_modules_split_btf() {
        let base = KernelBtf::parse(&blob(), None).expect("base");
        let base_len = base.strings.len() as u32;
        let module = blob_of(
            &[
                // [5] func g, of the base's type 3.
                &[base_len + 1, KIND_FUNC << 24, 3],
                // [6] struct t { int b; } (size 4), "b" from the base's strings.
                &[base_len + 3, KIND_STRUCT << 24 | 1, 4, 9, 1, 0],
            ],
            b"\0g\0t\0",
        );
        let btf = KernelBtf::parse(&module, Some(&base)).expect("module");
        assert_eq!(btf.function("g"), Some(Function { id: 5, params: 2 }));
        assert_eq!(btf.function("f"), None);
        assert_eq!(btf.member_offset("t", "b").expect("member"), 0);
        assert_eq!(btf.struct_size("t"), Some(4));
    }

    #[test]
    fn refuses_a_truncated_blob() {
        let mut data = blob();
        data.truncate(data.len() - 20);
        assert!(KernelBtf::parse(&data, None).is_err());
    }
}
