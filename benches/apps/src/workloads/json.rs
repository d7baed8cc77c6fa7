//! serde_json: a large `Value` document (nested maps, arrays, strings) built by hand,
//! serialised and parsed back, then a typed serde round trip of the same records.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rng::{Rng, hash_bytes};
use crate::{Output, Params};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Address {
    street: String,
    city: String,
    zip: String,
    geo: (f64, f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Event {
    kind: String,
    at: u64,
    note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    email: String,
    active: bool,
    tags: Vec<String>,
    scores: Vec<f64>,
    address: Address,
    history: Vec<Event>,
}

fn record(rng: &mut Rng, id: u64) -> Record {
    let first = rng.word(2);
    let last = rng.word(3);
    let tags = (0..rng.range(0, 6)).map(|_| rng.word(2)).collect();
    // Dyadic fractions: printed and parsed back exactly.
    let scores = (0..rng.range(1, 8))
        .map(|_| rng.below(1 << 20) as f64 / 64.0)
        .collect();
    let history = (0..rng.range(0, 5))
        .map(|_| Event {
            kind: ["create", "update", "login", "purchase", "refund"][rng.below(5)].to_string(),
            at: 1_600_000_000 + rng.below(100_000_000) as u64,
            note: rng
                .chance(0.4)
                .then(|| format!("{} {} {}", rng.word(2), rng.word(1), rng.word(3))),
        })
        .collect();
    Record {
        id,
        email: format!("{first}.{last}@{}.com", rng.word(2)),
        name: format!("{first} {last}"),
        active: rng.chance(0.7),
        tags,
        scores,
        address: Address {
            street: format!("{} {} street", rng.below(2000), rng.word(3)),
            city: rng.word(3),
            zip: format!("{:05}", rng.below(100_000)),
            geo: (
                rng.below(1 << 24) as f64 / 1024.0 - 8192.0,
                rng.below(1 << 24) as f64 / 1024.0 - 8192.0,
            ),
        },
        history,
    }
}

/// The record as a `Value`, built map by map (not through `serde_json::to_value`).
fn to_value(r: &Record) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), r.id.into());
    m.insert("name".into(), r.name.clone().into());
    m.insert("email".into(), r.email.clone().into());
    m.insert("active".into(), r.active.into());
    m.insert(
        "tags".into(),
        Value::Array(r.tags.iter().map(|t| Value::String(t.clone())).collect()),
    );
    m.insert(
        "scores".into(),
        Value::Array(r.scores.iter().map(|&s| s.into()).collect()),
    );
    let mut a = Map::new();
    a.insert("street".into(), r.address.street.clone().into());
    a.insert("city".into(), r.address.city.clone().into());
    a.insert("zip".into(), r.address.zip.clone().into());
    a.insert(
        "geo".into(),
        Value::Array(vec![r.address.geo.0.into(), r.address.geo.1.into()]),
    );
    m.insert("address".into(), Value::Object(a));
    let history = r
        .history
        .iter()
        .map(|e| {
            let mut o = Map::new();
            o.insert("kind".into(), e.kind.clone().into());
            o.insert("at".into(), e.at.into());
            o.insert(
                "note".into(),
                e.note.clone().map_or(Value::Null, Value::String),
            );
            Value::Object(o)
        })
        .collect();
    m.insert("history".into(), Value::Array(history));
    Value::Object(m)
}

/// Builds, serialises and parses; returns the checksum of both JSON texts.
pub fn run(p: &Params) -> Output {
    let n = p.n(70_000);
    let mut rng = Rng::new(1);
    let records: Vec<Record> = (0..n as u64).map(|id| record(&mut rng, id)).collect();

    // The untyped document: an object of shards, each an array of records.
    let mut doc = Map::new();
    for (i, chunk) in records.chunks(1000).enumerate() {
        doc.insert(
            format!("shard-{i:05}"),
            Value::Array(chunk.iter().map(to_value).collect()),
        );
    }
    let mut meta = Map::new();
    meta.insert("records".into(), n.into());
    meta.insert("generator".into(), "pagepool-apps".into());
    doc.insert("meta".into(), Value::Object(meta));
    let doc = Value::Object(doc);
    let text = serde_json::to_string(&doc).expect("serialise the document");
    let parsed: Value = serde_json::from_str(&text).expect("parse the document");
    assert!(parsed == doc, "the document survives a round trip");

    // The typed round trip, compact and pretty.
    let typed = serde_json::to_string(&records).expect("serialise the records");
    let back: Vec<Record> = serde_json::from_str(&typed).expect("parse the records");
    assert!(back == records, "the records survive a round trip");
    let pretty = serde_json::to_vec_pretty(&back[..n / 4]).expect("pretty-print");
    let again: Vec<Record> = serde_json::from_slice(&pretty).expect("parse the pretty text");
    assert!(again[..] == records[..n / 4]);

    let checksum = hash_bytes(text.as_bytes())
        ^ hash_bytes(typed.as_bytes()).rotate_left(1)
        ^ hash_bytes(&pretty).rotate_left(2);
    Output::new(
        checksum,
        (records, doc, text, parsed, typed, back, pretty, again),
    )
}
