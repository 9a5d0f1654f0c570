//! CPU features: which instruction-set extensions the machine an image was made on had, so a
//! restore on a machine that lacks one is refused before CRIU runs.
//!
//! A process picks code paths by CPU feature when it starts (glibc's string functions, a
//! crypto library's AES-NI or AVX2 kernels, a JIT) and never asks again; restored on a CPU
//! without them it dies of SIGILL at some later instruction. CRIU compares only the
//! architecture. OpenJDK CRaC has `-XX:CPUFeatures` for the same reason. What is recorded is
//! the kernel's `flags` (x86) or `Features` (arm64) line of `/proc/cpuinfo`, filtered to the
//! extensions user code dispatches on; the rest of that line (virtualisation hints, errata,
//! power management) differs between machines that run the same code fine.

use std::collections::BTreeSet;

/// The instruction-set features of this machine that code may rely on, sorted.
pub fn features() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            matches!(key.trim(), "flags" | "Features").then_some(value)
        })
        .unwrap_or("");
    let set: BTreeSet<String> = line
        .split_whitespace()
        .filter(|f| is_instruction_set(f))
        .map(str::to_owned)
        .collect();
    set.into_iter().collect()
}

/// Of the features an image recorded, those this machine lacks.
pub fn missing(recorded: &[String]) -> Vec<String> {
    let here: BTreeSet<String> = features().into_iter().collect();
    recorded
        .iter()
        .filter(|f| is_instruction_set(f) && !here.contains(*f))
        .cloned()
        .collect()
}

/// Whether a cpuinfo flag names instructions (rather than a property of the machine).
fn is_instruction_set(flag: &str) -> bool {
    const PREFIXES: [&str; 8] = ["sse", "avx", "amx", "sha", "aes", "fma", "bmi", "xsave"];
    const NAMES: [&str; 24] = [
        "mmx",
        "ssse3",
        "pclmulqdq",
        "popcnt",
        "abm",
        "lzcnt",
        "movbe",
        "f16c",
        "adx",
        "rdrand",
        "rdseed",
        "gfni",
        "vaes",
        "vpclmulqdq",
        "erms",
        "fsrm",
        "clflushopt",
        "clwb",
        "cx16",
        "sm3",
        "sm4", // arm64 (Features)
        "asimd",
        "sve",
        "atomics",
    ];
    PREFIXES.iter().any(|p| flag.starts_with(p)) || NAMES.contains(&flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_what_it_records_and_lacks_what_it_does_not() {
        let here = features();
        assert!(missing(&here).is_empty());
        let mut more = here.clone();
        more.push("avx9000".to_owned());
        // Not instruction sets: never held against a machine.
        more.push("hypervisor".to_owned());
        assert_eq!(missing(&more), ["avx9000"]);
        assert!(here.iter().all(|f| is_instruction_set(f)));
    }
}
