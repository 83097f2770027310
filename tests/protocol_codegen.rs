//! `src/frame/centrifugo/proto.rs` is generated from `proto/centrifugo.proto` and committed, so that building
//! Herald needs neither protoc nor a code generator. This test regenerates it and fails if the committed
//! file differs: the .proto is the source of truth.
//!
//! To regenerate after changing the .proto: `HERALD_REGENERATE=1 cargo test --test protocol_codegen`.

use std::path::Path;

/// `bytes` fields are raw JSON in the JSON protocol.
const JSON_BYTES_FIELDS: &[&str] = &["data", "conn_info", "chan_info"];

fn generate(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/centrifugo.proto")], [root.join("proto")])
        .expect("proto/centrifugo.proto compiles");
    let mut c = prost_build::Config::new();
    c.out_dir(out)
        .bytes(["."])
        .btree_map(["."])
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute(".", "#[serde(default)]")
        .field_attribute(
            ".",
            "#[serde(skip_serializing_if = \"crate::frame::centrifugo::codec::is_default\")]",
        );
    for f in JSON_BYTES_FIELDS {
        c.field_attribute(
            *f,
            "#[serde(with = \"crate::frame::centrifugo::codec::raw_json\")]",
        );
    }
    c.compile_fds(fds).expect("code generation");
}

#[test]
fn generated_protocol_code_matches_the_proto() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let fresh = std::fs::read_to_string(tmp.path().join("centrifugal.centrifuge.protocol.rs"))
        .expect("generated file");
    let committed_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/frame/centrifugo/proto.rs");
    if std::env::var_os("HERALD_REGENERATE").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "src/frame/centrifugo/proto.rs is out of date with proto/centrifugo.proto: run \
         `HERALD_REGENERATE=1 cargo test --test protocol_codegen` and commit the result"
    );
}
