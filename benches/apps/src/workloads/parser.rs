//! syn + prettyplease: a generated Rust source of a few MB (modules, structs, enums,
//! traits, impls, functions with loops, matches, closures and macros) parsed with `syn`
//! (full syntax tree), printed with `prettyplease`, and the printed text parsed again.

use std::fmt::Write as _;

use crate::rng::{Rng, hash_bytes};
use crate::{Output, Params};

const TYPES: &[&str] = &[
    "u8",
    "u32",
    "u64",
    "i64",
    "usize",
    "f64",
    "bool",
    "String",
    "Vec<u32>",
    "Option<String>",
    "HashMap<String, u64>",
    "Box<[u8]>",
];

fn ty(rng: &mut Rng) -> &'static str {
    TYPES[rng.below(TYPES.len())]
}

fn expr(rng: &mut Rng, depth: usize, vars: &[String]) -> String {
    let v = |rng: &mut Rng| vars[rng.below(vars.len())].clone();
    if depth == 0 {
        return match rng.below(4) {
            0 => rng.below(1000).to_string(),
            1 => format!("({}.len() as u64)", v(rng)),
            _ => format!("{}[{}]", v(rng), rng.below(4)),
        };
    }
    let e = match rng.below(7) {
        0 => format!(
            "({} + {}) * {}",
            expr(rng, depth - 1, vars),
            expr(rng, depth - 1, vars),
            rng.range(1, 9)
        ),
        1 => format!(
            "if {} > {} {{ {} }} else {{ {} }}",
            expr(rng, depth - 1, vars),
            rng.below(100),
            expr(rng, depth - 1, vars),
            expr(rng, depth - 1, vars)
        ),
        2 => format!(
            "[{}, {}, {}].iter().map(|x| x.wrapping_mul({})).sum::<u64>()",
            expr(rng, depth - 1, vars),
            expr(rng, depth - 1, vars),
            rng.below(50),
            rng.range(2, 7)
        ),
        3 => format!(
            "match {} % 4 {{ 0 => {}, 1 => {}, n => n + {} }}",
            expr(rng, depth - 1, vars),
            expr(rng, depth - 1, vars),
            rng.below(9),
            expr(rng, depth - 1, vars)
        ),
        4 => format!("helper_{}({})", rng.below(50), expr(rng, depth - 1, vars)),
        5 => format!(
            "{{ let t = {}; t.rotate_left({}) ^ {} }}",
            expr(rng, depth - 1, vars),
            rng.below(63),
            expr(rng, depth - 1, vars)
        ),
        _ => format!(
            "{}.max({})",
            expr(rng, depth - 1, vars),
            expr(rng, depth - 1, vars)
        ),
    };
    format!("({e})")
}

fn function(rng: &mut Rng, out: &mut String, name: &str, indent: &str) {
    let nargs = rng.range(1, 4);
    let vars: Vec<String> = (0..nargs).map(|i| format!("a{i}")).collect();
    let args: Vec<String> = vars.iter().map(|v| format!("{v}: &[u64]")).collect();
    let _ = writeln!(out, "{indent}/// Generated function `{name}`.");
    let _ = writeln!(out, "{indent}#[inline(never)]");
    let _ = writeln!(out, "{indent}pub fn {name}({}) -> u64 {{", args.join(", "));
    let _ = writeln!(out, "{indent}    let mut acc: u64 = {};", rng.below(1000));
    for s in 0..rng.range(2, 6) {
        match rng.below(4) {
            0 => {
                let _ = writeln!(
                    out,
                    "{indent}    for (i, x) in a0.iter().enumerate().skip({}) {{ acc = acc.wrapping_add(*x ^ i as u64); }}",
                    rng.below(4)
                );
            }
            1 => {
                let _ = writeln!(
                    out,
                    "{indent}    let v{s}: Vec<u64> = a0.iter().filter(|&&x| x % {} == 0).map(|x| x * 3).collect();",
                    rng.range(2, 9)
                );
                let _ = writeln!(
                    out,
                    "{indent}    acc ^= v{s}.iter().copied().fold(0, u64::wrapping_add);"
                );
            }
            2 => {
                let _ = writeln!(
                    out,
                    "{indent}    while acc > {} {{ acc /= {}; }}",
                    rng.range(1000, 100000),
                    rng.range(2, 5)
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "{indent}    acc = acc.wrapping_add({});",
                    expr(rng, 3, &vars)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{indent}    assert!(acc != u64::MAX, \"overflow in {{}}\", \"{name}\");"
    );
    let _ = writeln!(out, "{indent}    acc");
    let _ = writeln!(out, "{indent}}}");
}

/// A generated source of about `bytes` bytes.
fn source(rng: &mut Rng, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 4096);
    out.push_str("//! Generated.\n#![allow(dead_code)]\nuse std::collections::HashMap;\n\n");
    let mut m = 0;
    while out.len() < bytes {
        let _ = writeln!(out, "pub mod m{m} {{\n    use super::*;\n");
        for k in 0..rng.range(2, 5) {
            let fields: Vec<String> = (0..rng.range(2, 8))
                .map(|f| format!("        pub f{f}: {},", ty(rng)))
                .collect();
            let _ = writeln!(
                out,
                "    #[derive(Debug, Clone, Default)]\n    pub struct S{k}<T: Clone + Default> {{\n{}\n        pub extra: T,\n    }}\n",
                fields.join("\n")
            );
            let _ = writeln!(
                out,
                "    pub enum E{k} {{ A, B(u32, String), C {{ x: i64, y: Vec<u8> }}, D(Box<E{k}>) }}\n"
            );
            let _ = writeln!(
                out,
                "    impl<T: Clone + Default> S{k}<T> where T: std::fmt::Debug {{"
            );
            for f in 0..rng.range(1, 4) {
                function(rng, &mut out, &format!("method_{f}"), "        ");
            }
            let _ = writeln!(out, "    }}\n");
        }
        let _ = writeln!(
            out,
            "    pub trait T{m}: Sized {{ type Item; fn get(&self, i: usize) -> Option<&Self::Item>; fn size(&self) -> usize {{ 0 }} }}\n"
        );
        for f in 0..rng.range(3, 8) {
            function(rng, &mut out, &format!("f{f}"), "    ");
        }
        let _ = writeln!(
            out,
            "    macro_rules! mm{m} {{ ($x:expr) => {{ $x + 1 }}; }}\n    pub const C: u64 = {};\n    pub static NAMES: &[&str] = &[\"{}\", \"{}\"];\n}}\n",
            rng.below(1 << 30),
            rng.word(2),
            rng.word(3)
        );
        m += 1;
    }
    out
}

/// Parses, prints and parses again; the checksum covers the printed text.
pub fn run(p: &Params) -> Output {
    let mut rng = Rng::new(3);
    let src = source(&mut rng, p.n(3 << 20));
    let file = syn::parse_file(&src).expect("the generated source parses");
    let printed = prettyplease::unparse(&file);
    let again = syn::parse_file(&printed).expect("the printed source parses");
    assert_eq!(file.items.len(), again.items.len());
    let printed_again = prettyplease::unparse(&again);
    assert_eq!(printed, printed_again, "printing is stable");
    let checksum = hash_bytes(printed.as_bytes()) ^ file.items.len() as u64;
    Output::new(checksum, (src, file, printed, again, printed_again))
}
