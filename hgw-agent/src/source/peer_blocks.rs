//! The static config file read block by block: a file of thousands of `[[peers]]`
//! takes tens of milliseconds to parse whole with the TOML parser, at every start, and
//! one changed peer is one changed block. A block of plain lines (`key = "value"`, a
//! field of a peer, a string without escapes; blank lines and comments) is read as it
//! is, a TOML parser's work reduced to splitting lines; any other block is parsed on its
//! own, and kept by its text, so that a block seen before costs a lookup.
//!
//! Only a file whose blocks can be told apart from the text alone goes this way: every
//! block starts at a line that is exactly `[[peers]]`, no other table header follows
//! the first block, and no multi-line string can hide a header. Anything else, and any
//! error, is parsed whole, so the result (and an error's message) is always the whole
//! parse's.

use std::collections::HashMap;

use crate::config::{RawConfig, RawPeer};

#[derive(Debug, Default)]
pub struct PeerBlocks {
    /// The last file's `[[peers]]` blocks (the lines after the header) that are not
    /// plain, parsed.
    known: HashMap<String, RawPeer>,
}

impl PeerBlocks {
    /// `text` parsed as a config file.
    pub fn parse(&mut self, text: &str) -> Result<RawConfig, toml::de::Error> {
        let split = split(text);
        if let Some((head, blocks)) = &split {
            let plain: Vec<Option<RawPeer>> = blocks.iter().map(|b| plain_block(b)).collect();
            // Most blocks plain or known: each new one parsed on its own. Otherwise
            // (the first read of a file of other blocks) one whole parse is faster
            // than thousands of small ones.
            let new = blocks
                .iter()
                .zip(&plain)
                .filter(|(b, plain)| plain.is_none() && !self.known.contains_key(**b))
                .count();
            if new * 4 <= blocks.len()
                && let Some(raw) = self.parse_blocks(head, blocks, plain)
            {
                return Ok(raw);
            }
        }
        let raw: RawConfig = toml::from_str(text)?;
        self.known = match split {
            Some((_, blocks)) if blocks.len() == raw.peers.len() => blocks
                .into_iter()
                .map(str::to_owned)
                .zip(raw.peers.iter().cloned())
                .collect(),
            _ => HashMap::new(),
        };
        Ok(raw)
    }

    /// The head parsed, and each block looked up or parsed; `None` if any of it fails
    /// (the whole parse then says why).
    fn parse_blocks(
        &mut self,
        head: &str,
        blocks: &[&str],
        plain: Vec<Option<RawPeer>>,
    ) -> Option<RawConfig> {
        let mut raw: RawConfig = toml::from_str(head).ok()?;
        if !raw.peers.is_empty() {
            return None;
        }
        raw.peers.reserve(blocks.len());
        let mut known = HashMap::new();
        for (block, plain) in blocks.iter().zip(plain) {
            let peer = match plain {
                Some(peer) => peer,
                None => {
                    let peer = match self.known.remove(*block) {
                        Some(peer) => peer,
                        None => toml::from_str::<RawPeer>(block).ok()?,
                    };
                    known.insert((*block).to_owned(), peer.clone());
                    peer
                }
            };
            raw.peers.push(peer);
        }
        self.known = known;
        Some(raw)
    }
}

/// A peer's fields, in [`RawPeer`]'s order.
const FIELDS: [&str; 5] = ["name", "node_ip", "pod_cidr", "node_ip_v6", "pod_cidr_v6"];

/// A block of plain lines read as TOML reads it: each line blank, a comment, or a peer's
/// field (once) set to a basic string without escapes, as in `node_ip = "10.0.0.2"`;
/// `None` for anything else (the TOML parser's then, which also says what is wrong).
fn plain_block(block: &str) -> Option<RawPeer> {
    // TOML's whitespace is spaces and tabs; control characters other than tab are
    // errors, and a CR only ends a line before its LF.
    let blank = [' ', '\t'];
    let mut fields: [Option<&str>; 5] = [None; 5];
    for line in block.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return None;
        }
        let line = line.trim_matches(blank);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=')?;
        let value = value
            .trim_start_matches(blank)
            .strip_prefix('"')?
            .strip_suffix('"')?;
        if value.contains(['"', '\\']) {
            return None;
        }
        let field = FIELDS
            .iter()
            .position(|f| *f == key.trim_end_matches(blank))?;
        if fields[field].replace(value).is_some() {
            return None;
        }
    }
    let [name, node_ip, pod_cidr, node_ip_v6, pod_cidr_v6] = fields;
    Some(RawPeer {
        name: name?.into(),
        node_ip: node_ip?.into(),
        pod_cidr: pod_cidr?.into(),
        node_ip_v6: node_ip_v6.map(Into::into),
        pod_cidr_v6: pod_cidr_v6.map(Into::into),
    })
}

