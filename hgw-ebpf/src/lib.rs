//! Empty on purpose: hgw-agent lists this crate as a build-dependency so that cargo
//! rebuilds the agent (which embeds the programs from `src/main.rs`) when it changes.
#![no_std]
