// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The command-line parsers: the size parser against a reference, the
//! fault shorthand and the backend's flags never panic, and faults parse
//! (or not) the same from JSON as the catalogue says.
#![no_main]

use hmmgpu_device::cli::{parse_fault_args, parse_size, Args};
use hmmgpu_device::faults::{Fault, HostFault};
use libfuzzer_sys::fuzz_target;

/// The sizes the spec allows: digits, then nothing, B, or K/M/G/T with an
/// optional "iB", in any case.
fn reference_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: u64 = t[..digits].parse().ok()?;
    let unit = t[digits..].to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(parse_size(text).ok(), reference_size(text), "{text:?}");
    let words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    if let Ok(fault) = parse_fault_args(&words) {
        assert!(fault.is_object());
        // What the shorthand made either is a fault or is refused; either
        // way without a panic.
        let _ = Fault::from_json(&fault);
    }
    let argv = std::iter::once("hmmgpu-device".to_owned()).chain(words.iter().cloned());
    let _ = <Args as clap::Parser>::try_parse_from(argv);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(fault) = Fault::from_json(&value) {
            // A fault that parsed is valid and serializes back to itself.
            assert!(fault.validate().is_ok());
            let again = serde_json::to_value(&fault).expect("serialize");
            assert_eq!(Fault::from_json(&again).ok(), Some(fault));
        }
        if let Ok(fault) = HostFault::from_json(&value) {
            let again = serde_json::to_value(&fault).expect("serialize");
            assert_eq!(HostFault::from_json(&again).ok(), Some(fault));
        }
    }
});
