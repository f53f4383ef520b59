//! A Docker `config.json` (or a mounted `.dockerconfigjson`) as ossb reads credentials from
//! it. No panic; a file that names no credential helper is looked up for a few registries
//! (a helper would be run, which is not what this target is for).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ossb_image::registry::CredentialFiles;

fuzz_target!(|data: &[u8]| {
    let Ok(files) = CredentialFiles::parse(data, Path::new("config.json")) else {
        return;
    };
    let names_a_helper = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .is_some_and(|o| o.contains_key("credHelpers") || o.contains_key("credsStore"));
    if names_a_helper {
        return;
    }
    for registry in [
        "docker.io",
        "index.docker.io",
        "localhost:5000",
        "ghcr.io",
        "",
    ] {
        let _ = files.lookup(registry);
    }
});
