//! What a registry answers, as ossb reads it: a manifest, an index or an image config from
//! arbitrary JSON, and the references they name. No panic; what is read is written back as
//! canonical JSON that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ossb_image::oci::{to_canonical_json, ImageConfig, Index, Manifest, MediaTypes};

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        for types in [MediaTypes::Oci, MediaTypes::Docker] {
            for layer in &manifest.layers {
                let _ = types.layer(layer);
            }
            let _ = manifest.with_media_types(types);
        }
        let again: Manifest = serde_json::from_slice(&to_canonical_json(&manifest)).unwrap();
        assert_eq!(again, manifest);
    }
    if let Ok(index) = serde_json::from_slice::<Index>(data) {
        let platforms = index.platforms();
        for d in &index.manifests {
            if let Some(p) = &d.platform {
                assert!(index.find(&p.platform()).is_some(), "{platforms:?}");
            }
        }
        let again: Index = serde_json::from_slice(&to_canonical_json(&index)).unwrap();
        assert_eq!(again, index);
    }
    if let Ok(config) = serde_json::from_slice::<ImageConfig>(data) {
        let _ = config.platform().to_string();
        let _ = config.config.env_pairs();
        let _ = to_canonical_json(&config);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(reference) = ossb_image::registry::parse_reference(text) {
            let _ = reference.to_string();
        }
    }
});
