//! The static config file read again without parsing it all again: a file of thousands
//! of `[[peers]]` takes tens of milliseconds to parse whole, and one changed peer is one
//! changed block. The blocks parsed last time are kept by their text; a block seen
//! before costs a lookup, a new one its own parse.
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
    /// The last file's `[[peers]]` blocks (the lines after the header), parsed.
    known: HashMap<String, RawPeer>,
}

impl PeerBlocks {
    /// `text` parsed as a config file.
    pub fn parse(&mut self, text: &str) -> Result<RawConfig, toml::de::Error> {
        let split = split(text);
        if let Some((head, blocks)) = &split {
            // Most blocks known: each new one parsed on its own. Otherwise (the first
            // read) one whole parse is faster than thousands of small ones.
            let new = blocks
                .iter()
                .filter(|b| !self.known.contains_key(**b))
                .count();
            if new * 4 <= blocks.len()
                && let Some(raw) = self.parse_blocks(head, blocks)
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
    fn parse_blocks(&mut self, head: &str, blocks: &[&str]) -> Option<RawConfig> {
        let mut raw: RawConfig = toml::from_str(head).ok()?;
        if !raw.peers.is_empty() {
            return None;
        }
        let mut known = HashMap::with_capacity(blocks.len());
        for block in blocks {
            let peer = match self.known.remove(*block) {
                Some(peer) => peer,
                None => toml::from_str::<RawPeer>(block).ok()?,
            };
            raw.peers.push(peer.clone());
            known.insert((*block).to_owned(), peer);
        }
        self.known = known;
        Some(raw)
    }
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