/// The text before the first `[[peers]]` header, and each block's lines after its
/// header; `None` if the blocks cannot be told apart from the text alone.
fn split(text: &str) -> Option<(&str, Vec<&str>)> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut headers = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed == "[[peers]]" {
            headers.push((at, at + line.len()));
        } else if trimmed.starts_with('[') && !headers.is_empty() {
            // Another table after the first block: it would end that block.
            return None;
        }
        at += line.len();
    }
    let (first, _) = *headers.first()?;
    let blocks = headers
        .iter()
        .enumerate()
        .map(|(i, &(_, body))| {
            let end = headers.get(i + 1).map_or(text.len(), |&(next, _)| next);
            &text[body..end]
        })
        .collect();
    Some((&text[..first], blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(peers: usize, changed: Option<usize>) -> String {
        let mut text = String::from("node_name = \"n1\"\nuplink = \"eth0\"\n");
        for i in 0..peers {
            let last = if changed == Some(i) { 99 } else { i };
            text.push_str(&format!(
                "\n[[peers]]\nname = \"p{i}\" # a comment\nnode_ip = \"172.30.0.{last}\"\npod_cidr = \"10.{i}.0.0/24\"\n"
            ));
        }
        text
    }

    #[test]
    fn a_changed_block_reads_as_the_whole_parse_does() {
        let mut blocks = PeerBlocks::default();
        let first = file(40, None);
        assert_eq!(
            blocks.parse(&first).expect("parses"),
            toml::from_str::<RawConfig>(&first).expect("parses")
        );
        assert_eq!(blocks.known.len(), 40, "known from the whole parse");
        let changed = file(40, Some(7));
        assert_eq!(
            blocks.parse(&changed).expect("parses"),
            toml::from_str::<RawConfig>(&changed).expect("parses")
        );
        assert_eq!(blocks.known.len(), 40, "only this file's blocks are kept");
        let fewer = file(39, None);
        assert_eq!(
            blocks.parse(&fewer).expect("parses"),
            toml::from_str::<RawConfig>(&fewer).expect("parses")
        );
    }

    #[test]
    fn blocks_read_without_the_parser_read_as_the_parser_reads_them() {
        let head = "node_name = \"n1\"\nuplink = \"eth0\"\n";
        let plain = "name = \"a\"\nnode_ip = \"172.30.0.2\"\npod_cidr = \"10.1.0.0/24\"\n";
        let variants = [
            // Plain: spaces, tabs, CRLF, comments, blank lines, both IPv6 fields.
            plain.to_owned(),
            "\tname\t=\t\"a\"  \r\nnode_ip=\"172.30.0.2\"\r\n# a comment \"\\\r\n\npod_cidr = \"10.1.0.0/24\"\n".into(),
            format!("{plain}node_ip_v6 = \"fd00::2\"\npod_cidr_v6 = \"fd00:1::/64\"\n"),
            "name = \"\"\nnode_ip = \"x y\"\npod_cidr = \"\u{e9}\"\n".into(),
            // For the parser: escapes, literal strings, trailing comments, quoted and
            // dotted keys, inline tables, numbers.
            plain.replace("\"a\"", "\"a\\u0062\""),
            plain.replace("\"a\"", "'a'"),
            plain.replace("\"a\"", "\"a\" # the peer"),
            plain.replace("name =", "\"name\" ="),
            plain.replace("name =", "x.name ="),
            plain.replace("\"a\"", "{ a = 1 }"),
            // Errors: a repeated or unknown field, a missing one, a number, control
            // characters, a lone CR, a quote or backslash in the value, no value.
            format!("{plain}name = \"b\"\n"),
            format!("{plain}mtu = \"1500\"\n"),
            plain.replace("name = \"a\"\n", ""),
            plain.replace("\"a\"", "3"),
            plain.replace("\"a\"", "\"a\u{7}\""),
            plain.replace("\"a\"", "\"a\u{7f}\""),
            plain.replace("\"a\"\n", "\"a\"\rnode_ip_v6 = \"fd00::2\"\n"),
            plain.replace("\"a\"", "\"a\"b\""),
            plain.replace("\"a\"", "\"a\\\""),
            plain.replace("\"a\"", "\""),
            plain.replace("\"a\"", ""),
            plain.replace("name = ", "name "),
        ];
        for variant in variants {
            let text = format!("{head}\n[[peers]]\n{plain}\n[[peers]]\n{variant}");
            assert!(split(&text).is_some(), "{text}");
            assert_eq!(
                PeerBlocks::default()
                    .parse(&text)
                    .map_err(|e| e.to_string()),
                toml::from_str::<RawConfig>(&text).map_err(|e| e.to_string()),
                "{text:?}"
            );
        }
        assert!(plain_block(plain).is_some());
        assert!(plain_block(&plain.replace("\"a\"", "'a'")).is_none());
    }

    #[test]
    fn what_the_text_cannot_split_is_parsed_whole() {
        for text in [
            "node_name = \"n1\"\n[[peers]]\nname = \"a\"\nnode_ip = \"1.1.1.1\"\npod_cidr = \"10.1.0.0/24\"\n[etcd]\nendpoints = [\"http://a:1\"]\n",
            "[[peers]]\nname = \"\"\"\n[[peers]]\n\"\"\"\nnode_ip = \"1.1.1.1\"\npod_cidr = \"10.1.0.0/24\"\n",
            "node_name = \"n1\"\n",
        ] {
            assert!(split(text).is_none(), "{text}");
            assert_eq!(
                PeerBlocks::default().parse(text).map_err(|e| e.to_string()),
                toml::from_str::<RawConfig>(text).map_err(|e| e.to_string()),
                "{text}"
            );
        }
    }

    #[test]
    fn an_error_is_the_whole_parses() {
        let mut blocks = PeerBlocks::default();
        let good = file(8, None);
        blocks.parse(&good).expect("parses");
        let bad = good.replace("name = \"p3\"", "name = 3");
        let whole = toml::from_str::<RawConfig>(&bad).expect_err("fails");
        let got = blocks.parse(&bad).expect_err("fails");
        assert_eq!(got.to_string(), whole.to_string());
    }
}
