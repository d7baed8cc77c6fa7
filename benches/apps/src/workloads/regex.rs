//! regex: a few hundred patterns of common shapes (literals, case-insensitive words,
//! dates, e-mail addresses, alternations, Unicode classes, captures) compiled and searched
//! over a generated text corpus; some replacements and a `RegexSet`.

use regex::{Regex, RegexSet};

use crate::rng::{Rng, hash_bytes, mix};
use crate::{Output, Params};

fn corpus(rng: &mut Rng, vocab: &[String], bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 256);
    while text.len() < bytes {
        let words = rng.range(4, 16);
        for i in 0..words {
            if i > 0 {
                text.push(' ');
            }
            match rng.below(40) {
                0 => text.push_str(&format!(
                    "{}.{}@{}.{}",
                    vocab[rng.below(vocab.len())],
                    vocab[rng.below(vocab.len())],
                    vocab[rng.below(vocab.len())],
                    ["com", "org", "net", "io"][rng.below(4)]
                )),
                1 => text.push_str(&format!(
                    "20{:02}-{:02}-{:02}",
                    rng.below(30),
                    rng.range(1, 12),
                    rng.range(1, 28)
                )),
                2 => text.push_str(&format!(
                    "{}.{}.{}.{}",
                    rng.below(256),
                    rng.below(256),
                    rng.below(256),
                    rng.below(256)
                )),
                3 => text.push_str(&format!(
                    "https://{}.org/{}/{}",
                    vocab[rng.below(vocab.len())],
                    vocab[rng.below(vocab.len())],
                    rng.below(10_000)
                )),
                4 => {
                    let w = &vocab[rng.below(vocab.len())];
                    let mut c = w.chars();
                    if let Some(f) = c.next() {
                        text.extend(f.to_uppercase());
                        text.push_str(c.as_str());
                    }
                }
                5 => text.push_str(&rng.below(1_000_000).to_string()),
                6 => text.push_str(["über", "café", "naïve", "Ærø", "Σοφία"][rng.below(5)]),
                _ => text.push_str(&vocab[rng.below(vocab.len())]),
            }
        }
        text.push_str(".\n");
    }
    text
}

fn patterns(rng: &mut Rng, vocab: &[String], n: usize) -> Vec<String> {
    let mut w = || vocab[rng.below(vocab.len())].clone();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let p = match i % 10 {
            0 => format!(r"\b{}\w*\b", w()),
            1 => format!(r"(?i){}", w()),
            2 => format!(r"\b20{:02}-(\d{{2}})-(\d{{2}})\b", i % 30),
            3 => format!(r"([a-z]+)\.{}@([a-z]+)\.(com|org|net|io)", w()),
            4 => format!(r"\b{}\s+{}\b", w(), w()),
            5 => format!(r"\b[A-Z][a-z]*{}\b", &w()[1..]),
            6 => format!(r"\b(?:{}|{}|{}|{})\b", w(), w(), w(), w()),
            7 => format!(r"\b(\d+)\.(\d+)\.(\d+)\.{}\b", i % 256),
            8 => format!(r"https?://{}\.org/([a-z]+)/(\d+)", w()),
            _ => format!(r"(?u)\b\w*{}\w*\b", w()),
        };
        out.push(p);
    }
    out
}

/// Compiles and searches; the checksum covers every match position.
pub fn run(p: &Params) -> Output {
    let mut rng = Rng::new(2);
    let vocab: Vec<String> = (0..3000).map(|i| rng.word(2 + i % 3)).collect();
    let text = corpus(&mut rng, &vocab, p.n(1 << 20));
    let sources = patterns(&mut rng, &vocab, p.n(300));
    let regexes: Vec<Regex> = sources
        .iter()
        .map(|s| Regex::new(s).expect("a valid pattern"))
        .collect();

    let mut checksum = 0u64;
    let mut found: Vec<Vec<(usize, usize)>> = Vec::with_capacity(regexes.len());
    for (i, re) in regexes.iter().enumerate() {
        let spans: Vec<(usize, usize)> = if re.captures_len() > 1 {
            re.captures_iter(&text)
                .map(|c| {
                    let m = c.get(0).expect("group 0");
                    let groups: usize = c.iter().flatten().map(|g| g.len()).sum();
                    (m.start(), m.end() + groups)
                })
                .collect()
        } else {
            re.find_iter(&text).map(|m| (m.start(), m.end())).collect()
        };
        for &(a, b) in &spans {
            checksum = checksum.wrapping_add(mix((i as u64) << 40 ^ (a as u64) << 8 ^ b as u64));
        }
        found.push(spans);
    }

    // Replacements build new strings.
    let mut replaced = Vec::new();
    for re in regexes.iter().step_by(30) {
        let out = re.replace_all(&text, "<$0>").into_owned();
        checksum ^= hash_bytes(out.as_bytes());
        replaced.push(out);
    }

    // A set of the first patterns, line by line.
    let set = RegexSet::new(&sources[..sources.len().min(40)]).expect("a valid set");
    let mut set_hits = 0u64;
    for (n, line) in text.lines().enumerate() {
        let m: Vec<usize> = set.matches(line).into_iter().collect();
        set_hits = set_hits.wrapping_add(
            m.iter()
                .map(|&k| (k + 1) as u64 * (n as u64 + 1))
                .sum::<u64>(),
        );
    }
    checksum = checksum.wrapping_add(mix(set_hits));
    Output::new(checksum, (text, regexes, found, replaced, set))
}
