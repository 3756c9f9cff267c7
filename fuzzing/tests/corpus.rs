//! Every fuzz target, on every `cargo test`: the committed corpus
//! (`fuzz/corpus/<target>/`, grown by libFuzzer runs) replayed, then a
//! bounded stream of inputs mutated from it (bit flips, cuts, splices) from
//! a fixed seed, so a failure here reproduces. A full fuzzing run is
//! `cargo +nightly fuzz run <target>` (FUZZING.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Inputs mutated per target, and the time they may take at most.
const MUTATIONS: usize = 3_000;
const TIME: Duration = Duration::from_secs(4);

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// xorshift: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut input = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = rng.next() as u8;
            }
            2 => input.truncate(rng.below(input.len() + 1)),
            3 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let at = rng.below(input.len() + 1);
                input.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let at = rng.below(input.len() + 1);
                let byte = [0u8, 0xff, b'\n', b':', b'{', b'*', b'/'][rng.below(7)];
                input.insert(at, byte);
            }
        }
    }
    input
}

/// Runs `target` on `input`; on a panic, keeps the input for reproduction.
fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        let kept = std::env::temp_dir().join(format!("kanava-fuzz-{name}-crash.bin"));
        let _ = std::fs::write(&kept, input);
        panic!(
            "fuzz target {name} panicked; input kept in {} (replay: cargo +nightly fuzz run {name} {})",
            kept.display(),
            kept.display()
        );
    }
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    for &(name, target) in kanava_fuzzing::TARGETS {
        let seeds = corpus(name);
        assert!(
            !seeds.is_empty(),
            "no corpus for {name} in {}",
            corpus_dir(name).display()
        );
        for input in &seeds {
            run(name, target, input);
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        let started = Instant::now();
        for _ in 0..MUTATIONS {
            if started.elapsed() > TIME {
                break;
            }
            let input = mutate(&mut rng, &seeds);
            run(name, target, &input);
        }
    }
}
