//! Random and mutated frames, each checked against the model ([`crate::model`]).

use super::*;

/// xorshift64*: a seeded generator, so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Destinations next to the programs' decisions: routes of each length, the own CIDR,
/// the endpoint, misses, multicast.
fn interesting_dsts_v4() -> Vec<[u8; 4]> {
    vec![
        [10, 244, 2, 11],
        [10, 244, 2, 99],
        [10, 244, 7, 1],
        [10, 244, 3, 5],
        [10, 244, 1, 11],
        [10, 244, 1, 12],
        [10, 244, 1, 1],
        [10, 99, 0, 1],
        [224, 0, 0, 5],
        [255, 255, 255, 255],
    ]
}

fn interesting_dsts_v6() -> Vec<[u8; 16]> {
    [
        "fd00:244:2::11",
        "fd00:244:2::99",
        "fd00:244:0:7::1",
        "fd00:244:0:5::1",
        "fd00:244:7::1",
        "fd00:244:3::5",
        "fd00:244:1::11",
        "fd00:244:1::12",
        "fd00:244:1::1",
        "fd00:245::1",
        "ff02::1",
    ]
    .map(ip6)
    .to_vec()
}

/// Sources next to the source rules: this node's pods, its gateway, other nodes' pods,
/// the edges of the pod and cluster CIDRs, a node address.
fn interesting_srcs_v4() -> Vec<[u8; 4]> {
    vec![
        [10, 244, 1, 11],
        [10, 244, 1, 1],
        [10, 244, 1, 0],
        [10, 244, 2, 11],
        [10, 244, 0, 255],
        [10, 244, 255, 255],
        [10, 245, 0, 0],
        [10, 243, 255, 255],
        [172, 31, 0, 2],
    ]
}

fn interesting_srcs_v6() -> Vec<[u8; 16]> {
    [
        "fd00:244:1::11",
        "fd00:244:1::1",
        "fd00:244:1::",
        "fd00:244:2::11",
        "fd00:244:1:1::11",
        "fd00:244:ffff:ffff:ffff:ffff:ffff:ffff",
        "fd00:245::",
        "fd00:243:ffff:ffff:ffff:ffff:ffff:ffff",
        "fd00:172:31::2",
    ]
    .map(ip6)
    .to_vec()
}

/// Sets one header field to a value at or next to an edge the programs decide on.
fn poke_edge(f: &mut [u8], rng: &mut Rng) {
    match ether_type(f) {
        ETH_P_IPV4 if f.len() >= 34 => match rng.below(7) {
            0 => f[14] = rng.pick(&[0x45, 0x46, 0x4f, 0x44, 0x40, 0x55, 0x65]),
            1 => f[V4_TTL] = rng.pick(&[0, 1, 2, 255]),
            2 => f[20..22].copy_from_slice(&rng.pick::<[u8; 2]>(&[
                [0, 0],
                [0x40, 0],
                [0x20, 0],
                [0, 1],
            ])),
            3 => {
                let len = (f.len() - 14 + rng.below(3)).saturating_sub(1) as u16;
                f[16..18].copy_from_slice(&len.to_be_bytes());
            }
            4 => f[26] = rng.pick(&[0, 1, 126, 127, 128, 223, 224, 239, 240, 255]),
            5 => f[26..30].copy_from_slice(&rng.pick(&interesting_srcs_v4())),
            _ => f[30..34].copy_from_slice(&rng.pick(&interesting_dsts_v4())),
        },
        ETH_P_IPV6 if f.len() >= V6_HEADERS => match rng.below(7) {
            0 => f[14] = rng.pick(&[0x60, 0x6f, 0x40, 0x70, 0x00]),
            1 => {
                f[V6_NEXT_HEADER] = rng.pick(&[
                    0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 139, 140, 253, 254,
                ])
            }
            2 => f[V6_HOP_LIMIT] = rng.pick(&[0, 1, 2, 255]),
            3 => {
                let len = (f.len() - V6_HEADERS + rng.below(3)).saturating_sub(1) as u16;
                f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
            }
            4 => {
                let src = rng.pick(&[
                    "ff02::1", "fe80::1", "febf::1", "fec0::1", "::", "::1", "::2",
                ]);
                f[V6_SRC..V6_SRC + 16].copy_from_slice(&ip6(src));
            }
            5 => f[V6_SRC..V6_SRC + 16].copy_from_slice(&rng.pick(&interesting_srcs_v6())),
            _ => f[V6_DST..V6_DST + 16].copy_from_slice(&rng.pick(&interesting_dsts_v6())),
        },
        _ => {}
    }
}

