//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): the ids of functions
//! (for kfunc calls) and the byte offsets of struct members (for reading kernel objects
//! the way this kernel build lays them out). aya 0.14 keeps struct members private, and
//! a function's id is all the kfunc loader needs, so the two lookups are done here on
//! the raw blob (format: Documentation/bpf/btf.rst).

use std::collections::{HashMap, hash_map::Entry};

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
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF ({path}) is malformed: {reason}")]
    Malformed { path: &'static str, reason: String },
    #[error("struct {name} has no member {member} in the kernel's BTF")]
    NoMember { name: String, member: String },
    #[error("struct {name} is not in the kernel's BTF")]
    NoStruct { name: String },
}

/// Named functions and structs of one BTF blob.
#[derive(Debug, Default)]
pub struct KernelBtf {
    functions: HashMap<String, u32>,
    /// Struct name -> (member name -> byte offset); first definition wins.
    structs: HashMap<String, HashMap<String, u32>>,
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|source| BtfError::Read {
            path: VMLINUX,
            source,
        })?;
        Self::parse(&data).map_err(|reason| BtfError::Malformed {
            path: VMLINUX,
            reason,
        })
    }

    /// The BTF id of function `name`, if the kernel has it.
    pub fn function(&self, name: &str) -> Option<u32> {
        self.functions.get(name).copied()
    }

    /// The byte offset of `member` in struct `name`.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let members = self.structs.get(name).ok_or_else(|| BtfError::NoStruct {
            name: name.to_owned(),
        })?;
        members
            .get(member)
            .copied()
            .ok_or_else(|| BtfError::NoMember {
                name: name.to_owned(),
                member: member.to_owned(),
            })
    }

    fn parse(data: &[u8]) -> Result<Self, String> {
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
        let name = |off: u32| -> Result<&str, String> {
            let rest = strings
                .get(off as usize..)
                .ok_or_else(|| format!("name offset {off} out of bounds"))?;
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            std::str::from_utf8(&rest[..end]).map_err(|e| format!("name at {off}: {e}"))
        };

        let mut btf = Self::default();
        let mut off = types.start;
        // Type ids start at 1 (0 is void).
        let mut id = 1u32;
        while off < types.end {
            let name_off = u32_at(off)?;
            let info = u32_at(off + 4)?;
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
                KIND_FUNC => {
                    btf.functions
                        .entry(name(name_off)?.to_owned())
                        .or_insert(id);
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
                        slot.insert(members);
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
        Ok(btf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: int, struct s { int a; int b; } (b at byte 4), func f.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0f\0";
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // [1] int: name "int", kind INT, size 4, encoding word.
        push(&[1, KIND_INT << 24, 4, 32]);
        // [2] struct s, 2 members, size 8.
        push(&[5, KIND_STRUCT << 24 | 2, 8, 7, 1, 0, 9, 1, 32]);
        // [3] func f (type 0).
        push(&[11, KIND_FUNC << 24, 0]);
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

    #[test]
    fn finds_functions_and_member_offsets() {
        let btf = KernelBtf::parse(&blob()).expect("parse");
        assert_eq!(btf.function("f"), Some(3));
        assert_eq!(btf.function("g"), None);
        assert_eq!(btf.member_offset("s", "b").expect("member"), 4);
        assert!(matches!(
            btf.member_offset("s", "c"),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn refuses_a_truncated_blob() {
        let mut data = blob();
        data.truncate(data.len() - 20);
        assert!(KernelBtf::parse(&data).is_err());
    }
}