#[test]
fn random_and_mutated_frames_are_either_untouched_or_well_formed_redirects() {
    const SEED: u64 = 0x6867_7721;
    /// Frames the programs ran (the kernel did not refuse), per program and family.
    const FRAMES: usize = 100_000;
    let mut p = load();
    let mut rng = Rng(SEED);
    let seeds_v4 = [
        to_peer([10, 244, 2, 11], 64),
        to_peer([10, 244, 2, 99], 2),
        to_peer([10, 244, 9, 1], 9),
        to_pod([10, 244, 1, 11], 63),
        to_pod([10, 244, 1, 12], 63),
    ];
    let seeds_v6 = [
        to_peer6("fd00:244:2::11", 64),
        to_peer6("fd00:244:2::99", 2),
        to_peer6("fd00:244:0:9::1", 9),
        to_peer6("fd00:244:3::5", 64),
        to_pod6("fd00:244:1::11", 63),
        to_pod6("fd00:244:1::12", 63),
    ];
    let start = p.counters();
    // What the counters must have gained by the end: every redirect's own counters, and
    // per family (and not-IP) one pass counter per frame left to the kernel (which one
    // depends on the order of the checks, so only the sum is held to).
    let mut forwarded = vec![0u64; COUNTERS_LEN as usize];
    let not_ip = Family::ALL.len();
    let mut passed = vec![0u64; not_ip + 1];
    for program in [PROG_TO_PEER, PROG_TO_POD] {
        let our_mac = if program == PROG_TO_PEER {
            BRIDGE_MAC
        } else {
            UPLINK_MAC
        };
        for (v6, seeds) in [(false, &seeds_v4[..]), (true, &seeds_v6[..])] {
            let (header_end, ether_type_ip, version) = if v6 {
                (V6_HEADERS, ETH_P_IPV6, 0x6b)
            } else {
                (34, ETH_P_IPV4, 0x45)
            };
            let mut redirects = 0;
            let mut refused = 0;
            let mut ran = 0;
            for i in 0.. {
                if ran == FRAMES {
                    break;
                }
                let mut f = seeds[rng.below(seeds.len())].clone();
                match rng.below(5) {
                    // Flip a few bytes, mostly in the headers.
                    0 | 1 => {
                        for _ in 0..1 + rng.below(4) {
                            let span = if rng.below(4) == 0 {
                                f.len()
                            } else {
                                header_end
                            };
                            let at = rng.below(span);
                            f[at] = rng.next() as u8;
                        }
                    }
                    // Cut or grow the frame, now and then to around the MTU, and often
                    // with the IP length made to match.
                    2 => {
                        let len = if rng.below(8) == 0 {
                            14 + MTU as usize - 4 + rng.below(8)
                        } else {
                            14 + rng.below(f.len() + 16)
                        };
                        f.resize(len, rng.next() as u8);
                        if rng.below(2) == 0 {
                            fix_ip_len(&mut f);
                        }
                    }
                    3 => poke_edge(&mut f, &mut rng),
                    // Entirely random bytes, with a plausible header now and then.
                    _ => {
                        let len = 14 + rng.below(100);
                        f = (0..len).map(|_| rng.next() as u8).collect();
                        if rng.below(2) == 0 && len >= header_end {
                            f[12..14].copy_from_slice(&ether_type_ip.to_be_bytes());
                            f[14] = version;
                        }
                    }
                }
                // Aim at the program every other time, so that mutants of the other
                // side's seeds get past the MAC check.
                if rng.below(2) == 0 {
                    f[0..6].copy_from_slice(&our_mac);
                }
                if rng.below(2) == 0 && f.len() >= header_end {
                    match ether_type(&f) {
                        ETH_P_IPV4 => fix_checksum(&mut f),
                        ETH_P_IPV6 => fix_payload_len(&mut f),
                        _ => {}
                    }
                }
                let Some((verdict, out)) = p.try_run(program, &f) else {
                    refused += 1;
                    continue;
                };
                ran += 1;
                let what = || format!("seed {SEED:#x}, {program} frame {i} (v6 {v6}): {f:02x?}");
                let family = match ether_type(&f) {
                    ETH_P_IPV4 => Some(Family::Ipv4),
                    ETH_P_IPV6 => Some(Family::Ipv6),
                    _ => None,
                };
                match (verdict, expected_redirect(program, &f)) {
                    (HAND_ON, None) => {
                        assert_eq!(out, f, "{}: passed to the kernel but changed", what());
                        passed[family.map_or(not_ip, |family| family as usize)] += 1;
                    }
                    (TC_ACT_REDIRECT, Some(macs)) => {
                        assert_redirected_well_formed(&f, &out, &what());
                        assert_eq!(out[..12], macs, "{}: MACs", what());
                        let family = family.expect("only IP is redirected");
                        let mut count = |counter| {
                            forwarded[counter_index(family, counter) as usize] += 1;
                        };
                        if program == PROG_TO_PEER {
                            count(Counter::FwdToPeer);
                        } else {
                            count(Counter::FwdToPod);
                            if macs[..6] == POD_MAC {
                                count(Counter::FwdToPodDirect);
                            }
                        }
                        redirects += 1;
                    }
                    (HAND_ON, Some(macs)) => {
                        panic!(
                            "{}: left to the kernel, expected a redirect to {macs:02x?}",
                            what()
                        )
                    }
                    (TC_ACT_REDIRECT, None) => {
                        panic!(
                            "{}: redirected to {:02x?}, expected for the kernel",
                            what(),
                            &out[..12]
                        )
                    }
                    (other, _) => panic!("{}: unexpected verdict {other}", what()),
                }
            }
            let what = format!("{program}, v6 {v6}");
            assert!(
                refused < FRAMES / 2,
                "{what}: the kernel refused {refused} frames: the generator tests too little"
            );
            assert!(
                redirects > FRAMES / 20,
                "{what}: the generator produced too few forwardable frames ({redirects}) to mean anything"
            );
        }
    }
    let end = p.counters();
    let gained = |index: u32| end[index as usize] - start[index as usize];
    for &family in Family::ALL {
        let mut passes = 0;
        for &counter in Counter::ALL {
            let index = counter_index(family, counter);
            if matches!(
                counter,
                Counter::FwdToPeer | Counter::FwdToPod | Counter::FwdToPodDirect
            ) {
                assert_eq!(
                    gained(index),
                    forwarded[index as usize],
                    "counter {}",
                    slot_name(index)
                );
            } else {
                passes += gained(index);
            }
        }
        assert_eq!(
            passes,
            passed[family as usize],
            "{}: the pass_* counters together",
            family.name()
        );
    }
    assert_eq!(
        gained(COUNTER_NOT_IP),
        passed[not_ip],
        "{COUNTER_NOT_IP_NAME}"
    );
}
